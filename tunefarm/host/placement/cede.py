"""Trials go where TVM can still win: tasks a vendor library runs much faster give their trials to the others.

Before a run of a job that places groups on a vendor library, :func:`vendor_times` times every distinct group the
vendor can run, alone, on the key's agent (the placement's own group rows: same runner, threads and numerics check),
and finds the tuning task that is exactly that group (the group lowered by the job's pipeline is one TIR function:
its workload is the task's). During the run, :class:`Ceder` looks after every measured batch: a task with at least
:data:`MIN_ROUNDS` rounds measured whose best kernel is still :data:`FAR` times the vendor's time or slower is
*ceded*: it sends no more candidates, and the trials it had left stay in the run's budget for the tasks TVM can still
win (MetaSchedule's gradient scheduler then picks among those). The placement after tuning runs such a group on the
vendor unless TVM's record beat it after all; the all-TVM build keeps the ceded task's best record.

Why 2x after two rounds: on ResNet-18 in NCHWc (bench/results/placement-resnet18-*.md, 192 trials, 2 cores), TVM's
kernels after ~12 trials each were 1.1x or less of oneDNN's on the two groups it went on to win or nearly win and
2.7-4.6x on the others; the all-TVM build still gets every task's first rounds. In a spread run (search workers) the
check holds back only the trials not yet handed to a worker's share.
"""
from __future__ import annotations

from typing import Any

FAR = 2.0  # TVM's best at least this many times the vendor's time: the task is ceded
MIN_ROUNDS = 2  # rounds a task measures before it can be ceded


def task_key(gm, target, pipeline) -> str | None:
    """The workload key (structural hash, as the job's tasks) of the one tuning task ``gm``'s group lowers to, or
    None where it lowers to several functions or none."""
    # pylint: disable=import-outside-toplevel
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    tasks = ms.relax_integration.extract_tasks(pipeline.lower(gm.mod, target), target)
    if len(tasks) != 1:
        return None
    return str(tvm_ffi.structural_hash(tasks[0].dispatched[0]))


def vendor_times(plan, tracker: tuple[str, int], events) -> dict[str, Any]:
    """For a run of ``plan`` whose job places groups on a vendor: ``{"vendor_s": {task index: seconds}, "groups":
    [...], "not_used": [...]}``; empty ``vendor_s`` where no vendor is usable or no group is exactly a task."""
    # pylint: disable=import-outside-toplevel
    from tunefarm.core.errors import NoDeviceError
    from tunefarm.host.comparator import Comparator, FarmAgents
    from tunefarm.host.models import to_relax
    from tunefarm.host.placement.measure import GROUP_SETTINGS, group_modules, measure_vendor
    from tunefarm.host.placement.vendors import usable
    from tunefarm.host.tuning.evaluate import device_type_of

    job, target, pipeline = plan.job, plan.target, plan.pipeline
    out: dict[str, Any] = {"vendor_s": {}, "groups": [], "not_used": []}
    if pipeline.precision != "fp32":
        return out
    agents = FarmAgents(tracker, job.runner.device_wait_sec, events)
    try:
        try:
            vendors, why = usable(job.placement.backends, target, agents.agents(job.device.key))
        except NoDeviceError as err:
            return {**out, "not_used": [str(err)]}
        out["not_used"] = why
        if not vendors:
            return out
        index = {t.key: t.index for t in plan.tasks}
        with events.status("placement: finding the tasks a vendor library can run"):
            graph = pipeline.graph(to_relax(plan.model), target)
            found = []
            for gm in (g for v in vendors for g in group_modules(graph, v)):
                key = task_key(gm, target, pipeline)
                if key in index:
                    found.append((gm, index[key]))
        if not found:
            return out
        comparator = Comparator(agents, GROUP_SETTINGS, events)
        ev = job.evaluate
        times = measure_vendor(comparator, job.device.key, [gm for gm, _ in found], target, pipeline,
                               device=device_type_of(target), rtol=ev.rtol, atol=ev.atol, events=events)
    finally:
        agents.close()
    for gm, task in found:
        ms_ = times.get(gm.key)
        out["groups"].append({"task": plan.tasks[task].name, "vendor": gm.vendor, "composite": gm.group.composite,
                              "vendor_ms": ms_})
        if ms_ is not None:
            out["vendor_s"][task] = ms_ / 1e3
    return out


class Ceder:
    """After each measured batch (:meth:`check`, with the run's JobProgress): cede the tasks TVM is far from."""

    def __init__(self, plan, counter, vendor_s: dict[int, float], round_size: int, events, far: float = FAR,
                 min_rounds: int = MIN_ROUNDS):
        self.tasks = plan.tasks
        self.counter = counter
        self.vendor_s = dict(vendor_s)
        self.min_trials = max(1, min_rounds * round_size)
        self.far = far
        self.events = events
        self.ceded: list[dict[str, Any]] = []

    def check(self, progress) -> None:
        for task, vendor_s in list(self.vendor_s.items()):
            t = self.tasks[task]
            trials = t.measured + progress.task_trials.get(task, 0)
            best = progress.best.get(task)
            if trials < self.min_trials or best is None or best < self.far * vendor_s:
                continue
            del self.vendor_s[task]
            freed = self.counter.cede(t.key)
            self.ceded.append({"task": t.name, "trials": trials, "tvm_best_ms": best * 1e3,
                               "vendor_ms": vendor_s * 1e3, "trials_freed": freed})
            self.events.print(f"task {t.name}: TVM's best {best * 1e3:.3f} ms is {best / vendor_s:.1f}x the vendor "
                              f"library's {vendor_s * 1e3:.3f} ms after {trials} trials: it sends no more candidates "
                              f"(up to {freed} more it could have had go to the other tasks)")
