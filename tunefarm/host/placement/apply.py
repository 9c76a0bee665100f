"""The one call that builds a job's model from a pulled directory, placement included.

::

    from tunefarm.host.placement.apply import compile_pulled
    ex = compile_pulled(mod, "resnet18/")        # mod: the model in Relax, weights bound as constants
    ex.export_library("resnet18.so")             # loading it needs the oneDNN plugin where groups were offloaded

``resnet18/`` is what ``tunefarm pull JOB -o resnet18/`` wrote: ``database/job_state.json`` (the pipeline and
target the job tuned with; a ``job_state.json`` beside ``best/`` is taken first, as a job directory's own), ``best/`` (the best verified records) and, for a job that placed groups on a vendor library,
``placement.json`` (the chosen build and its offloaded groups). The model is built exactly as the job's evaluation
built the build it chose (:func:`tunefarm.host.placement.build.build_model`). A process that loads the exported
library must load the vendor's runtime first (``tunefarm.core.onednn.load_plugin()``; agents do it themselves).
"""
from __future__ import annotations

import json
from pathlib import Path

from tunefarm.core.errors import TunefarmError


def environment(pulled_dir: str | Path) -> dict[str, str]:
    """The environment the pulled job's chosen build runs best with (placement.json's ``environment``: the idle
    spins its placement measured faster for a model with oneDNN parts); set it in the process that runs the model
    before the oneDNN plugin loads. Empty without a placement file or where nothing needs setting."""
    from tunefarm.host.placement import result as placement_file  # pylint: disable=import-outside-toplevel

    placement = Path(pulled_dir) / placement_file.FILE
    return placement_file.read(placement)["environment"] if placement.is_file() else {}


def compile_pulled(mod, pulled_dir: str | Path, target=None):
    """``mod`` (the Relax module of the job's model, weights bound, not yet fused) built with the pulled job's
    pipeline, records and placement for its target (or ``target``): a Relax executable."""
    # pylint: disable=import-outside-toplevel
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from tunefarm.host.placement import result as placement_file
    from tunefarm.host.placement.build import build_model
    from tunefarm.host.tuning.pipeline import job_dir_pipeline

    pulled = Path(pulled_dir)
    best = pulled / "best"
    state_path = next((p for p in (pulled / "job_state.json", pulled / "database" / "job_state.json")
                       if p.is_file()), None)
    if state_path is None or not best.is_dir():
        raise TunefarmError(f"{pulled} is not a pulled job directory (best/ and database/job_state.json expected)")
    try:
        state = json.loads(state_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TunefarmError(f"cannot read {state_path}: {err}") from None
    if not isinstance(state, dict) or not isinstance(state.get("target"), dict):
        raise TunefarmError(f"{state_path} names no target")
    target = target or tvm.target.Target(state["target"])
    pipeline = job_dir_pipeline(state)
    placement = pulled / placement_file.FILE
    offload = placement_file.chosen_offload(placement_file.read(placement)) if placement.is_file() else {}
    database = ms.database.JSONDatabase(work_dir=str(best))
    graph = pipeline.graph(mod, target)
    ex, _scheduled, _unscheduled, _external = build_model(graph, target, pipeline, database, offload)
    return ex
