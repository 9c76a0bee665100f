"""Builds on the agent: MetaSchedule candidates compiled by the machine that will run them.

Registers ``tunefarm.builder.build(mod_file, target_json, out_name)`` in the agent's RPC server.
The host uploads the candidate (``tvm.ir.save_json`` text) into the session's work dir, calls the
function, and downloads the ``.tar`` it returns; the host's own compiler stays free, so adding
build-capable agents adds build throughput (the host's builder bounds a farm otherwise).
"""
from __future__ import annotations

import json


def _build(mod_file: str, target_json: str, out_name: str) -> str:
    # pylint: disable=import-outside-toplevel
    import tvm
    import tvm_ffi

    from tunefarm.core.building import build_candidate

    workpath = tvm_ffi.get_global_func("tvm.rpc.server.workpath")
    with open(workpath(mod_file), encoding="utf-8") as fh:
        mod = tvm.ir.load_json(fh.read())
    target = tvm.target.Target(json.loads(target_json))
    build_candidate(mod, target, workpath(out_name))
    return out_name


def register() -> None:
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    tvm_ffi.register_global_func("tunefarm.builder.build", _build, override=True)
