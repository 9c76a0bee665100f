"""report.json and report.md of a tuning job: what was tuned, how it was measured, what it gave."""
from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path
from typing import Any

from tunefarm.core.targets import target_to_json
from tunefarm.host.reports.markdown import number
from tunefarm.host.tuning.logs import task_rows


def write_report(tuned: dict[str, Any], rows: dict[str, dict[str, Any]], scheduled: list[str],
                 unscheduled: list[str], reference, problems: list[str], method: str = "") -> dict[str, Any]:
    import tvm  # pylint: disable=import-outside-toplevel

    job = tuned["job"]
    job_dir: Path = tuned["job_dir"]
    tasks = json.loads((job_dir / "tasks.json").read_text())
    per_task = task_rows(tuned["database"], tasks)
    untuned_ms = rows["tvm-untuned"]["latency"]["median_ms"]
    for row in rows.values():
        lat = row.get("latency")
        if lat:
            row["speedup_vs_untuned"] = untuned_ms / lat["median_ms"]
    reference_name = "PyTorch" if tuned["model"].kind == "torch" else "ONNX Runtime"
    report = {
        "job": job.name,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": {"source": job.model.source, "name": job.model.name or job.model.path,
                  "input_shapes": [list(x.shape) for x in tuned["model"].inputs],
                  "fingerprint": tuned["model"].fingerprint, "weights": "random (weights=None), seeded"},
        "device_key": job.device.key,
        "target": target_to_json(tuned["target"]),
        "host": {"hostname": platform.node(), "python": platform.python_version(), "tvm": tvm.__version__},
        "tuning": {"max_trials_global": job.tuning.max_trials_global,
                   "max_trials_per_task": job.tuning.max_trials_per_task,
                   "num_trials_per_iter": job.tuning.num_trials_per_iter, "cost_model": job.tuning.cost_model,
                   "population_size": job.tuning.population_size,
                   "trials_measured_total": sum(r["trials"] for r in per_task),
                   "trials_before_this_run": tuned["trials_before"], "resumed": tuned["resumed"],
                   "wall_s_this_run": round(tuned["tuning_wall_s"], 1), **tuned["runner_stats"]},
        "schedules": {"tir_functions": len(scheduled) + len(unscheduled), "tuned": len(scheduled),
                      "untuned_functions": unscheduled,
                      "tasks_without_record": [r["task"] for r in per_task if not r["tuned"]]},
        "tasks": per_task,
        "reference": reference_name,
        "results": rows,
        "problems": problems,
        "ok": not problems,
    }
    md = [f"# tunefarm report: {job.name}", "",
          f"- model: {report['model']['name']} ({job.model.source}), input {report['model']['input_shapes']}, "
          "random weights",
          f"- device key: `{job.device.key}`; target: `{json.dumps(report['target'])}`",
          f"- tuning: {report['tuning']['trials_measured_total']} trials measured in total "
          f"(budget {job.tuning.max_trials_global}, {job.tuning.num_trials_per_iter} per round, cost model "
          f"{job.tuning.cost_model}); this run {report['tuning']['wall_s_this_run']} s",
          f"- tuned schedules: **{len(scheduled)} of {len(scheduled) + len(unscheduled)}** TIR functions"
          + (f"; without: {', '.join(unscheduled)}" if unscheduled else ""),
          f"- numerics: every backend checked against {reference_name} on the same inputs and weights",
          "", "| backend | where | threads | precision | median ms | p90 ms | p99 ms | std ms | samples | "
              "speed-up vs untuned | numerics (max abs err) |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in rows.items():
        lat = row.get("latency")
        if not lat:
            md.append(f"| {name} | {row.get('not_run')} | | | | | | | | | |")
            continue
        num = row["numerics"]
        verdict = "ok" if num["ok"] else "**FAILED**"
        md.append(f"| {name} | {row['where']} | {row.get('threads') or '-'} | {row.get('precision') or '-'} | "
                  f"{number(lat['median_ms'])} | "
                  f"{number(lat['p90_ms'])} | "
                  f"{number(lat['p99_ms'])} | {number(lat['std_ms'])} | {lat['samples']} | "
                  f"{row['speedup_vs_untuned']:.2f}x | {verdict} ({num['max_abs_err']:.2g}) |")
    md += ["", f"Method: {method or rows['tvm-tuned']['latency']['method']}", "", "## Tasks", "", "| # | task | weight | trials | failed | best us | tuned |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for i, row in enumerate(per_task):
        md.append(f"| {i} | {row['task']} | {row['weight']:g} | {row['trials']} | {row['failed']} | "
                  f"{number(row['best_us'], 2)} | {'yes' if row['tuned'] else '**no**'} |")
    if problems:
        md += ["", "## Problems", ""] + [f"- {p}" for p in problems]
    report["markdown"] = "\n".join(md) + "\n"
    (job_dir / "report.md").write_text(report["markdown"])
    (job_dir / "report.json").write_text(json.dumps({k: v for k, v in report.items() if k != "markdown"},
                                                    indent=2, default=str))
    return report
