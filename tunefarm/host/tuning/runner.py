"""FarmRunner: MetaSchedule's Runner interface, measuring candidates on the farm's agents.

A batch of candidates is measured by one thread per agent on the key, each holding **one RPC session
for the batch** and taking candidates from a shared queue as it finishes the previous one (a fast
agent measures more). Each candidate is measured exactly as stock ``RPCRunner`` measures it (the same
upload, argument allocation and ``time_evaluator`` code, imported from TVM), under a name of its own
so that candidates sharing a session never share a library path. What a farm adds:
  * before each batch the tracker is asked how many agents serve the key: none -> wait up to
    ``device_wait_sec`` with a visible message, then a one-line NoDeviceError; several -> one
    session on each, so every agent on the key is used;
  * a deadline per candidate (``timeout_sec`` from the moment an agent starts it): a candidate that
    overruns is reported failed at once and its thread is abandoned; a new thread asks the tracker for
    a session (another agent, or this one once its server has ended the stuck session at the batch's
    ``session_timeout``);
  * an agent that dies, freezes or drops off the network costs no candidate: the one it had in flight
    (its session failed, or it overran its deadline) goes back to the queue and is measured again on
    the next session, another agent's or this one's once it is back (at most :data:`MAX_ATTEMPTS` times:
    a candidate that kills every session it runs on fails then); its thread asks for a new session, and
    when no agent serves the key any more the candidates left fail at once (the next batch then waits
    visibly for an agent, as above);
  * each measurement records which agent ran it (``tunefarm.agent.id`` on the agent), and an agent that
    measured for this runner and is no longer listed at the tracker is reported (``on_agent_lost``) once.

Why not stock's session per candidate: opening one costs a tracker round trip, a request and a
handshake (~200 ms measured, Nagle's delayed ACKs included) against ~60 ms of device time for a typical
ResNet-18 candidate; bench/farm_overhead.py measures both ways.

A candidate is one RPC call to a tunefarm agent (``tunefarm.measure.candidate``: the artifact's bytes, its
arguments and the evaluator settings; measured on the agent by stock MetaSchedule's local functions). Over a
slow link a worker sends several candidates per call (``tunefarm.measure.batch``): as many as keep the
session's measured round trip under :data:`CHUNK_RTT_SHARE` of their measuring time (:func:`chunk_size`;
one at a time on a LAN). Each candidate of a chunk keeps its own deadline (its place in the chunk times
``timeout_sec``), its own result or error, and the ones the agent did not start after a failure go back to
the queue without costing an attempt.

Between batches a worker's session stays open for the next batch (:data:`SESSION_IDLE_S`; the round trips of
opening one are paid once per job rather than per batch), unless a worker of a batch running beside it is
waiting for a session (MetaSchedule's first round sends every task's batch at once) or the tracker has a
request from anyone else waiting on the key (another search worker's runner, another job): then it is closed
so that the tracker hands the agent on. A kept session that turns out dead costs its candidates no attempt. A second
measurement (the timing verifier) uses a kept session on another agent, or frees them all and asks the tracker.
"""
from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
import uuid
from typing import Callable

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, RunnerInput, RunnerResult
from tvm.s_tir.meta_schedule.runner.runner import PyRunner, PyRunnerFuture

from tunefarm.core.errors import AgentsBusy, AgentUnreachable, TrackerUnreachable, TunefarmError

_WATCH_INTERVAL_S = 0.1
REMEASURE_WAIT_S = 15.0  # how long a second measurement waits for an agent other than the one it has
REMEASURE_PRIORITY = 2  # the tracker serves a second measurement before the batches' requests (priority 1)
LOST_CHECK_DELAY_S = 1.0  # a session died: the tracker is asked this much later whether its agent is gone
MAX_ATTEMPTS = 2  # a candidate whose session dies under it is measured once more, on the next session
# What an RPC session that died under a candidate raises (the agent killed, frozen past its deadline,
# unplugged, its session crashed), as against a candidate's own error reported through a live session.
_SESSION_LOST = ("socket", "connection", "broken pipe", "timed out", "timeout", "reset by peer", "eof",
                 "rpcsession", "rpc session", "closed", "errno",
                 "kshutdown")  # the session process ended mid-call: "code == RPCCode::kReturn ... code=kShutdown"


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


