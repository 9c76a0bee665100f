"""The search spread over machines: a job's tasks dealt to search workers, their records merged into its database.

MetaSchedule's task scheduler searches serially in one process, and on a farm with many build and measure
agents that search bounds the whole run (issue 16: 4 build agents made runs only 1.28x faster). With
``search: {workers: N}`` a job deals its tasks to N **search workers** (``tunefarm search-worker``: a farm
agent on its own key, default ``search``, whose RPC server also serves this module's functions). Each worker
runs stock ``ms.tune_tasks`` for its share (the job's search settings, the farm's builder on its own cores,
the :class:`~tunefarm.host.tuning.runner.FarmRunner` on the job's device key, the timing verifier), and the
host merges what each one measured into the job's one database as it comes, so the job's budget, progress,
resume and report stay one job's. Workers are reached the way agents are: an RPC session from the tracker
(the farm key at registration), one session per share for as long as the share runs.

The RPC functions (in the worker's session process, which ends with the session, its search with it):

* ``tunefarm.search.start(share_json)``: the share (tasks as ``tvm.ir.save_json`` text, each with its trials
  left and the job's best records so far, the target, the job's search/builder/runner settings, the tracker
  and device key, the seed); starts the search in a thread;
* ``tunefarm.search.poll(since)``: JSON ``{records, next, done, error, trials, per_agent, ...}``, the records
  measured from ``since`` on (at most :data:`MAX_POLL_RECORDS` per call);
* ``tunefarm.search.stop()``: no new candidates (the job's deadline or stop hook);
* ``tunefarm.search.release(count)``: JSON ``{released, trials}``: the share gives up at most ``count`` of its
  tasks whose search has not begun (the last ones in its order) and the trials they take with them (their even
  part of the share's trials left): the host hands them to a search worker whose own share has ended (work
  stealing, :func:`run_spread`), so that one slow share — a batch held by a slow build, a slower machine — does
  not hold the run while other workers idle.

A worker's reply is the network's word: the host bounds its size, takes only records of the tasks it sent
(the workload is the host's own module, never the worker's), replays every trace on the task's module before
committing it, keeps run times finite and positive, and counts no more records than the share's trials.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import sys
import threading
import time
from typing import Any

START_FUNC = "tunefarm.search.start"
POLL_FUNC = "tunefarm.search.poll"
STOP_FUNC = "tunefarm.search.stop"
RELEASE_FUNC = "tunefarm.search.release"
MAX_SHARE_BYTES = 256 << 20  # a share: its tasks' modules and best records
MAX_REPLY_BYTES = 64 << 20  # one poll's answer
MAX_POLL_RECORDS = 256
# the runner's and the builder's words for a failed candidate (runner.FAILURE_KINDS, and the builder's "no agent")
FAILURE_KINDS = ("timeout", "error", "no agent", "not measured", "session lost")
MAX_RUN_SECS = 1024  # samples in one record
MAX_PROFILE_SCOPES = 64  # MetaSchedule profiler scopes a share reports (about 20 in a CPU tuning loop)
FAILED_RUN_S = 1e10  # what MetaSchedule commits for a failed candidate
SEED_RECORDS = 32  # the job's best records per task handed to a share (its search starts from them)
POLL_INTERVAL_S = 1.0
SHARE_ATTEMPTS = 3  # sessions a share may use (a worker lost: the next one goes on from the records so far)
STEAL_WAIT_S = 30.0  # how long a free worker's thread waits for a busy share to answer its request for tasks

_session: dict[str, Any] = {}  # the share this session searches (a session is its own forked process)


# ---------------------------------------------------------------------------------------------- worker side

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
    share = _Share(check_share(spec))
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


SHARE_FIELDS = {"tasks", "trials", "target", "pipeline", "tuning", "seed", "cost_model", "builder", "runner",
                "tracker", "device_key"}
MAX_SHARE_TASKS = 4096
SHARE_COST_MODELS = ("xgb", "random")


def _int_in(value: Any, low: int, high: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"a share's {what} must be an integer in [{low}, {high}]")
    return value


def _text(value: Any, what: str, limit: int = 1024) -> str:
    if not isinstance(value, str) or not value or len(value) > limit or not value.isprintable():
        raise ValueError(f"a share's {what} must be printable text of 1-{limit} characters")
    return value


def check_share(spec: Any) -> dict[str, Any]:
    """A share as the worker takes it (ValueError, one line, otherwise): the session's caller is whoever got
    a session on the worker's key, so every field is typed and bounded before anything runs — the job
    file's own ranges for the search, builder and runner settings (core.jobspec), at most
    :data:`MAX_SHARE_TASKS` tasks of at most :data:`SEED_RECORDS` seed records, a tracker address, a key.
    What TVM parses (the tasks' modules, the target, the records) is parsed in the share's thread, and its
    error is the share's ``error``."""
    # pylint: disable=import-outside-toplevel
    from tunefarm.core.errors import TunefarmError
    from tunefarm.core.jobspec import BuilderSpec, RunnerSpec, TuningSpec, section
    from tunefarm.core.wire import parse_hostport

    if not isinstance(spec, dict) or set(spec) != SHARE_FIELDS:
        raise ValueError(f"a share must be a JSON object of exactly the fields {', '.join(sorted(SHARE_FIELDS))}")
    tasks = spec["tasks"]
    if not isinstance(tasks, list) or not 1 <= len(tasks) <= MAX_SHARE_TASKS:
        raise ValueError(f"a share needs a list of 1-{MAX_SHARE_TASKS} tasks")
    for task in tasks:
        if not isinstance(task, dict) or set(task) != {"name", "mod", "weight", "left", "records"}:
            raise ValueError("a share's task must be an object of name, mod, weight, left and records")
        _text(task["name"], "task name", 200)
        if not isinstance(task["mod"], str) or not task["mod"]:
            raise ValueError("a share's task module must be TVM's JSON text")
        weight = task["weight"]  # MetaSchedule's task weights are floats (1.0, 2.0, ...)
        if (not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight)
                or not 1 <= weight <= 10 ** 9):
            raise ValueError("a share's task weight must be a number in [1, 1000000000]")
        _int_in(task["left"], 0, 10_000_000, "trials left of a task")
        recs = task["records"]
        if not isinstance(recs, list) or len(recs) > SEED_RECORDS:
            raise ValueError(f"a share's task carries at most {SEED_RECORDS} seed records")
    _int_in(spec["trials"], 0, 10_000_000, "trials")
    if not isinstance(spec["target"], dict):
        raise ValueError("a share's target must be a JSON object")
    if spec["pipeline"] is not None and not isinstance(spec["pipeline"], dict):
        raise ValueError("a share's pipeline must be a JSON object")
    if spec["cost_model"] not in SHARE_COST_MODELS:
        raise ValueError(f"a share's cost model must be one of {', '.join(SHARE_COST_MODELS)}")
    tuning = spec["tuning"]
    if not isinstance(tuning, dict) or set(tuning) != {"population_size", "num_trials_per_iter"}:
        raise ValueError("a share's tuning settings must be population_size and num_trials_per_iter")
    try:
        section(TuningSpec, {**tuning, "seed": spec["seed"]}, "share: tuning")  # the job file's ranges
        spec = {**spec, "builder": dataclasses.asdict(section(BuilderSpec, spec["builder"], "share: builder")),
                "runner": dataclasses.asdict(section(RunnerSpec, spec["runner"], "share: runner"))}
    except (TunefarmError, TypeError) as err:
        raise ValueError(str(err)) from None
    try:
        parse_hostport(_text(spec["tracker"], "tracker address"))
    except TunefarmError as err:
        raise ValueError(f"a share's tracker address: {err}") from None
    _text(spec["device_key"], "device key", 256)
    return spec


