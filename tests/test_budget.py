"""The trial budget (tunefarm.host.tuning.budget): pure arithmetic, no processes, no TVM."""
from __future__ import annotations

from tunefarm.host.tuning.budget import TrialCounter, plan_budget


def test_a_resumed_task_gets_only_what_is_left_of_its_cap():
    # Task 0 measured 12 of its 16 in an earlier run, task 1 all 16, task 2 nothing yet.
    budget = plan_budget(64, 16, 8, measured=[12, 16, 0], has_record=[True, True, False])
    assert budget.measured_before == 28 and budget.remaining == 36
    assert budget.task_left == (4, 0, 16)  # not a full cap of 16 again for the partly tuned task
    assert budget.order == (2, 0)  # the task at its cap is not tuned again; the one without a record first


def test_without_a_per_task_cap_a_task_is_capped_at_the_global_budget():
    budget = plan_budget(24, None, 4, measured=[16, 0], has_record=[True, True])
    assert budget.per_task_cap == 24 and budget.task_left == (8, 24) and budget.remaining == 8
    spent = plan_budget(16, None, 4, measured=[10, 6], has_record=[True, True])
    assert spent.remaining == 0 and spent.order == (0, 1)  # tasks under their cap, but no trial left


def test_tasks_without_any_record_come_first_and_set_the_minimum_budget():
    # 27 tasks x 8 trials per round: a budget of 160 leaves tasks without any schedule (issue 10).
    budget = plan_budget(160, 16, 8, measured=[0] * 27, has_record=[False] * 27)
    assert budget.need == 216 and budget.minimum_global == 216 and budget.too_small
    assert plan_budget(216, 16, 8, measured=[0] * 27, has_record=[False] * 27).too_small is False
    # A warm start seeded tasks 1 and 3: they have records, the others go first and need a round each.
    warm = plan_budget(16, 16, 4, measured=[0] * 5, has_record=[False, True, False, True, False])
    assert warm.order == (0, 2, 4, 1, 3) and warm.untouched == (0, 2, 4)
    assert warm.need == 12 and not warm.too_small
    # A per-task cap under a round makes the round smaller; measured trials add to the minimum.
    resumed = plan_budget(40, 2, 8, measured=[2, 0, 0], has_record=[True, False, False])
    assert resumed.round_size == 2 and resumed.need == 4 and resumed.minimum_global == 6


def test_the_schedulers_own_limits_leave_room_for_every_cache_hit():
    budget = plan_budget(64, 16, 8, measured=[12, 16, 0], has_record=[True, True, False])
    assert budget.scheduler_limits(cached=30, cached_most_per_task=20) == (36 + 30, 16 + 20)


def test_a_batch_is_trimmed_to_what_its_task_and_the_run_have_left_and_cache_hits_go_free():
    budget = plan_budget(10, 6, 4, measured=[3, 0], has_record=[True, False])
    counter = TrialCounter(budget, ["a", "b"])
    assert counter.allowed("a") == 3 and counter.allowed("b") == 6
    # Task a: 3 trials left; its batch of 4 (two of them cache hits) goes out whole: 2 new candidates.
    assert counter.admit("a", [False, True, False, True]) == [0, 1, 2, 3]
    assert counter.allowed("a") == 1 and counter.sent == 2
    # Next batch of a: only one new candidate fits, the cache hit still goes.
    assert counter.admit("a", [False, False, True, False]) == [0, 2]
    assert counter.allowed("a") == 0
    # The run has 10 - 3 = 7 trials: 3 went to a, task b may take 4 more although its cap leaves 6.
    assert counter.allowed("b") == 4
    assert counter.admit("b", [False] * 6) == [0, 1, 2, 3]
    assert counter.allowed("b") == 0 and counter.left_global == 0 and counter.sent == 7
    assert counter.allowed("unknown") == 0


def test_stop_ends_every_task():
    counter = TrialCounter(plan_budget(100, None, 4, measured=[0, 0], has_record=[False, False]), ["a", "b"])
    assert counter.admit("a", [False] * 4) == [0, 1, 2, 3]
    counter.stop()
    assert counter.stopped and counter.allowed("a") == 0 and counter.allowed("b") == 0


def test_a_share_releases_its_last_tasks_not_begun_with_their_even_part_of_the_trials_left():
    counter = TrialCounter.of(80, {k: 64 for k in "abcde"})
    keys = list("abcde")
    assert counter.begin("a") and counter.admit("a", [False] * 16) == list(range(16))
    assert counter.unstarted(keys) == list("bcde")
    # 64 left over 4 tasks not begun: 16 each; the last two go
    assert counter.release(keys, 2) == [("d", 16), ("e", 16)]
    assert counter.left_global == 32 and counter.left["d"] == counter.left["e"] == 0
    assert not counter.begin("d") and counter.unstarted(keys) == list("bc")
    # a task begun is never released; what is left is still the share's
    assert counter.begin("b") and counter.release(keys, 5) == [("c", 32)]
    assert counter.left_global == 0 and counter.unstarted(keys) == [] and counter.release(keys, 1) == []
    # rounded up, never beyond a task's own cap or what is left
    odd = TrialCounter.of(10, {"x": 2, "y": 64, "z": 64})
    assert odd.release(["x", "y", "z"], 3) == [("x", 2), ("y", 4), ("z", 4)] and odd.left_global == 0
    stopped = TrialCounter.of(10, {"x": 5})
    stopped.stop()
    assert stopped.release(["x"], 1) == [] and stopped.unstarted(["x"]) == []


def test_a_ceded_task_sends_nothing_more_and_its_trials_stay_for_the_others():
    budget = plan_budget(48, 24, 8, [0, 0, 0], [False, False, False])
    counter = TrialCounter(budget, ["a", "b", "c"])
    assert counter.admit("a", [False] * 8) == list(range(8))
    assert counter.cede("a") == 16 and counter.allowed("a") == 0 and not counter.begin("a")
    assert counter.allowed("b") == 24 and counter.left_global == 40  # a's 16 are not spent: b and c may use them


def test_the_ceder_cedes_a_task_only_after_its_rounds_and_only_when_tvm_is_far_from_the_vendor():
    import types

    from tunefarm.host.placement.cede import Ceder
    from tunefarm.host.tuning.events import Events
    from tunefarm.host.tuning.plan import PlannedTask

    tasks = [PlannedTask(index=i, name=f"t{i}", weight=1.0, key=k, measured=0, seeded=0, best_s=None)
             for i, k in enumerate("abc")]
    budget = plan_budget(96, 32, 8, [0, 0, 0], [False, False, False])
    counter = TrialCounter(budget, ["a", "b", "c"])
    ceder = Ceder(types.SimpleNamespace(tasks=tasks), counter, {0: 1e-3, 1: 1e-3}, 8, Events())
    progress = types.SimpleNamespace(task_trials={0: 8, 1: 16, 2: 16}, best={0: 5e-3, 1: 1.5e-3, 2: 9e-3})
    ceder.check(progress)  # t0: 5x but one round only; t1: two rounds but 1.5x; t2: no vendor time
    assert ceder.ceded == [] and counter.allowed("a") == 32
    progress.task_trials[0] = 16
    ceder.check(progress)
    (c,) = ceder.ceded
    assert c["task"] == "t0" and c["trials"] == 16 and c["trials_freed"] == 32 and counter.allowed("a") == 0
    assert abs(c["tvm_best_ms"] - 5.0) < 1e-9 and abs(c["vendor_ms"] - 1.0) < 1e-9
    ceder.check(progress)  # ceded once
    assert len(ceder.ceded) == 1 and counter.allowed("b") == 32
