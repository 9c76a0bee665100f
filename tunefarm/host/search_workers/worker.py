"""A search worker's side: the RPC functions of protocol.py, and a share's search in the session's process.

``tunefarm search-worker`` is a farm agent on its own key (default ``search``) whose RPC server also serves
this module (:func:`register`). A share is searched by the farm's one tuning loop
(:class:`tunefarm.host.tuning.loop.TuningLoop`): the job's search settings, the farm's builder on the
worker's own cores, the FarmRunner on the job's device key, the timing verifier.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
from typing import Any

from tunefarm.core.share import SearchShare
from tunefarm.host.search_workers.protocol import (FAILED_RUN_S, MAX_POLL_RECORDS, MAX_SHARE_BYTES, MAX_SHARE_TASKS,
                                                   POLL_FUNC, RELEASE_FUNC, SEED_RECORDS, START_FUNC, STOP_FUNC)

_session: dict[str, Any] = {}  # the share this session searches (a session is its own forked process)


def register() -> None:
    """Register the search functions (``tunefarm search-worker`` names this module to its RPC server), and load
    what every share's search imports — MetaSchedule, XGBoost (0.5 s on the 2-core development machine) and this
    machine's tensor intrinsics (intrinsics.py) — once,
    here in the server before it listens, so that the session processes it forks start with them loaded
    (stock, each session's ``TuneContext`` imported every architecture's intrinsics: 20-85 s per share)."""
    # pylint: disable=import-outside-toplevel
    import tvm
    import tvm_ffi
    import xgboost  # noqa: F401  # pylint: disable=unused-import  # the cost model's, imported at its first use
    from tvm.s_tir import meta_schedule  # noqa: F401  # pylint: disable=unused-import

    from tunefarm.host.tuning.intrinsics import load_for

    load_for(tvm.target.Target("llvm"))  # a share for another target adds its own (load_for in _tune)

    tvm_ffi.register_global_func(START_FUNC, _start, override=True)
    tvm_ffi.register_global_func(POLL_FUNC, _poll, override=True)
    tvm_ffi.register_global_func(STOP_FUNC, _stop, override=True)
    tvm_ffi.register_global_func(RELEASE_FUNC, _release, override=True)


def _start(share_json: str) -> str:
    if "share" in _session:
        raise RuntimeError("this session already searches a share")
    if not isinstance(share_json, str) or len(share_json) > MAX_SHARE_BYTES:
        raise ValueError("a share must be JSON text of at most 256 MiB")
    try:
        spec = json.loads(share_json)
    except ValueError:
        raise ValueError("a share that is not JSON") from None
    share = _Share(SearchShare.from_json(spec))
    _session["share"] = share
    share.thread.start()
    return "started"


def _poll(since: int) -> str:
    share = _session.get("share")
    if share is None:
        raise RuntimeError("no share started in this session")
    return json.dumps(share.snapshot(int(since)))


def _stop() -> str:
    share = _session.get("share")
    if share is not None:
        share.stop()
    return "stopping"


def _release(count: int) -> str:
    share = _session.get("share")
    if share is None:
        raise RuntimeError("no share started in this session")
    return json.dumps(share.release(max(0, min(int(count), MAX_SHARE_TASKS))))


class _Share:
    """One share of a job, searched in this process: stock ``ms.tune_tasks`` with the farm's parts."""

    def __init__(self, spec: SearchShare):
        self.spec = spec
        self.lock = threading.Lock()
        self.records: list[dict[str, Any]] = []
        self.done = False
        self.error = ""
        self.counter = None
        self.keys: list[str] = []  # the tasks' workload keys, in the share's order (the counter's)
        self.runner = None
        self.builder = None
        self.verifier = None
        self.stopped = False
        self.began = time.monotonic()  # the share's start (its _start call)
        self.setup_s: float | None = None  # from its start to its tuning loop's (the share's fixed cost)
        self.profile: dict[str, float] = {}  # MetaSchedule's profiler scopes of its tuning loop, once it ended
        self.thread = threading.Thread(target=self._run, name="tunefarm-search-share", daemon=True)

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            if self.counter is not None:
                self.counter.stop()

    def release(self, count: int) -> dict[str, Any]:
        """Give up at most ``count`` tasks not begun (:meth:`TrialCounter.release`): their positions in the
        share and the trials they take. Nothing before the search has its counter, or once it is done."""
        with self.lock:
            counter, keys, done = self.counter, list(self.keys), self.done
        if counter is None or done:
            return {"released": [], "trials": 0}
        gone = counter.release(keys, count)
        position = {k: n for n, k in enumerate(keys)}
        return {"released": [position[k] for k, _ in gone], "trials": sum(t for _, t in gone)}

    def snapshot(self, since: int) -> dict[str, Any]:
        with self.lock:  # (the counter's own lock is never held while this one is taken: no lock-order cycle)
            unstarted = len(self.counter.unstarted(self.keys)) if self.counter is not None and not self.done else 0
            since = max(0, min(since, len(self.records)))
            part = self.records[since:since + MAX_POLL_RECORDS]
            done = self.done and since + len(part) == len(self.records)
            builder = self.builder
            counts = self.runner.stats.snapshot() if self.runner is not None else {}
            return {"records": part, "next": since + len(part), "done": done, "error": self.error,
                    "unstarted": unstarted,
                    "per_agent": counts.get("per_agent", {}), "failures": counts.get("failures", {}),
                    "build_failures": dict(builder.build_failures) if builder is not None else {},
                    "requeued": counts.get("requeued", 0), "unreachable": counts.get("unreachable", {}),
                    "verification": self.verifier.summary() if self.verifier is not None else {},
                    "setup_s": self.setup_s, "profile": dict(self.profile) if self.done else {}}

    def _add(self, task: int, record: Any, error: str) -> None:
        with self.lock:
            self.records.append({"task": task, "record": record, "error": error[:2000]})

    def _run(self) -> None:
        try:
            self._tune()
        except Exception as err:  # pylint: disable=broad-except  # said to the host, which decides
            with self.lock:
                self.error = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        finally:
            with self.lock:
                self.done = True

    def _tune(self) -> None:
        # pylint: disable=import-outside-toplevel
        import tempfile
        from pathlib import Path

        import tvm
        import tvm_ffi
        from rich.console import Console
        from tvm.s_tir import meta_schedule as ms

        from tunefarm.core.threads import usable_cores
        from tunefarm.core.wire import parse_hostport
        from tunefarm.host.console import ConsoleEvents
        from tunefarm.host.tuning.budget import TrialCounter
        from tunefarm.host.tuning.builder import BUILD_TIMEOUTS_DIR
        from tunefarm.host.tuning.intrinsics import load_for
        from tunefarm.host.tuning.loop import TuningLoop
        from tunefarm.host.tuning.measured_cache import MeasuredCache
        from tunefarm.host.tuning.pipeline import Pipeline
        from tunefarm.host.tuning.search import quiet_pool_rule

        spec = self.spec
        target = tvm.target.Target(spec.target)
        load_for(target)  # before the task modules are read (TuningLoop asks again: loaded once)
        quiet_pool_rule(target)
        work = tempfile.mkdtemp(prefix="tunefarm-search-")
        database = ms.database.JSONDatabase(work_dir=work)
        mods, keys = [], []
        for task in spec.tasks:
            mod = tvm.ir.load_json(task.mod)
            workload = database.commit_workload(mod)
            for rec in task.records[:SEED_RECORDS]:
                database.commit_tuning_record(ms.database.TuningRecord.from_json(rec, workload))
            mods.append(mod)
            keys.append(str(tvm_ffi.structural_hash(mod)))
        cache = MeasuredCache()
        cached = cache.load_database(database)
        with self.lock:
            self.counter = TrialCounter.of(spec.trials, {k: t.left for k, t in zip(keys, spec.tasks)})
            self.keys = keys
            if self.stopped:
                self.counter.stop()
        extracted = [ms.ExtractedTask(task_name=t.name, mod=mod, target=target, dispatched=[mod],
                                      weight=max(1, int(t.weight))) for t, mod in zip(spec.tasks, mods)]
        # The worker's own cores build (or the job's build agents): never more processes than it has cores.
        build = dataclasses.replace(spec.builder, workers=min(spec.builder.workers or usable_cores(), usable_cores()))
        loop = TuningLoop(extracted, target, work_dir=work, counter=self.counter, cache=cache,
                          tracker=parse_hostport(spec.tracker), device_key=spec.device_key, builder=build,
                          runner=spec.runner, population_size=spec.population_size, seed=spec.seed,
                          space=Pipeline.from_json(spec.pipeline).space(target),
                          keep_dir=Path(work) / BUILD_TIMEOUTS_DIR, verified_log=Path(work) / "verified.jsonl",
                          events=ConsoleEvents(Console(stderr=True, highlight=False)))  # a flagged agent, in its log
        with self.lock:
            self.runner, self.builder, self.verifier = loop.runner, loop.builder, loop.verifier
            self.setup_s = time.monotonic() - self.began
        per_task_cap = max(t.left for t in spec.tasks)
        try:
            loop.run(database, cost_model=spec.cost_model, max_trials_global=spec.trials + cached,
                     max_trials_per_task=per_task_cap + cached, num_trials_per_iter=spec.num_trials_per_iter,
                     on_measured=_collector(self, loop.committed))
        finally:
            with self.lock:
                self.profile = dict(loop.profile)
            for note in loop.space_lines():  # the worker's log: a task whose tensor-core space needed redraws
                print(f"tunefarm search worker: design space: {note}", file=sys.stderr, flush=True)
            for path in loop.builder.kept:  # the worker's log: where to find a candidate that held its batch
                print(f"tunefarm search worker: a candidate's build timed out; kept at {path}", file=sys.stderr,
                      flush=True)


def _collector(share: _Share, committed: list):
    """The measure callback that keeps each committed record (the verifier's decision) for the host's polls."""
    # pylint: disable=import-outside-toplevel
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    from tunefarm.host.tuning.measured_cache import MeasuredCache

    @derived_object
    class Collect(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            import tvm  # pylint: disable=import-outside-toplevel

            ctx = task_scheduler.tasks_[task_id].ctx
            workload = task_scheduler.database_.commit_workload(ctx.mod)
            decided = iter(list(committed))
            for cand, built, res in zip(measure_candidates, builder_results, runner_results):
                if MeasuredCache.is_placeholder(built.artifact_path):
                    continue  # a cache hit: already in the host's database
                secs = next(decided, None)
                run_secs = [tvm.tirx.FloatImm("float32", s) for s in (secs or [FAILED_RUN_S])]
                record = ms.database.TuningRecord(cand.sch.trace, workload, run_secs, ctx.target, cand.args_info)
                error = "" if secs is not None else str(built.error_msg or res.error_msg or "rejected by the timing check")
                share._add(int(task_id), record.as_json(), error.strip())  # pylint: disable=protected-access

    return Collect()
