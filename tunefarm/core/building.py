"""How a MetaSchedule candidate becomes a loadable artifact: the one build routine of the farm.

Used by the host's WarmBuilder (warm local workers) and by agents that build for their own target
(``tunefarm.builder.build`` in the agent's RPC server), so a candidate is built the same way
wherever it is built: exactly as stock MetaSchedule's ``default_build``/``default_export`` do, minus
the ``import tvm.s_tir.tensor_intrin`` that costs ~20 s per fresh process and is not needed to build
an already-scheduled module.
"""
from __future__ import annotations

import math

# Stragglers: MetaSchedule's builder returns when every candidate of a batch is done, so one candidate that
# builds for 30 s holds the batch — and on a spread search the share, and the run, while the other workers idle
# (bench/results/search_scaling-h200vm-16c-steal: 14 of a batch's 16 built in a few seconds, two ran into the
# 30 s timeout, and that share ended 25 s after the others). Once STRAGGLER_SHARE of a batch (of at least 8) has
# built, a candidate still building at straggler_factor x that moment, and past STRAGGLER_MIN_S, is cut: the
# search sees a build timeout, as it would at builder.timeout_sec. The host's builder applies it to its batches,
# a build agent to each call's candidates (a call carries one candidate per core of the agent).
STRAGGLER_SHARE = 0.875
STRAGGLER_MIN_S = 10.0
STRAGGLER_BATCH = 8  # smaller batches wait for every candidate (up to builder.timeout_sec)


def build_candidate(mod, target, out_path: str) -> str:
    """Build a scheduled IRModule for ``target`` and export it as a ``.tar`` at ``out_path``."""
    # pylint: disable=import-outside-toplevel
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    from tvm.support.tar import tar

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    rt_mod = tvm_build(mod, target=target)
    rt_mod.export_library(out_path, fcompile=tar)
    return out_path


def straggler_cut(finished: list[float], batch: int, factor: float, min_s: float = STRAGGLER_MIN_S):
    """A function giving the second (from the batch's start) at which the candidates of a ``batch`` still
    building are cut, or None while no cut applies: once ``STRAGGLER_SHARE`` of it has finished (``finished``,
    filled as candidates finish, in seconds, in time order), ``factor`` x that moment, at least ``min_s``. Never
    for a batch under ``STRAGGLER_BATCH`` or ``factor`` 0."""
    need = math.ceil(STRAGGLER_SHARE * batch)

    def cut_at() -> float | None:
        if factor <= 0 or batch < STRAGGLER_BATCH or len(finished) < need:
            return None
        return max(min_s, factor * finished[need - 1])

    return cut_at
