"""``tunefarm compare``: models x (device key, backend) rows, each checked, timed and plotted.

For each model: import it once (``host.models``), compute the reference outputs once, prepare every row,
then hand the rows to the :class:`~tunefarm.host.comparator.Comparator`, which runs each on an agent of
its key (one RPC session per row, the agent's runners) and then compares the outputs with the reference:

* ``tvm-tuned``: the tuning job's database applied to exactly the module the farm tunes
  (``tuning.fuse_for_tuning`` then ``evaluate.apply_database``), compiled on the host for the agents'
  target and run by the agent's TVM runner (Relax VM, ``time_evaluator``);
* ``tvm-untuned``: the same fused module compiled without records (default schedules);
* ``torch``, ``torch-compile``, ``onnxruntime``, ``tensorrt``: the agent's runners on the model file.

A row that cannot run (no agent on its key within the wait, a backend the device does not have, no
tuning logs) is kept in the report with its reason, never with a number. Output: ``report.md``,
``report.json``, ``latency.png`` and ``tuning.png`` in the output directory.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from tunefarm.core.comparespec import TVM_BACKENDS, CompareConfig, CompareRow, load_compare
from tunefarm.core.errors import NoDeviceError, TuningFailed, TunefarmError
from tunefarm.core.threads import usable_cpus
from tunefarm.core.wire import parse_hostport
from tunefarm.host.reports.markdown import number
from tunefarm.host.comparator import (FAILED, NO_AGENT, NOT_AVAILABLE, NOT_RUN, OK, Comparator, FarmAgents,
                                      MeasureSettings, ModelArtifacts, Row, RowResult, agents_of_rows, agents_text,
                                      result)


class CompareArtifacts(ModelArtifacts):
    """A compare file's model: loaded from its spec, and the TVM builds its rows need (made once each)."""

    def __init__(self, spec, work_dir: Path, console):
        from tunefarm.host.models import load_model  # pylint: disable=import-outside-toplevel

        with console.status(f"loading {spec.name or spec.path}"):
            model = load_model(spec)
            super().__init__(model, spec, work_dir, console)
        self._relax = None
        self._fused: dict[str, Any] = {}
        self._libs: dict[tuple, dict[str, Any]] = {}

    def relax(self):
        if self._relax is None:
            from tunefarm.host.models import to_relax  # pylint: disable=import-outside-toplevel

            with self.console.status(f"importing {self.name} into Relax"):
                self._relax = to_relax(self.model)
        return self._relax

    def fused(self, target, pipeline=None):
        """The fused module for ``target`` through ``pipeline`` (None: the target's default), made once."""
        from tunefarm.core.targets import target_to_json  # pylint: disable=import-outside-toplevel
        from tunefarm.host.tuning.pipeline import resolve_pipeline  # pylint: disable=import-outside-toplevel

        pipeline = pipeline or resolve_pipeline(target)
        key = (json.dumps(target_to_json(target), sort_keys=True), pipeline)
        if key not in self._fused:
            self._fused[key] = pipeline.fuse(self.relax(), target)
        return self._fused[key]

    def library(self, target, logs: Path | None) -> dict[str, Any]:
        """Compile (once) the untuned build, or the build with ``logs``'s database applied."""
        # pylint: disable=import-outside-toplevel
        import tvm

        from tunefarm.core.targets import target_to_json
        from tunefarm.host.tuning.evaluate import apply_database
        from tunefarm.host.tuning.jobdir import JobDir
        from tunefarm.host.tuning.logs import open_database

        cache_key = (json.dumps(target_to_json(target), sort_keys=True), str(logs) if logs else None)
        if cache_key in self._libs:
            return self._libs[cache_key]
        # a job's records apply to the module it tuned: the pipeline its directory was tuned with
        mod = self.fused(target, JobDir(logs).pipeline() if logs is not None else None)
        info: dict[str, Any] = {}
        if logs is not None:
            mod, scheduled, unscheduled = apply_database(mod, target, open_database(logs))
            info = {"tuned_functions": len(scheduled), "tir_functions": len(scheduled) + len(unscheduled),
                    "untuned_functions": unscheduled}
        label = "tuned" if logs else "untuned"
        with self.console.status(f"compiling the {label} TVM build of {self.name}"):
            t0 = time.perf_counter()
            ex = tvm.compile(mod, target)
            path = self.work_dir / f"{self.name}-{label}-{len(self._libs)}.so"
            ex.export_library(str(path))
            info["compile_s"] = round(time.perf_counter() - t0, 2)
        self._libs[cache_key] = {"path": str(path), **info}
        return self._libs[cache_key]


