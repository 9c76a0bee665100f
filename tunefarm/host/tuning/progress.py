"""A tuning run's progress: the live bar, ``progress.jsonl`` (one line per measured batch), the measure
callback that feeds both, and where the run's time went (MetaSchedule's profiler, grouped)."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

from tunefarm.host.tuning.events import Events
from tunefarm.host.tuning.jobdir import JobDir


class JobProgress:
    """Live progress (a bar of the run's events) and a JSON-lines log of every measured batch (``progress.jsonl``).

    It follows every task of the job, those this run does not tune too (``start_best`` holds what earlier
    runs and the warm start found), so that "best est." is the whole model's estimate. ``trials`` counts
    measured candidates of the job (earlier runs included), never cache hits (``cache_hits``, this run).
    """

    def __init__(self, job_dir: Path, task_names: list[str], task_weights: list[float], total_trials: int,
                 events: Events | None = None, start_best: dict[int, float] | None = None, trials_before: int = 0,
                 run_tasks: list[int] | None = None):
        self.job_dir = JobDir(job_dir)
        self.task_names = task_names
        self.task_weights = task_weights
        # MetaSchedule's task id (the run's tasks, in the order given to it) -> index among the job's tasks
        self.run_tasks = list(run_tasks) if run_tasks is not None else list(range(len(task_names)))
        self.best: dict[int, float] = dict(start_best or {})
        self.task_trials: dict[int, int] = {}  # per task: candidates measured in this run (cache hits left out)
        self.trials = trials_before
        self.run_ok = 0  # candidates measured successfully in this run
        self.run_failed = 0  # candidates that failed to build or run in this run
        self.cache_hits = 0  # candidates answered from the database in this run
        self.first_error: str | None = None
        self.total = total_trials
        self.t0 = time.time()
        # The bar (live inside ``with progress.progress:``, the run), shown by whoever renders the events.
        self.progress = (events or Events()).progress(max(total_trials, 1), trials_before, self._status())

    def estimated_ms(self) -> float | None:
        if len(self.best) < len(self.task_names):
            return None
        return sum(self.best[i] * self.task_weights[i] for i in self.best) * 1e3

    def _status(self) -> str:
        est = self.estimated_ms()
        est_s = f"{est:.3f} ms" if est is not None else "n/a (not every task measured yet)"
        return f"trials | tasks measured {len(self.best)}/{len(self.task_names)} | best est. {est_s}"

    def on_batch(self, task_id: int, costs: list[float | None], errors: int, cache_hits: int = 0) -> None:
        """One batch of MetaSchedule's task ``task_id``: ``costs`` of its measured candidates (None: failed),
        ``cache_hits`` candidates answered from the database besides. An empty batch (the search found
        nothing new this round) leaves no line."""
        if not costs and not cache_hits:
            return
        task = self.run_tasks[task_id]
        valid = [c for c in costs if c is not None]
        self.run_ok += len(valid)
        self.run_failed += errors
        self.cache_hits += cache_hits
        if valid:
            best = min(valid)
            if task not in self.best or best < self.best[task]:
                self.best[task] = best
        self.trials += len(costs)
        self.task_trials[task] = self.task_trials.get(task, 0) + len(costs)
        event = {"time": time.time(), "elapsed_s": round(time.time() - self.t0, 3), "task_id": task,
                 "task": self.task_names[task], "batch": len(costs), "errors": errors, "cache_hits": cache_hits,
                 "trials": self.trials, "task_best_us": self.best.get(task, math.nan) * 1e6,
                 "estimated_ms": self.estimated_ms()}
        self.job_dir.append_event(event)
        self.progress.update(min(self.trials, self.total), self._status())


def make_progress_callback(progress: JobProgress, should_stop: Callable[[JobProgress], bool] | None = None,
                           on_stop: Callable[[], None] | None = None, committed: list | None = None):
    """The measure callback that feeds ``progress``; after each batch, ``should_stop(progress)`` True calls
    ``on_stop()`` (once): the run then sends no new batch and ends once the batches in flight are in.
    ``committed``: the list the database callback fills with what it committed for the batch (the
    verifier's decisions: a rejected time counts as failed); without it the runner's results count."""
    from tvm.ir.utils import derived_object  # pylint: disable=import-outside-toplevel
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback  # pylint: disable=import-outside-toplevel

    from tunefarm.host.tuning.measured_cache import MeasuredCache  # pylint: disable=import-outside-toplevel

    stopped = []

    @derived_object
    class ProgressCallback(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            costs, errors, hits = [], 0, 0
            decided = iter(list(committed)) if committed is not None else None
            for bres, res in zip(builder_results, runner_results):
                if MeasuredCache.is_placeholder(bres.artifact_path):
                    hits += 1
                    continue
                secs = next(decided, None) if decided is not None else (
                    None if res.error_msg or not res.run_secs else [float(x) for x in res.run_secs])
                if secs is None:
                    costs.append(None)
                    errors += 1
                    if progress.first_error is None:
                        progress.first_error = str(bres.error_msg or res.error_msg or
                                                   "rejected by the timing check (see verified.jsonl)").strip()
                else:
                    costs.append(sum(secs) / len(secs))
            progress.on_batch(task_id, costs, errors, hits)
            if should_stop is not None and not stopped and should_stop(progress):
                stopped.append(True)
                if on_stop is not None:
                    on_stop()

    return ProgressCallback()


# MetaSchedule times every Python measure callback as one scope, "MeasureCallback/PyMeasureCallback"; the farm's
# database callback (search.py AddMeasuredToDatabase) times itself inside it under the stock callback's name, so
# that reports read as stock's. Its time is in both: counted once (it was counted twice, and a share's split
# added up to more than its wall time: 69.4 s of 67.3 s).
PY_CALLBACK = "MeasureCallback/PyMeasureCallback"
INSIDE_PY_CALLBACK = ("MeasureCallback/AddToDatabase",)


def time_split(profile: dict[str, float], wall_s: float) -> dict[str, float]:
    """MetaSchedule's profiler scopes (seconds) grouped into where a tuning run's time goes.

    search: evolutionary search (sampling, mutation, cost-model prediction); build: SendToBuilder
    (the builder's whole batch); measure: SendToRunner + JoinRunnerFutures (what the runner keeps
    the host waiting for); model_update: training the cost model and the database on each batch;
    other: the rest of the wall time (task scheduling, Python callbacks, progress output).
    """
    # Scopes nest ("EvoSearch/Evolve/Misc" holds ".../CopyMeasuredWorkloads"): count outermost ones only.
    outer = {k: v for k, v in profile.items()
             if k != "Total" and not any(k.startswith(j + "/") for j in profile if j != k)
             and not (k in INSIDE_PY_CALLBACK and PY_CALLBACK in profile)}

    def total(prefixes):
        return sum(v for k, v in outer.items() if k.startswith(prefixes))

    split = {"search_s": total(("EvoSearch",)), "build_s": total(("SendToBuilder",)),
             "measure_s": total(("SendToRunner", "JoinRunnerFutures")),
             "model_update_s": total(("MeasureCallback",)), "wall_s": wall_s}
    split["other_s"] = max(0.0, wall_s - sum(v for k, v in split.items() if k != "wall_s"))
    split["scopes"] = profile
    return split
