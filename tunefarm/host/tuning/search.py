"""What a job's MetaSchedule loop runs with besides the builder and the runner: the search kept to the trial
budget, the database callback that records measured candidates only, and a quiet rule for pooling blocks.

MetaSchedule counts trials in its task scheduler (``TaskSchedulerNode::Tune``: every candidate it sends to the
builder counts against ``max_trials_global``; a task ends once it got ``max_trials_per_task`` results) and in
``EvolutionarySearch`` (a task's batches stop at ``max_trials_per_task`` results, the last one trimmed to fit).
Both count cache hits, and one per-task limit holds for every task. :class:`BudgetedSearch` wraps the
evolutionary search of one task and trims each batch it hands out to what the task and the run have left
(:class:`~tunefarm.host.tuning.budget.TrialCounter`), letting cache hits through free; the scheduler's own
limits are set where they cannot bind first (:meth:`~tunefarm.host.tuning.budget.Budget.scheduler_limits`).

Records reach the database as their batches are measured, in the first pass over the tasks too: MetaSchedule's
gradient scheduler sends every task's first batch before it joins any (``GradientBasedNode::NextTaskId``), so on
a model of 51 tasks nothing was committed for the first ~250 candidates, and a crash of the tuning process in
that window lost all of them. :func:`committing_as_measured` hands the scheduler to the job's search, which,
before it makes a task's next batch, joins every batch whose measurements are all back (the scheduler's own
``TouchTask``: the same join, callbacks and cost-model update MetaSchedule runs later; one still measuring is
left for the scheduler, as before).
"""
from __future__ import annotations

import contextlib

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
from tvm.s_tir.meta_schedule.search_strategy import PySearchStrategy

from tunefarm.host.tuning.budget import TrialCounter
from tunefarm.host.tuning.measured_cache import MeasuredCache


@derived_object
class BudgetedSearch(PySearchStrategy):
    """A search strategy (``inner``, e.g. EvolutionarySearch) whose batches keep to ``counter``'s budget.

    A candidate ``cache`` already answers is a cache hit: it goes out (free: the builder and runner answer
    it from the cache, and the cost model learns from it) and is not counted."""

    def __init__(self, inner, counter: TrialCounter, cache: MeasuredCache, joiner: "_Joiner | None" = None):
        super().__init__()
        self.inner = inner
        self.counter = counter
        self.cache = cache
        self.joiner = joiner if joiner is not None else _Joiner()  # shared by every task's clone
        self.key = ""  # the task's workload key, set with its tune context

    def _initialize_with_tune_context(self, context) -> None:
        import tvm_ffi  # pylint: disable=import-outside-toplevel

        self.key = str(tvm_ffi.structural_hash(context.mod))
        self.inner._initialize_with_tune_context(context)  # pylint: disable=protected-access

    def pre_tuning(self, max_trials, num_trials_per_iter, design_spaces, database=None, cost_model=None) -> None:
        self.inner.pre_tuning(max_trials, num_trials_per_iter, design_spaces, database, cost_model)

    def post_tuning(self) -> None:
        self.inner.post_tuning()

    def generate_measure_candidates(self):
        self.joiner.join_measured()  # earlier tasks' batches measured meanwhile: committed now
        if not self.counter.begin(self.key):
            return None  # the task (or the run) has spent its budget, the run was stopped or the task released
        candidates = self.inner.generate_measure_candidates()
        if candidates is None:
            return None
        candidates = list(candidates)
        keep = self.counter.admit(self.key, [self.cache.has(self.cache.key(c.sch.mod)) for c in candidates])
        return [candidates[i] for i in keep]

    def notify_runner_results(self, measure_candidates, results) -> None:
        self.inner.notify_runner_results(measure_candidates, results)

    def clone(self):
        return BudgetedSearch(self.inner.clone(), self.counter, self.cache, self.joiner)


class _Joiner:
    """The task scheduler a job's searches join measured batches through (None outside a tuning loop)."""

    def __init__(self):
        self.scheduler = None

    def join_measured(self) -> None:
        scheduler = self.scheduler
        if scheduler is None:
            return
        for task_id in range(len(scheduler.tasks_)):
            # TouchTask joins a task not terminated whose batch is out and whose every result is back (the
            # candidates' futures say so without waiting); it does nothing for the others.
            scheduler.touch_task(task_id)