def session_lost(err: BaseException) -> bool:
    """Whether ``err`` says the session died (rather than that the candidate failed on a live one)."""
    if isinstance(err, (OSError, EOFError, TimeoutError, ConnectionError)):
        return True
    text = str(err).lower()
    return any(word in text for word in _SESSION_LOST)


class _Candidate:
    """One candidate of a batch: what to measure, and the future its result goes to."""

    __slots__ = ("artifact_path", "device_type", "args_info", "remote_name", "future", "started", "worker",
                 "attempts", "remeasured", "allowance")

    def __init__(self, artifact_path: str, device_type: str, args_info: tuple, remote_name: str):
        self.artifact_path = artifact_path
        self.device_type = device_type
        self.args_info = args_info
        self.remote_name = remote_name
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.started: float | None = None
        self.worker: int | None = None
        self.attempts = 0  # sessions it was started on
        self.remeasured = False  # handed back to the queue once: its first session died under it
        self.allowance = 0.0  # seconds from ``started`` to its deadline (later places of a chunk get more)

    def settle(self, value=None, error: BaseException | None = None) -> bool:
        """Set the result once; False when it was already settled (e.g. timed out meanwhile)."""
        try:
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(value)
            return True
        except concurrent.futures.InvalidStateError:
            return False


def _agent_measure(session):
    """The agent's one-round-trip measuring function (tunefarm.measure.candidate), or None (a stock server)."""
    from tunefarm.core.wire import MEASURE_FUNC  # pylint: disable=import-outside-toplevel

    try:
        return session.get_function(MEASURE_FUNC)
    except Exception:  # pylint: disable=broad-except
        return None


def _agent_measure_batch(session):
    """The agent's several-candidates-per-round-trip function (tunefarm.measure.batch), or None."""
    from tunefarm.core.wire import MEASURE_BATCH_FUNC  # pylint: disable=import-outside-toplevel

    try:
        return session.get_function(MEASURE_BATCH_FUNC)
    except Exception:  # pylint: disable=broad-except
        return None


def _evaluator_json(evaluator_config) -> str:
    import json  # pylint: disable=import-outside-toplevel

    return json.dumps({"number": evaluator_config.number, "repeat": evaluator_config.repeat,
                       "min_repeat_ms": evaluator_config.min_repeat_ms,
                       "enable_cpu_cache_flush": evaluator_config.enable_cpu_cache_flush})


class NotMeasured(RuntimeError):
    """No session took the candidate (no agent left on the key, or none would open): the farm's failure, not the
    candidate's."""


class EveryAgentUnreachable(TunefarmError):
    """Every agent on the key was handed out and none could be reached from this host, and none ever measured
    here (issue 32, item 7): the job stops, its candidates are not spent as failures."""


class CandidateNotRun(Exception):
    """The agent did not measure this candidate of a chunk (an earlier one failed): measure it again."""


