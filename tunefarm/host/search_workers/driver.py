"""The host's side of the spread search: a job's tasks dealt to search workers (dealing.py), each share driven
over an RPC session (protocol.py), their records merged into the job's one database as they come.

MetaSchedule's task scheduler searches serially in one process, and on a farm with many build and measure
agents that search bounds the whole run (issue 16: 4 build agents made runs only 1.28x faster). With
``search: {workers: N}`` a job deals its tasks to N **search workers** (worker.py), and the host merges what
each one measured, so the job's budget, progress, resume and report stay one job's. Workers are reached the
way agents are: an RPC session from the tracker (the farm key at registration), one session per share for as
long as the share runs.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import threading
import time
from typing import Any

from tunefarm.core.share import SearchShare, ShareTask
from tunefarm.host.search_workers.dealing import deal, flops, split_trials, task_capacity
from tunefarm.host.search_workers.protocol import (FAILED_RUN_S, MAX_RUN_SECS, POLL_FUNC, RELEASE_FUNC,
                                                   SEED_RECORDS, START_FUNC, STOP_FUNC, WorkerLied, check_release,
                                                   check_reply, clean)

POLL_INTERVAL_S = 1.0
SHARE_ATTEMPTS = 3  # sessions a share may use (a worker lost: the next one goes on from the records so far)
STEAL_WAIT_S = 30.0  # how long a free worker's thread waits for a busy share to answer its request for tasks


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


def run_spread(plan, database, tracker: tuple[str, int], events, progress, counter, result, after_batch=None) -> None:
    """Tune ``plan``'s tasks on ``plan.job.search.workers`` search workers (blocks until every share ends).
    ``counter`` (the run's TrialCounter) stopped ends them early (``after_batch()`` is called after each merge, the
    job's stop hook); ``result`` gets the per-agent counts, the workers' shares and what was refused."""
    SpreadSearch(plan, database, tracker, events, progress, counter, result, after_batch).run()


class SpreadSearch:
    """One run's spread search on the host: the shares dealt at the start, one thread per share driving it over
    worker sessions (:meth:`drive`), work stealing between them, and what every thread shares, under ``lock``:
    the shares, the records merged per task, the workers shunned and the sessions held aside on them."""

    def __init__(self, plan, database, tracker: tuple[str, int], events, progress, counter, result,
                 after_batch=None):
        # pylint: disable=import-outside-toplevel
        import tvm

        from tunefarm.host.tuning.intrinsics import load_for

        self.plan, self.database, self.tracker, self.events = plan, database, tracker, events
        self.progress, self.counter, self.result, self.after_batch = progress, counter, result, after_batch
        self.job, self.budget = job, budget = plan.job, plan.budget
        order = list(budget.order)
        self.position = {index: pos for pos, index in enumerate(order)}  # job task -> MetaSchedule's id in progress
        costs = {i: float(plan.tasks[i].weight) * flops(plan.extracted[i].dispatched[0]) for i in order}
        load_for(plan.target)  # before any TuneContext here: its stock import of every architecture's takes 20-80 s
        space = plan.pipeline.space(plan.target)
        can_take = {i: budget.task_left[i] for i in order}
        for i in order:  # a task of a few candidates can measure no more than those
            known = task_capacity(plan.extracted[i].dispatched[0], plan.target, space)
            if known is not None:
                can_take[i] = min(can_take[i], max(0, known - budget.measured[i]))
        light = {i for i in order if can_take[i] < budget.round_size}
        self.shares = [ShareState(tasks=t, trials=0) for t in deal(costs, job.search.workers, light)]
        for share, trials in zip(self.shares, split_trials(
                budget.remaining, [sum(min(can_take[i], budget.round_size) for i in s.tasks) for s in self.shares],
                [sum(can_take[i] for i in s.tasks) for s in self.shares])):
            share.trials = trials
        self.lock = threading.Lock()
        self.workloads = {i: database.commit_workload(plan.extracted[i].dispatched[0]) for i in order}
        self.mod_json = {i: tvm.ir.save_json(plan.extracted[i].dispatched[0]) for i in order}
        events.print(f"search spread over {len(self.shares)} search worker(s) on key '{job.search.key}': "
                     + "; ".join(f"{len(s.tasks)} task(s), {s.trials} trials" for s in self.shares))
        self.measured_per_task: dict[int, int] = {}  # job task -> records merged in this run
        self.shunned: set[str] = set()  # workers whose records were refused
        self.aside: list = []  # sessions on shunned workers, held until the run ends
        self.active = len(self.shares)  # shares still being driven
        self.started = time.monotonic()

    def share_spec(self, share: ShareState) -> SearchShare:
        """What ``start`` is handed for ``share`` now: its tasks with their trials left and the job's best
        records so far (a share taken over goes on from what the earlier worker measured)."""
        job, plan = self.job, self.plan
        tasks = [ShareTask(name=plan.tasks[i].name, mod=self.mod_json[i], weight=plan.tasks[i].weight,
                           left=self.budget.task_left[i] - self.measured_per_task.get(i, 0),
                           records=[r.as_json() for r in self.database.get_top_k(self.workloads[i], SEED_RECORDS)])
                 for i in share.tasks]
        return SearchShare(tasks=tasks, trials=share.trials - share.received, target=plan.target_json,
                           pipeline=plan.pipeline.to_json(), population_size=job.tuning.population_size,
                           num_trials_per_iter=job.tuning.num_trials_per_iter, seed=job.tuning.seed,
                           cost_model="xgb" if plan.cost_model == "xgb-farm" else plan.cost_model,
                           builder=job.builder, runner=job.runner, tracker=f"{self.tracker[0]}:{self.tracker[1]}",
                           device_key=job.device.key)

    def commit(self, share: ShareState, items: list, sent: list[int], checks: tuple[list, list], gone: set[int]) -> None:
        """Merge a poll's records; ``sent`` the job's task indices in the order this session's share listed
        them (a record's ``task`` is a position in it), ``checks`` their modules and workloads (the record
        checks'), ``gone`` the positions it released since."""
        batches: dict[int, list] = {}
        for item in items:
            if share.received >= share.trials:
                share.rejected += 1  # more than the share was given: not counted, not kept
                continue
            try:
                pos, record, secs = record_from_worker(item, *checks, self.plan.target)
                if pos in gone:
                    raise ValueError(f"a record for task {pos}, which the worker released")
            except ValueError as err:
                share.rejected += 1
                if share.rejected == 1:
                    self.events.print(f"[yellow]search worker record refused[/]: {_escape(str(err))}")
                continue
            index = sent[pos]
            with self.lock:
                self.database.commit_tuning_record(record)
                share.received += 1
                self.measured_per_task[index] = self.measured_per_task.get(index, 0) + 1
            cost = sum(secs) / len(secs) if secs is not None else None
            batches.setdefault(index, []).append(cost)
            if secs is None and self.progress.first_error is None:
                self.progress.first_error = str(item.get("error") or "failed on the search worker")[:2000]
        with self.lock:
            for index, costs_ in batches.items():
                self.progress.on_batch(self.position[index], costs_, sum(1 for c in costs_ if c is None))
            if batches and self.after_batch is not None:
                self.after_batch()


    def drive(self, share: ShareState) -> None:
        try:
            while share is not None:
                try:
                    self.drive_share(share)
                finally:
                    share.wall_s = time.monotonic() - self.started
                # this thread's worker is free now (a share that failed steals nothing: its trials would wait)
                share = None if self.counter.stopped or share.error else self.steal_for(share)
        finally:
            with self.lock:
                self.active -= 1

    def steal_for(self, thief: ShareState) -> ShareState | None:
        """Work stealing: ask the share with the most tasks not begun (that a session searches now) to release
        half of them (rounded up); the new share of those tasks, or None when none is left to take. Shares are
        dealt even, but one batch held by a slow build, or a slower machine, makes one share end well after the
        others (bench/results/search_scaling-h200vm-16c-torchless: 76 s against 49 s), and the run waits for it."""
        with self.lock:
            victims = [s for s in self.shares if s is not thief and s.live and s.steal is None and s.unstarted > 0]
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
            with self.lock:  # not taken up (its session ended, or hangs): withdrawn; taken up, it is answered
                if victim.steal is request and (not victim.live or time.monotonic() - asked > STEAL_WAIT_S):
                    victim.steal = None
                    return None

    def answer_steal(self, share: ShareState, session, sent: list[int], gone: set[int]) -> None:
        """In the share's own thread (its session's one caller): a free worker's pending request, if any."""
        with self.lock:
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
            with self.lock:
                gone.update(released)
                share.tasks = [i for i in share.tasks if i not in moved]
                share.trials -= trials
                share.unstarted = max(0, share.unstarted - len(released))
                new = ShareState(tasks=moved, trials=trials, stolen_from=self.shares.index(share))
                self.shares.append(new)
            future.set_result(new)
        finally:
            if not future.done():
                future.set_result(None)

    def drive_share(self, share: ShareState) -> None:
        from tunefarm.core.wire import AGENT_ID_FUNC
        from tunefarm.tracker.client import request_session

        attempts = 0
        while attempts < SHARE_ATTEMPTS:
            if share.received >= share.trials or self.counter.stopped:
                return
            try:
                session = request_session(self.tracker, self.job.search.key, self.job.runner.device_wait_sec, 0,
                                          priority=1)
            except Exception as err:  # pylint: disable=broad-except
                share.error = _line(err)
                with self.lock:
                    others = self.active - 1
                if others > 0:
                    time.sleep(POLL_INTERVAL_S)
                    continue  # the workers are busy with other shares: one is free once its share ends
                return
            rejected_before, received_before = share.rejected, share.received
            worker, counted, poll = "unknown", False, None
            try:
                worker = clean(str(session.get_function(AGENT_ID_FUNC)()))
                with self.lock:
                    if worker in self.shunned:
                        # held open, so that the tracker hands out another worker next
                        self.aside.append(session)  # (each held one is off the tracker's list: no loop)
                        continue
                attempts, counted = attempts + 1, True
                share.workers.append(worker)
                with self.lock:
                    sent, gone = list(share.tasks), set()  # this session's tasks; positions it released
                    spec = self.share_spec(share)
                checks = ([self.plan.extracted[i].dispatched[0] for i in sent],
                          [self.workloads[i] for i in sent])
                session.get_function(START_FUNC)(json.dumps(spec.to_json()))
                poll, since, stop_sent = session.get_function(POLL_FUNC), 0, False
                share.live = True
                session_counts: dict[str, dict[str, int]] = {}  # this session's so far, by ShareState field
                while True:
                    if self.counter.stopped and not stop_sent:
                        session.get_function(STOP_FUNC)()
                        stop_sent = True
                    self.answer_steal(share, session, sent, gone)
                    reply = check_reply(poll(since), since)
                    self.commit(share, reply["records"], sent, checks, gone)
                    since = reply["next"]
                    share.unstarted = min(reply["unstarted"], len(sent) - len(gone))
                    session_counts = {"per_agent": {clean(a): n for a, n in reply["per_agent"].items()},
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
                    self.events.print(f"[yellow]search worker {_escape(worker)} stopped[/]: "
                                      f"{_escape(reply['error'])}")
                if share.rejected > rejected_before:
                    with self.lock:
                        # sent records the host refused: none of its sessions again this run
                        self.shunned.add(worker)
                    self.events.print(f"[bold red]search worker {_escape(worker)} shunned[/]: "
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
                    with self.lock:
                        self.shunned.add(worker)
                    self.events.print(f"[bold red]search worker {_escape(worker)} shunned[/]: "
                                      f"{_escape(share.error)}")
                    continue
                self.events.print(f"[yellow]search worker lost[/] ({_escape(share.error)}); "
                              f"{share.trials - share.received} trial(s) of its share go to the next one")
            finally:
                share.live = False
                with self.lock:
                    request, share.steal = share.steal, None
                if request is not None:
                    request[1].set_result(None)
                # Drop the session now (its functions hold it too): a worker whose start failed is free for
                # the next request at once, never held by this thread while it asks the tracker again (two
                # shares whose workers refused them each kept the other's only free worker: a deadlock).
                session = poll = None  # (one set aside stays open: the list holds it)

    def run(self) -> None:
        """Drive every share (a thread each, blocks until all ended), then put the shares' counts in the result."""
        from tunefarm.host.tuning.progress import time_split  # pylint: disable=import-outside-toplevel

        threads = [threading.Thread(target=self.drive, args=(s,), name=f"tunefarm-share-{n}", daemon=True)
                   for n, s in enumerate(list(self.shares))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.aside.clear()
        self.result.search_shunned = sorted(self.shunned)
        for share in self.shares:
            _add_counts(self.result.per_agent, share.per_agent)
            _add_counts(self.result.search_workers, share.by_worker)
            _add_counts(self.result.failures, share.failures)
            _add_counts(self.result.build_failures, share.build_failures)
        self.result.search_shares = [{"tasks": [self.plan.tasks[i].name for i in s.tasks], "trials": s.trials,
                                      "received": s.received, "workers": s.workers, "rejected": s.rejected,
                                      "error": s.error, "wall_s": round(s.wall_s, 1), "stolen_from": s.stolen_from,
                                      "setup_s": round(s.setup_s, 2), "time_split": time_split(s.profile, s.wall_s)}
                                     for s in self.shares]
        if not any(s.received for s in self.shares):
            errors = ("; ".join(sorted({s.error for s in self.shares if s.error}))
                      or "no search worker measured anything")
            from tunefarm.core.errors import TunefarmError  # pylint: disable=import-outside-toplevel

            raise TunefarmError(f"the spread search measured nothing: {errors}")


def _add_counts(into: dict[str, Any], counts: dict[str, Any]) -> None:
    for key, n in counts.items():
        into[key] = into.get(key, 0) + n


def _line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[-1] if text else type(err).__name__)[:300]


def _escape(text: str) -> str:
    from rich.markup import escape  # pylint: disable=import-outside-toplevel

    return escape(text)
