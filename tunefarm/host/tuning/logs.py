"""Tuning logs: the per-task view of a job's database, and the best-records export.

A job directory is a MetaSchedule JSONDatabase work_dir (``database_workload.json`` +
``database_tuning_record.json``) plus ``tasks.json`` (task names, weights and workload hashes).
The export goes through ``JSONDatabase`` (never text tools), so plain TVM can apply it::

    db = ms.database.JSONDatabase(work_dir=OUT)
    with target, db:
        mod = relax.transform.MetaScheduleApplyDatabase()(fused_module)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from tunefarm.core.errors import TunefarmError
from tunefarm.host.tuning.events import Events
from tunefarm.host.tuning.jobdir import DB_RECORDS, JobDir, workload_counts


def open_database(job_dir: str | Path):
    return JobDir(job_dir).open_database()


def task_rows(database, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per task of ``tasks.json``: trials this job measured (failed ones included), failed, records
    seeded by the warm start (not trials), best latency (us) of any valid record."""
    counts = workload_counts(database)
    rows = []
    for task in tasks:
        row = counts.get(task["workload_hash"], {"records": 0, "failed": 0, "best_s": None})
        seeded = int(task.get("seeded", 0))
        best_us = row["best_s"] * 1e6 if row["best_s"] is not None else None
        rows.append({"task": task["name"], "weight": task["weight"], "trials": max(0, row["records"] - seeded),
                     "failed": row["failed"], "seeded": seeded, "best_us": best_us, "tuned": best_us is not None})
    return rows


def load_tasks(job_dir: str | Path) -> list[dict[str, Any]]:
    return JobDir(job_dir).read_tasks()


def show(job_dir: str | Path, events: Events) -> list[dict[str, Any]]:
    """``tunefarm logs show``: the job's tasks as a table, then the end-to-end estimate (or what is untuned)."""
    rows = task_rows(open_database(job_dir), load_tasks(job_dir))
    cells = []
    for i, row in enumerate(rows):
        best = row["best_us"]
        cells.append([str(i), row["task"], f"{row['weight']:g}", str(row["trials"]), str(row["failed"]),
                      str(row["seeded"]),
                      f"{best:.2f}" if best is not None else "-",
                      f"{best * row['weight']:.2f}" if best is not None else "-",
                      "yes" if row["tuned"] else "[red]NO[/]"])
    events.task_table(f"tasks of {job_dir}", ("#", "task", "weight", "trials", "failed", "seeded", "best (us)",
                                              "weighted (us)", "tuned"), cells)
    total = [r["best_us"] * r["weight"] for r in rows if r["best_us"] is not None]
    if len(total) == len(rows):
        events.print(f"estimated end-to-end: {sum(total) / 1e3:.3f} ms (sum of weighted task bests)")
    else:
        events.print(f"[red]{len(rows) - len(total)} task(s) have no tuned schedule[/]")
    return rows


def export_best(job_dir: str | Path, output: str | Path, say: Callable[[str], None] | None = None) -> int:
    """Write the best *verified* record of every workload (measured a second time before it counted:
    tuning/verify.py) into a fresh JSONDatabase at ``output``; returns the count. A directory tuned before
    timings were verified (no verified.jsonl) exports its best records as they are, and says so: ``say`` gets
    that closing line, plain text (``tunefarm logs best`` prints it; the service's bundle has no use for it)."""
    import tvm_ffi  # pylint: disable=import-outside-toplevel
    from tvm.s_tir import meta_schedule as ms  # pylint: disable=import-outside-toplevel

    from tunefarm.host.tuning.verify import trace_hash  # pylint: disable=import-outside-toplevel

    job = JobDir(job_dir)
    src = job.open_database()
    verified = job.verified()
    output = Path(output)
    if (output / DB_RECORDS).exists():
        raise TunefarmError(f"{output} already holds a database; choose an empty directory")
    output.mkdir(parents=True, exist_ok=True)
    dst = ms.database.JSONDatabase(work_dir=str(output))
    count = skipped = 0
    seen = set()
    for rec in src.get_all_tuning_records():
        wl = rec.workload
        key = str(tvm_ffi.structural_hash(wl.mod))
        if key in seen:
            continue
        seen.add(key)
        ranked = src.get_top_k(wl, 1 if verified is None else 1 << 20)
        if verified is not None:
            ranked = [r for r in ranked if trace_hash(r.trace) in verified.get(key, set())]
        if not ranked:
            skipped += 1
            continue
        new_wl = dst.commit_workload(wl.mod)
        top = ranked[0]
        dst.commit_tuning_record(ms.database.TuningRecord(top.trace, new_wl, top.run_secs, top.target, top.args_info))
        count += 1
    note = ("; tuned before timings were verified: records exported as measured" if verified is None
            else f"; {skipped} workload(s) without a verified record left out" if skipped else "")
    if say is not None:
        say(f"wrote the best verified record of {count} workload(s) to {output}{note}")
    return count