class _Share:
    """One share of a job, searched in this process: stock ``ms.tune_tasks`` with the farm's parts."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec  # check_share's
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
            runner, builder = self.runner, self.builder
            return {"records": part, "next": since + len(part), "done": done, "error": self.error,
                    "unstarted": unstarted,
                    "per_agent": dict(runner.per_agent) if runner is not None else {},
                    "failures": dict(runner.failures) if runner is not None else {},
                    "build_failures": dict(builder.build_failures) if builder is not None else {},
                    "requeued": runner.requeued if runner is not None else 0,
                    "unreachable": dict(runner.unreachable) if runner is not None else {},
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

        from tunefarm.core.jobspec import BuilderSpec, RunnerSpec
        from tunefarm.core.threads import usable_cores
        from tunefarm.core.wire import parse_hostport
        from tunefarm.host.tuning.budget import TrialCounter
        from tunefarm.host.tuning.builder import BUILD_TIMEOUTS_DIR
        from tunefarm.host.tuning.intrinsics import load_for
        from tunefarm.host.tuning.loop import TuningLoop
        from tunefarm.host.tuning.measured_cache import MeasuredCache
        from tunefarm.host.tuning.pipeline import Pipeline
        from tunefarm.host.tuning.search import quiet_pool_rule

        spec = self.spec
        target = tvm.target.Target(spec["target"])
        load_for(target)  # before the task modules are read (TuningLoop asks again: loaded once)
        quiet_pool_rule(target)
        work = tempfile.mkdtemp(prefix="tunefarm-search-")
        database = ms.database.JSONDatabase(work_dir=work)
        mods, keys = [], []
        for task in spec["tasks"]:
            mod = tvm.ir.load_json(task["mod"])
            workload = database.commit_workload(mod)
            for rec in task.get("records", [])[:SEED_RECORDS]:
                database.commit_tuning_record(ms.database.TuningRecord.from_json(rec, workload))
            mods.append(mod)
            keys.append(str(tvm_ffi.structural_hash(mod)))
        cache = MeasuredCache()
        cached = cache.load_database(database)
        tuning = spec["tuning"]
        with self.lock:
            self.counter = TrialCounter.of(spec["trials"], {k: int(t["left"]) for k, t in zip(keys, spec["tasks"])})
            self.keys = keys
            if self.stopped:
                self.counter.stop()
        extracted = [ms.ExtractedTask(task_name=str(t["name"])[:200], mod=mod, target=target, dispatched=[mod],
                                      weight=max(1, int(t["weight"]))) for t, mod in zip(spec["tasks"], mods)]
        # The worker's own cores build (or the job's build agents): never more processes than it has cores.
        build = BuilderSpec(**spec["builder"])
        build.workers = min(build.workers or usable_cores(), usable_cores())
        loop = TuningLoop(extracted, target, work_dir=work, counter=self.counter, cache=cache,
                          tracker=parse_hostport(spec["tracker"]), device_key=spec["device_key"], builder=build,
                          runner=RunnerSpec(**spec["runner"]), population_size=int(tuning["population_size"]),
                          seed=spec.get("seed"), space=Pipeline.from_json(spec.get("pipeline")).space(target),
                          keep_dir=Path(work) / BUILD_TIMEOUTS_DIR, verified_log=Path(work) / "verified.jsonl",
                          console=Console(stderr=True, highlight=False))
        with self.lock:
            self.runner, self.builder, self.verifier = loop.runner, loop.builder, loop.verifier
            self.setup_s = time.monotonic() - self.began
        per_task_cap = max(int(t["left"]) for t in spec["tasks"])
        try:
            loop.run(database, cost_model=str(spec.get("cost_model") or "xgb"),
                     max_trials_global=int(spec["trials"]) + cached, max_trials_per_task=per_task_cap + cached,
                     num_trials_per_iter=int(tuning["num_trials_per_iter"]),
                     on_measured=_collector(self, loop.committed))
        finally:
            with self.lock:
                self.profile = dict(loop.profile)
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


# ------------------------------------------------------------------------------------------------ host side

@dataclasses.dataclass
class ShareState:
    """One share of the job on the host: its tasks (the job's indices) and what came back."""

    tasks: list[int]
    trials: int  # this share's part of the run's budget
    received: int = 0
    workers: list[str] = dataclasses.field(default_factory=list)  # the search workers that served it
    per_agent: dict[str, int] = dataclasses.field(default_factory=dict)
    failures: dict[str, int] = dataclasses.field(default_factory=dict)  # candidates not measured, by kind
    build_failures: dict[str, int] = dataclasses.field(default_factory=dict)  # candidates not built, by kind
    by_worker: dict[str, int] = dataclasses.field(default_factory=dict)  # records merged from each worker
    rejected: int = 0  # worker records refused (malformed, foreign task, over the share's trials)
    error: str = ""
    wall_s: float = 0.0  # from the run's start to the share's end (the slowest share bounds the run)
    stolen_from: int | None = None  # the share (its index in the run's list) whose tasks not begun these were
    unstarted: int = 0  # its worker's last word: tasks whose search has not begun
    live: bool = False  # a session searches it now (its tasks not begun may be released to a free worker)
    steal: Any = None  # a free worker's pending request: (count, Future of the new share or None)
    setup_s: float = 0.0  # its sessions' start-up: from a share's start on the worker to its tuning loop's
    profile: dict[str, float] = dataclasses.field(default_factory=dict)  # its tuning loops' profiler scopes (s)


def deal(task_costs: dict[int, float], workers: int, light: frozenset[int] | set[int] = frozenset()) -> list[list[int]]:
    """The tasks (index -> cost: weight x flops, in the run's order) dealt into at most ``workers`` shares of equal task counts
    (one apart at most), the costliest first to the share with the fewest tasks, then the lightest (so the
    costly tasks land apart).

    Counts come first because a share's wall time is its trials, and a trial costs about the same on any
    task (a search step, a build, a measurement padded to the runner's min_repeat_ms): dealt by cost alone,
    4 workers on ResNet-18 got 2, 3, 4 and 10 tasks, and the 10-task share bounded the run (0.85x of one
    worker on the lent 16-core machine, bench/results/search_scaling-h200vm-16c).

    ``light`` tasks (a space of fewer candidates than one round, like ResNet-18's ``reshape``: one) are not
    counted: they are dealt after the others, one by one to the share with the fewest of them.

    Each share starts with its costliest task (a long search: the share's build pool starts meanwhile, ~3 s of
    a 2-core worker; after a ``mean`` or ``reshape`` first, whose search takes 0-2 s, the first build waited
    ~5 s for it on the lent 16-core host), then the run's order."""
    shares: list[list[int]] = [[] for _ in range(max(1, min(workers, len(task_costs))))]
    load = [0.0] * len(shares)
    heavy = [i for i in task_costs if i not in light]
    for index in sorted(heavy, key=lambda i: (-task_costs[i], i)):
        pick = min(range(len(shares)), key=lambda s: (len(shares[s]), load[s], s))
        shares[pick].append(index)
        load[pick] += task_costs[index]
    lights = [0] * len(shares)
    for index in (i for i in task_costs if i in light):
        pick = min(range(len(shares)), key=lambda s: (lights[s], len(shares[s]), s))
        shares[pick].append(index)
        lights[pick] += 1
    rank = {index: n for n, index in enumerate(task_costs)}  # the run's order: the dict's
    out = []
    for share in (s for s in shares if s):
        costly = [i for i in share if i not in light] or share
        first = min(costly, key=lambda i: (-task_costs[i], rank[i]))
        out.append(sorted(share, key=lambda i: (i != first, rank[i])))
    return out


def split_trials(total: int, needs: list[int], capacity: list[int] | None = None) -> list[int]:
    """``total`` trials over shares: each its ``needs`` first (the trials that give each of its tasks one round),
    in proportion to them if ``total`` does not cover them all; what is left over evens the shares out (the
    smallest raised first), none beyond its ``capacity`` (what its tasks may measure; default unbounded).

    Even trials, not trials in proportion to task counts: a share's wall time is its rounds (a search, a build
    and a measurement of at most one round's candidates each), so a share of 4 tasks and one of 5 should run
    the same number of rounds. In proportion, 320 ResNet-18 trials over 4 workers gave 68, 84, 84, 84, and the
    84-trial share whose fifth task was ``reshape`` (one candidate) spent 19 trials on two extra rounds of one
    conv and bounded the run (bench/results/search_scaling-h200vm-16c). The sum is ``total`` unless every share
    is at its capacity."""
    capacity = list(capacity) if capacity is not None else [total + n for n in needs]  # unbounded
    needs = [min(n, c) for n, c in zip(needs, capacity)]
    count = sum(needs)
    if total <= count:  # not even one round each: in proportion, largest remainders first
        if count == 0:
            return [0] * len(needs)
        out = [total * n // count for n in needs]
        for i in sorted(range(len(needs)), key=lambda i: -(total * needs[i] % count))[: total - sum(out)]:
            out[i] += 1
        return out
    spare = total - count

    def raised(level: int) -> int:  # trials the shares take beyond their needs when raised to ``level``
        return sum(min(c, max(n, level)) - n for n, c in zip(needs, capacity))

    low, high = 0, max(capacity, default=0)
    while low < high:  # the highest level whose raise fits in the spare trials
        mid = (low + high + 1) // 2
        low, high = (mid, high) if raised(mid) <= spare else (low, mid - 1)
    out = [min(c, max(n, low)) for n, c in zip(needs, capacity)]
    left = total - sum(out)
    for i in range(len(out)):  # fewer left than shares that can still take one at this level
        if left and out[i] == low and out[i] < capacity[i]:
            out[i] += 1
            left -= 1
    return out


def task_capacity(mod, target, space=None) -> int | None:
    """How many distinct candidates the task's design space holds, where that is known: a space whose traces
    decide nothing (ResNet-18's ``reshape`` on CPU) has one per design space; None for any other (or when the
    space cannot be generated here: the worker will say why)."""
    from tvm.s_tir import meta_schedule as ms  # pylint: disable=import-outside-toplevel

    try:
        ctx = ms.TuneContext(mod=mod, target=target, space_generator=space or "post-order-apply",
                             task_name="capacity")
        spaces = ctx.generate_design_space()
    except Exception:  # pylint: disable=broad-except
        return None
    if not spaces or any(len(s.trace.decisions) for s in spaces):
        return None
    return len(spaces)


class WorkerLied(ValueError):
    """A search worker's answer that is not what the protocol allows."""


def check_reply(text: Any, since: int) -> dict[str, Any]:
    """A worker's poll answer, shape-checked (ValueError otherwise): records is a list, next moves forward by
    at most their count, the counters are small dicts of ints."""
    if not isinstance(text, str) or len(text) > MAX_REPLY_BYTES:
        raise WorkerLied("a poll answer must be JSON text of at most 64 MiB")
    try:
        reply = json.loads(text)
    except ValueError:
        raise WorkerLied("a poll answer that is not JSON") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("records"), list):
        raise WorkerLied("a poll answer must be a JSON object with a list of records")
    records = reply["records"]
    nxt = reply.get("next")
    if (len(records) > MAX_POLL_RECORDS or not isinstance(nxt, int) or isinstance(nxt, bool)
            or nxt != since + len(records)):
        raise WorkerLied("a poll answer's record count and position do not add up")
    counts = {}
    for field, what, keys in (("per_agent", "per-agent counts", None), ("failures", "failure counts", FAILURE_KINDS),
                              ("build_failures", "build failure counts", FAILURE_KINDS)):
        value = reply.get(field, {})
        if not (isinstance(value, dict) and len(value) <= 1024
                and all(isinstance(k, str) and len(k) <= 256 and (keys is None or k in keys)
                        and isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 10 ** 9
                        for k, v in value.items())):
            raise WorkerLied(f"a poll answer's {what} are malformed")
        counts[field] = value
    unstarted = reply.get("unstarted", 0)
    if not isinstance(unstarted, int) or isinstance(unstarted, bool) or not 0 <= unstarted <= MAX_SHARE_TASKS:
        raise WorkerLied("a poll answer's count of tasks not begun is malformed")
    setup_s, profile = reply.get("setup_s"), reply.get("profile", {})
    if setup_s is not None and not _seconds(setup_s):
        raise WorkerLied("a poll answer's setup time is malformed")
    if not (isinstance(profile, dict) and len(profile) <= MAX_PROFILE_SCOPES
            and all(isinstance(k, str) and 0 < len(k) <= 100 and k.isprintable() and _seconds(v)
                    for k, v in profile.items())):
        raise WorkerLied("a poll answer's profile is malformed")
    return {"records": records, "next": nxt, "done": reply.get("done") is True, "unstarted": unstarted,
            "error": _clean(str(reply.get("error") or ""))[:500], "setup_s": setup_s,
            "profile": {k: float(v) for k, v in profile.items()}, **counts}


def _seconds(value: Any) -> bool:
    """A time a worker reports: a finite number of seconds, not negative, under a week."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and 0 <= value < 7 * 86400)


def check_release(text: Any, tasks: int, gone: set[int], count: int, trials_left: int) -> tuple[list[int], int]:
    """A worker's answer to ``release(count)`` (WorkerLied otherwise): at most ``count`` distinct positions of
    the session's ``tasks`` not released before (``gone``), and the trials they take, at most the share's
    ``trials_left`` (none without a task)."""
    if not isinstance(text, str) or len(text) > 1 << 20:
        raise WorkerLied("a release answer must be JSON text of at most 1 MiB")
    try:
        reply = json.loads(text)
    except ValueError:
        raise WorkerLied("a release answer that is not JSON") from None
    released, trials = (reply.get("released"), reply.get("trials")) if isinstance(reply, dict) else (None, None)
    if (not isinstance(released, list) or len(released) > count
            or not all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p < tasks and p not in gone
                       for p in released) or len(set(released)) != len(released)):
        raise WorkerLied("a release answer's tasks are not tasks of its share it still had")
    if (not isinstance(trials, int) or isinstance(trials, bool) or not 0 <= trials <= trials_left
            or (trials and not released)):
        raise WorkerLied("a release answer's trials are more than its share has left")
    return released, trials


def record_from_worker(item: Any, mods: list, workloads: list, target) -> tuple[int, Any, list[float] | None]:
    """(task position in the share, the TuningRecord to commit, run seconds or None if failed) from one record
    a worker sent; ValueError for anything else. The workload and target are the host's own; the trace must
    replay on the task's module."""
    # pylint: disable=import-outside-toplevel
    import tvm
    from tvm.s_tir import meta_schedule as ms

    if not isinstance(item, dict) or not isinstance(item.get("task"), int) or isinstance(item.get("task"), bool):
        raise ValueError("a record must name its task")
    task = item["task"]
    if not 0 <= task < len(mods):
        raise ValueError(f"a record for task {task}, which the share does not have")
    record = item.get("record")
    if not isinstance(record, list) or len(record) != 4:
        raise ValueError("a record must be MetaSchedule's [trace, run_secs, target, args_info]")
    secs = record[1]
    if (not isinstance(secs, list) or not 1 <= len(secs) <= MAX_RUN_SECS
            or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and 0 < s <= FAILED_RUN_S
                       for s in secs)):
        raise ValueError("a record's run_secs must be 1 to 1024 finite positive numbers")
    try:
        parsed = ms.database.TuningRecord.from_json(record, workloads[task])
        sch = tvm.s_tir.Schedule(mods[task])
        parsed.trace.apply_to_schedule(sch, remove_postproc=False)
    except Exception as err:  # pylint: disable=broad-except
        raise ValueError(f"a record whose trace does not replay on its task: {str(err).strip()[:200]}") from None
    failed = any(s >= FAILED_RUN_S for s in secs)
    run_secs = [tvm.tirx.FloatImm("float32", float(s)) for s in ([FAILED_RUN_S] if failed else secs)]
    return task, ms.database.TuningRecord(parsed.trace, workloads[task], run_secs, target, parsed.args_info), (
        None if failed else [float(s) for s in secs])


