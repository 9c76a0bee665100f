"""How a MetaSchedule candidate becomes a loadable artifact: the one build routine of the farm.

Used by the host's WarmBuilder (warm local workers) and by agents that build for their own target
(``tunefarm.builder.build`` in the agent's RPC server), so a candidate is built the same way
wherever it is built: exactly as stock MetaSchedule's ``default_build``/``default_export`` do, minus
the ``import tvm.s_tir.tensor_intrin`` that costs ~20 s per fresh process and is not needed to build
an already-scheduled module.
"""
from __future__ import annotations


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