def _row(row: CompareRow, cfg: CompareConfig) -> Row:
    rtol = row.rtol if row.rtol is not None else cfg.evaluate.rtol
    atol = row.atol if row.atol is not None else cfg.evaluate.atol
    return Row(backend=row.backend, key=row.key, label=row.label, options=dict(row.options), rtol=float(rtol),
               atol=float(atol))


def _check_tuning_logs(logs: Path, model) -> tuple[dict[str, Any] | None, str]:
    """The job state of a tuning directory made for this model, or why it cannot be used."""
    if not logs.is_dir():
        return None, f"no tuning logs at {logs} (tune first: tunefarm tune configs/jobs/...)"
    state_path = logs / "job_state.json"
    if not state_path.is_file() or not (logs / "database_tuning_record.json").is_file():
        return None, f"{logs} is not a tuning job directory (no job_state.json / MetaSchedule database)"
    state = json.loads(state_path.read_text())
    if state.get("model_fingerprint") != model.fingerprint:
        return None, (f"{logs} holds the tuning of a different model (fingerprint {state.get('model_fingerprint')}, "
                      f"this model {model.fingerprint})")
    return state, ""


def _prepare_tvm_row(row: CompareRow, spec: Row, art: CompareArtifacts, agents: FarmAgents) -> Row | RowResult:
    """The build a TVM row runs (compiled here for the agents' target), or why the row cannot run."""
    # pylint: disable=import-outside-toplevel
    import tvm

    from tunefarm.core.targets import runtime_problem, target_from_spec, target_to_json
    from tunefarm.host.tuning.evaluate import device_type_of

    logs = row.logs_for(art.name) if row.backend == "tvm-tuned" else None
    state = None
    if logs is not None:
        state, why = _check_tuning_logs(logs, art.model)
        if state is None:
            return result(spec, NOT_RUN, why)
    try:
        infos = agents.agents(row.key)
    except NoDeviceError as err:
        return result(spec, NO_AGENT, str(err))
    if state is not None:
        target = tvm.target.Target(state["target"])
    elif row.target in (None, "from-agent"):
        targets = {json.dumps(a.target, sort_keys=True) for a in infos if a.target}
        if len(targets) != 1:
            return result(spec, NOT_RUN, f"agents on key '{row.key}' report {len(targets)} different targets; "
                                         "set target: in the row")
        target = tvm.target.Target(json.loads(targets.pop()))
    else:
        target = target_from_spec(row.target)
    spec.target = target_to_json(target)
    problems = [runtime_problem(spec.target, a) for a in infos]
    if infos and all(problems):
        return result(spec, NOT_AVAILABLE, problems[0])
    lib = art.library(target, logs)
    spec.model_file = lib["path"]
    spec.options = {"device": device_type_of(target), **spec.options}
    spec.details = {k: v for k, v in lib.items() if k != "path"}
    if logs is not None:
        spec.details["logs"] = str(logs)
        spec.details.update(_tuning_summary(logs))
    return spec


def _tuning_summary(logs: Path) -> dict[str, Any]:
    """Trials measured and tuning wall time of a job directory, from its progress log."""
    path = logs / "progress.jsonl"
    if not path.is_file():
        return {}
    events = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    if not events:
        return {}
    return {"trials": max(e.get("trials", 0) for e in events),
            "tuning_wall_s_last_run": round(max(e.get("elapsed_s", 0.0) for e in events), 1)}


