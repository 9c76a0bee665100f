"""Warm start: a new job's database seeded with the best earlier records of its workloads (same target)."""
from __future__ import annotations

from pathlib import Path

from tunefarm.host.tuning.jobdir import job_dirs, mean_run_s


def warm_start(database, job_dir: Path, logs_dir: Path, target: dict, task_mods, task_keys, top_k: int) -> dict:
    """Seed a new job's database with the best earlier records of its workloads (same target).

    Sources are the other job directories under ``logs_dir`` tuned for the same target. Workloads
    shared across models (ResNet-18 and ResNet-50 share layers) are found by structural hash. The
    seeded records become part of the evolutionary search's first population and are never
    measured again (MeasuredCache); they do not count against this job's trial budget.
    """
    # pylint: disable=import-outside-toplevel
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    wanted = dict(zip(task_keys, task_mods))
    best: dict[str, list] = {}
    sources = []
    for other in job_dirs(logs_dir):
        if other.path.resolve() == job_dir.resolve():
            continue
        try:
            if other.read_state().get("target") != target:
                continue
            records = other.open_database().get_all_tuning_records()
        except Exception:  # pylint: disable=broad-except
            continue  # an unreadable or foreign directory is no source
        used = False
        for rec in records:
            key = str(tvm_ffi.structural_hash(rec.workload.mod))
            mean = mean_run_s(rec.run_secs)
            if key not in wanted or mean is None:
                continue
            best.setdefault(key, []).append((mean, rec))
            used = True
        if used:
            sources.append(other.name)
    per_workload: dict[str, int] = {}
    for key, recs in best.items():
        workload = database.commit_workload(wanted[key])
        seen = set()
        for _, rec in sorted(recs, key=lambda r: r[0]):
            trace_key = str(rec.trace.as_json())
            if trace_key in seen:
                continue
            seen.add(trace_key)
            database.commit_tuning_record(ms.database.TuningRecord(rec.trace, workload, rec.run_secs, rec.target,
                                                                   rec.args_info))
            per_workload[key] = per_workload.get(key, 0) + 1
            if per_workload[key] >= top_k:
                break
    return {"sources": sources, "records": sum(per_workload.values()), "per_workload": per_workload}
