"""FarmRunner: MetaSchedule's Runner interface, measuring candidates on the farm's agents.

Each candidate is measured exactly as stock ``RPCRunner`` measures it (the same upload, argument allocation and
``time_evaluator`` code, run on the agent), under a name of its own so that candidates sharing a session never
share a library path. The parts, one module each as MetaSchedule keeps its runner's steps apart:
  * transport.py: how one candidate, or a chunk of them over a slow link, is measured over an open session;
  * sessions.py: the sessions kept open between batches (the session pool) and handed back to the tracker
    when someone else waits for their agents;
  * batch.py: one batch measured by one thread (one session) per agent of the key, with a deadline per
    candidate and the candidates of an agent that died measured again on the others;
  * this module: the runner MetaSchedule calls, what it counted (:class:`RunnerStats`), and a second
    measurement of one candidate on another agent for the timing verifier (:meth:`FarmRunner.remeasure`).
What the runner itself adds: before each batch the tracker is asked how many agents serve the key (none ->
wait up to ``device_wait_sec`` with a visible message, then a one-line NoDeviceError; several -> one session
on each, so every agent on the key is used); each measurement records which agent ran it
(``tunefarm.agent.id``), and an agent that measured for this runner and is no longer listed at the tracker is
reported (``on_agent_lost``) once.

Why not stock's session per candidate: opening one costs a tracker round trip, a request and a handshake
(~200 ms measured, Nagle's delayed ACKs included) against ~60 ms of device time for a typical ResNet-18
candidate; bench/farm_overhead.py measures both ways.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
import time
import uuid
from typing import Callable

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, RunnerInput, RunnerResult
from tvm.s_tir.meta_schedule.runner.runner import PyRunner, PyRunnerFuture

from tunefarm.core.errors import AgentsBusy, AgentUnreachable, TrackerUnreachable, TunefarmError
# session_lost and NotMeasured are also imported from here (tests)
from tunefarm.host.tuning.batch import Batch, EveryAgentUnreachable, NotMeasured, session_lost  # noqa: F401
from tunefarm.host.tuning.sessions import SessionPool
from tunefarm.host.tuning.transport import Candidate, agent_measure_func, measure_on, suffix
from tunefarm.core.rpc import close_session

REMEASURE_WAIT_S = 15.0  # how long a second measurement waits for an agent other than the one it has
REMEASURE_PRIORITY = 2  # the tracker serves a second measurement before the batches' requests (priority 1)
LOST_CHECK_DELAY_S = 1.0  # a session died: the tracker is asked this much later whether its agent is gone


# A failed candidate's kind (FarmRunner.failures): "timeout" (past its deadline twice), "error" (it failed on a live
# session: the candidate's own doing), and two that are the farm's: "not measured" (no session took it) and
# "session lost" (its session died under it on each attempt: its agents were lost, or it kills them).
FAILURE_KINDS = ("timeout", "error", "not measured", "session lost")
FARM_FAILURES = ("not measured", "session lost")


def failure_kind(err: BaseException) -> str:
    """The kind of a candidate's measuring failure (see :data:`FAILURE_KINDS`; timeouts are told apart before)."""
    if isinstance(err, NotMeasured):
        return "not measured"
    return "session lost" if session_lost(err) else "error"






@dataclasses.dataclass
class RunnerStats:
    """What a FarmRunner counted, for the job's result, a share's poll and the report. The runner counts
    (:meth:`count`, under its lock, from its batch threads); everyone else reads (:meth:`snapshot`)."""

    per_agent: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # agent id -> measured
    failures: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # FAILURE_KINDS -> count
    lost: dict[str, int] = dataclasses.field(default_factory=dict)  # agent id -> measured before it went
    requeued: int = 0  # candidates handed back to the queue because their session died under them
    chunks: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # per call -> calls
    sessions_reused: int = 0  # batches' sessions that were kept open from an earlier batch
    unreachable: dict[str, str] = dataclasses.field(default_factory=dict)  # "host:port" handed out -> why not
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, field: str, key=None, n: int = 1) -> None:
        """Add ``n`` to a counter (``key`` of a Counter field, or an int field)."""
        with self._lock:
            if key is None:
                setattr(self, field, getattr(self, field) + n)
            else:
                getattr(self, field)[key] += n

    def note_unreachable(self, addr: str, why: str) -> bool:
        """Whether ``addr`` is new to the list of agents this host cannot reach."""
        with self._lock:
            new = addr not in self.unreachable
            self.unreachable[addr] = why
        return new

    def note_lost(self, listed: set[str]) -> list[tuple[str, int]]:
        """The agents that measured here and are no longer ``listed``, not said before: (id, measured)."""
        with self._lock:
            gone = [(a, n) for a, n in self.per_agent.items()
                    if a not in listed and a not in self.lost and not a.startswith("unknown")]
            self.lost.update(gone)
        return gone

    def snapshot(self) -> dict:
        """Plain copies of every count."""
        with self._lock:
            return {"per_agent": dict(self.per_agent), "failures": dict(self.failures), "lost": dict(self.lost),
                    "requeued": self.requeued, "chunks": dict(self.chunks), "sessions_reused": self.sessions_reused,
                    "unreachable": dict(self.unreachable)}