def _measure_chunk(measure_batch, cands: list[_Candidate], evaluator_config) -> list:
    """Several candidates in one RPC call: per candidate, its costs or the exception to settle it with
    (:class:`CandidateNotRun` for the ones the agent skipped after a failure)."""
    import json  # pylint: disable=import-outside-toplevel

    from tunefarm.core.wire import MEASURE_NOT_RUN as NOT_RUN  # pylint: disable=import-outside-toplevel

    blobs, header = [], []
    for cand in cands:
        with open(cand.artifact_path, "rb") as fh:
            blob = fh.read()
        blobs.append(blob)
        header.append({"name": cand.remote_name, "size": len(blob), "args_info": list(cand.args_info),
                       "device_type": cand.device_type})
    answer = json.loads(str(measure_batch(bytearray(b"".join(blobs)), json.dumps(header),
                                          _evaluator_json(evaluator_config))))
    if not isinstance(answer, list) or len(answer) != len(cands):
        raise RuntimeError(f"the agent answered {type(answer).__name__} for a chunk of {len(cands)} candidates")
    out: list = []
    for item in answer:
        if isinstance(item, dict) and isinstance(item.get("costs"), list):
            out.append([float(c) for c in item["costs"]])
        elif isinstance(item, dict) and item.get("error") == NOT_RUN:
            out.append(CandidateNotRun(NOT_RUN))
        else:
            error = item.get("error") if isinstance(item, dict) else None
            out.append(RuntimeError(str(error)[-2000:] if error else f"malformed answer {str(item)[:80]!r}"))
    return out


# A chunk pays one network round trip for all its candidates: it holds as many as keep that round trip under
# this share of their measuring time (1 where the round trip is negligible, as on a LAN: one at a time keeps
# the load spread over the agents and the fault handling per candidate).
CHUNK_RTT_SHARE = 0.05
MAX_CHUNK = 16


