"""One batch of candidates measured on the farm: a thread (one RPC session) per agent of the key.

Each worker thread holds **one RPC session for the batch** (a kept one from the session pool, sessions.py, or a
new one from the tracker) and takes candidates from the batch's queue as it finishes the previous one (a fast
agent measures more), one per call or a chunk over a slow link (transport.py). What the batch adds:
  * a deadline per candidate (``timeout_sec`` from the moment an agent starts it; a later place of a chunk
    gets its place times that): a candidate that overruns is reported failed and its thread is abandoned; a
    new thread asks the tracker for a session (another agent, or this one once its server has ended the stuck
    session at the batch's ``session_timeout``);
  * an agent that dies, freezes or drops off the network costs no candidate: the one it had in flight (its
    session failed, or it overran its deadline) goes back to the queue and is measured again on the next
    session (at most :data:`MAX_ATTEMPTS` times: a candidate that kills every session it runs on fails then);
    a kept session that turns out dead, and the candidates of a chunk the agent did not start, cost no attempt;
    when no agent serves the key any more the candidates left fail at once as :class:`NotMeasured`.
The runner (runner.py) makes batches, counts what they measured and hands MetaSchedule the futures.
"""
from __future__ import annotations

import collections
import threading
import time

from tunefarm.core.errors import TunefarmError
from tunefarm.host.tuning.sessions import POOLED_SESSION_TIMEOUT_S, HeldSession
from tunefarm.host.tuning.transport import Candidate, CandidateNotRun, chunk_size, measure_chunk, measure_on

_WATCH_INTERVAL_S = 0.1
MAX_ATTEMPTS = 2  # a candidate whose session dies under it is measured once more, on the next session
# What an RPC session that died under a candidate raises (the agent killed, frozen past its deadline,
# unplugged, its session crashed), as against a candidate's own error reported through a live session.
_SESSION_LOST = ("socket", "connection", "broken pipe", "timed out", "timeout", "reset by peer", "eof",
                 "rpcsession", "rpc session", "closed", "errno",
                 "kshutdown")  # the session process ended mid-call: "code == RPCCode::kReturn ... code=kShutdown"


def session_lost(err: BaseException) -> bool:
    """Whether ``err`` says the session died (rather than that the candidate failed on a live one)."""
    if isinstance(err, (OSError, EOFError, TimeoutError, ConnectionError)):
        return True
    text = str(err).lower()
    return any(word in text for word in _SESSION_LOST)



class EveryAgentUnreachable(TunefarmError):
    """Every agent on the key was handed out and none could be reached from this host, and none ever measured
    here (issue 32, item 7): the job stops, its candidates are not spent as failures."""


class NotMeasured(RuntimeError):
    """No session took the candidate (no agent left on the key, or none would open): the farm's failure, not the
    candidate's."""


class Batch:
    """Measures a list of candidates with one thread (one RPC session) per agent."""

    def __init__(self, runner: "FarmRunner", cands: list[Candidate], agents: int):
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
        return HeldSession(session, agent_id, rtt, self.session_timeout)

    def _work(self, wid: int) -> None:
        held: HeldSession | None = None  # the session this worker measures on
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
                    held = self.runner.sessions.take_idle(len(self.cands))  # else counted as opening one
                    reused = held is not None
                    if reused:
                        with self.lock:
                            self.sessions_opened += 1  # a session of this batch, for the retry rule below
                if held is None:
                    try:
                        try:
                            held = self._open()
                        finally:
                            self.runner.sessions.opened()
                    except Exception as err:  # pylint: disable=broad-except
                        self.runner.note_session_error(err)
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
                    self.runner.stats.count("chunks", len(chunk))
                t0 = time.perf_counter()
                try:
                    if len(chunk) == 1:
                        results: list = [measure_on(held.session, device, cand, self.runner.evaluator_config, 1,
                                                     held.agent_measure)]
                    else:
                        results = measure_chunk(held.measure_batch, chunk, self.runner.evaluator_config)
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
                self.runner.sessions.give_idle(held)  # for the next batch

    def _requeue(self, cand: Candidate) -> None:
        """Hand a candidate whose session died under it back to the queue (caller holds the lock)."""
        cand.started = None
        cand.worker = None  # a late answer of the attempt that lost it is stale: past its deadline, or dead
        cand.remeasured = True
        self.runner.stats.count("requeued")
        self.queue.appendleft(cand)

    def _watch(self) -> None:
        """Enforce per-candidate deadlines; fail what is left once no worker can take it."""
        timeout = self.runner.timeout_sec
        while True:
            restart = 0
            orphaned: list[Candidate] = []
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
