"""Builds on the agent: MetaSchedule candidates compiled by the machine that will run them.

Registers in the agent's RPC server:
  ``tunefarm.builder.build(mod_file, target_json, out_name)``: one candidate;
  ``tunefarm.builder.build_many(names_json, target_json)``: several at once, one process per core of
      this agent (a server holds one session at a time, so parallelism has to live inside it);
  ``tunefarm.builder.build_many_timed(names_json, target_json, options_json)``: the same, each candidate's
      build process (and what it started) killed once it has run ``timeout_s`` (the job's
      ``builder.timeout_sec``), or cut as a straggler among the call's candidates (``straggler_factor``, the
      host builder's rule: tunefarm.core.building.straggler_cut), its error then "timeout ...": a compile that
      hangs costs its own candidate, not the batch;
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


BUILD_WORKERS_ENV = "TUNEFARM_AGENT_BUILD_WORKERS"  # an agent's share of the CPUs (set by tunefarm agent --gpus)


def _parallelism() -> int:
    """The CPUs this agent may use, or its share of them where several agents share the machine (``--gpus``)."""
    import os  # pylint: disable=import-outside-toplevel

    from tunefarm.core.threads import usable_cpus  # pylint: disable=import-outside-toplevel

    try:
        share = int(os.environ.get(BUILD_WORKERS_ENV, "0"))
    except ValueError:
        share = 0
    return min(usable_cpus(), share) if share > 0 else usable_cpus()


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


MAX_NAMES = 4096  # candidates in one call
MAX_ERROR_CHARS = 4000  # of one candidate's error


def _jobs(names_json: str, target_json: str) -> list[tuple[str, str, str]]:
    """The call's candidates as (module file, target JSON, artifact file), its names checked: the host's word,
    but a name becomes a path in the session's work dir."""
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    names = json.loads(names_json)
    if not (isinstance(names, list) and len(names) <= MAX_NAMES
            and all(isinstance(n, str) and 0 < len(n) <= 200 and n.replace("-", "").replace("_", "").isalnum()
                    for n in names)):
        raise ValueError("names must be a JSON list of at most 4096 plain names (letters, digits, - and _)")
    workpath = tvm_ffi.get_global_func("tvm.rpc.server.workpath")
    return [(workpath(n + ".json"), target_json, workpath(n + ".tar")) for n in names]


def _build_many(names_json: str, target_json: str) -> str:
    """Build ``NAME.json`` -> ``NAME.tar`` for every name; returns a JSON list of errors ("" = built)."""
    return json.dumps(run_builds(_jobs(names_json, target_json), _parallelism(), 0.0))


def _build_many_timed(names_json: str, target_json: str, options_json: str) -> str:
    """:func:`_build_many` with the host's limits: ``{"timeout_s": S, "straggler_factor": F}`` (0: none)."""
    try:
        options = json.loads(options_json)
        timeout_s, factor = float(options.get("timeout_s", 0)), float(options.get("straggler_factor", 0))
    except (ValueError, TypeError, AttributeError):
        raise ValueError("options must be a JSON object of numbers: timeout_s, straggler_factor") from None
    if not (0 <= timeout_s <= 86400 and 0 <= factor <= 1000):
        raise ValueError("timeout_s must be 0-86400 seconds and straggler_factor 0-1000")
    return json.dumps(run_builds(_jobs(names_json, target_json), _parallelism(), timeout_s, factor))