def chunk_size(rtt_s: float, per_candidate_s: float | None, queued: int, workers: int) -> int:
    """How many candidates a worker sends in its next call: enough that ``rtt_s`` is at most
    :data:`CHUNK_RTT_SHARE` of their measuring time (``per_candidate_s``, unknown before the first one), never
    more than :data:`MAX_CHUNK` nor than its share of the ``queued`` candidates among ``workers``."""
    if not per_candidate_s or per_candidate_s <= 0 or rtt_s <= 0:
        return 1
    want = -(-rtt_s // (CHUNK_RTT_SHARE * per_candidate_s))
    share = -(-queued // max(1, workers))
    return int(max(1, min(want, MAX_CHUNK, share)))


def _measure_on(session, device, cand: _Candidate, evaluator_config, alloc_repeat: int,
                agent_measure=None) -> list[float]:
    """One candidate on an open session. With ``agent_measure`` (a tunefarm agent): one RPC call carrying the
    artifact, measured on the agent with stock MetaSchedule's local alloc/evaluator functions
    (device_agents/measure_service.py); else stock RPCRunner's own upload/alloc/run functions."""
    if agent_measure is not None and alloc_repeat == 1:
        import json  # pylint: disable=import-outside-toplevel

        with open(cand.artifact_path, "rb") as fh:
            blob = fh.read()
        out = agent_measure(bytearray(blob), cand.remote_name,
                            json.dumps(list(cand.args_info)), _evaluator_json(evaluator_config), cand.device_type)
        return [float(c) for c in json.loads(str(out))]
    from tvm.s_tir.meta_schedule.runner import rpc_runner as stock  # pylint: disable=import-outside-toplevel

    remote = cand.remote_name
    try:
        rt_mod = stock.default_upload_module(session, cand.artifact_path, remote)
        args = stock.default_alloc_argument(session, device, cand.args_info, alloc_repeat)
        return [float(c) for c in stock.default_run_evaluator(session, rt_mod, device, evaluator_config, args)]
    finally:
        # Stock cleanup also removes the session's work dir (remove("")), which a reused session
        # still needs: remove this candidate's files only (the whole dir goes when the session ends).
        for path in (remote, remote + ".so"):
            try:
                session.remove(path)
            except Exception:  # pylint: disable=broad-except
                pass


# A session stays open between batches for this long (the search and builds of the next batch run meanwhile):
# over a slow link opening one costs several round trips (the reachability probe, TCP and RPC handshakes, the
# agent's id and functions). The agent is held for this job meanwhile; the runner's shutdown, and a second
# measurement that needs the agent, give it back at once.
SESSION_IDLE_S = 30.0
IDLE_CHECK_S = 0.25  # how often kept sessions look at the tracker for someone else waiting for their agents
POOLED_SESSION_TIMEOUT_S = 900  # what the server is asked to allow a session that may serve several batches


class _Held:
    """An open session on one agent, with what the runner learnt about it."""

    __slots__ = ("session", "agent_id", "rtt", "agent_measure", "measure_batch", "per_candidate", "opened",
                 "timeout", "idle_since")

    def __init__(self, session, agent_id: str, rtt: float, timeout: float):
        self.session = session
        self.agent_id = agent_id
        self.rtt = rtt
        self.agent_measure = _agent_measure(session)
        self.measure_batch = _agent_measure_batch(session) if self.agent_measure is not None else None
        self.per_candidate: float | None = None
        self.opened = time.monotonic()
        self.timeout = timeout
        self.idle_since = 0.0

    def fits(self, seconds: float) -> bool:
        """Whether the server's session timeout leaves ``seconds`` more (with a margin)."""
        return time.monotonic() - self.opened + seconds < self.timeout - 30


class _Batch:
    """Measures a list of candidates with one thread (one RPC session) per agent."""

    def __init__(self, runner: "FarmRunner", cands: list[_Candidate], agents: int):
        self.runner = runner
        self.queue = collections.deque(cands)
        self.cands = cands
        self.lock = threading.Lock()
        self.live: set[int] = set()  # worker ids still taking candidates
        self.abandoned: set[int] = set()
        self.next_worker = 0
        self.sessions_opened = 0
        self.open_failures = 0
        # The server ends a session at this timeout: enough for one agent to measure the whole batch, and for
        # the session to serve the next batches too (SESSION_IDLE_S).
        self.session_timeout = max(int(runner.timeout_sec * len(cands)) + 60, POOLED_SESSION_TIMEOUT_S)
        for _ in range(max(1, min(agents, len(cands)))):
            self._start_worker()
        threading.Thread(target=self._watch, name="farm-runner-watch", daemon=True).start()

    def _start_worker(self) -> None:
        with self.lock:
            wid = self._new_worker()
        self._run_worker(wid)

    def _new_worker(self) -> int:
        """A worker id counted live at once (caller holds the lock): the watcher never sees the batch without
        workers while a worker hands over to its replacement."""
        wid = self.next_worker
        self.next_worker += 1
        self.live.add(wid)
        return wid

    def _run_worker(self, wid: int) -> None:
        threading.Thread(target=self._work, args=(wid,), name=f"farm-runner-{wid}", daemon=True).start()

    def _open(self):
        from tunefarm.core.wire import AGENT_ID_FUNC  # pylint: disable=import-outside-toplevel

        runner = self.runner
        if runner.tracker.servers_for_key(runner.key) == 0:
            raise RuntimeError(f"no agent serves key '{runner.key}' any more")
        # Every agent of the key may be busy for the whole wait with this runner's own sessions (MetaSchedule's
        # first round sends every task's batch at once; an agent lost leaves fewer for them): while they measure,
        # this worker waits its turn instead of failing its candidates as "not measured".
        session = runner.request_patiently(runner.device_wait_sec, self.session_timeout, 1, patient=True)
        try:
            get_id = session.get_function(AGENT_ID_FUNC)
            t0 = time.perf_counter()
            agent_id = str(get_id())
            rtt = time.perf_counter() - t0  # one round trip, nearly nothing done on the agent
        except Exception:  # pylint: disable=broad-except
            agent_id, rtt = "unknown (not a tunefarm agent)", 0.0
        return _Held(session, agent_id, rtt, self.session_timeout)

    def _work(self, wid: int) -> None:
        held: _Held | None = None  # the session this worker measures on
        reused = False  # held came from the runner's idle sessions and has not answered in this batch yet
        device = device_type = None
        try:
            while True:
                with self.lock:
                    while self.queue and self.queue[0].future.done():
                        self.queue.popleft()  # settled by a late result of an earlier attempt
                    if wid in self.abandoned or not self.queue:
                        # Leaving is decided and counted at once: a worker that hands a candidate back
                        # meanwhile sees this one gone and starts another instead of leaving it orphaned.
                        self.live.discard(wid)
                        return
                    cand = self.queue.popleft()
                if held is None:
                    held = self.runner.take_idle(len(self.cands))  # else counted as opening one
                    reused = held is not None
                    if reused:
                        with self.lock:
                            self.sessions_opened += 1  # a session of this batch, for the retry rule below
                if held is None:
                    try:
                        try:
                            held = self._open()
                        finally:
                            self.runner.opened()
                    except Exception as err:  # pylint: disable=broad-except
                        self.runner.last_session_error = str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)
                        if isinstance(err, AgentUnreachable):
                            self.runner.note_unreachable(err)
                        with self.lock:
                            self.queue.appendleft(cand)  # for a worker that has a session
                            self.open_failures += 1
                            self.live.discard(wid)
                            # The others may have left while this one held the last candidates: if any agent
                            # opened a session in this batch, another worker asks again (bounded).
                            retry = (not self.live and self.sessions_opened > 0
                                     and self.open_failures <= 2 * len(self.cands) + 4)
                            successor = self._new_worker() if retry else None
                        if successor is not None:
                            self._run_worker(successor)
                        return
                    with self.lock:
                        self.sessions_opened += 1
                    device_type = None
                if device_type != cand.device_type:
                    device = held.session.device(cand.device_type, 0)
                    device_type = cand.device_type
                with self.lock:
                    if wid in self.abandoned:
                        self.queue.appendleft(cand)
                        return
                    size = (chunk_size(held.rtt, held.per_candidate, len(self.queue) + 1, len(self.live))
                            if held.measure_batch is not None else 1)
                    chunk = [cand]
                    while len(chunk) < size and self.queue:
                        if self.queue[0].future.done():
                            self.queue.popleft()
                        elif self.queue[0].device_type != cand.device_type:
                            break
                        else:
                            chunk.append(self.queue.popleft())
                    now = time.monotonic()
                    attempts = []
                    for place, member in enumerate(chunk):
                        member.started = now
                        member.worker = wid
                        member.attempts += 1
                        member.allowance = self.runner.timeout_sec * (place + 1)  # measured in turn
                        attempts.append(member.attempts)
                    self.runner.chunks[len(chunk)] += 1
                t0 = time.perf_counter()
                try:
                    if len(chunk) == 1:
                        results: list = [_measure_on(held.session, device, cand, self.runner.evaluator_config, 1,
                                                     held.agent_measure)]
                    else:
                        results = _measure_chunk(held.measure_batch, chunk, self.runner.evaluator_config)
                except Exception as err:  # pylint: disable=broad-except
                    held = None  # the session may be dead (agent gone, session crashed): a fresh one next
                    was_idle, reused = reused, False
                    if session_lost(err):
                        self.runner.check_agents_soon()  # its agent may be gone: said within this batch
                    for member, attempt in zip(chunk, attempts):
                        with self.lock:
                            if (member.attempts != attempt or member.worker != wid or member.future.done()
                                    or member.started is None):
                                continue  # taken back meanwhile (its deadline passed): queued again already
                            if session_lost(err) and was_idle:
                                # a session kept from an earlier batch died while idle (its agent went, or the
                                # server ended it): not the candidate's attempt
                                member.attempts -= 1
                                member.started = member.worker = None
                                self.queue.appendleft(member)
                                continue
                            if session_lost(err) and member.attempts < MAX_ATTEMPTS:
                                self._requeue(member)
                                continue
                        member.settle(error=err)
                    continue
                reused = False
                ran = [r for r in results if not isinstance(r, CandidateNotRun)]
                held.per_candidate = max(time.perf_counter() - t0 - held.rtt, 1e-4) / max(1, len(ran))
                agent_id = held.agent_id
                if len(chunk) > 1 and len(ran) < len(chunk) or any(isinstance(r, Exception) for r in ran):
                    held = None  # a candidate failed: the rest on a fresh session (a GPU fault can stick)
                for member, attempt, res in zip(chunk, attempts, results):
                    with self.lock:
                        if member.attempts != attempt or member.worker != wid:
                            continue  # stale: taken back meanwhile
                        if isinstance(res, CandidateNotRun):  # not started on the agent: not an attempt
                            member.attempts -= 1
                            member.started = member.worker = None
                            self.queue.appendleft(member)
                            continue
                    if isinstance(res, Exception):
                        member.settle(error=res)
                    elif member.settle((res, agent_id)):
                        self.runner.count_measured(agent_id)  # now, not when MetaSchedule joins the batch
                self.runner.note_progress()
        finally:
            with self.lock:
                self.live.discard(wid)
                keep = wid not in self.abandoned
            if held is not None and keep:
                self.runner.give_idle(held)  # for the next batch

    def _requeue(self, cand: _Candidate) -> None:
        """Hand a candidate whose session died under it back to the queue (caller holds the lock)."""
        cand.started = None
        cand.worker = None  # a late answer of the attempt that lost it is stale: past its deadline, or dead
        cand.remeasured = True
        self.runner.requeued += 1
        self.queue.appendleft(cand)

    def _watch(self) -> None:
        """Enforce per-candidate deadlines; fail what is left once no worker can take it."""
        timeout = self.runner.timeout_sec
        while True:
            restart = 0
            orphaned: list[_Candidate] = []
            with self.lock:
                if all(c.future.done() for c in self.cands):
                    return
                now = time.monotonic()
                for cand in self.cands:
                    if (cand.started is not None and not cand.future.done()
                            and now - cand.started > (cand.allowance or timeout)):
                        worker = cand.worker
                        if cand.attempts < MAX_ATTEMPTS:
                            self._requeue(cand)  # its agent froze or dropped off: the next session measures it
                        else:
                            cand.settle(error=TimeoutError())
                        if worker not in self.abandoned:
                            self.abandoned.add(worker)
                            self.live.discard(worker)
                            restart += 1
                if not self.live and not restart and self.queue:
                    orphaned = list(self.queue)
                    self.queue.clear()
            for _ in range(restart if self.queue else 0):
                self._start_worker()
            reason = self.runner.last_session_error or f"no agent on key '{self.runner.key}' took it"
            stop = self.runner.every_agent_unreachable
            for cand in orphaned:
                cand.settle(error=EveryAgentUnreachable(stop) if stop else NotMeasured(f"not measured: {reason}"))
            time.sleep(_WATCH_INTERVAL_S)


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
                 on_agent_lost: Callable[[str, int, int], None] | None = None):
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
        self.last_session_error = ""
        self._lock = threading.Lock()
        self.per_agent = collections.Counter()  # agent id -> candidates measured
        self.failures = collections.Counter()  # FAILURE_KINDS -> count
        self.on_agent_lost = on_agent_lost  # (agent id, candidates it measured, agents left on the key)
        self.lost: dict[str, int] = {}  # agent id -> candidates it measured before it went
        self.requeued = 0  # candidates handed back to the queue because their session died under them
        self.chunks = collections.Counter()  # candidates per measuring call -> calls (several: a slow link)
        self.sessions_reused = 0  # batches' sessions that were kept open from an earlier batch
        self._idle: list[_Held] = []  # open sessions between batches (SESSION_IDLE_S)
        self._idle_watch: threading.Thread | None = None  # hands kept sessions back (see _watch_idle)
        self._closed = False
        self._last_progress = time.monotonic()  # when a candidate of this runner was last measured
        self._lost_check: threading.Timer | None = None
        self._opening = 0  # workers asking the tracker for a session now
        self.unreachable: dict[str, str] = {}  # "host:port" the tracker handed out -> why this host cannot reach it
        self.every_agent_unreachable = ""  # set by note_unreachable: why the job stops
        self.on_unreachable: Callable[[str], None] | None = None  # told each such address once
        self.measured_by: dict[str, str] = {}  # artifact path -> agent id (for the timing verifier)
        self._inputs: dict[str, tuple[str, tuple]] = {}  # artifact path -> (device type, args info)

    @property
    def closed(self) -> bool:
        return self._closed

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
        with self._lock:
            new = addr not in self.unreachable
            self.unreachable[addr] = str(err)
            unreachable, measured = len(self.unreachable), bool(self.per_agent)
        if new and self.on_unreachable is not None:
            self.on_unreachable(str(err))
        if not measured and not self.every_agent_unreachable:
            try:
                listed = self.tracker.servers_for_key(self.key)
            except TrackerUnreachable:
                return
            if listed and unreachable >= listed:  # as many distinct addresses failed as agents are listed; none measured
                self.every_agent_unreachable = (
                    f"no agent on key '{self.key}' can be reached from this host ({unreachable} tried, see the "
                    "line above): fix the agent's --custom-addr (or the network) and run the job again")

    def check_agents(self) -> None:
        """Note every agent that measured here and is no longer listed on the key (killed, crashed, unplugged)."""
        try:
            listed = {a.agent_id for a in self.tracker.agent_infos(self.key)}
        except TrackerUnreachable:
            return  # said elsewhere: the next batch waits for the tracker, or the run fails
        with self._lock:
            gone = [(a, n) for a, n in self.per_agent.items()
                    if a not in listed and a not in self.lost and not a.startswith("unknown")]
            self.lost.update(gone)
        for agent_id, measured in gone:
            if self.on_agent_lost is not None:
                self.on_agent_lost(agent_id, measured, len(listed))

    def take_idle(self, batch_size: int) -> _Held | None:
        """A session kept open from an earlier batch, if one is fresh enough for ``batch_size`` candidates; else
        None, and the caller is counted as opening a session (it calls :meth:`opened` when done)."""
        now = time.monotonic()
        with self._lock:
            keep, found = [], None
            for held in self._idle:
                expected = 2 * (held.per_candidate or self.timeout_sec) * batch_size + 60
                if found is None and now - held.idle_since < SESSION_IDLE_S and held.fits(expected):
                    found = held
                elif now - held.idle_since < SESSION_IDLE_S:
                    keep.append(held)
            self._idle = keep  # the rest are closed (dropped)
            if found is not None:
                self.sessions_reused += 1
            else:
                self._opening += 1
            return found

    def opened(self) -> None:
        with self._lock:
            self._opening -= 1

    def give_idle(self, held: _Held) -> None:
        """Keep ``held`` open for the next batch — unless a worker (of a batch running beside this one, as in
        MetaSchedule's first round over every task) is asking the tracker for a session meanwhile: then it is
        closed, so that the tracker hands its agent to that worker."""
        held.idle_since = time.monotonic()
        with self._lock:
            if self._opening != 0:
                return
            self._idle.append(held)
            watch = self._idle_watch is None
            if watch:
                self._idle_watch = threading.Thread(target=self._watch_idle, name="farm-runner-idle", daemon=True)
        if watch:
            self._idle_watch.start()

    def _watch_idle(self) -> None:
        """While sessions are kept between batches: close one for each request the tracker has waiting on the
        key (another runner's: a search worker of the same job, another job on the same agents — this runner's
        own ``_opening`` is only what this process asks), and each one kept past :data:`SESSION_IDLE_S`.
        Without it a runner whose batches come faster than SESSION_IDLE_S kept every agent of the key to itself
        and the other runners' batches waited out ``device_wait_sec`` and failed (issue 16's spread search)."""
        while True:
            with self._lock:
                now = time.monotonic()
                self._idle = [h for h in self._idle if now - h.idle_since < SESSION_IDLE_S]
                if not self._idle or self._closed:
                    self._idle, self._idle_watch = [], None
                    return
            waiting = self._waiting()
            if waiting:
                with self._lock:
                    self._idle.sort(key=lambda h: h.idle_since)
                    del self._idle[:waiting]  # the oldest first: closed, the tracker hands their agents on
            time.sleep(IDLE_CHECK_S)

    def _waiting(self) -> int:
        """Requests the tracker has waiting on this runner's key (0 when it cannot say)."""
        try:
            for entry in self.tracker.devices():
                if entry["key"] == self.key:
                    return max(0, int(entry["pending"]))
        except Exception:  # pylint: disable=broad-except  # the tracker lost or its answer malformed: keep them
            pass
        return 0

    def drop_idle(self, agent_id: str | None = None) -> None:
        """Close the sessions kept between batches (those on ``agent_id`` only, if given): their agents are free."""
        with self._lock:
            self._idle = [h for h in self._idle if agent_id is not None and h.agent_id != agent_id]

    def count_measured(self, agent_id: str) -> None:
        """A candidate measured on ``agent_id``: counted as its result comes (an agent reported lost meanwhile is
        said with every candidate it measured, not only those MetaSchedule had joined)."""
        with self._lock:
            self.per_agent[agent_id] += 1

    def _record(self, agent_id, status):
        if agent_id is None:
            with self._lock:
                self.failures[status] += 1

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
        self.last_session_error = ""
        batch_id = uuid.uuid4().hex[:8]
        cands = []
        for n, i in enumerate(todo):
            inp = runner_inputs[i]
            path = str(inp.artifact_path)
            cand = _Candidate(path, str(inp.device_type), tuple(a.as_json() for a in inp.args_info),
                              f"cand-{batch_id}-{n}{_suffix(path)}")
            self._inputs[path] = (cand.device_type, cand.args_info)
            cands.append(cand)
            futures[i] = FarmRunnerFuture(cand.future, self.timeout_sec, self._recorder(path))
        _Batch(self, cands, agents)
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
        with self._lock:
            other = next((h for h in self._idle if h.agent_id not in (measured_by, *shunned)
                          and not h.agent_id.startswith("unknown")), None)
            if other is not None:
                self._idle.remove(other)  # this thread's alone while it measures
        if other is not None:  # an agent kept open between batches, not the one that measured it
            try:
                cand = _Candidate(artifact_path, device_type, args_info,
                                  f"verify-{uuid.uuid4().hex[:8]}{_suffix(artifact_path)}")
                costs = _measure_on(other.session, other.session.device(device_type, 0), cand,
                                    self.evaluator_config, 1, other.agent_measure)
                self.note_progress()
                self.give_idle(other)
                return costs, other.agent_id
            except Exception:  # pylint: disable=broad-except
                pass  # dropped; asked for below like any other
        with self._lock:
            self._opening += 1  # batches ending meanwhile give their sessions back to the tracker, not the idle list
        self.drop_idle()  # the tracker can hand those agents out now (the one that measured it: a fresh session)
        held: list[tuple[object, str]] = []
        try:
            servers = self.tracker.servers_for_key(self.key)
            if servers == 0:
                return None  # no agent now: the next batch waits for one, visibly; this one is not verified
            chosen = None
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
            cand = _Candidate(artifact_path, device_type, args_info,
                              f"verify-{uuid.uuid4().hex[:8]}{_suffix(artifact_path)}")
            costs = _measure_on(session, session.device(device_type, 0), cand, self.evaluator_config, 1,
                                _agent_measure(session))
            self.note_progress()
            return costs, agent_id
        except Exception:  # pylint: disable=broad-except
            return None
        finally:
            held.clear()
            self.opened()

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
        self._closed = True  # the idle watcher asks the tracker no more
        if self._lost_check is not None:
            self._lost_check.cancel()
        self.drop_idle()
        self.tracker.close()


def _suffix(path: str) -> str:
    """The artifact's extension (.tar, .so): the agent's load_module picks its loader by it."""
    name = path.rsplit("/", 1)[-1]
    return "." + name.split(".", 1)[1] if "." in name else ""
