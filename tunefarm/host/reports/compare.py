"""The report of ``tunefarm compare``: report.json, report.md, latency.png and tuning.png.

Plots are drawn with matplotlib's Agg backend (no display needed). ``latency.png``: per model, the
median latency of each row that ran as a bar, with a whisker up to its p90, on a log scale (untuned
TVM on a CPU is 100x slower than the rest); rows that did not run are named under the axis with "n/a".
``tuning.png``: for each tuned TVM row's job, the estimated end-to-end latency (sum over tasks of weight
x best measured task latency) against trials measured, from the job's ``progress.jsonl``.
"""
from __future__ import annotations

import datetime
import json
import platform
import socket
from pathlib import Path
from typing import Any

from tunefarm.core.backends import BACKENDS
from tunefarm.core.stats import method_text
from tunefarm.host.comparator import STATUS_TEXT, agents_text
from tunefarm.host.reports.markdown import cell, number, threads_text

BACKEND_COLORS = {name: b.color for name, b in BACKENDS.items()}  # core/backends.py describes each


def write_compare_report(cfg, models: list[dict[str, Any]], out_dir: Path, wall_s: float,
                         load_avg: dict[str, Any] | None = None,
                         agents: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    plots = {}
    latency_png = out_dir / "latency.png"
    plot_latency(models, cfg.baseline, latency_png)
    plots["latency"] = latency_png.name
    tuned_dirs = []
    for model in models:
        for row in model["rows"]:
            logs = (row.get("details") or {}).get("logs")
            if row["backend"] == "tvm-tuned" and logs and (Path(logs) / "progress.jsonl").is_file():
                tuned_dirs.append((f"{model['name']} ({row['label']})", Path(logs), row))
    tuning_png = out_dir / "tuning.png"
    if tuned_dirs:
        plot_tuning_curves(tuned_dirs, tuning_png)
        plots["tuning"] = tuning_png.name
    elif tuning_png.exists():
        tuning_png.unlink()  # a stale plot of an earlier run would be read as this run's
    host = {**host_info(), **(load_avg or {})}
    report = {"name": cfg.name, "config": cfg.to_dict(), "source": cfg.source_path, "host": host,
              "tracker": cfg.tracker, "baseline": cfg.baseline, "wall_s": round(wall_s, 1),
              "method": method_text(cfg.evaluate.warmup, cfg.evaluate.repeat, cfg.evaluate.budget_s), "agents": agents or {}, "models": models, "plots": plots}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / "report.md").write_text(_markdown(report, cfg))
    return report


