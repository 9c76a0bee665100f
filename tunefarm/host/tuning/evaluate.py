"""After tuning: build tuned and untuned, run them and the baselines on an agent of the job's key, check, time.

The tuned build applies the database to exactly the module that was tuned and compiles that; the
report says how many of its TIR functions carry a tuned schedule, and names the rest. Both builds and
the PyTorch / ONNX Runtime baselines are rows of one :class:`~tunefarm.host.comparator.Comparator`:
each runs on an agent of the job's key through that agent's runner (TVM: Relax VM, ``time_evaluator``;
the peers: their own frameworks with the agent's thread count), never in this tuning process, and then
every row's outputs are checked against the reference framework on the same inputs and weights.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from tunefarm.core.backends import JOB_BUILDS
from tunefarm.core.errors import TuningFailed, TunefarmError
from tunefarm.core.stats import method_text
from tunefarm.host.reports.markdown import number
from tunefarm.host.comparator import (STATUS_TEXT, Comparator, FarmAgents, MeasureSettings, ModelArtifacts, Row,
                                      RowResult, agents_of_rows, agents_text)
from tunefarm.host.tuning.events import Events

EVAL_BUDGET_S = 120.0  # per row: a slow build (untuned TVM on a CPU) gets fewer samples, never under 5
TVM_ROWS = ("tvm-tuned", "tvm-untuned")  # always built; with placement also tvm-placed and tvm-vendor
BUILD_ORDER = JOB_BUILDS  # tvm-tuned, tvm-vendor, tvm-placed, tvm-untuned


def apply_database(mod, target, database):
    """Records applied to exactly ``mod`` (the tuned module): (module, scheduled names, unscheduled names);
    see :func:`tunefarm.host.tuning.pipeline.apply_records`."""
    from tunefarm.host.tuning.pipeline import apply_records  # pylint: disable=import-outside-toplevel

    return apply_records(mod, target, database)


def device_type_of(target) -> str:
    """The runtime device a target's kernels run on ("llvm" -> "cpu")."""
    kind = target.kind.name
    return "cpu" if kind in ("llvm", "c") else kind


def evaluation_rows(job, libs: dict[str, str], device_type: str, precision: str = "fp32",
                    spins: dict[str, str] | None = None) -> list[Row]:
    """The rows of a job's evaluation: the TVM builds (``libs``: backend -> exported library, in the order of
    :data:`BUILD_ORDER`; ``precision``: the class the job's pipeline compiles them in; ``spins``: a oneDNN build's
    idle spins, as the placement's probe chose them), then the job's baselines, all on the job's key with its
    tolerances."""
    ev, spins = job.evaluate, spins or {}
    rows = [Row(name, job.device.key, label=name,
                options={"device": device_type, "precision": precision,
                         **({"pool_spin": spins[name]} if name in spins else {})},
                rtol=ev.rtol, atol=ev.atol, model_file=libs[name]) for name in BUILD_ORDER if name in libs]
    return rows + [Row(base, job.device.key, label=base, rtol=ev.rtol, atol=ev.atol) for base in ev.baselines]


def report_row(res: RowResult) -> dict[str, Any]:
    """A row as the tuning report keeps it (``report.json``'s ``results``): ``agent_note`` where the row ran
    on another agent than the evaluation's others, and why."""
    moved = {"agent_note": res.agent_note} if res.agent_note else {}
    if not res.ok:
        where = f" ({res.where})" if res.where else ""
        return {"backend": res.backend, "not_run": f"{STATUS_TEXT.get(res.status, res.status)}: {res.reason}{where}",
                **moved}
    return {"backend": res.backend, "where": res.where, "latency": res.latency, "threads": res.threads,
            "precision": res.precision, "numerics": res.numerics, "version": res.version, **moved,
            **({"details": {"pool_spin": res.details["pool_spin"]}} if res.details.get("pool_spin") else {})}


def agents_sentence(results: list[RowResult]) -> str:
    """Where the evaluation's rows ran, for the report's method line: one agent, or which and why not."""
    from tunefarm.host.reports.markdown import cell  # pylint: disable=import-outside-toplevel

    lines = agents_text(agents_of_rows(results))  # agents' ids and errors: their own text, escaped
    return ("Agents: " + cell("; ".join(lines), limit=2000) + ".") if lines else ""


def _plain(text, limit: int = 120) -> str:
    """An agent's own text (its id, a reason about it) safe in a problem line of report.md and the console:
    letters, digits, spaces and a few punctuation marks kept, the rest shown as '?'."""
    return "".join(c if c.isalnum() or c in " .,:;=@_-+/()" else "?" for c in str(text))[:limit]


