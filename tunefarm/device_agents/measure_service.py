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

Over a slow link one round trip per candidate is still one round trip too many (50 ms of RTT against ~60 ms of
device time): ``tunefarm.measure.batch`` takes several candidates in one call (their bytes concatenated, a JSON
header saying where each one ends) and measures them in turn, each as above. It stops at the first candidate
that fails (a GPU fault can leave the device unusable for the rest): the rest come back "not run", for the
host to measure on a fresh session. The host decides how many to send per call from the round trip it
measured (tunefarm/host/tuning/runner.py).
"""
from __future__ import annotations

import json
import os

from tunefarm.core.wire import MEASURE_NOT_RUN as NOT_RUN

MAX_ARTIFACT_BYTES = 1 << 30
MAX_BATCH = 64  # candidates in one tunefarm.measure.batch call
MAX_HEADER_BYTES = 1 << 20


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


def _measure_batch(blob, header_json: str, evaluator_json: str) -> str:
    """``blob``: the candidates' artifacts back to back; ``header_json``: ``[{"name", "size", "args_info",
    "device_type"}, ...]`` in that order. Answers ``[{"costs": [...]} | {"error": "..."}, ...]``, one per
    candidate. Everything about the header is checked before anything is written or loaded."""
    data = bytes(blob)
    header_text = str(header_json)
    if len(header_text) > MAX_HEADER_BYTES:
        raise ValueError(f"batch header of {len(header_text)} bytes is over the {MAX_HEADER_BYTES} limit")
    items = json.loads(header_text)
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH:
        raise ValueError(f"a batch is a list of 1 to {MAX_BATCH} candidates")
    sizes = []
    for item in items:
        if (not isinstance(item, dict) or not isinstance(item.get("size"), int) or item["size"] < 0
                or not isinstance(item.get("name"), str) or not isinstance(item.get("device_type"), str)
                or not isinstance(item.get("args_info"), list)):
            raise ValueError("each candidate of a batch needs name, size, args_info and device_type")
        sizes.append(item["size"])
    if sum(sizes) != len(data):
        raise ValueError(f"the batch's sizes add up to {sum(sizes)} bytes; {len(data)} were sent")
    out, offset, failed = [], 0, False
    for item, size in zip(items, sizes):
        chunk, offset = data[offset:offset + size], offset + size
        if failed:
            out.append({"error": NOT_RUN})
            continue
        try:
            costs = _measure(chunk, item["name"], json.dumps(item["args_info"]), evaluator_json, item["device_type"])
            out.append({"costs": json.loads(costs)})
        except Exception as err:  # pylint: disable=broad-except  # reported per candidate, as the one-call path does
            out.append({"error": f"{type(err).__name__}: {str(err).strip()[-2000:]}"})
            failed = True
    return json.dumps(out)


def register() -> None:
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    from tunefarm.core.wire import MEASURE_BATCH_FUNC, MEASURE_FUNC  # pylint: disable=import-outside-toplevel

    tvm_ffi.register_global_func(MEASURE_FUNC, lambda *a: _measure(*a), override=True)  # _measure looked up per call
    tvm_ffi.register_global_func(MEASURE_BATCH_FUNC, _measure_batch, override=True)
