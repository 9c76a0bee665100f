"""tunefarm.host.tuning.search: the pooling rule's warning silenced and nothing else changed.

Real design-space generation by MetaSchedule on TE kernels; no processes, no tuning."""
from __future__ import annotations


def _space(rule: str):
    """Design spaces of a kernel whose block carries ``schedule_rule: rule`` (as legalized pooling does)."""
    import tvm
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    a = te.placeholder((1, 8, 16, 16), name="a")
    b = te.compute((1, 8, 8, 8), lambda n, c, h, w: tvm.te.max(a[n, c, h * 2, w * 2], a[n, c, h * 2 + 1, w * 2 + 1]),
                   name="pool_max", attrs={"schedule_rule": rule})
    mod = tvm.IRModule({"main": te.create_prim_func([a, b])})
    target = tvm.target.Target({"kind": "llvm", "num-cores": 1})
    # MetaSchedule's own first rule (ApplyCustomRule) and one rule after it; the full default list would
    # import every tensor intrinsic first (~20 s here).
    rules = [ms.schedule_rule.ApplyCustomRule(),
             ms.schedule_rule.ParallelizeVectorizeUnroll(max_jobs_per_core=16, max_vectorize_extent=64,
                                                         unroll_max_steps=[0, 16], unroll_explicit=True)]
    space = ms.space_generator.PostOrderApply(sch_rules=rules, postprocs=[], mutator_probs={})
    ctx = ms.TuneContext(mod=mod, target=target, space_generator=space, search_strategy="replay-trace",
                         task_name="pool")
    return target, ctx.generate_design_space()


def test_the_unknown_pool_max_rule_is_quiet_and_the_block_still_scheduled(capfd):
    from tunefarm.host.tuning.search import quiet_pool_rule

    _, spaces = _space("meta_schedule.pool_max")
    warned = capfd.readouterr().err
    assert 'Unknown schedule rule "meta_schedule.pool_max"' in warned  # TVM 0.27 as it comes
    target, _ = _space("meta_schedule.pool_max")
    capfd.readouterr()
    quiet_pool_rule(target)
    quiet_pool_rule(target)  # twice is harmless: a registered name is left alone
    _, quiet = _space("meta_schedule.pool_max")
    assert "Unknown schedule rule" not in capfd.readouterr().err
    # The same design spaces: the annotation dropped, then the other rules schedule the block.
    assert len(quiet) == len(spaces)
    for before, after in zip(spaces, quiet):
        assert [i.kind.name for i in before.trace.insts] == [i.kind.name for i in after.trace.insts]
    assert "Unannotate" in [i.kind.name for i in quiet[0].trace.insts]
    # Any other unknown rule still warns.
    _space("meta_schedule.some_other_rule")
    assert 'Unknown schedule rule "meta_schedule.some_other_rule"' in capfd.readouterr().err
