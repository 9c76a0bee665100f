"""Warm start: a new job's database seeded with the best earlier records of its workloads (same target).

Sources are the other job directories under the logs directory that were tuned for the same target and
whose last run ended (finished or stopped); only their verified records are taken (tuning/verify.py).
Workloads shared across models (ResNet-18 and ResNet-50 share layers) are found by structural hash. The
seeded records become part of the evolutionary search's first population and are never measured again
(MeasuredCache); they do not count against the new job's trial budget. Choosing the records
(:func:`find_warm_start`) only reads; :func:`seed_database` writes them, so that ``tunefarm tune --plan``
can say what a warm start would bring without touching any directory.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from tunefarm.host.tuning.jobdir import JobDir, job_dirs, mean_run_s


@dataclasses.dataclass
class WarmStart:
    """The records a warm start takes: per workload key, best first, at most ``top_k``."""

    sources: list[str]  # names of the job directories that gave records
    chosen: dict[str, list[Any]]  # workload key -> TuningRecords, best first

    @property
    def per_workload(self) -> dict[str, int]:
        return {key: len(recs) for key, recs in self.chosen.items()}

    @property
    def records(self) -> int:
        return sum(self.per_workload.values())

    def best_s(self, key: str) -> float | None:
        """The best mean run seconds among the records chosen for ``key`` (None: none chosen)."""
        means = [m for m in (mean_run_s(r.run_secs) for r in self.chosen.get(key, [])) if m is not None]
        return min(means) if means else None

    def summary(self) -> dict[str, Any]:
        """What ``job_state.json`` keeps under ``warm_start``."""
        return {"sources": self.sources, "records": self.records, "per_workload": self.per_workload}


def find_warm_start(job_dir: JobDir, logs_dir: str | Path, target: dict, task_keys, top_k: int) -> WarmStart:
    """The best ``top_k`` valid records of each of ``task_keys`` in the other job directories under
    ``logs_dir`` tuned for ``target``; records with the same trace count once. Only verified records
    (measured a second time before they counted: tuning/verify.py) of directories whose last run ended
    (finished or stopped: not failed, not killed) are taken."""
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    from tunefarm.host.tuning.verify import trace_hash  # pylint: disable=import-outside-toplevel

    wanted = set(task_keys)
    found: dict[str, list] = {}
    sources = []
    for other in job_dirs(logs_dir):
        if other.path.resolve() == job_dir.path.resolve():
            continue
        try:
            if other.read_state().get("target") != target or not other.run_ended():
                continue
            verified = other.verified()
            if not verified:
                continue  # nothing verified (or tuned before timings were verified): no source
            records = other.open_database().get_all_tuning_records()
        except Exception:  # pylint: disable=broad-except
            continue  # an unreadable or foreign directory is no source
        used = False
        for rec in records:
            key = str(tvm_ffi.structural_hash(rec.workload.mod))
            mean = mean_run_s(rec.run_secs)
            if key not in wanted or mean is None or trace_hash(rec.trace) not in verified.get(key, ()):
                continue
            found.setdefault(key, []).append((mean, rec))
            used = True
        if used:
            sources.append(other.name)
    chosen: dict[str, list] = {}
    for key, recs in found.items():
        seen = set()
        for _, rec in sorted(recs, key=lambda r: r[0]):
            trace_key = str(rec.trace.as_json())
            if trace_key in seen:
                continue
            seen.add(trace_key)
            chosen.setdefault(key, []).append(rec)
            if len(chosen[key]) >= top_k:
                break
    return WarmStart(sources=sources, chosen=chosen)


def seed_database(database, warm: WarmStart, task_mods: dict[str, Any], verified_log=None) -> None:
    """Commit the chosen records into ``database``, each under its workload (``task_mods``: key -> module);
    ``verified_log``: the new job's verified.jsonl, which notes each seeded record as verified (in its source)."""
    import json  # pylint: disable=import-outside-toplevel

    from tvm.s_tir import meta_schedule as ms  # pylint: disable=import-outside-toplevel

    from tunefarm.host.tuning.verify import trace_hash  # pylint: disable=import-outside-toplevel

    lines = []
    for key, recs in warm.chosen.items():
        workload = database.commit_workload(task_mods[key])
        for rec in recs:
            database.commit_tuning_record(ms.database.TuningRecord(rec.trace, workload, rec.run_secs, rec.target,
                                                                   rec.args_info))
            lines.append({"workload": key, "trace": trace_hash(rec.trace), "status": "verified",
                          "run_s": mean_run_s(rec.run_secs), "seeded_from": warm.sources})
    if verified_log is not None and lines:
        with open(verified_log, "a") as fh:
            fh.writelines(json.dumps(line, sort_keys=True) + "\n" for line in lines)
