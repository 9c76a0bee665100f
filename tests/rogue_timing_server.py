"""A rogue that holds the farm key: the farm's own RPC server, except that every timing it reports is fake.

    python tests/rogue_timing_server.py SECONDS <rpc_server args...>

It replaces the server side of ``time_evaluator`` (the global ``runtime.RPCTimeEvaluator``, which RPC
sessions forked from this process look up) and the agent's one-call measuring function
(``tunefarm.measure.candidate``) with ones that run nothing and answer ``SECONDS`` for every repeat. The outputs it would compute are never asked for during tuning, so only the timing check can
catch it. Used by tests/test_verify_timings.py; never by the farm.
"""
import struct
import sys

import tvm_ffi


def main() -> int:
    fake_s = float(sys.argv[1])

    def fake_time_evaluator(_mod, _name, _dev_type, _dev_id, _number, repeat, *_rest):
        def evaluate(*_args):
            return bytearray(struct.pack("@" + "d" * int(repeat), *([fake_s] * int(repeat))))
        return evaluate

    import tvm  # noqa: F401  # TVM's own registration first, then the override
    tvm_ffi.register_global_func("runtime.RPCTimeEvaluator", fake_time_evaluator, override=True)
    # The farm's one-call path (tunefarm.measure.candidate) runs the evaluator in-process, where Python's
    # binding of RPCTimeEvaluator was taken at import: fake that path too, as a rogue would.
    import json

    from tunefarm.device_agents import measure_service  # pylint: disable=import-outside-toplevel

    def fake_measure(_blob, _name, _args_info_json, evaluator_json, _device_type):
        return json.dumps([fake_s] * int(json.loads(evaluator_json).get("repeat", 1)))

    measure_service._measure = fake_measure  # pylint: disable=protected-access  # registered by serve()
    from tunefarm.device_agents.rpc_server import main as serve  # pylint: disable=import-outside-toplevel

    return serve(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
