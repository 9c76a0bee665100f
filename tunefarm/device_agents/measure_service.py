"""A candidate measured in one RPC round trip: ``tunefarm.measure.candidate`` in the agent's RPC server.

Stock ``RPCRunner`` measures a candidate with a dozen round trips between host and device (upload, load,
one allocation and one random fill per argument, getting and calling the time evaluator, two removals):
at 50 ms of network round trip that is over half a second per candidate, against ~60 ms of device time for
a typical ResNet-18 candidate. Here the host sends the artifact's bytes with the arguments' shapes and the
evaluator settings in one call; the agent writes the file into its session's work dir, loads it, allocates
and fills the arguments and times it with **stock MetaSchedule's own local functions**
(``local_runner.default_alloc_argument`` / ``default_run_evaluator``: the same ``time_evaluator`` the RPC path
calls remotely), removes the file and answers the run seconds. The host falls back to the stock RPC path for
a server without this function (a stock ``tvm.rpc`` server on an open key).
"""
from __future__ import annotations

import json
import os

MAX_ARTIFACT_BYTES = 1 << 30


def _measure(blob, name: str, args_info_json: str, evaluator_json: str, device_type: str) -> str:
    # pylint: disable=import-outside-toplevel
    import tvm
    import tvm_ffi
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig
    from tvm.s_tir.meta_schedule.runner import local_runner as stock

    data = bytes(blob)
    if len(data) > MAX_ARTIFACT_BYTES:
        raise ValueError(f"artifact of {len(data)} bytes is over the {MAX_ARTIFACT_BYTES} limit")
    base = os.path.basename(str(name))
    if not base or base != str(name) or not base.endswith((".tar", ".so")):
        raise ValueError(f"artifact name {str(name)[:80]!r} must be a plain .tar or .so file name")
    path = tvm_ffi.get_global_func("tvm.rpc.server.workpath")(base)
    try:
        with open(path, "wb") as fh:
            fh.write(data)
        rt_mod = tvm.runtime.load_module(path)
        device = tvm.device(str(device_type), 0)
        args_info = json.loads(args_info_json)
        config = EvaluatorConfig(**json.loads(evaluator_json))
        args = stock.default_alloc_argument(device, args_info, 1)
        costs = stock.default_run_evaluator(rt_mod, device, config, args)
        return json.dumps([float(c) for c in costs])
    finally:
        for leftover in (path, path + ".so"):
            try:
                os.remove(leftover)
            except OSError:
                pass


def register() -> None:
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    from tunefarm.core.wire import MEASURE_FUNC  # pylint: disable=import-outside-toplevel

    tvm_ffi.register_global_func(MEASURE_FUNC, _measure, override=True)
