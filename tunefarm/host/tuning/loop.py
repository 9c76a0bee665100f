"""The farm's tuning loop: MetaSchedule's ``tune_tasks`` with the farm's parts. The one module that calls it.

A host's job (tuning/job.py ``run_plan``) and a search worker's share (host/search_workers/worker.py) both tune
through :class:`TuningLoop`; what differs between them is passed in, as ``tune_tasks`` takes its builder,
runner, database and callbacks: the tasks, the budget's :class:`~tunefarm.host.tuning.budget.TrialCounter`,
where the loop's files go, the job's settings, the cost model, the limits and the callback that takes each
measured batch (the host's progress, a share's collector for the host's polls).

The steps, in order: this machine's tensor intrinsics (intrinsics.py, before any ``TuneContext``), the search
kept to the budget (search.py), the tune contexts, the farm's builder (its workers start while the first
task's search runs), the :class:`~tunefarm.host.tuning.runner.FarmRunner` on the job's device key, the
timing verifier, then ``tune_tasks`` under MetaSchedule's profiler with records committed batch by batch as
they are measured (``committing_as_measured``).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, ContextManager

from tunefarm.core.jobspec import BuilderSpec, RunnerSpec
from tunefarm.core.threads import usable_cores


class TuningLoop:
    """The parts of one tuning loop, made (and the builder's workers started) when it is constructed;
    :meth:`run` runs ``tune_tasks`` once and shuts the builder and runner down, however it ends.

    ``runner``, ``builder`` and ``verifier`` are public for what a caller reports of them (counts, kept
    builds, the timing check's summary); ``committed`` is the verifier's decision per candidate of the
    batch being committed, read by the callback that ``run`` is given (it must see the same list)."""

    def __init__(self, extracted: list, target, *, work_dir: str | Path, counter, cache, tracker: tuple[str, int],
                 device_key: str, builder: BuilderSpec, runner: RunnerSpec, population_size: int, seed: int | None,
                 space=None, keep_dir: str | Path, verified_log: str | Path, events=None,
                 on_wait: Callable | None = None, on_agent_lost: Callable[[str, int, int], None] | None = None,
                 on_unreachable: Callable[[str], None] | None = None):
        # pylint: disable=import-outside-toplevel
        from tvm.s_tir import meta_schedule as ms

        from tunefarm.host.tuning.builder import job_builder
        from tunefarm.host.tuning.intrinsics import load_for
        from tunefarm.host.tuning.runner import FarmRunner
        from tunefarm.host.tuning.search import BudgetedSearch
        from tunefarm.host.tuning.verify import TimingVerifier

        load_for(target)  # before the tune contexts: stock, each imports every architecture's intrinsics (20-80 s)
        self.work_dir = str(work_dir)
        self.search = BudgetedSearch(ms.search_strategy.EvolutionarySearch(population_size=population_size),
                                     counter, cache)
        self.contexts, self.weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            extracted, work_dir=self.work_dir, strategy=self.search, seed=seed,
            num_threads=usable_cores(),  # MetaSchedule's "physical" counts the machine's cores, pinned or not
            **({"space": space} if space is not None else {}))  # fp16 on CUDA: the tensor-core rules
        host, port = tracker
        self.builder = job_builder(builder, (host, port), runner.device_wait_sec, cache=cache, keep_dir=keep_dir)
        self.builder.warm()  # its workers start while the first task's search runs
        self.runner = FarmRunner(host, port, device_key, timeout_sec=runner.timeout_sec,
                                 device_wait_sec=runner.device_wait_sec, on_wait=on_wait, cache=cache,
                                 on_agent_lost=on_agent_lost, on_unreachable=on_unreachable,
                                 evaluator_config=ms.runner.EvaluatorConfig(
                                     number=runner.number, repeat=runner.repeat, min_repeat_ms=runner.min_repeat_ms,
                                     enable_cpu_cache_flush=runner.enable_cpu_cache_flush))
        self.verifier = TimingVerifier(self.runner, verified_log, events)
        self.committed: list = []
        # The tensor-core space's redraws and fallbacks (tuning/space.py), shared by every task's clone.
        self.space_notes = getattr(space, "notes", None)
        self.profile: dict[str, float] = {}  # MetaSchedule's profiler scopes (s), once run has ended

    def run(self, database, *, cost_model: Any, max_trials_global: int, max_trials_per_task: int,
            num_trials_per_iter: int, on_measured, around: ContextManager | None = None,
            check_agents: bool = False) -> dict[str, float]:
        """``tune_tasks`` once: ``on_measured`` (a measure callback that reads :attr:`committed`) is called
        after the database took each batch; ``around`` is entered outside the loop (the host's live progress
        display); ``check_agents`` asks the tracker, once the loop ended, which agents went (said by the
        runner's ``on_agent_lost``). Returns the profile; the builder and runner are shut down on any end."""
        # pylint: disable=import-outside-toplevel
        from tvm.s_tir import meta_schedule as ms

        from tunefarm.host.tuning.search import committing_as_measured, measure_callbacks

        profiler = ms.Profiler()  # where the loop's time goes (the report; thread-local in TVM)
        try:
            with around or contextlib.nullcontext(), profiler, committing_as_measured(self.search) as scheduler:
                ms.tune_tasks(tasks=self.contexts, task_weights=self.weights, work_dir=self.work_dir,
                              max_trials_global=max_trials_global, max_trials_per_task=max_trials_per_task,
                              num_trials_per_iter=num_trials_per_iter, builder=self.builder, runner=self.runner,
                              database=database, cost_model=cost_model,
                              measure_callbacks=measure_callbacks(on_measured, self.verifier, self.committed),
                              task_scheduler=scheduler)
            if check_agents:
                self.runner.check_agents()
        finally:
            self.profile = {str(k): float(v) for k, v in profiler.get().items()}
            self.close()
        return self.profile

    def space_lines(self) -> list[str]:
        """One line per task whose design space needed another draw or the plain space (none: nothing to say)."""
        return self.space_notes.lines() if self.space_notes is not None else []

    def close(self) -> None:
        """Shut the builder's workers and the runner's sessions down (also when the loop never ran)."""
        self.builder.shutdown()
        self.runner.shutdown()
