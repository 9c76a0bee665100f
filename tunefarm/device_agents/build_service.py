"""Builds on the agent: MetaSchedule candidates compiled by the machine that will run them.

Registers in the agent's RPC server:
  ``tunefarm.builder.build(mod_file, target_json, out_name)``: one candidate;
  ``tunefarm.builder.build_many(names_json, target_json)``: several at once, one process per core of
      this agent (a server holds one session at a time, so parallelism has to live inside it);
  ``tunefarm.builder.parallelism()``: how many candidates ``build_many`` builds at once.
The host uploads candidates (``tvm.ir.save_json`` text) into the session's work dir, calls the
function, and downloads the ``.tar`` files; the host's own compiler stays free, so adding
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


def _parallelism() -> int:
    from tunefarm.core.threads import usable_cpus  # pylint: disable=import-outside-toplevel

    return usable_cpus()


def _build_in_child(args):
    mod_path, target_json, out_path = args
    try:
        # pylint: disable=import-outside-toplevel
        import tvm

        from tunefarm.core.building import build_candidate

        with open(mod_path, encoding="utf-8") as fh:
            mod = tvm.ir.load_json(fh.read())
        build_candidate(mod, tvm.target.Target(json.loads(target_json)), out_path)
        return ""
    except Exception as err:  # pylint: disable=broad-except
        return f"{type(err).__name__}: {err}"


def _build_many(names_json: str, target_json: str) -> str:
    """Build ``NAME.json`` -> ``NAME.tar`` for every name; returns a JSON list of errors ("" = built)."""
    # pylint: disable=import-outside-toplevel
    import multiprocessing

    import tvm_ffi

    workpath = tvm_ffi.get_global_func("tvm.rpc.server.workpath")
    names = json.loads(names_json)
    jobs = [(workpath(n + ".json"), target_json, workpath(n + ".tar")) for n in names]
    if len(jobs) == 1:
        return json.dumps([_build_in_child(jobs[0])])
    # fork: the session process already has TVM loaded, so children start building at once
    with multiprocessing.get_context("fork").Pool(min(_parallelism(), len(jobs))) as pool:
        return json.dumps(pool.map(_build_in_child, jobs, chunksize=1))


def register() -> None:
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    from tunefarm.core.wire import (  # pylint: disable=import-outside-toplevel
        BUILDER_BUILD_FUNC, BUILDER_BUILD_MANY_FUNC, BUILDER_PARALLELISM_FUNC)

    tvm_ffi.register_global_func(BUILDER_BUILD_FUNC, _build, override=True)
    tvm_ffi.register_global_func(BUILDER_BUILD_MANY_FUNC, _build_many, override=True)
    tvm_ffi.register_global_func(BUILDER_PARALLELISM_FUNC, _parallelism, override=True)