def _markdown(report: dict[str, Any], cfg) -> str:
    md = [f"# tunefarm compare: {report['name']}", "",
          f"- host {report['host']['hostname']}, TVM {report['host']['tvm']}, tracker {report['tracker']}, "
          f"{report['host']['created']}, {report['wall_s']} s in total; host load average "
          f"{report['host'].get('load_avg_start')} at the start, {report['host'].get('load_avg_end')} at the end "
          f"({report['host'].get('cpus')} CPUs)",
          f"- baseline for speed-ups: `{report['baseline']}`; weights random (weights=None), seeded",
          f"- method: {report['method']}"]
    for key, agents in report["agents"].items():
        for agent in agents:  # what the agents say about themselves: their own text, escaped
            gpus = f", GPU {', '.join(str(g) for g in agent['cuda'])}" if agent["cuda"] else ""
            md.append(f"- key `{key}`: agent " + cell(f"{agent['agent_id']} ({agent['cpu']}, {agent['cores']} "
                                                          f"cores, {agent.get('threads') or '?'} threads{gpus}; "
                                                          f"TVM {agent['tvm']}; runners {', '.join(agent['runners'])})"))
    md.append("")
    for model in report["models"]:
        md += [f"## {model['name']}", "",
               f"input {model['input_shapes']}, reference {model['reference']}, fingerprint {model['fingerprint']}",
               "", "| row | where | threads | precision | median ms | p90 ms | p99 ms | mean ms | min ms | std ms | "
                   "samples | throughput /s | speed-up vs baseline | numerics (relative L2 err; max abs err, "
                   "reference max) |",
               "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in model["rows"]:
            moved = " (moved, see below)" if row.get("agent_note") else ""
            if row["status"] != "ok":
                text = STATUS_TEXT.get(row["status"], row["status"])
                where = f" ({row['where']})" if row.get("where") else ""
                md.append(f"| {cell(row['label'])} | {text}: {cell(row['reason'] + where)}{moved} "
                          "| | | | | | | | | | | | |")
                continue
            lat, num = row["latency"], row["numerics"]
            speed = "-" if row.get("speedup_vs_baseline") is None else f"{row['speedup_vs_baseline']:.2f}x"
            verdict = "ok" if num["ok"] else "**FAILED**"
            md.append(f"| {cell(row['label'])} | {cell(row['where'])}{moved} | {threads_text(row)} | "
                      f"{cell(row.get('precision') or '-')} | "
                      f"{number(lat['median_ms'])} | "
                      f"{number(lat['p90_ms'])} | "
                      f"{number(lat['p99_ms'])} | {number(lat['mean_ms'])} | {number(lat['min_ms'])} | "
                      f"{number(lat['std_ms'])} | {lat['samples']} | {number(row['throughput_per_s'], 1)} | {speed} | "
                      f"{verdict} ({number(num.get('rel_l2_err'), 2)}; {number(num.get('max_abs_err'), 2)}, "
                      f"{number(num.get('ref_max_abs'), 2)}) |")
        md += [""] + [f"- agents: {cell(line)}" for line in agents_text(model.get("row_agents") or {})]
        checks: dict[str, list[str]] = {}
        for row in model["rows"]:
            num = row.get("numerics") or {}
            if row["status"] == "ok":
                checks.setdefault(num.get("check") or num.get("detail") or "?", []).append(row["label"])
        # the check's words are the farm's own (core.stats.check_text), the labels the compare file's
        md += [f"- numerics of {cell(', '.join(labels))}: {check}" for check, labels in checks.items()]
        notes = []
        for row in model["rows"]:
            det = row.get("details") or {}
            if row.get("agent_note"):
                notes.append(f"- {cell(row['label'])} ran on {cell(row['where'])}: {cell(row['agent_note'])}")
            if row["status"] != "ok":
                continue
            if row["backend"] == "tvm-tuned":
                notes.append(f"- `{row['label']}`: {det.get('tuned_functions')} of {det.get('tir_functions')} TIR "
                             f"functions tuned, {det.get('trials', '?')} trials in {det.get('logs')}")
            if row["latency"].get("first_run_ms") is not None:
                notes.append(f"- `{row['label']}`: first run {row['latency']['first_run_ms']:.1f} ms "
                             f"(median after warm-up {row['latency']['median_ms']:.3f} ms)"
                             + (f"; model: {cell(det['model_form'])}" if det.get("model_form") else "")
                             + (f"; torch.compile took {det['compile_s']} s"
                                if row["backend"] == "torch-compile" and det.get("compile_s") else "")
                             + (f"; TVM compile on the host {det['compile_s']} s"
                                if row["backend"].startswith("tvm") and det.get("compile_s") else "")
                             + (f"; engine {'from cache' if det.get('engine_cache_hit') else 'built in ' + str(det.get('build_s')) + ' s'}"
                                if row["backend"] == "tensorrt" else ""))
            if det.get("gpu_compute"):
                notes.append(f"- `{row['label']}`: GPU compute median {det['gpu_compute']['median_ms']:.3f} ms "
                             f"(without host<->device copies)")
        if notes:
            md += ["", *notes]
        md.append("")
    if "latency" in report["plots"]:
        md += ["## Plots", "", "![latency: median, whisker to p90](latency.png)", ""]
    if "tuning" in report["plots"]:
        md += ["![tuning curves](tuning.png)", ""]
    return "\n".join(md)


def plot_latency(models: list[dict[str, Any]], baseline: str, path: Path) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    width = sum(max(5.0, 0.8 * len(m["rows"]) + 1.5) for m in models)
    fig, axes = plt.subplots(1, len(models), figsize=(width, 5.2),
                             squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = model["rows"]
        xs = list(range(len(rows)))
        ran = [(x, r) for x, r in zip(xs, rows) if r["status"] == "ok"]
        if ran:
            med = [r["latency"]["median_ms"] for _, r in ran]
            up = [max(0.0, r["latency"]["p90_ms"] - r["latency"]["median_ms"]) for _, r in ran]
            colors = [BACKEND_COLORS.get(r["backend"], "#666666") for _, r in ran]
            ax.bar([x for x, _ in ran], med, color=colors, edgecolor="black", linewidth=0.6,
                   yerr=[[0.0] * len(up), up], capsize=4, error_kw={"elinewidth": 1.0})
            for (x, r), m in zip(ran, med):
                ax.annotate(f"{m:.3g}", (x, m), textcoords="offset points", xytext=(0, 3), ha="center",
                            fontsize=7, rotation=0)
            ax.set_yscale("log")
            ymin = min(med) / 3
            for x, r in zip(xs, rows):
                if r["status"] != "ok":
                    ax.annotate("n/a", (x, ymin * 1.5), ha="center", fontsize=8, color="#999999")
            ax.set_ylim(bottom=ymin)
        ax.set_xticks(xs)
        ax.set_xticklabels([r["label"] + (" *" if r["label"] == baseline else "") for r in rows],
                           rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{model['name']} (batch {model['input_shapes'][0][0]})", fontsize=10)
        ax.set_ylabel("latency, ms (median; whisker to p90; log scale)", fontsize=8)
        ax.grid(axis="y", which="both", alpha=0.3)
    fig.suptitle("tunefarm compare: lower is better; n/a = did not run (see report); * = baseline", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tuning_curve(logs: Path) -> tuple[list[int], list[float], list[int], int | None, int]:
    """(trials, estimated ms, tasks with a record, trials when every task had one, task count) from a job's
    progress log.

    Estimated ms at each point: the sum over tasks of weight x best latency measured so far, over the
    tasks measured so far (a partial sum, which grows as tasks are added, until every task has a record;
    after that it falls as tuning finds faster schedules).
    """
    weights = {}
    tasks_path = logs / "tasks.json"
    if tasks_path.is_file():
        weights = {t["name"]: float(t["weight"]) for t in json.loads(tasks_path.read_text())}
    best: dict[str, float] = {}
    trials, est, measured, complete_at = [], [], [], None
    for line in (logs / "progress.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        event = json.loads(line)
        value = event.get("task_best_us")
        if value is None or value != value:  # NaN: the batch had no valid measurement
            continue
        task = event["task"]
        best[task] = min(best.get(task, float("inf")), float(value))
        trials.append(int(event["trials"]))
        est.append(sum(best[t] * weights.get(t, 1.0) for t in best) / 1e3)
        measured.append(len(best))
        if complete_at is None and weights and len(best) >= len(weights):
            complete_at = int(event["trials"])
    return trials, est, measured, complete_at, len(weights)


def plot_tuning_curves(jobs: list[tuple[str, Path, dict[str, Any]]], path: Path) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    seen = set()
    fig, (ax, ax_tasks) = plt.subplots(2, 1, figsize=(8.0, 7.0), sharex=True, height_ratios=[3, 1.3])
    for i, (name, logs, row) in enumerate(jobs):
        if logs in seen:
            continue
        seen.add(logs)
        trials, est, measured, complete_at, n_tasks = tuning_curve(logs)
        if not trials:
            continue
        color = plt.cm.tab10(i % 10)  # pylint: disable=no-member
        cut = len(trials) if complete_at is None else trials.index(complete_at) + 1
        ax.step(trials[:cut], est[:cut], where="post", color=color, linestyle=":", alpha=0.8,
                label=f"{name}: partial sum, tasks still without a record")
        if complete_at is not None:
            ax.step(trials[cut - 1:], est[cut - 1:], where="post", color=color, linewidth=2,
                    label=f"{name}: estimate, every task measured")
            ax.plot([trials[cut - 1]], [est[cut - 1]], "o", color=color)
        if row.get("latency"):
            ax.axhline(row["latency"]["median_ms"], color=color, linestyle="--", alpha=0.8,
                       label=f"{name}: measured end to end (median)")
        ax_tasks.step(trials, measured, where="post", color=color, label=f"{name} ({n_tasks} tasks)")
        ax_tasks.axhline(n_tasks, color=color, linestyle=":", alpha=0.5)
    ax.set_ylabel("estimated latency, ms\n(sum of weight x best per task)", fontsize=9)
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.set_title("Tuning curves from progress.jsonl (the estimate falls only once every task has a record)",
                 fontsize=9)
    ax.legend(fontsize=7)
    ax_tasks.set_ylabel("tasks with a record", fontsize=9)
    ax_tasks.set_xlabel("trials measured")
    ax_tasks.grid(alpha=0.3)
    ax_tasks.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def host_info() -> dict[str, Any]:
    import tvm  # pylint: disable=import-outside-toplevel

    return {"hostname": socket.gethostname(), "python": platform.python_version(), "tvm": str(tvm.__version__),
            "created": datetime.datetime.now().isoformat(timespec="seconds")}
