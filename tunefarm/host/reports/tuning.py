"""report.json and report.md of a tuning job: what was tuned, how it was measured, what it gave."""
from __future__ import annotations

import datetime
import json
import platform
from typing import Any

from tunefarm.core.targets import target_to_json
from tunefarm.host.reports.markdown import number, threads_text
from tunefarm.host.reports.placement import markdown as placement_markdown
from tunefarm.host.tuning.result import failed_text, failure_breakdown
from tunefarm.host.tuning.jobdir import JobDir
from tunefarm.host.tuning.logs import task_rows


def write_report(tuned, rows: dict[str, dict[str, Any]], scheduled: list[str],
                 unscheduled: list[str], reference, problems: list[str], method: str = "",
                 placement: dict[str, Any] | None = None) -> dict[str, Any]:
    """``tuned`` is the tuning run's TuneResult (tunefarm.host.tuning.job); ``placement``: what
    host/placement/evaluation.py chose (or why nothing was placed)."""
    import tvm  # pylint: disable=import-outside-toplevel

    job = tuned.job
    job_dir = JobDir(tuned.job_dir)
    per_task = task_rows(tuned.database, job_dir.read_tasks())
    untuned_ms = rows["tvm-untuned"]["latency"]["median_ms"]
    for row in rows.values():
        lat = row.get("latency")
        if lat:
            row["speedup_vs_untuned"] = untuned_ms / lat["median_ms"]
    reference_name = "PyTorch" if tuned.model.kind == "torch" else "ONNX Runtime"
    report = {
        "job": job.name,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": {"source": job.model.source, "name": job.model.name or job.model.path,
                  "input_shapes": [list(x.shape) for x in tuned.model.inputs],
                  "fingerprint": tuned.model.fingerprint, "weights": "random (weights=None), seeded"},
        "device_key": job.device.key,
        "target": target_to_json(tuned.target),
        "host": {"hostname": platform.node(), "python": platform.python_version(), "tvm": tvm.__version__},
        "tuning": {"max_trials_global": job.tuning.max_trials_global,
                   "max_trials_per_task": job.tuning.max_trials_per_task,
                   "num_trials_per_iter": job.tuning.num_trials_per_iter, "cost_model": tuned.cost_model or {"kind": tuned.plan.cost_model},
                   "farm_model_update": tuned.farm_model_update,
                   "population_size": job.tuning.population_size,
                   "pipeline": tuned.plan.pipeline.to_json(),
                   # measured trials of this job (all runs), seeded records and cache hits: three apart
                   "trials_measured_total": sum(r["trials"] for r in per_task),
                   "trials_before_this_run": tuned.measured_before, "trials_this_run": tuned.measured,
                   "failed_this_run": tuned.failed, "failed_this_run_by_kind": tuned.failed_kinds or failure_breakdown(tuned),
                   "seeded_records": sum(r["seeded"] for r in per_task),
                   "cache_hits": tuned.cache_hits, "resumed": tuned.resumed, "stopped_early": tuned.stopped,
                   "wall_s_this_run": round(tuned.wall_s, 1), "per_agent": tuned.per_agent,
                   "agents_lost": tuned.agents_lost, "requeued": tuned.requeued, "unreachable": tuned.unreachable, "failures": tuned.failures,
                   "built_on_agents": tuned.built_on_agents, "build_failures": tuned.build_failures,
                   "verification": tuned.verification, "vendor_first": tuned.vendor_first,
                   "design_space_notes": tuned.space_notes,
                   "search": {"workers": job.search.workers, "key": job.search.key,
                              "per_worker": tuned.search_workers, "shares": tuned.search_shares}},
        "schedules": {"tir_functions": len(scheduled) + len(unscheduled), "tuned": len(scheduled),
                      "untuned_functions": unscheduled,
                      "tasks_without_record": [r["task"] for r in per_task if not r["tuned"]]},
        "tasks": per_task,
        "reference": reference_name,
        "results": rows,
        "model_handed_out": (placement or {}).get("chosen", "tvm-tuned"),
        "placement": placement,
        "problems": problems,
        "ok": not problems,
    }
    tn = report["tuning"]
    md = [f"# tunefarm report: {job.name}", "",
          f"- model: {report['model']['name']} ({job.model.source}), input {report['model']['input_shapes']}, "
          "random weights",
          f"- device key: `{job.device.key}`; target: `{json.dumps(report['target'])}`",
          f"- tuning: {tn['trials_measured_total']} trials measured by this job (budget "
          f"{job.tuning.max_trials_global}, at most {job.tuning.max_trials_per_task or job.tuning.max_trials_global} "
          f"per task, {job.tuning.num_trials_per_iter} per round, cost model {_cost_model_text(tuned.cost_model)}); this run "
          f"{tn['trials_this_run']} in {tn['wall_s_this_run']} s, {failed_text(tuned)}"
          + (" (stopped early)" if tuned.stopped else ""),
          f"- pipeline: {tuned.plan.pipeline.describe()}",
          *(f"- design space: {_md(note)}" for note in tuned.space_notes),
          *_vendor_first_lines(tuned.vendor_first),
          "- farm cost model after this run: " + _farm_update_text(tuned.farm_model_update),
          "- timings checked: " + (_verification_text(tuned.verification) if tuned.verification else
                                   "nothing measured in this run"),
          f"- not trials: {tn['seeded_records']} record(s) seeded from earlier jobs (warm start); "
          f"{tn['cache_hits']} cache hit(s) this run (candidates the database already answered: not built, "
          "measured or recorded again)",
          f"- tuned schedules: **{len(scheduled)} of {len(scheduled) + len(unscheduled)}** TIR functions"
          + (f"; without: {', '.join(unscheduled)}" if unscheduled else ""),
          f"- numerics: every backend checked against {reference_name} on the same inputs and weights",
          "", "| backend | where | threads | precision | median ms | p90 ms | p99 ms | std ms | samples | "
              "speed-up vs untuned | numerics (relative L2 err; max abs err, reference max) |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in rows.items():
        lat = row.get("latency")
        if not lat:
            md.append(f"| {name} | {row.get('not_run')} | | | | | | | | | |")
            continue
        num = row["numerics"]
        verdict = "ok" if num["ok"] else "**FAILED**"
        md.append(f"| {name} | {row['where']} | {threads_text(row)} | {row.get('precision') or '-'} | "
                  f"{number(lat['median_ms'])} | "
                  f"{number(lat['p90_ms'])} | "
                  f"{number(lat['p99_ms'])} | {number(lat['std_ms'])} | {lat['samples']} | "
                  f"{row['speedup_vs_untuned']:.2f}x | {verdict} ({number(num.get('rel_l2_err'), 2)}; "
                  f"{number(num.get('max_abs_err'), 2)}, {number(num.get('ref_max_abs'), 2)}) |")
    md += ["", f"Method: {method or rows['tvm-tuned']['latency']['method']}"]
    md += placement_markdown(placement, rows, (placement or {}).get("peak_gflops") or 0.0)
    md += _agents_section(tn)
    md += ["", "## Tasks", "", "Trials: candidates this job measured (failed ones included); seeded: records of "
           "earlier jobs copied in by the warm start.", "",
           "| # | task | weight | trials | failed | seeded | best us | tuned |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, row in enumerate(per_task):
        md.append(f"| {i} | {row['task']} | {row['weight']:g} | {row['trials']} | {row['failed']} | {row['seeded']} | "
                  f"{number(row['best_us'], 2)} | {'yes' if row['tuned'] else '**no**'} |")
    if problems:
        md += ["", "## Problems", ""] + [f"- {p}" for p in problems]
    report["markdown"] = "\n".join(md) + "\n"
    job_dir.write_report({k: v for k, v in report.items() if k != "markdown"}, report["markdown"])
    return report


def _vendor_first_lines(info: dict) -> list[str]:
    """report.md's line on the tasks timed on a vendor library before tuning and those ceded to it
    (host/placement/cede.py); none where nothing was timed."""
    if not info or not info.get("groups"):
        return []
    ceded = info.get("ceded") or []
    text = (f"- trials where TVM can still win: {len(info['groups'])} task(s) timed on the vendor library before "
            f"tuning; a task still {info['far']:g}x its time after {info['min_trials']} trials gives its trials to "
            f"the others: ")
    if not ceded:
        return [text + "none was"]
    return [text + "; ".join(f"{c['task']} ({c['tvm_best_ms']:.3f} ms vs {c['vendor_ms']:.3f} ms after "
                             f"{c['trials']} trials; up to {c['trials_freed']} more went to the others)" for c in ceded)]


def _cost_model_text(info: dict) -> str:
    kind = (info or {}).get("kind", "xgb")
    if kind == "xgb-farm":
        return (f"the farm's XGBoost model, trained on {info.get('records')} records of "
                f"{len(info.get('jobs') or {})} earlier job(s) ({', '.join(sorted(info.get('jobs') or {}))}; training "
                f"{info.get('train_s')} s, loaded in {info.get('load_s')} s)")
    if info.get("farm_model_error"):
        return f"xgb, cold (the farm's model could not be loaded: {info['farm_model_error']})"
    return {"xgb": "xgb, cold", "random": "random"}.get(kind, str(kind))


def _farm_update_text(update: dict) -> str:
    if not update:
        return "not updated (nothing measured in this run)"
    if update.get("error"):
        return f"not updated ({update['error']})"
    if not update.get("records"):
        return "none yet (no trusted job for this target has valid records)"
    return (f"rebuilt from {update['records']} records of {len(update.get('jobs') or {})} trusted job(s) "
            f"(features {update.get('extract_s')} s, training {update.get('train_s')} s); `tunefarm models` lists it")


def _verification_text(ver: dict[str, Any]) -> str:
    text = (f"{ver['verified']} new best(s) measured a second time before they counted ({ver['disputed']} not "
            f"reproduced: the slower time kept); {ver['below_floor']} result(s) below the physical floor, "
            f"{ver['from_flagged']} from flagged agents and {ver.get('unverifiable', 0)} new best(s) that could not be "
            "measured a second time (no agent free) committed as failed")
    if ver["flagged"]:
        text += "; FLAGGED: " + ", ".join(f"{a} ({w})" for a, w in ver["flagged"].items())
    return text


def _md(text: Any) -> str:
    """Text a worker or agent reported, safe in a markdown table cell (no cell breaks, code spans or HTML)."""
    return "".join("?" if c in "|`<>" or not c.isprintable() else c for c in str(text))[:300]


def _agents_section(tuning: dict[str, Any]) -> list[str]:
    """Where this run's candidates were measured (and built), and the agents lost on the way."""
    if not tuning["per_agent"] and not tuning["failures"] and not tuning.get("build_failures"):
        return []
    md = ["", "## Agents (this run)", "", "| agent | measured | built | note |", "| --- | --- | --- | --- |"]
    built = tuning["built_on_agents"]
    for agent in sorted(set(tuning["per_agent"]) | set(tuning["agents_lost"]) | set(built)):
        note = ("lost during the run" if agent in tuning["agents_lost"]
                else "build agent" if agent not in tuning["per_agent"] else "-")
        md.append(f"| {agent} | {tuning['per_agent'].get(agent, 0)} | {built.get(agent, '-')} | {note} |")
    failed = ", ".join(f"{n} {kind}" for kind, n in sorted(tuning["failures"].items()) if n)
    unbuilt = ", ".join(f"{n} {kind}" for kind, n in sorted(tuning.get("build_failures", {}).items()) if n)
    # The table's sum, those that failed to measure and those that failed to build are this run's trials.
    md += ["", f"This run's {tuning['trials_this_run']} trial(s): {sum(tuning['per_agent'].values())} measured on the "
               f"agents above, {sum(tuning['failures'].values())} failed to measure" + (f" ({failed})" if failed else "")
           + f", {sum(tuning.get('build_failures', {}).values())} failed to build" + (f" ({unbuilt})" if unbuilt else "")
           + "."]
    if tuning.get("requeued"):
        md += ["", f"Candidates measured again because their session died under them (an agent killed, frozen or "
                   f"cut off): {tuning['requeued']}."]
    search = tuning.get("search") or {}
    if search.get("workers"):
        md += ["", f"Search spread over {search['workers']} search worker(s) on key `{_md(search['key'])}`:", "",
               "| share | tasks | trials merged / share | search worker(s) | refused | tasks taken over from |",
               "| --- | --- | --- | --- | --- | --- |"]
        for n, share in enumerate(search.get("shares", []), 1):
            src = share.get("stolen_from")
            md.append(f"| {n} | {len(share['tasks'])} | {share['received']} / {share['trials']} | "
                      f"{_md(', '.join(share['workers'])) or '-'} | {share['rejected']} | "
                      f"{'-' if src is None else f'share {src + 1} (not begun there)'} |")
    for addr in sorted(tuning.get("unreachable") or {}):
        md += ["", f"**Unreachable agent** at `{addr}`: the tracker handed it out, but this host cannot connect to "
                   "it (NAT, a firewall, or a wrong advertised address: start that agent with `--custom-addr`)."]
    return md
