"""A design space that one task's unlucky draw does not end: :class:`SteadySpace`.

MetaSchedule generates each task's design space once, when its task scheduler starts, and an error there is not
caught: it ends ``tune_tasks`` for every task. Its CUDA tensor-core rule (``MultiLevelTilingTensorCore``) samples
while it builds the space, and some draws raise. Measured on ResNet-18 fp16 in NHWC for the H100 tag: the three
14x14 convs with BatchNorm's four-op epilogue raise "The scope ... is not a stage pipeline" for 2 of 40 seeds (the
same draw for all three), so a job's 26 tasks stopped the whole NHWC tuning run on the lent H100 before a single
candidate was measured (bench/results/gpu-nvidia-h100-80gb-hbm3-resnet18-fp16-nhwc.md).

:class:`SteadySpace` asks its inner space again (each try forks a new random state, as MetaSchedule's own
``PostOrderApply`` does per call) and, when every try raised, gives the task the target's plain space (no
tensor-core rule) so that it is still tuned. Each retry and fallback is kept in the shared :class:`SpaceNotes`,
which the job prints and reports.
"""
from __future__ import annotations

import threading
from typing import Any

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.space_generator import PostOrderApply, PySpaceGenerator

TRIES = 4  # draws of the inner space before the fallback: a bad draw came 2 times in 40 (above)


class SpaceNotes:
    """What the spaces of one loop had to do, shared by every task's clone: task name -> {tries, fell_back,
    error} (the last error, first line, bounded)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._notes: dict[str, dict[str, Any]] = {}

    def add(self, task: str, tries: int, fell_back: bool, error: str) -> None:
        with self._lock:
            self._notes[task] = {"tries": tries, "fell_back": fell_back, "error": error}

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {k: dict(v) for k, v in self._notes.items()}

    def lines(self) -> list[str]:
        """One line per task whose space needed more than one draw (unescaped: callers escape)."""
        out = []
        for task, note in sorted(self.snapshot().items()):
            if note["fell_back"]:
                out.append(f"{task}: the tensor-core space raised {note['tries']} times ({note['error']}); "
                           "tuned in the plain space")
            else:
                out.append(f"{task}: the tensor-core space raised on {note['tries'] - 1} draw(s) "
                           f"({note['error']}); the next draw built")
        return out


def _first_line(err: BaseException) -> str:
    """The error's message line (TVM puts the trace first and the message last), bounded."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    message = next((line for line in lines if line.startswith("Error message:")), lines[-1] if lines else "")
    return message.removeprefix("Error message:").strip()[:200] or type(err).__name__


@derived_object
class SteadySpace(PySpaceGenerator):
    """``kind``'s rules (e.g. ``cuda-tensorcore``), tried :data:`TRIES` times per task, then ``fallback``'s rules
    (e.g. ``cuda``). Postprocessors and mutators are ``kind``'s for both: the tensor-core postprocessors include
    the plain space's and leave untensorized candidates as they are."""

    def __init__(self, kind: str, fallback: str, notes: SpaceNotes | None = None, tries: int = TRIES):
        super().__init__()
        self.kind, self.fallback_kind, self.tries = kind, fallback, max(1, int(tries))
        self.notes = notes if notes is not None else SpaceNotes()
        self.inner = PostOrderApply(sch_rules=kind, postprocs=kind, mutator_probs=kind)
        self.fallback = PostOrderApply(sch_rules=fallback, postprocs=kind, mutator_probs=kind)
        self.sch_rules, self.postprocs, self.mutator_probs = (self.inner.sch_rules, self.inner.postprocs,
                                                              self.inner.mutator_probs)
        self.task = ""

    def _initialize_with_tune_context(self, context) -> None:
        self.task = str(context.task_name or "")
        self.inner._initialize_with_tune_context(context)  # pylint: disable=protected-access
        self.fallback._initialize_with_tune_context(context)  # pylint: disable=protected-access

    def generate_design_space(self, mod):
        error = ""
        for attempt in range(1, self.tries + 1):
            try:
                spaces = self.inner.generate_design_space(mod)
            except Exception as err:  # pylint: disable=broad-except  # a draw the rule cannot schedule
                error = _first_line(err)
                continue
            if attempt > 1:
                self.notes.add(self.task, attempt, False, error)
            return spaces
        self.notes.add(self.task, self.tries, True, error)
        return self.fallback.generate_design_space(mod)

    def clone(self):
        return SteadySpace(self.kind, self.fallback_kind, self.notes, self.tries)