@contextlib.contextmanager
def committing_as_measured(search: BudgetedSearch):
    """MetaSchedule's gradient task scheduler (``tune_tasks(task_scheduler=...)``, as ``"gradient"`` makes it),
    through which ``search`` and its clones join each batch once measured (see the module doc)."""
    from tvm.s_tir import meta_schedule as ms  # pylint: disable=import-outside-toplevel

    scheduler = ms.TaskScheduler.create("gradient")
    search.joiner.scheduler = scheduler
    try:
        yield scheduler
    finally:
        search.joiner.scheduler = None  # the scheduler holds the tasks, whose strategies hold the joiner


@derived_object
class AddMeasuredToDatabase(PyMeasureCallback):
    """MetaSchedule's AddToDatabase, except for cache hits (a candidate the database already answered is not
    committed again; stock commits it once more, as an identical line, every time the search proposes it),
    and with the job's :class:`~tunefarm.host.tuning.verify.TimingVerifier` deciding what each measured
    candidate is committed with (below the physical floor or from a flagged agent: failed; a new best: only
    once measured again). ``committed`` (a list shared with the progress callback, which runs after this
    one) gets the last batch's committed run seconds (None: failed), cache hits left out."""

    def __init__(self, verifier=None, committed: list | None = None):
        super().__init__()
        self.verifier = verifier
        self.committed = committed if committed is not None else []

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        # pylint: disable=import-outside-toplevel
        import tvm
        import tvm_ffi
        from tvm.s_tir import meta_schedule as ms

        from tunefarm.host.tuning.jobdir import mean_run_s

        database = task_scheduler.database_
        self.committed.clear()
        if database is None:
            return
        with ms.Profiler.timeit("MeasureCallback/AddToDatabase"):
            ctx = task_scheduler.tasks_[task_id].ctx
            workload = database.commit_workload(ctx.mod)
            items, cands = [], []
            for cand, built, res in zip(measure_candidates, builder_results, runner_results):
                if MeasuredCache.is_placeholder(built.artifact_path):
                    continue
                secs = [float(x) for x in res.run_secs] if res.run_secs is not None and not res.error_msg else None
                items.append((str(built.artifact_path), cand.sch.trace, secs))
                cands.append(cand)
            if self.verifier is not None and items:
                top = database.get_top_k(workload, 1)
                best = mean_run_s(top[0].run_secs) if top else None
                commit = self.verifier.run_secs_to_commit(str(tvm_ffi.structural_hash(ctx.mod)), ctx.mod, best, items)
            else:
                commit = [secs for _, _, secs in items]
            self.committed.extend(commit)
            for cand, secs in zip(cands, commit):
                run_secs = ([tvm.tirx.FloatImm("float32", s) for s in secs] if secs is not None
                            else [tvm.tirx.FloatImm("float32", 1e10)])
                database.commit_tuning_record(ms.database.TuningRecord(cand.sch.trace, workload, run_secs,
                                                                       ctx.target, cand.args_info))


def measure_callbacks(progress_callback, verifier=None, committed: list | None = None) -> list:
    """MetaSchedule's default callbacks with AddToDatabase replaced, then the job's progress callback
    (``committed``: the list through which it reads what the database callback committed)."""
    from tvm.s_tir import meta_schedule as ms  # pylint: disable=import-outside-toplevel

    return [AddMeasuredToDatabase(verifier, committed), ms.measure_callback.RemoveBuildArtifact(),
            ms.measure_callback.UpdateCostModel(), progress_callback]


def quiet_pool_rule(target) -> None:
    """Silence MetaSchedule's "Unknown schedule rule "meta_schedule.pool_max"" warning, changing nothing else.

    Legalized pooling blocks carry ``schedule_rule: meta_schedule.pool_max``; MetaSchedule's ApplyCustomRule
    looks for ``s_tir.meta_schedule.<target key>.meta_schedule.pool_max``, which TVM 0.27 registers for no
    target, so it warns at every design-space generation of a pooling task, drops the annotation and lets
    the other rules schedule the block. The rule registered here does exactly that, without the warning.
    A name TVM itself registers is left alone, and any other unknown rule still warns."""
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    def drop_annotation(sch, block):
        sch.unannotate(block, "schedule_rule")
        return [sch]

    for key in target.keys:
        name = f"s_tir.meta_schedule.{key}.meta_schedule.pool_max"
        if tvm_ffi.get_global_func(name, allow_missing=True) is None:
            tvm_ffi.register_global_func(name, drop_annotation)
