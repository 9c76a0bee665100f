"""A tuning job's trial budget: what is left to measure, per task and in all, and this run's count against it.

Pure arithmetic, no TVM (tests/test_budget.py). A job's database holds three kinds of records, kept apart
everywhere (console, report.json, report.md):

* **measured**: candidates this job built and ran, failed ones included. The only thing the budget
  (``max_trials_global``, ``max_trials_per_task``) counts, across resumed runs.
* **seeded**: the best records of earlier jobs, copied in by the warm start. Never counted.
* **cache hits**: a candidate the search proposes again although the database already answers it
  (MetaSchedule's evolutionary search seeds each round from the database's best records and does not
  skip them). Not built, not measured, not recorded again, not counted.

MetaSchedule's task scheduler counts every candidate it sends, hits included, against both of its limits,
and takes one per-task limit for all tasks. So the job gives the scheduler limits it cannot reach first
(:meth:`Budget.scheduler_limits`) and the search itself keeps to the budget: each batch goes out trimmed to
what its task and the run have left (:meth:`TrialCounter.admit`), hits let through free.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class Budget:
    """The budget of one run of a job, from what its database already holds."""

    max_trials_global: int
    per_task_cap: int
    num_trials_per_iter: int
    measured: tuple[int, ...]  # per task: trials this job measured in earlier runs
    has_record: tuple[bool, ...]  # per task: any record at all (measured or seeded)

    @property
    def measured_before(self) -> int:
        return sum(self.measured)

    @property
    def remaining(self) -> int:
        """Trials this run may measure."""
        return max(0, self.max_trials_global - self.measured_before)

    @property
    def task_left(self) -> tuple[int, ...]:
        """Per task: trials it may still measure (its cap less what it measured before)."""
        return tuple(max(0, self.per_task_cap - m) for m in self.measured)

    @property
    def order(self) -> tuple[int, ...]:
        """The tasks this run tunes (those under their cap), tasks without any record first.

        MetaSchedule's task scheduler gives each task one round in this order before it picks by
        gradient: a task without a record runs as naive loops (on CPU as slow as untuned), so it goes first.
        """
        todo = [i for i, left in enumerate(self.task_left) if left > 0]
        return tuple(sorted(todo, key=lambda i: (self.has_record[i], i)))

    @property
    def untouched(self) -> tuple[int, ...]:
        """Tasks without any record (neither measured nor seeded)."""
        return tuple(i for i in self.order if not self.has_record[i])

    @property
    def round_size(self) -> int:
        return min(self.num_trials_per_iter, self.per_task_cap)

    @property
    def need(self) -> int:
        """Trials that give every task without a record one round."""
        return len(self.untouched) * self.round_size

    @property
    def minimum_global(self) -> int:
        """The smallest ``max_trials_global`` that gives every task without a record one round."""
        return self.measured_before + self.need

    @property
    def too_small(self) -> bool:
        return self.remaining > 0 and self.need > self.remaining

    def scheduler_limits(self, cached: int, cached_most_per_task: int) -> tuple[int, int]:
        """``(max_trials_global, max_trials_per_task)`` for ``ms.tune_tasks``: the budget plus every cache hit
        the scheduler may count (a run hits each cached candidate at most once); the budget itself is kept
        by :class:`TrialCounter`."""
        return self.remaining + cached, self.per_task_cap + cached_most_per_task


def plan_budget(max_trials_global: int, max_trials_per_task: int | None, num_trials_per_iter: int,
                measured: Sequence[int], has_record: Sequence[bool]) -> Budget:
    """The budget of a run; ``max_trials_per_task`` None caps a task at the global budget (as MetaSchedule)."""
    return Budget(max_trials_global=max_trials_global, per_task_cap=max_trials_per_task or max_trials_global,
                  num_trials_per_iter=num_trials_per_iter, measured=tuple(measured),
                  has_record=tuple(bool(h) for h in has_record))


class TrialCounter:
    """This run's measured trials against its budget, by task (workload key); ``stop()`` ends the run."""

    def __init__(self, budget: Budget, task_keys: Sequence[str]):
        self.left_global = budget.remaining
        self.left = dict(zip(task_keys, budget.task_left))
        self.sent = 0  # measured candidates sent this run
        self.stopped = False
        self.begun: set[str] = set()  # tasks whose search has started (:meth:`begin`)
        self.lock = threading.Lock()  # a search worker's host may take tasks away (:meth:`release`) mid-run

    @classmethod
    def of(cls, left_global: int, left: dict[str, int]) -> "TrialCounter":
        """A counter for a share of a run (a search worker's): ``left_global`` trials, ``left`` per task key."""
        counter = cls.__new__(cls)
        counter.left_global, counter.left, counter.sent, counter.stopped = int(left_global), dict(left), 0, False
        counter.begun, counter.lock = set(), threading.Lock()
        return counter

    def begin(self, key: str) -> bool:
        """Whether the task ``key`` may search now (its first search marks it begun: it can no longer be
        released)."""
        with self.lock:
            if self.allowed(key) <= 0:
                return False
            self.begun.add(key)
            return True

    def unstarted(self, keys: Sequence[str]) -> list[str]:
        """Of ``keys`` (in the order the scheduler visits them), those not begun that still have trials."""
        with self.lock:
            return self._unstarted(keys)

    def _unstarted(self, keys: Sequence[str]) -> list[str]:  # under self.lock
        return [k for k in keys if k not in self.begun and self.allowed(k) > 0]

    def release(self, keys: Sequence[str], count: int) -> list[tuple[str, int]]:
        """Give up the last ``count`` of ``keys`` not begun: each leaves with its even part of the trials left
        (the trials left over the tasks not begun, rounded up, at most its own cap), which this counter no longer
        spends. ``(key, trials)`` of each released task, in ``keys``' order."""
        with self.lock:
            free = self._unstarted(keys)
            if count <= 0 or not free:
                return []
            each = -(-self.left_global // len(free))
            out = []
            for key in free[max(0, len(free) - count):]:
                moved = min(self.left[key], each, self.left_global)
                self.left[key] = 0
                self.left_global -= moved
                out.append((key, moved))
            return out

    def allowed(self, key: str) -> int:
        """Measured candidates the task ``key`` may still send."""
        if self.stopped:
            return 0
        return max(0, min(self.left_global, self.left.get(key, 0)))

    def admit(self, key: str, is_hit: Sequence[bool]) -> list[int]:
        """Indices of a batch's candidates that may go, counted against the budget: every cache hit (free)
        and the others while the task and the run have trials left."""
        with self.lock:
            room = self.allowed(key)
            keep = []
            for i, hit in enumerate(is_hit):
                if hit:
                    keep.append(i)
                elif room > 0:
                    keep.append(i)
                    room -= 1
            fresh = sum(1 for i in keep if not is_hit[i])
            self.left_global -= fresh
            self.left[key] = self.left.get(key, 0) - fresh
            self.sent += fresh
            return keep

    def cede(self, key: str) -> int:
        """The task ``key`` sends no more candidates (a vendor library runs it far faster: host/placement/cede.py);
        the trials it had left stay in the run's budget for the other tasks. Returns how many it had left."""
        with self.lock:
            freed = max(0, min(self.left_global, self.left.get(key, 0)))
            self.left[key] = 0
            return freed

    def stop(self) -> None:
        self.stopped = True