def evaluate_job(tuned, events: Events) -> dict[str, Any]:
    """Compile, run, verify and time; write report.json/report.md; raise TuningFailed on a bad result.
    ``events`` also goes to host/comparator.py's artifacts, agents and comparator (their ``print`` and
    ``status``)."""
    from tunefarm.host.reports.tuning import write_report  # pylint: disable=import-outside-toplevel

    job, target, mod, database = tuned.job, tuned.target, tuned.mod, tuned.database
    ev = job.evaluate
    model = tuned.model
    job_dir: Path = tuned.job_dir
    build_dir = Path(tempfile.mkdtemp(prefix="tunefarm-eval-"))

    with events.status("compiling the tuned and the untuned builds"):
        applied, scheduled, unscheduled = apply_database(mod, target, database)
        libs = {}
        from tunefarm.host.tuning.pipeline import compile_module  # pylint: disable=import-outside-toplevel

        for name, module in (("tvm-tuned", applied), ("tvm-untuned", mod)):
            ex = compile_module(module, target, cuda_graph=ev.cuda_graph)
            libs[name] = str(build_dir / f"{name}.so")
            ex.export_library(libs[name])
    artifacts = ModelArtifacts(model, job.model, build_dir, events)
    reference = artifacts.reference
    on_wait = tuned.on_wait
    agents = FarmAgents(tuned.tracker, job.runner.device_wait_sec, events,
                        on_wait=lambda _key, waited, limit: on_wait(waited, limit))
    try:
        comparator = Comparator(agents, MeasureSettings(ev.warmup, ev.repeat, EVAL_BUDGET_S), events)
        from tunefarm.host.placement import evaluation as placement  # pylint: disable=import-outside-toplevel

        # first: its group rows pin the comparison's agent, and it adds the tvm-vendor / tvm-placed builds
        placing = placement.prepare(tuned, comparator, libs, build_dir, device_type_of(target), events)
        precision = tuned.plan.pipeline.precision
        spins = placement.probe_spins(comparator, artifacts, libs, placing, job, device_type_of(target), precision)
        results = comparator.run_and_compare(artifacts, evaluation_rows(job, libs, device_type_of(target),
                                                                        precision, spins))
    finally:
        agents.close()
    for res in results:
        if res.backend in TVM_ROWS and not res.ok:
            raise TunefarmError(f"running {res.backend} on key '{job.device.key}': {res.status}: {res.reason}")
    rows = {res.backend: report_row(res) for res in results}
    where = agents_sentence(results)
    placed = placement.choose(placing, rows, job_dir)

    tuned_ms = rows["tvm-tuned"]["latency"]["median_ms"]
    untuned_ms = rows["tvm-untuned"]["latency"]["median_ms"]
    problems = []
    for name in ("tvm-tuned", "tvm-untuned"):
        if not rows[name]["numerics"]["ok"]:
            num = rows[name]["numerics"]
            problems.append(f"{name} output differs from the reference (" + (
                num.get("detail") or f"relative L2 err {num['rel_l2_err']:.3g}, max abs err {num['max_abs_err']:.3g} "
                                     f"against a reference of largest magnitude {num['ref_max_abs']:.3g}; check: "
                                     f"{num['check']}") + ")")
    for name in ("tvm-placed", "tvm-vendor"):
        num = (rows.get(name) or {}).get("numerics")
        if num is not None and not num["ok"]:
            problems.append(f"{name} (operator groups on {', '.join(placing['backends'])}) output differs from the "
                            f"reference (relative L2 err {number(num.get('rel_l2_err'), 3)}): it was not chosen")
    for agent, why in (tuned.verification or {}).get("flagged", {}).items():
        problems.append(f"agent {_plain(agent)} was flagged during tuning ({_plain(why, 300)}); its results were "
                        "discarded")
    # Candidates that failed for want of an agent (none took them, their sessions died under them on every try,
    # or a new best found none free to measure it again): the farm's failures, not the candidates'.
    from tunefarm.host.tuning.runner import FARM_FAILURES  # pylint: disable=import-outside-toplevel

    farm_failed = {k: n for k, n in tuned.failures.items() if k in FARM_FAILURES and n}
    unverifiable = int((tuned.verification or {}).get("unverifiable", 0))
    if farm_failed or unverifiable:
        kinds = [f"{n} {k}" for k, n in sorted(farm_failed.items())]
        kinds += [f"{unverifiable} new best(s) not measured a second time"] if unverifiable else []
        problems.append(f"{sum(farm_failed.values()) + unverifiable} candidate(s) of this run failed for want of an "
                        f"agent ({', '.join(kinds)}; lost agents: {', '.join(map(_plain, tuned.agents_lost)) or 'none'}): they "
                        "count as failed, and tasks they were the best of may be slower than they could be")
    if ev.require_speedup and tuned_ms >= untuned_ms:
        problems.append(f"tuned build is not faster than untuned ({tuned_ms:.3f} ms vs {untuned_ms:.3f} ms)")
    report = write_report(tuned, rows, scheduled, unscheduled, reference, problems,
                          method=" ".join(filter(None, [method_text(ev.warmup, ev.repeat, EVAL_BUDGET_S), where])),
                          placement=placed)
    events.markdown(report["markdown"])
    events.print(f"report: {job_dir / 'report.md'}")
    if problems:
        raise TuningFailed("; ".join(problems))
    return report
