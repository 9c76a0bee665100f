"""What the API shows: a job as JSON (with its progress and its files), its task table and its bundle for
``tunefarm pull``, and the devices (heartbeats and the tracker's list together), as JSON a browser can parse.
"""
from __future__ import annotations

import math
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from tunefarm.core.errors import TunefarmError
from tunefarm.core.wire import DeviceInfo
from tunefarm.host.service.farmdir import FarmDir
from tunefarm.host.service.store import QUEUED, RUNNING, JobStore
from tunefarm.host.service.tracker_proc import HostTracker
from tunefarm.host.tuning import jobdir
from tunefarm.host.tuning.jobdir import JobDir, read_events

PLOT_SUFFIXES = (".png", ".svg")
RUN_LOG = "tune.log"  # the worker's output (LOGS/farm/runs/<job>.log), served beside the job dir's files
# The job directory's files by role, in a job's detail: the dashboard takes the names from here.
FILE_NAMES = {"report_md": jobdir.REPORT_MD, "report_json": jobdir.REPORT_JSON, "progress": jobdir.PROGRESS,
              "db_workload": jobdir.DB_WORKLOAD, "db_records": jobdir.DB_RECORDS, "tasks": jobdir.TASKS,
              "state": jobdir.STATE, "spec": jobdir.SPEC, "profile": jobdir.PROFILE}
# What a bundle's database/ holds: the database and what makes a copy of it a job directory again.
BUNDLE_DATABASE = (*jobdir.DATABASE_FILES, jobdir.TASKS, jobdir.STATE, jobdir.SPEC)


