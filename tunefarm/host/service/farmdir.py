"""The farm's own directory, ``LOGS/farm/``: the one module that names its files. (A job's files are in its
job directory, ``LOGS/<job>/``: :mod:`tunefarm.host.tuning.jobdir`.)::

    farm.sqlite3        the job queue and the devices that reported (store.py)
    token               the API token, mode 0600, unless the config names another (auth.py)
    host.lock           held by the running host: one host per logs dir (app.py)
    tracker.json        the tracker this host started: pid, start time, port (tracker_proc.py)
    tracker.log         that tracker's output
    specs/<job>.yaml    the spec a worker runs (jobs.py)
    runs/<job>.log      a worker's output, every attempt (served as the job's tune.log)
    uploads/<job>/      the ONNX model that came with a job
    tmp/                bundles being packed for `tunefarm pull`
"""
from __future__ import annotations

import os
from pathlib import Path


class FarmDir:
    """``LOGS/farm/``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.database = self.path / "farm.sqlite3"
        self.token = self.path / "token"
        self.lock = self.path / "host.lock"
        self.tracker_state = self.path / "tracker.json"
        self.tracker_log = self.path / "tracker.log"
        self.tmp = self.path / "tmp"

    def create(self) -> None:
        for sub in ("specs", "runs", "uploads", "tmp"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)  # the token, the queue and uploaded models: the farm's owner only

    def spec(self, job_id: str) -> Path:
        return self.path / "specs" / f"{job_id}.yaml"

    def run_log(self, job_id: str) -> Path:
        return self.path / "runs" / f"{job_id}.log"

    def run_result(self, job_id: str) -> Path:
        """How the job's last run ended (core/runresult.py), beside its log."""
        return self.path / "runs" / f"{job_id}.result.json"

    def uploads(self, job_id: str) -> Path:
        return self.path / "uploads" / job_id