@derived_object
class FarmRunnerFuture(PyRunnerFuture):
    """A candidate in flight; ``result()`` never raises (the batch's watcher bounds the wait)."""

    def __init__(self, future: concurrent.futures.Future, timeout_sec: float, on_done: Callable):
        super().__init__()
        self.future = future
        self.timeout_sec = timeout_sec
        self.on_done = on_done

    def done(self) -> bool:
        return self.future.done()

    def result(self) -> RunnerResult:
        try:
            costs, agent_id = self.future.result()
        except EveryAgentUnreachable as err:
            # Raised through MetaSchedule's loop (the job stops; _root_cause finds the TunefarmError line), so
            # that candidates that never reached a device are not recorded as failed trials.
            raise TunefarmError(str(err)) from None
        except TimeoutError:
            self.on_done(None, "timeout")
            return RunnerResult(None, f"FarmRunner: no result within {self.timeout_sec:g} s of the agent "
                                      "starting it (agent frozen or candidate too slow); candidate dropped")
        except Exception as err:  # pylint: disable=broad-except
            self.on_done(None, failure_kind(err))
            return RunnerResult(None, f"FarmRunner: measurement failed\n{err}")
        self.on_done(agent_id, "ok", costs)
        return RunnerResult(costs, None)


@derived_object
class FarmRunner(PyRunner):
    """Measures on every agent registered under ``key`` at the tracker."""

    def __init__(self, tracker_host: str, tracker_port: int, key: str, *,
                 evaluator_config: EvaluatorConfig | None = None, timeout_sec: float = 60.0,
                 device_wait_sec: float = 120.0, max_workers: int = 16,
                 on_wait: Callable | None = None, cache=None,
                 on_agent_lost: Callable[[str, int, int], None] | None = None,
                 on_unreachable: Callable[[str], None] | None = None):
        super().__init__()
        from tunefarm.tracker.client import TrackerClient  # pylint: disable=import-outside-toplevel

        self.key = key
        self.tracker_addr = (tracker_host, int(tracker_port))
        self.tracker = TrackerClient(tracker_host, tracker_port)
        self.evaluator_config = EvaluatorConfig._normalized(evaluator_config)  # pylint: disable=protected-access
        self.timeout_sec = timeout_sec
        self.device_wait_sec = device_wait_sec
        self.max_workers = max_workers  # most agents measured at once
        self.on_wait = on_wait
        self.cache = cache  # MeasuredCache shared with the builder
        self.on_agent_lost = on_agent_lost  # (agent id, candidates it measured, agents left on the key)
        self.on_unreachable = on_unreachable  # told each address handed out that this host cannot reach, once
        self.every_agent_unreachable = ""  # set by note_unreachable: why the job stops (issue 32, item 7)
        self.stats = RunnerStats()
        self.sessions = SessionPool(self.tracker, key, timeout_sec,
                                    on_reuse=lambda: self.stats.count("sessions_reused"))
        self._last_session_error = ""  # why this batch's last session did not open (said for what it left)
        self._closed = False
        self._last_progress = time.monotonic()  # when a candidate of this runner was last measured
        self._lost_check: threading.Timer | None = None
        self._lock = threading.Lock()
        self.measured_by: dict[str, str] = {}  # artifact path -> agent id (for the timing verifier)
        self._inputs: dict[str, tuple[str, tuple]] = {}  # artifact path -> (device type, args info)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def last_session_error(self) -> str:
        return self._last_session_error

    def note_session_error(self, err: BaseException) -> None:
        """A batch's worker could not open a session: kept for the candidates it leaves unmeasured."""
        text = str(err).strip()
        self._last_session_error = text.splitlines()[-1] if text else repr(err)
        if isinstance(err, AgentUnreachable):
            self.note_unreachable(err)

    def note_progress(self) -> None:
        """A measuring call of this runner came back from an agent."""
        self._last_progress = time.monotonic()

    def progressed_within(self, seconds: float) -> bool:
        """Whether this runner's sessions measured anything in the last ``seconds``."""
        return time.monotonic() - self._last_progress < seconds

    def busy_with_own_work(self) -> bool:
        """Whether this runner's own sessions are what keeps the key's agents busy: they measured something
        within the wait for an agent plus one candidate's deadline (an agent measuring finishes a candidate
        within ``timeout_sec``, or the candidate is taken from it)."""
        return self.progressed_within(self.device_wait_sec + self.timeout_sec)

    def check_agents_soon(self) -> None:
        """:meth:`check_agents` in :data:`LOST_CHECK_DELAY_S` (a session just died: the tracker drops a killed
        agent as its connection closes), once however many sessions died at once."""
        with self._lock:
            if self._closed or (self._lost_check is not None and self._lost_check.is_alive()):
                return
            self._lost_check = threading.Timer(LOST_CHECK_DELAY_S, self.check_agents)
            self._lost_check.daemon = True
            self._lost_check.start()

    def agents_available(self) -> int:
        """Agents on the key now; waits (bounded) while there are none."""
        try:
            return self.tracker.wait_for_key(self.key, self.device_wait_sec, on_wait=self.on_wait)
        except TrackerUnreachable as err:
            raise TrackerUnreachable(f"lost the tracker during tuning: {err}") from None

    def note_unreachable(self, err: AgentUnreachable) -> None:
        """An agent the tracker handed out cannot be reached from here: said once per address."""
        # The address is the agent's own word (its registration): only address characters are kept.
        addr = "".join(c if c.isalnum() or c in ".:-[]" else "?" for c in f"{err.host}:{err.port}")[:120]
        if self.stats.note_unreachable(addr, str(err)) and self.on_unreachable is not None:
            self.on_unreachable(str(err))
        counts = self.stats.snapshot()
        unreachable, measured = len(counts["unreachable"]), bool(counts["per_agent"])
        if not measured and not self.every_agent_unreachable:
            try:
                listed = self.tracker.servers_for_key(self.key)
            except TrackerUnreachable:
                return
            if listed and unreachable >= listed:  # as many distinct addresses failed as agents are listed; none measured
                addrs = ", ".join(sorted(counts["unreachable"]))  # address characters only (note_unreachable)
                self.every_agent_unreachable = (
                    f"no agent on key '{self.key}' can be reached from this host ({unreachable} tried: {addrs}): "
                    "fix the agent's --custom-addr (or the network) and run the job again")

    def check_agents(self) -> None:
        """Note every agent that measured here and is no longer listed on the key (killed, crashed, unplugged)."""
        try:
            listed = {a.agent_id for a in self.tracker.agent_infos(self.key)}
        except TrackerUnreachable:
            return  # said elsewhere: the next batch waits for the tracker, or the run fails
        gone = self.stats.note_lost(listed)
        for agent_id, measured in gone:
            if self.on_agent_lost is not None:
                self.on_agent_lost(agent_id, measured, len(listed))

    def count_measured(self, agent_id: str) -> None:
        """A candidate measured on ``agent_id``: counted as its result comes (an agent reported lost meanwhile is
        said with every candidate it measured, not only those MetaSchedule had joined)."""
        self.stats.count("per_agent", agent_id)

    def _record(self, agent_id, status):
        if agent_id is None:
            self.stats.count("failures", status)

    def run(self, runner_inputs: list[RunnerInput]) -> list[FarmRunnerFuture]:
        futures: list[FarmRunnerFuture | None] = [None] * len(runner_inputs)
        todo = []
        for i, inp in enumerate(runner_inputs):
            cached = self.cache.lookup(str(inp.artifact_path)) if self.cache is not None else None
            if cached is not None:
                done = concurrent.futures.Future()
                done.set_result((cached, "cache"))
                futures[i] = FarmRunnerFuture(done, self.timeout_sec, lambda *_: None)
            else:
                todo.append(i)
        if not todo:
            return futures  # type: ignore[return-value]
        self.check_agents()
        agents = min(self.agents_available(), self.max_workers)
        self._last_session_error = ""
        batch_id = uuid.uuid4().hex[:8]
        cands = []
        for n, i in enumerate(todo):
            inp = runner_inputs[i]
            path = str(inp.artifact_path)
            cand = Candidate(path, str(inp.device_type), tuple(a.as_json() for a in inp.args_info),
                              f"cand-{batch_id}-{n}{suffix(path)}")
            self._inputs[path] = (cand.device_type, cand.args_info)
            cands.append(cand)
            futures[i] = FarmRunnerFuture(cand.future, self.timeout_sec, self._recorder(path))
        Batch(self, cands, agents)
        return futures  # type: ignore[return-value]

    def _recorder(self, artifact_path: str):
        def record(agent_id, status, costs=None):
            self._record(agent_id, status)
            if agent_id is not None:
                self.measured_by[artifact_path] = agent_id
            if costs is not None and self.cache is not None:
                self.cache.add_result(artifact_path, costs)
        return record

    def remeasure(self, artifact_path: str, measured_by: str = "",
                  shunned: frozenset[str] = frozenset()) -> tuple[list[float], str] | None:
        """Measure one candidate of this runner's batches again, on an agent of the key other than
        ``measured_by`` and not in ``shunned`` where the key has one (sessions on the others are held
        meanwhile, so the tracker hands out the next), else on ``measured_by`` itself in a fresh session
        (unless it is shunned). (costs, agent id), or None when it could not be measured."""
        from tunefarm.core.wire import AGENT_ID_FUNC  # pylint: disable=import-outside-toplevel

        if artifact_path not in self._inputs:
            return None
        device_type, args_info = self._inputs[artifact_path]
        other = self.sessions.take_other((measured_by, *shunned))  # this thread's alone while it measures
        if other is not None:  # an agent kept open between batches, not the one that measured it
            try:
                cand = Candidate(artifact_path, device_type, args_info,
                                  f"verify-{uuid.uuid4().hex[:8]}{suffix(artifact_path)}")
                costs = measure_on(other.session, other.session.device(device_type, 0), cand,
                                    self.evaluator_config, 1, other.agent_measure)
                self.note_progress()
                self.sessions.give_idle(other)
                return costs, other.agent_id
            except Exception:  # pylint: disable=broad-except
                pass  # dropped; asked for below like any other
        self.sessions.opening()  # batches ending meanwhile give their sessions back to the tracker, not the pool
        # the tracker can hand those agents out now (the one that measured it: a fresh session)
        self.sessions.drop_idle()
        held: list[tuple[object, str]] = []
        chosen = None
        try:
            servers = self.tracker.servers_for_key(self.key)
            if servers == 0:
                return None  # no agent now: the next batch waits for one, visibly; this one is not verified
            for attempt in range(servers):
                # The first request takes the first agent free, ahead of the batches' requests: it waits for
                # the batch an agent is measuring as long as this runner's sessions progress. The next ones, for
                # an agent other than the one that measured it, wait briefly: one that is gone is not waited for.
                try:
                    session = self.request_patiently(
                        self.device_wait_sec if attempt == 0 else min(self.device_wait_sec, REMEASURE_WAIT_S),
                        int(self.timeout_sec) + 60, REMEASURE_PRIORITY, patient=attempt == 0)
                except AgentUnreachable as err:
                    self.note_unreachable(err)  # not a verifier: the agents this host reaches are asked
                    continue
                except TunefarmError:
                    # none other free within the wait (one the host could not reach is not back on the
                    # tracker's free list yet): the sessions held so far are what there is, measured_by's too
                    break
                try:
                    agent_id = str(session.get_function(AGENT_ID_FUNC)())
                except Exception:  # pylint: disable=broad-except
                    agent_id = "unknown (not a tunefarm agent)"
                if agent_id != measured_by and agent_id not in shunned:
                    chosen = (session, agent_id)
                    break
                held.append((session, agent_id))  # keep it busy: the next request goes to another server
            if chosen is None:  # no other agent: the one that measured it, in a fresh session
                chosen = next(((sess, a) for sess, a in held if a == measured_by and a not in shunned), None)
            if chosen is None:
                return None
            session, agent_id = chosen
            cand = Candidate(artifact_path, device_type, args_info,
                              f"verify-{uuid.uuid4().hex[:8]}{suffix(artifact_path)}")
            costs = measure_on(session, session.device(device_type, 0), cand, self.evaluator_config, 1,
                                agent_measure_func(session))
            self.note_progress()
            return costs, agent_id
        except Exception:  # pylint: disable=broad-except
            return None
        finally:
            for sess, _ in held:
                close_session(sess)  # now: a dropped session holds its agent until Python collects it
            if chosen is not None:
                close_session(chosen[0])
            held.clear()
            self.sessions.opened()

    def request_patiently(self, wait_s: float, session_timeout: int, priority: int, patient: bool):
        """A session on an agent of the key within ``wait_s``; ``patient``: asked again while every agent is busy
        and this runner's own sessions progress (they hold the agents, and end)."""
        from tunefarm.tracker.client import request_session  # pylint: disable=import-outside-toplevel

        while True:
            try:
                return request_session(self.tracker_addr, self.key, wait_s, session_timeout, priority=priority)
            except AgentsBusy:
                if not patient or self._closed or not self.busy_with_own_work():
                    raise

    def peak_floor_gflops(self) -> float:
        """The lowest positive peak the key's agents report: agents of one key are one kind of device, and a
        process that reports a huge peak to lower the floor for itself does not change the minimum."""
        try:
            peaks = [float(i.peak_gflops or 0.0) for i in self.tracker.agent_infos(self.key)]
        except TrackerUnreachable:
            return 0.0
        positive = [p for p in peaks if p > 0]
        return min(positive) if positive else 0.0

    def shutdown(self) -> None:
        self._closed = True
        if self._lost_check is not None:
            self._lost_check.cancel()
        self.sessions.close()  # the idle watcher asks the tracker no more
        self.tracker.close()
