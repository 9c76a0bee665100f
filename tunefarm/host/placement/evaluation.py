"""Placement in a job's evaluation: measure the groups, build the whole-model candidates, choose the model.

:func:`prepare` runs before the evaluation's rows (its group rows pin the comparison's agent, so every row of the
evaluation runs on the agent the groups were measured on) and adds the ``tvm-vendor`` and ``tvm-placed`` builds to
the evaluation's libraries; :func:`choose` takes the rows' results, names the fastest correct build of the three
and writes ``placement.json``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tunefarm.core.backends import MODEL_CANDIDATES
from tunefarm.core.errors import NoDeviceError
from tunefarm.core.threads import MIXED_POOLS, POOL_SPINS
from tunefarm.host.placement import result as placement_file
from tunefarm.host.placement.vendors import usable

CANDIDATES = MODEL_CANDIDATES  # the builds the job's model is chosen from


def _offload_of(groups: list[dict[str, Any]], vendors: list[str], placed_only: bool) -> dict[str, list[str]]:
    return {v: [g["key"] for g in groups if g["backend"] == v and (not placed_only or g["placed"] == v)]
            for v in vendors}


def prepare(tuned, comparator, libs: dict[str, str], build_dir: Path, device: str, events) -> dict[str, Any]:
    """Measure and place the groups of ``tuned``'s model, compile ``tvm-vendor`` and (where it differs from both
    others) ``tvm-placed`` into ``libs``. Returns the placement's description (``backends`` used, ``not_used``
    with reasons, ``groups``, ``builds``); empty ``backends`` where nothing could be placed."""
    # pylint: disable=import-outside-toplevel
    from tunefarm.host.comparator import clean_agent_id
    from tunefarm.host.models import to_relax
    from tunefarm.host.placement.build import build_model
    from tunefarm.host.placement.measure import measure_groups

    job, target = tuned.job, tuned.target
    try:
        agents = comparator.agents.agents(job.device.key)
    except NoDeviceError as err:
        return {"backends": [], "not_used": [str(err)]}
    vendors, why = usable(job.placement.backends, target, agents)
    info: dict[str, Any] = {"asked": job.placement.backends, "backends": [v.name for v in vendors], "not_used": why}
    if not vendors:
        return info
    pipeline = tuned.plan.pipeline
    refused = [v for v in vendors if pipeline.precision not in v.precisions]
    if refused:
        vendors = [v for v in vendors if v not in refused]
        info["backends"] = [v.name for v in vendors]
        info["not_used"] = why = why + [f"{v.name}: its codegen takes {'/'.join(v.precisions)} graphs; this job's "
                                        f"pipeline is {pipeline.precision}" for v in refused]
    if not vendors:
        return info
    with events.status("placement: importing the model's graph"):
        graph = pipeline.graph(to_relax(tuned.model), target)
    ev = job.evaluate
    task_keys = {t.key for t in getattr(tuned.plan, "tasks", None) or []}
    groups = measure_groups(comparator, job.device.key, graph, target, pipeline, tuned.database, vendors,
                            device=device, rtol=ev.rtol, atol=ev.atol, events=events, task_keys=task_keys)
    info["groups"] = groups
    pinned = comparator.pins.get(job.device.key)
    info["peak_gflops"] = next((float(a.peak_gflops) for a in agents if clean_agent_id(a.agent_id) == pinned), 0.0)
    names = info["backends"]
    every, placed = _offload_of(groups, names, False), _offload_of(groups, names, True)
    builds: dict[str, Any] = {}
    todo = [("tvm-vendor", every)]
    n_placed = sum(map(len, placed.values()))
    if n_placed == 0:
        builds["tvm-placed"] = {"same_as": "tvm-tuned"}
    elif placed == every:
        builds["tvm-placed"] = {"same_as": "tvm-vendor"}
    else:
        todo.append(("tvm-placed", placed))
    for name, offload in todo:
        with events.status(f"placement: compiling {name}"):
            ex, _scheduled, unscheduled, external = build_model(graph, target, pipeline, tuned.database, offload)
            libs[name] = str(build_dir / f"{name}.so")
            ex.export_library(libs[name])
        builds[name] = {"offload": offload, "vendor_modules": external, "untuned_functions": unscheduled}
    builds.setdefault("tvm-tuned", {"offload": {}})
    info["builds"] = builds
    return info


def probe_spins(comparator, artifacts, libs: dict[str, str], info: dict[str, Any], job, device: str,
                precision: str) -> dict[str, str]:
    """Time each CPU build with oneDNN parts once with each idle-spin setting (``mixed``: TVM's pool spin 0 and
    GOMP_SPINCOUNT=3000, core.threads.MIXED_POOLS; ``stock``: both libraries' own) on the evaluation's agent, and
    keep the faster for that build's evaluation row, an independent run after this probe. Neither wins for every
    model: mixed ran ResNet-50 (every conv on oneDNN) at 67.8 ms against 79.6, but a build whose oneDNN part sits
    among many small TVM kernels pays a wake-up per kernel with TVM's spin at 0 (ResNet-18 NHWC: 110 ms against
    76 for all-TVM; docs/placement.md). Returns build -> setting; each build's ``pool_spin`` in ``info`` says the
    probe's medians."""
    # pylint: disable=import-outside-toplevel
    from tunefarm.host.comparator import Row

    if device != "cpu" or "onednn" not in (info.get("backends") or []):
        return {}
    ev, chosen = job.evaluate, {}
    for name, build in (info.get("builds") or {}).items():
        if name not in libs or not build.get("vendor_modules"):
            continue
        rows = [Row(name, job.device.key, label=f"{name} (idle spins: {spin})",
                    options={"device": device, "precision": precision, "pool_spin": spin}, rtol=ev.rtol,
                    atol=ev.atol, model_file=libs[name]) for spin in POOL_SPINS]
        medians = {spin: float(res.latency["median_ms"])
                   for spin, res in zip(POOL_SPINS, comparator.run(artifacts, rows)) if res.ok and res.latency}
        if not medians:
            continue
        chosen[name] = min(medians, key=medians.get)
        build["pool_spin"] = {"chosen": chosen[name], "probe_ms": medians}
    return chosen