def run_builds(jobs: list, width: int, timeout_s: float, straggler_factor: float = 0.0, fn=None,
               min_s: float | None = None) -> list[str]:
    """``fn(job)`` (default :func:`_build_in_child`: "" when built, else its error) for every job, ``width`` at a
    time, each in a forked process of its own (the session process has TVM loaded, so a child starts building at
    once). A child still running ``timeout_s`` after it started (0: no limit) is killed with what it started, and
    its job answered "timeout, killed after N s on the agent"; so is one still building when the straggler rule
    (:func:`~tunefarm.core.building.straggler_cut` over these jobs, ``straggler_factor``, at least ``min_s``)
    says cut, once it has itself run that long. One that dies without an answer is answered with its exit code.
    Answers in the jobs' order."""
    # pylint: disable=import-outside-toplevel
    import multiprocessing
    import multiprocessing.connection
    import time

    from tunefarm.core.building import STRAGGLER_MIN_S, straggler_cut

    fn = fn or _build_in_child
    ctx = multiprocessing.get_context("fork")
    began, finished = time.monotonic(), []
    cut_at = straggler_cut(finished, len(jobs), straggler_factor, STRAGGLER_MIN_S if min_s is None else min_s)
    answers: list[str | None] = [None] * len(jobs)
    waiting = list(range(len(jobs)))
    running: dict[int, tuple] = {}  # job -> (process, its answer's pipe, started)
    try:
        while waiting or running:
            while waiting and len(running) < max(1, width):
                n = waiting.pop(0)
                read, write = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_child, args=(fn, jobs[n], write), daemon=True)
                proc.start()
                write.close()
                running[n] = (proc, read, time.monotonic())
            multiprocessing.connection.wait([r for _, r, _ in running.values()], timeout=0.2)
            now = time.monotonic()
            limit = cut_at()
            for n, (proc, read, started) in list(running.items()):
                answer = None
                try:
                    if read.poll():
                        answer = str(read.recv())[:MAX_ERROR_CHARS]
                except (EOFError, OSError):  # it died without answering
                    proc.join(5)
                    answer = f"the build process ended without an answer (exit code {proc.exitcode})"
                if answer is None and timeout_s > 0 and now - started > timeout_s:
                    _kill(proc)
                    answer = f"timeout, killed after {timeout_s:g} s on the agent"
                elif answer is None and limit is not None and now - began >= limit and now - started >= limit:
                    _kill(proc)
                    answer = (f"timeout (straggler), killed on the agent {now - began:.1f} s into its call: still "
                              f"building at {straggler_factor:g}x the time most of the call's candidates took")
                if answer is not None:
                    proc.join(5)
                    read.close()
                    answers[n] = answer
                    finished.append(now - began)
                    del running[n]
    finally:
        for proc, read, _ in running.values():  # the call itself failed (interrupted): nothing left behind
            _kill(proc)
            read.close()
    return [a if a is not None else "not built" for a in answers]


def _child(fn, job, write) -> None:
    try:
        answer = fn(job)
    except BaseException as err:  # pylint: disable=broad-except  # said to the parent, which answers the host
        answer = f"{type(err).__name__}: {err}"
    write.send(str(answer or ""))
    write.close()


def _kill(proc) -> None:
    """Kill a build process and what it started (a compiler, a linker), as the host's build pool does."""
    from tvm.support.popen_pool import kill_child_processes  # pylint: disable=import-outside-toplevel

    try:
        kill_child_processes(proc.pid)
    except Exception:  # pylint: disable=broad-except  # psutil missing, or they are gone
        pass
    proc.kill()
    proc.join(5)


def register() -> None:
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    from tunefarm.core.wire import (  # pylint: disable=import-outside-toplevel
        BUILDER_BUILD_FUNC, BUILDER_BUILD_MANY_FUNC, BUILDER_BUILD_TIMED_FUNC, BUILDER_PARALLELISM_FUNC)

    tvm_ffi.register_global_func(BUILDER_BUILD_FUNC, _build, override=True)
    tvm_ffi.register_global_func(BUILDER_BUILD_MANY_FUNC, _build_many, override=True)
    tvm_ffi.register_global_func(BUILDER_BUILD_TIMED_FUNC, _build_many_timed, override=True)
    tvm_ffi.register_global_func(BUILDER_PARALLELISM_FUNC, _parallelism, override=True)
