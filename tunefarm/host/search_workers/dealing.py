"""Dealing a job's tasks and trials over search workers: which tasks each share gets, and how many trials.

Pure functions of the plan (bar :func:`task_capacity`, which asks MetaSchedule for a task's design space),
kept apart from the driver that runs the shares (driver.py) so that they are read and tested on their own.
"""
from __future__ import annotations


def deal(task_costs: dict[int, float], workers: int, light: frozenset[int] | set[int] = frozenset()) -> list[list[int]]:
    """The tasks (index -> cost: weight x flops, in the run's order) dealt into at most ``workers`` shares of equal task counts
    (one apart at most), the costliest first to the share with the fewest tasks, then the lightest (so the
    costly tasks land apart).

    Counts come first because a share's wall time is its trials, and a trial costs about the same on any
    task (a search step, a build, a measurement padded to the runner's min_repeat_ms): dealt by cost alone,
    4 workers on ResNet-18 got 2, 3, 4 and 10 tasks, and the 10-task share bounded the run (0.85x of one
    worker on the lent 16-core machine, bench/results/search_scaling-h200vm-16c).

    ``light`` tasks (a space of fewer candidates than one round, like ResNet-18's ``reshape``: one) are not
    counted: they are dealt after the others, one by one to the share with the fewest of them.

    Each share starts with its costliest task (a long search: the share's build pool starts meanwhile, ~3 s of
    a 2-core worker; after a ``mean`` or ``reshape`` first, whose search takes 0-2 s, the first build waited
    ~5 s for it on the lent 16-core host), then the run's order."""
    shares: list[list[int]] = [[] for _ in range(max(1, min(workers, len(task_costs))))]
    load = [0.0] * len(shares)
    heavy = [i for i in task_costs if i not in light]
    for index in sorted(heavy, key=lambda i: (-task_costs[i], i)):
        pick = min(range(len(shares)), key=lambda s: (len(shares[s]), load[s], s))
        shares[pick].append(index)
        load[pick] += task_costs[index]
    lights = [0] * len(shares)
    for index in (i for i in task_costs if i in light):
        pick = min(range(len(shares)), key=lambda s: (lights[s], len(shares[s]), s))
        shares[pick].append(index)
        lights[pick] += 1
    rank = {index: n for n, index in enumerate(task_costs)}  # the run's order: the dict's
    out = []
    for share in (s for s in shares if s):
        costly = [i for i in share if i not in light] or share
        first = min(costly, key=lambda i: (-task_costs[i], rank[i]))
        out.append(sorted(share, key=lambda i: (i != first, rank[i])))
    return out


def split_trials(total: int, needs: list[int], capacity: list[int] | None = None) -> list[int]:
    """``total`` trials over shares: each its ``needs`` first (the trials that give each of its tasks one round),
    in proportion to them if ``total`` does not cover them all; what is left over evens the shares out (the
    smallest raised first), none beyond its ``capacity`` (what its tasks may measure; default unbounded).

    Even trials, not trials in proportion to task counts: a share's wall time is its rounds (a search, a build
    and a measurement of at most one round's candidates each), so a share of 4 tasks and one of 5 should run
    the same number of rounds. In proportion, 320 ResNet-18 trials over 4 workers gave 68, 84, 84, 84, and the
    84-trial share whose fifth task was ``reshape`` (one candidate) spent 19 trials on two extra rounds of one
    conv and bounded the run (bench/results/search_scaling-h200vm-16c). The sum is ``total`` unless every share
    is at its capacity."""
    capacity = list(capacity) if capacity is not None else [total + n for n in needs]  # unbounded
    needs = [min(n, c) for n, c in zip(needs, capacity)]
    count = sum(needs)
    if total <= count:  # not even one round each: in proportion, largest remainders first
        if count == 0:
            return [0] * len(needs)
        out = [total * n // count for n in needs]
        for i in sorted(range(len(needs)), key=lambda i: -(total * needs[i] % count))[: total - sum(out)]:
            out[i] += 1
        return out
    spare = total - count

    def raised(level: int) -> int:  # trials the shares take beyond their needs when raised to ``level``
        return sum(min(c, max(n, level)) - n for n, c in zip(needs, capacity))

    low, high = 0, max(capacity, default=0)
    while low < high:  # the highest level whose raise fits in the spare trials
        mid = (low + high + 1) // 2
        low, high = (mid, high) if raised(mid) <= spare else (low, mid - 1)
    out = [min(c, max(n, low)) for n, c in zip(needs, capacity)]
    left = total - sum(out)
    for i in range(len(out)):  # fewer left than shares that can still take one at this level
        if left and out[i] == low and out[i] < capacity[i]:
            out[i] += 1
            left -= 1
    return out


def task_capacity(mod, target, space=None) -> int | None:
    """How many distinct candidates the task's design space holds, where that is known: a space whose traces
    decide nothing (ResNet-18's ``reshape`` on CPU) has one per design space; None for any other (or when the
    space cannot be generated here: the worker will say why)."""
    from tvm.s_tir import meta_schedule as ms  # pylint: disable=import-outside-toplevel

    try:
        ctx = ms.TuneContext(mod=mod, target=target, space_generator=space or "post-order-apply",
                             task_name="capacity")
        spaces = ctx.generate_design_space()
    except Exception:  # pylint: disable=broad-except
        return None
    if not spaces or any(len(s.trace.decisions) for s in spaces):
        return None
    return len(spaces)


def flops(mod) -> float:
    """A task's cost for dealing: its TIR's floating-point operations (1 where TVM cannot estimate them)."""
    try:
        from tvm.s_tir.analysis import estimate_tir_flops  # pylint: disable=import-outside-toplevel

        return max(1.0, float(estimate_tir_flops(mod)))
    except Exception:  # pylint: disable=broad-except
        return 1.0