def run_spread(plan, database, tracker: tuple[str, int], console, progress, counter, result, after_batch=None) -> None:
    """Tune ``plan``'s tasks on ``plan.job.search.workers`` search workers (blocks until every share ends).
    ``counter`` (the run's TrialCounter) stopped ends them early (``after_batch()`` is called after each merge, the
    job's stop hook); ``result`` gets the per-agent counts, the workers' shares and what was refused."""
    # pylint: disable=import-outside-toplevel
    import tvm

    from tunefarm.host.tuning.progress import time_split

    job, budget = plan.job, plan.budget
    order = list(budget.order)
    position = {index: pos for pos, index in enumerate(order)}  # job task -> MetaSchedule's id in progress
    costs = {i: float(plan.tasks[i].weight) * _flops(plan.extracted[i].dispatched[0]) for i in order}
    from tunefarm.host.tuning.intrinsics import load_for

    load_for(plan.target)  # before any TuneContext here: its stock import of every architecture's takes 20-80 s
    space = plan.pipeline.space(plan.target)
    can_take = {i: budget.task_left[i] for i in order}
    for i in order:  # a task of a few candidates can measure no more than those
        known = task_capacity(plan.extracted[i].dispatched[0], plan.target, space)
        if known is not None:
            can_take[i] = min(can_take[i], max(0, known - budget.measured[i]))
    light = {i for i in order if can_take[i] < budget.round_size}
    shares = [ShareState(tasks=t, trials=0) for t in deal(costs, job.search.workers, light)]
    for share, trials in zip(shares, split_trials(
            budget.remaining, [sum(min(can_take[i], budget.round_size) for i in s.tasks) for s in shares],
            [sum(can_take[i] for i in s.tasks) for s in shares])):
        share.trials = trials
    lock = threading.Lock()
    workloads = {i: database.commit_workload(plan.extracted[i].dispatched[0]) for i in order}
    mod_json = {i: tvm.ir.save_json(plan.extracted[i].dispatched[0]) for i in order}
    runner_spec = dataclasses.asdict(job.runner)
    console.print(f"search spread over {len(shares)} search worker(s) on key '{job.search.key}': "
                  + "; ".join(f"{len(s.tasks)} task(s), {s.trials} trials" for s in shares))

    measured_per_task: dict[int, int] = {}  # job task -> records merged in this run
    shunned: set[str] = set()  # workers whose records were refused
    aside: list = []  # sessions on shunned workers, held until the run ends

    def share_spec(share: ShareState) -> dict[str, Any]:
        left = share.trials - share.received
        tasks = []
        for i in share.tasks:
            top = [r.as_json() for r in database.get_top_k(workloads[i], SEED_RECORDS)]
            tasks.append({"name": plan.tasks[i].name, "mod": mod_json[i], "weight": plan.tasks[i].weight,
                          "left": budget.task_left[i] - measured_per_task.get(i, 0), "records": top})
        return {"tasks": tasks, "trials": left, "target": plan.target_json, "pipeline": plan.pipeline.to_json(),
                "tuning": {"population_size": job.tuning.population_size,
                           "num_trials_per_iter": job.tuning.num_trials_per_iter},
                "seed": job.tuning.seed, "cost_model": "xgb" if plan.cost_model == "xgb-farm" else plan.cost_model,
                "builder": dataclasses.asdict(job.builder), "runner": runner_spec,
                "tracker": f"{tracker[0]}:{tracker[1]}", "device_key": job.device.key}

    def commit(share: ShareState, items: list, sent: list[int], checks: tuple[list, list], gone: set[int]) -> None:
        """Merge a poll's records; ``sent`` the job's task indices in the order this session's share listed
        them (a record's ``task`` is a position in it), ``checks`` their modules and workloads (the record
        checks'), ``gone`` the positions it released since."""
        batches: dict[int, list] = {}
        for item in items:
            if share.received >= share.trials:
                share.rejected += 1  # more than the share was given: not counted, not kept
                continue
            try:
                pos, record, secs = record_from_worker(item, *checks, plan.target)
                if pos in gone:
                    raise ValueError(f"a record for task {pos}, which the worker released")
            except ValueError as err:
                share.rejected += 1
                if share.rejected == 1:
                    console.print(f"[yellow]search worker record refused[/]: {_escape(str(err))}")
                continue
            index = sent[pos]
            with lock:
                database.commit_tuning_record(record)
                share.received += 1
                measured_per_task[index] = measured_per_task.get(index, 0) + 1
            cost = sum(secs) / len(secs) if secs is not None else None
            batches.setdefault(index, []).append(cost)
            if secs is None and progress.first_error is None:
                progress.first_error = str(item.get("error") or "failed on the search worker")[:2000]
        with lock:
            for index, costs_ in batches.items():
                progress.on_batch(position[index], costs_, sum(1 for c in costs_ if c is None))
            if batches and after_batch is not None:
                after_batch()

    active = [len(shares)]  # shares still being driven
    started = time.monotonic()

    def drive(share: ShareState) -> None:
        try:
            while share is not None:
                try:
                    drive_share(share)
                finally:
                    share.wall_s = time.monotonic() - started
                # this thread's worker is free now (a share that failed steals nothing: its trials would wait)
                share = None if counter.stopped or share.error else steal_for(share)
        finally:
            with lock:
                active[0] -= 1

    def steal_for(thief: ShareState) -> ShareState | None:
        """Work stealing: ask the share with the most tasks not begun (that a session searches now) to release
        half of them (rounded up); the new share of those tasks, or None when none is left to take. Shares are
        dealt even, but one batch held by a slow build, or a slower machine, makes one share end well after the
        others (bench/results/search_scaling-h200vm-16c-torchless: 76 s against 49 s), and the run waits for it."""
        with lock:
            victims = [s for s in shares if s is not thief and s.live and s.steal is None and s.unstarted > 0]
            if not victims:
                return None
            victim = max(victims, key=lambda s: (s.unstarted, s.trials - s.received))
            request = (-(-victim.unstarted // 2), concurrent.futures.Future())
            victim.steal, asked = request, time.monotonic()
        while True:
            try:
                return request[1].result(timeout=POLL_INTERVAL_S)
            except concurrent.futures.TimeoutError:
                pass
            with lock:  # not taken up (its session ended, or hangs): withdrawn; taken up, it is answered
                if victim.steal is request and (not victim.live or time.monotonic() - asked > STEAL_WAIT_S):
                    victim.steal = None
                    return None

    def answer_steal(share: ShareState, session, sent: list[int], gone: set[int]) -> None:
        """In the share's own thread (its session's one caller): a free worker's pending request, if any."""
        with lock:
            request, share.steal = share.steal, None
        if request is None:
            return
        count, future = request
        try:
            released, trials = check_release(session.get_function(RELEASE_FUNC)(int(count)), len(sent), gone,
                                              count, share.trials - share.received)
            if not released:
                return
            moved = [sent[p] for p in released]
            with lock:
                gone.update(released)
                share.tasks = [i for i in share.tasks if i not in moved]
                share.trials -= trials
                share.unstarted = max(0, share.unstarted - len(released))
                new = ShareState(tasks=moved, trials=trials, stolen_from=shares.index(share))
                shares.append(new)
            future.set_result(new)
        finally:
            if not future.done():
                future.set_result(None)

    def drive_share(share: ShareState) -> None:
        from tunefarm.core.wire import AGENT_ID_FUNC
        from tunefarm.tracker.client import request_session

        attempts = 0
        while attempts < SHARE_ATTEMPTS:
            if share.received >= share.trials or counter.stopped:
                return
            try:
                session = request_session(tracker, job.search.key, job.runner.device_wait_sec, 0, priority=1)
            except Exception as err:  # pylint: disable=broad-except
                share.error = _line(err)
                with lock:
                    others = active[0] - 1
                if others > 0:
                    time.sleep(POLL_INTERVAL_S)
                    continue  # the workers are busy with other shares: one is free once its share ends
                return
            rejected_before, received_before = share.rejected, share.received
            worker, counted, poll = "unknown", False, None
            try:
                worker = _clean(str(session.get_function(AGENT_ID_FUNC)()))
                with lock:
                    if worker in shunned:
                        # held open, so that the tracker hands out another worker next
                        aside.append(session)  # (each held one is off the tracker's list: no loop)
                        continue
                attempts, counted = attempts + 1, True
                share.workers.append(worker)
                with lock:
                    sent, gone = list(share.tasks), set()  # this session's tasks; positions it released
                    spec = share_spec(share)
                checks = ([plan.extracted[i].dispatched[0] for i in sent], [workloads[i] for i in sent])
                session.get_function(START_FUNC)(json.dumps(spec))
                poll, since, stop_sent = session.get_function(POLL_FUNC), 0, False
                share.live = True
                session_counts: dict[str, dict[str, int]] = {}  # this session's so far, by ShareState field
                while True:
                    if counter.stopped and not stop_sent:
                        session.get_function(STOP_FUNC)()
                        stop_sent = True
                    answer_steal(share, session, sent, gone)
                    reply = check_reply(poll(since), since)
                    commit(share, reply["records"], sent, checks, gone)
                    since = reply["next"]
                    share.unstarted = min(reply["unstarted"], len(sent) - len(gone))
                    session_counts = {"per_agent": {_clean(a): n for a, n in reply["per_agent"].items()},
                                      "failures": reply["failures"], "build_failures": reply["build_failures"]}
                    if reply["done"]:
                        share.setup_s += reply["setup_s"] or 0.0
                        _add_counts(share.profile, reply["profile"])
                        break
                    if not reply["records"]:
                        time.sleep(POLL_INTERVAL_S)
                share.by_worker[worker] = share.by_worker.get(worker, 0) + share.received - received_before
                if reply["error"]:
                    share.error = reply["error"]
                    console.print(f"[yellow]search worker {_escape(worker)} stopped[/]: {_escape(reply['error'])}")
                if share.rejected > rejected_before:
                    with lock:
                        shunned.add(worker)  # sent records the host refused: none of its sessions again this run
                    console.print(f"[bold red]search worker {_escape(worker)} shunned[/]: "
                                  f"{share.rejected - rejected_before} of its records refused")
                else:
                    for field, counts in session_counts.items():  # a shunned worker's word on them is not kept
                        _add_counts(getattr(share, field), counts)
                    if not reply["error"]:
                        share.error = ""  # an earlier worker's failure, made good
                        return  # its search ended (the share's trials spent, or its space exhausted)
            except Exception as err:  # pylint: disable=broad-except  # the worker lost or lying: the next one
                attempts += 0 if counted else 1
                share.by_worker[worker] = share.by_worker.get(worker, 0) + share.received - received_before
                share.error = _line(err)
                if isinstance(err, WorkerLied):
                    with lock:
                        shunned.add(worker)
                    console.print(f"[bold red]search worker {_escape(worker)} shunned[/]: {_escape(share.error)}")
                    continue
                console.print(f"[yellow]search worker lost[/] ({_escape(share.error)}); "
                              f"{share.trials - share.received} trial(s) of its share go to the next one")
            finally:
                share.live = False
                with lock:
                    request, share.steal = share.steal, None
                if request is not None:
                    request[1].set_result(None)
                # Drop the session now (its functions hold it too): a worker whose start failed is free for
                # the next request at once, never held by this thread while it asks the tracker again (two
                # shares whose workers refused them each kept the other's only free worker: a deadlock).
                session = poll = None  # (one set aside stays open: the list holds it)

    threads = [threading.Thread(target=drive, args=(s,), name=f"tunefarm-share-{n}", daemon=True)
               for n, s in enumerate(list(shares))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    aside.clear()
    result.search_shunned = sorted(shunned)
    for share in shares:
        _add_counts(result.per_agent, share.per_agent)
        _add_counts(result.search_workers, share.by_worker)
        _add_counts(result.failures, share.failures)
        _add_counts(result.build_failures, share.build_failures)
    result.search_shares = [{"tasks": [plan.tasks[i].name for i in s.tasks], "trials": s.trials,
                             "received": s.received, "workers": s.workers, "rejected": s.rejected,
                             "error": s.error, "wall_s": round(s.wall_s, 1), "stolen_from": s.stolen_from,
                             "setup_s": round(s.setup_s, 2), "time_split": time_split(s.profile, s.wall_s)}
                            for s in shares]
    if not any(s.received for s in shares):
        errors = "; ".join(sorted({s.error for s in shares if s.error})) or "no search worker measured anything"
        from tunefarm.core.errors import TunefarmError

        raise TunefarmError(f"the spread search measured nothing: {errors}")


def _add_counts(into: dict[str, Any], counts: dict[str, Any]) -> None:
    for key, n in counts.items():
        into[key] = into.get(key, 0) + n


def _flops(mod) -> float:
    try:
        from tvm.s_tir.analysis import estimate_tir_flops  # pylint: disable=import-outside-toplevel

        return max(1.0, float(estimate_tir_flops(mod)))
    except Exception:  # pylint: disable=broad-except
        return 1.0


def _clean(text: str) -> str:
    """An id a worker or agent reported (its own word): printable, bounded."""
    return "".join(c if c.isprintable() else "?" for c in text)[:200]


def _line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[-1] if text else type(err).__name__)[:300]


def _escape(text: str) -> str:
    from rich.markup import escape  # pylint: disable=import-outside-toplevel

    return escape(text)
