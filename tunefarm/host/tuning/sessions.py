"""The runner's session pool: RPC sessions on the key's agents kept open between batches.

Opening a session costs a tracker round trip, a request and a handshake (~200 ms measured, Nagle's delayed
ACKs included; over a slow link several round trips more: the reachability probe, TCP and RPC handshakes, the
agent's id and functions). A batch's worker therefore gives its session to this pool when the batch ends, and
the next batch's worker takes it (:data:`SESSION_IDLE_S`; the round trips are paid once per job rather than per
batch) — unless a worker of a batch running beside it is asking the tracker for a session meanwhile
(MetaSchedule's first round sends every task's batch at once) or the tracker has a request from anyone else
waiting on the key (another search worker's runner, another job): then the session is closed so that the
tracker hands the agent on. The agent is held for this job while its session is kept; the runner's shutdown,
and a second measurement that needs the agent, give it back at once.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from tunefarm.host.tuning.transport import agent_measure_batch, agent_measure_func
from tunefarm.core.rpc import close_session


def _close(held: list) -> None:
    """Close dropped sessions now (their agents are free at once, not when Python collects them)."""
    for h in held:
        close_session(h.session)

# A session stays open between batches for this long (the search and builds of the next batch run meanwhile).
SESSION_IDLE_S = 30.0
IDLE_CHECK_S = 0.25  # how often kept sessions look at the tracker for someone else waiting for their agents
POOLED_SESSION_TIMEOUT_S = 900  # what the server is asked to allow a session that may serve several batches


class HeldSession:
    """An open session on one agent, with what the runner learnt about it."""

    __slots__ = ("session", "agent_id", "rtt", "agent_measure", "measure_batch", "per_candidate", "opened",
                 "timeout", "idle_since")

    def __init__(self, session, agent_id: str, rtt: float, timeout: float):
        self.session = session
        self.agent_id = agent_id
        self.rtt = rtt
        self.agent_measure = agent_measure_func(session)
        self.measure_batch = agent_measure_batch(session) if self.agent_measure is not None else None
        self.per_candidate: float | None = None
        self.opened = time.monotonic()
        self.timeout = timeout
        self.idle_since = 0.0

    def fits(self, seconds: float) -> bool:
        """Whether the server's session timeout leaves ``seconds`` more (with a margin)."""
        return time.monotonic() - self.opened + seconds < self.timeout - 30


class SessionPool:
    """The sessions kept between batches of one runner (its ``key`` at ``tracker``), and the count of this
    runner's workers asking the tracker for a session now (while any is, a batch's session goes back to the
    tracker instead of the pool). ``on_reuse`` is told each session taken from the pool (the runner's stats)."""

    def __init__(self, tracker, key: str, timeout_sec: float, on_reuse: Callable[[], None] | None = None):
        self.tracker = tracker
        self.key = key
        self.timeout_sec = timeout_sec  # one candidate's deadline: how long a batch may keep a session busy
        self.on_reuse = on_reuse
        self._lock = threading.Lock()
        self._idle: list[HeldSession] = []
        self._watch: threading.Thread | None = None  # hands kept sessions back (see _watch_idle)
        self._opening = 0  # workers asking the tracker for a session now
        self._closed = False

    def kept(self) -> list[str]:
        """The agents of the sessions kept now."""
        with self._lock:
            return [h.agent_id for h in self._idle]

    def take_idle(self, batch_size: int) -> HeldSession | None:
        """A session kept open from an earlier batch, if one is fresh enough for ``batch_size`` candidates; else
        None, and the caller is counted as opening a session (it calls :meth:`opened` when done)."""
        now = time.monotonic()
        with self._lock:
            keep, found, dropped = [], None, []
            for held in self._idle:
                expected = 2 * (held.per_candidate or self.timeout_sec) * batch_size + 60
                if found is None and now - held.idle_since < SESSION_IDLE_S and held.fits(expected):
                    found = held
                elif now - held.idle_since < SESSION_IDLE_S:
                    keep.append(held)
                else:
                    dropped.append(held)
            self._idle = keep  # the rest are closed
            if found is None:
                self._opening += 1
        _close(dropped)
        if found is not None and self.on_reuse is not None:
            self.on_reuse()
        return found

    def take_other(self, exclude: tuple[str, ...]) -> HeldSession | None:
        """A kept session on a tunefarm agent not in ``exclude`` (a second measurement's), taken out of the pool:
        the caller's alone while it measures (it gives it back with :meth:`give_idle`)."""
        with self._lock:
            other = next((h for h in self._idle if h.agent_id not in exclude
                          and not h.agent_id.startswith("unknown")), None)
            if other is not None:
                self._idle.remove(other)
            return other

    def opening(self) -> None:
        """A caller asks the tracker for a session now: batches ending meanwhile give theirs back to the tracker."""
        with self._lock:
            self._opening += 1

    def opened(self) -> None:
        with self._lock:
            self._opening -= 1

    def give_idle(self, held: HeldSession) -> None:
        """Keep ``held`` open for the next batch — unless a worker (of a batch running beside this one, as in
        MetaSchedule's first round over every task) is asking the tracker for a session meanwhile: then it is
        closed, so that the tracker hands its agent to that worker."""
        held.idle_since = time.monotonic()
        with self._lock:
            keep = self._opening == 0 and not self._closed
            if keep:
                self._idle.append(held)
        if not keep:
            _close([held])
            return
        with self._lock:
            watch = self._watch is None
            if watch:
                self._watch = threading.Thread(target=self._watch_idle, name="farm-runner-idle", daemon=True)
        if watch:
            self._watch.start()

    def _watch_idle(self) -> None:
        """While sessions are kept between batches: close one for each request the tracker has waiting on the
        key (another runner's: a search worker of the same job, another job on the same agents — this runner's
        own ``_opening`` is only what this process asks), and each one kept past :data:`SESSION_IDLE_S`.
        Without it a runner whose batches come faster than SESSION_IDLE_S kept every agent of the key to itself
        and the other runners' batches waited out ``device_wait_sec`` and failed (issue 16's spread search)."""
        while True:
            with self._lock:
                now = time.monotonic()
                expired = [h for h in self._idle if now - h.idle_since >= SESSION_IDLE_S]
                self._idle = [h for h in self._idle if now - h.idle_since < SESSION_IDLE_S]
                done = not self._idle or self._closed
                if done:
                    expired += self._idle
                    self._idle, self._watch = [], None
            _close(expired)
            if done:
                return
            waiting = self._waiting()
            if waiting:
                with self._lock:
                    self._idle.sort(key=lambda h: h.idle_since)
                    handed_on = self._idle[:waiting]
                    del self._idle[:waiting]  # the oldest first: closed, the tracker hands their agents on
                _close(handed_on)
            time.sleep(IDLE_CHECK_S)

    def _waiting(self) -> int:
        """Requests the tracker has waiting on this pool's key (0 when it cannot say)."""
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
            dropped = [h for h in self._idle if agent_id is None or h.agent_id == agent_id]
            self._idle = [h for h in self._idle if agent_id is not None and h.agent_id != agent_id]
        _close(dropped)

    def close(self) -> None:
        """Close every kept session and keep none from now on (the idle watcher asks the tracker no more)."""
        with self._lock:
            self._closed = True
        self.drop_idle()