def clean(value: Any) -> Any:
    """NaN/inf -> None, recursively: browsers' JSON.parse rejects them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


class FarmViews:
    """The read side of the service: the store's jobs and devices and the job directories, as the API shows
    them; caches what is costly to read again (progress summaries, task tables)."""

    def __init__(self, store: JobStore, logs_dir: Path, farm: FarmDir, tracker: HostTracker, offline_after_s: float):
        self.store = store
        self.logs_dir = logs_dir  # job directories: LOGS/<job>/
        self.farm = farm
        self.tracker = tracker
        self.offline_after_s = offline_after_s  # no heartbeat for this long: offline (device_offline_after_s)
        self._summary_cache: dict[str, tuple[tuple[float, int], dict[str, Any]]] = {}
        self._tasks_cache: dict[str, tuple[float, Any]] = {}

    def job_dir(self, job_id: str) -> JobDir:
        return JobDir(self.logs_dir / job_id)

    def forget(self, job_id: str) -> None:
        """Drop what is cached of a deleted job."""
        self._summary_cache.pop(job_id, None)
        self._tasks_cache.pop(job_id, None)

    def events(self, job_id: str, start: int = 0) -> list[dict[str, Any]]:
        """The job's progress lines from line ``start`` on (jobdir.read_events), JSON-safe; none where the
        file is a link (it would show what the link points to)."""
        path = self.job_dir(job_id).file(jobdir.PROGRESS)
        if not self.plain_file(path):
            return []
        return clean(read_events(path, start))

    def progress_summary(self, job_id: str) -> dict[str, Any]:
        path = self.job_dir(job_id).file(jobdir.PROGRESS)
        try:
            st = path.stat()
            sig = (st.st_mtime, st.st_size)
        except FileNotFoundError:
            return {"trials": 0, "batches": 0, "estimated_ms": None, "best_ms": None}
        cached = self._summary_cache.get(job_id)
        if cached and cached[0] == sig:
            return cached[1]
        events = self.events(job_id)
        ests = [e["estimated_ms"] for e in events if e.get("estimated_ms") is not None]
        summary = {"trials": events[-1]["trials"] if events else 0, "batches": len(events),
                   "estimated_ms": ests[-1] if ests else None, "best_ms": min(ests) if ests else None,
                   "last_batch_time": events[-1].get("time") if events else None}
        self._summary_cache[job_id] = (sig, summary)
        return summary

    def job_files(self, job_id: str) -> list[str]:
        """The job's files that may be served: plain files where they say they are (see :meth:`plain_file`)."""
        job_dir = self.job_dir(job_id)
        names = [n for n in jobdir.SHARED_FILES if self.plain_file(job_dir.file(n))]
        if self.unlinked(job_dir.path, self.logs_dir) and job_dir.path.is_dir():
            names += sorted(p.name for p in job_dir.path.iterdir() if p.suffix in PLOT_SUFFIXES and self.plain_file(p))
        if self.plain_file(self.farm.run_log(job_id)):
            names.append(RUN_LOG)
        return names

    def plain_file(self, path: Path) -> bool:
        """Whether ``path`` (in a job directory or the farm's run logs) is a regular file reached without a
        link, nor a hard link (jobdir.plain_file): a link in a job directory to the farm's token, say, must not
        serve the token."""
        return jobdir.plain_file(path, self.logs_dir)

    @staticmethod
    def unlinked(path: Path, folder: Path) -> bool:
        """Whether ``path`` lies below ``folder`` with no link on the way (nor itself one)."""
        return jobdir.unlinked(path, folder)

    def file_path(self, job_id: str, name: str) -> Path | None:
        if name not in self.job_files(job_id):
            return None
        return self.farm.run_log(job_id) if name == RUN_LOG else self.job_dir(job_id).file(name)

    def read_file(self, job_id: str, name: str) -> bytes | None:
        """A job's file (job_files), opened without following a link; None if it is not one."""
        path = self.file_path(job_id, name)
        if path is None:
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None  # replaced by a link (or removed) since it was checked
        with os.fdopen(fd, "rb") as fh:
            if os.fstat(fh.fileno()).st_nlink != 1:
                return None  # replaced by a hard link since it was checked
            return fh.read()

    def public_job(self, job: dict[str, Any], detail: bool = False) -> dict[str, Any]:
        out = {k: job[k] for k in ("id", "key", "state", "model", "budget", "skip_eval", "created", "started",
                                   "finished", "attempts", "pid", "exit_code", "error", "cancel_requested")}
        out.update(self.progress_summary(job["id"]))
        if job["state"] == QUEUED:
            queued = [j["id"] for j in self.store.jobs((QUEUED,)) if j["key"] == job["key"]]
            out["queue_position"] = queued.index(job["id"]) + 1 if job["id"] in queued else None
        if detail:
            out["history"] = job["history"]
            out["files"] = self.job_files(job["id"])
            out["file_names"] = FILE_NAMES
            out["spec"] = yaml.safe_load(job["spec"])
        return clean(out)

    def devices_view(self, tracker_view: list[dict[str, Any]] | None, tracker_error: str | None,
                     now: float | None = None) -> dict[str, Any]:
        """Every device that reported by heartbeat (online: heard from within the offline window and not
        stopped), then the tracker's agents that never did; ``tracker_view``: TrackerClient.devices()."""
        now = time.time() if now is None else now
        running = {j["key"]: j["id"] for j in self.store.jobs((RUNNING,))}
        devices, seen = [], set()
        for dev in self.store.devices():
            info = DeviceInfo.from_json(dev["info"])
            window = max(self.offline_after_s, 3 * dev["interval_s"])
            online = not dev["stopped"] and now - dev["last_seen"] < window
            seen.add(dev["agent_id"])
            devices.append({"agent_id": dev["agent_id"], "key": dev["key"], "hostname": info.hostname,
                            "status": "online" if online else "offline", "busy": online and dev["busy"],
                            "listed": dev["listed"], "last_seen": dev["last_seen"],
                            "last_seen_s": round(now - dev["last_seen"], 1), "target": info.target,
                            "cpu": info.cpu_model, "num_cores": info.num_cores, "threads": info.threads,
                            "has_cc": info.has_cc, "cuda": [d.get("name") for d in info.cuda], "job": running.get(dev["key"]),
                            "source": "heartbeat"})
        keys = []
        for item in tracker_view or []:
            keys.append({k: item[k] for k in ("key", "total", "free", "busy", "pending")})
            for agent, addr in zip(item["agents"], item["addrs"]):
                agent_id = agent.agent_id if isinstance(agent, DeviceInfo) else addr
                if agent_id in seen:
                    continue
                info = agent if isinstance(agent, DeviceInfo) else DeviceInfo(key=item["key"])
                devices.append({"agent_id": agent_id, "key": item["key"], "hostname": info.hostname,
                                "status": "online", "busy": False, "listed": True, "last_seen": None,
                                "last_seen_s": None, "target": info.target, "cpu": info.cpu_model,
                                "num_cores": info.num_cores, "threads": info.threads, "has_cc": info.has_cc,
                                "cuda": [d.get("name") for d in info.cuda], "job": running.get(item["key"]),
                                "source": "tracker (no heartbeat: started without --farm)"})
        return clean({"tracker": self.tracker.addr, "tracker_error": tracker_error, "keys": keys,
                       "devices": devices})

    def task_table(self, job_id: str) -> list[dict[str, Any]]:
        """tuning_logs.task_rows of a job (blocking, TVM: call in tvm_pool); cached per database change."""
        from tunefarm.host.tuning.logs import task_rows  # pylint: disable=import-outside-toplevel

        job_dir = self.job_dir(job_id)
        record_file = job_dir.file(jobdir.DB_RECORDS)
        workload = job_dir.file(jobdir.DB_WORKLOAD)
        if not (self.plain_file(job_dir.file(jobdir.TASKS)) and self.plain_file(record_file)) or (
                os.path.lexists(workload) and not self.plain_file(workload)):
            return []  # missing, or a link: TVM would read what it points to
        stamp = record_file.stat().st_mtime
        cached = self._tasks_cache.get(job_id)
        if cached and cached[0] == stamp:
            return cached[1]
        rows = clean(task_rows(job_dir.open_database(), job_dir.read_tasks()))
        self._tasks_cache[job_id] = (stamp, rows)
        return rows

    def build_bundle(self, job_id: str) -> Path:
        """A .tar.gz of best records (export_best), the full database, reports, plots and the run log."""
        from tunefarm.host.tuning.logs import export_best  # pylint: disable=import-outside-toplevel

        job_dir = self.job_dir(job_id)
        if not job_dir.file(jobdir.DB_RECORDS).is_file():
            raise TunefarmError(f"job {job_id} has no tuning records yet")
        present = [name for name in BUNDLE_DATABASE if os.path.lexists(job_dir.file(name))]
        linked = [name for name in present if not self.plain_file(job_dir.file(name))]
        if linked:  # export_best would read through them: refuse rather than serve what they point to
            raise TunefarmError(f"job {job_id}'s {', '.join(linked)} is not a plain file in its job directory "
                                "(a link?); the bundle is not built")
        work = Path(tempfile.mkdtemp(prefix=f"bundle-{job_id}-", dir=self.farm.tmp))
        try:
            export_best(job_dir.path, work / "best")
            (work / "database").mkdir()
            for name in present:
                shutil.copy2(job_dir.file(name), work / "database" / name, follow_symlinks=False)
            for name in self.job_files(job_id):
                if name in BUNDLE_DATABASE:
                    continue
                shutil.copy2(self.file_path(job_id, name), work / name, follow_symlinks=False)
            archive = work.with_suffix(".tar.gz")
            with tarfile.open(archive, "w:gz") as tar:
                for path in sorted(work.rglob("*")):
                    tar.add(path, arcname=str(path.relative_to(work)), recursive=False)
            return archive
        finally:
            shutil.rmtree(work, ignore_errors=True)