def run_compare(config_path: str, tracker_override: str | None = None, output: str | None = None,
                console=None) -> dict[str, Any]:
    """Run every row of every model in the compare file; write the report and plots; return the report."""
    if console is None:
        from rich.console import Console  # pylint: disable=import-outside-toplevel

        console = Console(highlight=False)
    from rich.markup import escape  # pylint: disable=import-outside-toplevel

    cfg = load_compare(config_path)
    if tracker_override:
        cfg.tracker = tracker_override
    out_dir = Path(output) if output else Path("logs") / f"compare-{cfg.name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    agents = FarmAgents(parse_hostport(cfg.tracker), cfg.device_wait_sec, console)
    ev = cfg.evaluate
    comparator = Comparator(agents, MeasureSettings(ev.warmup, ev.repeat, ev.budget_s), console)
    work_dir = Path(tempfile.mkdtemp(prefix=f"tunefarm-compare-{cfg.name}-"))
    t_start = time.time()
    load_start = _load_avg()
    models_out = []
    try:
        for spec in cfg.models:
            art = CompareArtifacts(spec, work_dir, console)
            console.print(f"[bold]{escape(art.name)}[/]: input {[list(x.shape) for x in art.model.inputs]}, reference "
                          f"{'PyTorch' if art.model.kind == 'torch' else 'ONNX Runtime'}")
            prepared, prepare_s = [], []
            for row in cfg.rows:
                t0 = time.time()
                item = _row(row, cfg)
                try:
                    if row.backend in TVM_BACKENDS:
                        item = _prepare_tvm_row(row, item, art, agents)
                except TunefarmError as err:
                    item = result(item, FAILED, str(err))
                prepared.append(item)
                prepare_s.append(time.time() - t0)
            results = comparator.run_and_compare(art, prepared)
            rows = []
            for res, spent in zip(results, prepare_s):
                res.wall_s = round((res.wall_s or 0.0) + spent, 1)
                rows.append(res.to_dict())
                # the reason and the agent's id are the agent's own text: never read as markup
                console.print(escape(f"  {res.label:<28} {_one_line_summary(rows[-1])}"))
            _add_speedups(rows, cfg.baseline)
            row_agents = agents_of_rows(results)
            for line in agents_text(row_agents):
                console.print(escape(f"  {line}"))
            models_out.append({"name": art.name, "source": spec.source,
                               "input_shapes": [list(x.shape) for x in art.model.inputs],
                               "fingerprint": art.model.fingerprint,
                               "reference": "PyTorch" if art.model.kind == "torch" else "ONNX Runtime",
                               "rows": rows, "row_agents": row_agents})
    finally:
        agents.close()
    from tunefarm.host.reports.compare import write_compare_report  # pylint: disable=import-outside-toplevel

    # Other work on a shared machine skews every figure: the report says how busy it was.
    report = write_compare_report(cfg, models_out, out_dir, wall_s=time.time() - t_start,
                                  load_avg={"load_avg_start": load_start, "load_avg_end": _load_avg(),
                                            "cpus": usable_cpus()}, agents=agents.seen)
    console.print(f"report: {out_dir / 'report.md'}")
    bad = [f"{m['name']}/{r['label']}" for m in models_out for r in m["rows"]
           if r["status"] == OK and not r["numerics"]["ok"]]
    if bad:
        raise TuningFailed(f"outputs differ from the reference in: {', '.join(bad)} (see {out_dir / 'report.md'})")
    return report


def _load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _one_line_summary(row: dict[str, Any]) -> str:
    where = f" ({row['where']})" if row.get("where") else ""
    if row["status"] != OK:
        return f"{row['status']}: {row['reason']}{where}"
    lat, num = row["latency"], row["numerics"]
    return (f"median {lat['median_ms']:.3f} ms, p90 {lat['p90_ms']:.3f} ms, {lat['samples']} samples, "
            f"{row.get('threads') or '-'} threads, {row.get('precision')}; numerics {'ok' if num['ok'] else 'FAILED'} "
            f"(relative L2 err {number(num['rel_l2_err'], 2)}, max abs err {number(num['max_abs_err'], 2)} of "
            f"reference max {number(num.get('ref_max_abs'), 2)}){where}")


def _add_speedups(rows: list[dict[str, Any]], baseline: str) -> None:
    base = next((r for r in rows if r["label"] == baseline and r["status"] == OK), None)
    for row in rows:
        if row["status"] == OK and base is not None:
            row["speedup_vs_baseline"] = base["latency"]["median_ms"] / row["latency"]["median_ms"]
        else:
            row["speedup_vs_baseline"] = None