def _spin_env(build: dict[str, Any]) -> dict[str, str]:
    """The environment a build's chosen idle spins need where it is deployed (empty: none)."""
    if not build.get("vendor_modules") or not (build.get("offload") or {}).get("onednn"):
        return {}
    return dict(MIXED_POOLS) if (build.get("pool_spin") or {}).get("chosen", "mixed") == "mixed" else {}


def _build(info: dict[str, Any], name: str) -> dict[str, Any]:
    """A whole build's entry, the one it is the same as where it has no build of its own."""
    build = info["builds"][name]
    return _build(info, build["same_as"]) if "same_as" in build else build


def choose(info: dict[str, Any], rows: dict[str, dict[str, Any]], job_dir: Path) -> dict[str, Any]:
    """The fastest build among :data:`CANDIDATES` whose row ran with correct numerics; writes placement.json (also
    when nothing was placed: it then says tvm-tuned and why, and replaces an earlier evaluation's) and returns what
    the report says of it."""
    if not info.get("backends"):
        out = {"chosen": "tvm-tuned", "offload": {}, "whole_ms": {}, "environment": {}, "asked": info.get("asked"),
               "backends": [],
               "not_used": info.get("not_used") or [], "groups": [], "builds": {}}
        placement_file.write(job_dir, out)
        return out
    timed = {}
    for name in CANDIDATES:
        row = rows.get(name) or {}
        build = info["builds"].get(name, {})
        if "same_as" in build:
            continue
        if row.get("latency") and (row.get("numerics") or {}).get("ok"):
            timed[name] = float(row["latency"]["median_ms"])
    chosen = min(timed, key=timed.get) if timed else "tvm-tuned"
    build = _build(info, chosen)
    out = {"chosen": chosen, "offload": build["offload"], "whole_ms": timed,
           "environment": _spin_env(build),  # set where the chosen model runs (the agent set it for its row)
           **{k: info[k] for k in ("asked", "backends", "not_used", "groups", "builds", "peak_gflops")}}
    placement_file.write(job_dir, out)
    return out
