"""The farm's persistent state: its job queue and the devices that reported to it, in one SQLite file.

Written by the host service only (one process, one thread), so one connection suffices. Every change
is committed before the HTTP answer that announces it, so a job that was accepted survives a
``kill -9`` of the host: on the next start, jobs found ``running`` are put back in the queue and
resume from their MetaSchedule databases (see :mod:`tunefarm.host.service.jobs`).
"""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import yaml

from tunefarm.core.errors import TunefarmError
from tunefarm.core.jobspec import TuningJob, job_from_dict

# Job states. ``queued`` and ``running`` are the live ones; the others are final until a resume.
QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINAL_STATES = (DONE, FAILED, CANCELLED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    key TEXT NOT NULL,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,            -- the job as YAML, as the worker runs it
    model TEXT NOT NULL,           -- short description for tables
    budget INTEGER NOT NULL,       -- the spec's tuning.max_trials_global, written with the spec only
    skip_eval INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    pid INTEGER,                   -- the worker's `tunefarm tune` process (its own process group)
    pid_started REAL,              -- its start time, so a recycled pid is never signalled
    exit_code INTEGER,
    error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    history TEXT NOT NULL DEFAULT '[]',
    dir_mark TEXT                  -- what the farm wrote into the job directory it created (jobs.py)
);
CREATE TABLE IF NOT EXISTS devices (
    agent_id TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    info TEXT NOT NULL,            -- DeviceInfo as JSON
    tracker TEXT,
    listed INTEGER NOT NULL DEFAULT 0,
    busy INTEGER NOT NULL DEFAULT 0,
    interval_s REAL NOT NULL DEFAULT 2,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    stopped INTEGER NOT NULL DEFAULT 0
);
"""

_JOB_COLUMNS = ("seq", "id", "key", "state", "spec", "model", "budget", "skip_eval", "created", "started",
                "finished", "attempts", "pid", "pid_started", "exit_code", "error", "cancel_requested",
                "history", "dir_mark")


class JobExists(Exception):
    """A job of that name is already stored (its state is the message)."""


class JobStore:
    """Jobs and devices in SQLite (``logs/farm/farm.sqlite3`` by default)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file() and self.path.stat().st_size == 0:
            # SQLite takes an empty file for a new database: the queue it held would be gone without a word.
            raise TunefarmError(f"{self.path} is empty (0 bytes): the farm's queue is not in it; restore it from a "
                                "backup, or delete it to start with an empty queue (the job directories are kept)")
        self.db = sqlite3.connect(str(self.path), isolation_level=None)
        try:
            self.db.row_factory = sqlite3.Row
            # Checked before anything is written: a damaged file is refused as it is, never rewritten.
            problems = [row[0] for row in self.db.execute("PRAGMA quick_check(3)").fetchall()]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError(f"damaged: {problems[0]}")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(jobs)")}
            if "dir_mark" not in columns:  # a queue from before the farm marked the directories it creates
                self.db.execute("ALTER TABLE jobs ADD COLUMN dir_mark TEXT")
            self.db.execute("SELECT count(*) FROM jobs").fetchone()
        except sqlite3.DatabaseError as err:  # not a database, or a damaged one: one line, not a traceback
            self.db.close()
            detail = " ".join(str(err).split())[:200]
            raise TunefarmError(f"{self.path} is not a readable farm database ({detail}); restore it from a "
                                "backup, or move it aside to start with an empty queue (the job directories "
                                "are kept)") from None

    def close(self) -> None:
        self.db.close()

    # -- jobs -------------------------------------------------------------------------------------
    @staticmethod
    def _job(row: sqlite3.Row | None) -> dict[str, Any] | None:
        if row is None:
            return None
        job = {name: row[name] for name in _JOB_COLUMNS}
        job["history"] = json.loads(job["history"])
        job["skip_eval"] = bool(job["skip_eval"])
        job["cancel_requested"] = bool(job["cancel_requested"])
        return job

    def add_job(self, spec: TuningJob, model: str, skip_eval: bool) -> dict[str, Any]:
        """Queue ``spec`` (its name is the job's id, its device key the job's key); JobExists if the name is
        taken. The name check and the insert are one transaction: of concurrent submissions of one name,
        exactly one is stored."""
        now = time.time()
        history = json.dumps([[now, "submitted"]])
        self.db.execute("BEGIN IMMEDIATE")
        try:
            row = self.db.execute("SELECT state FROM jobs WHERE id = ?", (spec.name,)).fetchone()
            if row is not None:
                raise JobExists(row["state"])
            self.db.execute("INSERT INTO jobs (id, key, state, spec, model, budget, skip_eval, created, history) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (spec.name, spec.device.key, QUEUED, _dump_spec(spec), model,
                             spec.tuning.max_trials_global, int(skip_eval), now, history))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return self.job(spec.name)

    def delete_job(self, job_id: str) -> None:
        self.db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def job(self, job_id: str) -> dict[str, Any] | None:
        return self._job(self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def jobs(self, states: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        if states:
            marks = ",".join("?" * len(states))
            rows = self.db.execute(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY seq", states)
        else:
            rows = self.db.execute("SELECT * FROM jobs ORDER BY seq")
        return [self._job(r) for r in rows]

    def update_job(self, job_id: str, note: str | None = None, **fields: Any) -> dict[str, Any]:
        """Set ``fields`` and append ``note`` to the job's history, in one transaction.

        ``spec`` is a TuningJob; the budget column follows it (it is never set on its own).
        """
        unknown = set(fields) - set(_JOB_COLUMNS)
        if unknown:
            raise ValueError(f"unknown job field(s): {sorted(unknown)}")
        if "budget" in fields:
            raise ValueError("a job's budget is its spec's tuning.max_trials_global: change the spec")
        if "spec" in fields:
            spec = fields["spec"]
            fields.update(spec=_dump_spec(spec), budget=spec.tuning.max_trials_global)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if note:
                row = self.db.execute("SELECT history FROM jobs WHERE id = ?", (job_id,)).fetchone()
                history = json.loads(row["history"]) if row else []
                history.append([time.time(), note])
                fields["history"] = json.dumps(history)
            if fields:
                sets = ", ".join(f"{name} = ?" for name in fields)
                values = [int(v) if isinstance(v, bool) else v for v in fields.values()]
                self.db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*values, job_id))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return self.job(job_id)

    @staticmethod
    def spec(job: dict[str, Any]) -> TuningJob:
        """A stored job's spec, typed."""
        return job_from_dict(yaml.safe_load(job["spec"]))

    # -- devices ----------------------------------------------------------------------------------
    def heartbeat(self, agent_id: str, key: str, info: dict[str, Any], tracker: str, listed: bool, busy: bool,
                  interval_s: float, stopped: bool) -> None:
        now = time.time()
        self.db.execute(
            "INSERT INTO devices (agent_id, key, info, tracker, listed, busy, interval_s, first_seen, last_seen, "
            "stopped) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(agent_id) DO UPDATE SET key = excluded.key, "
            "info = excluded.info, tracker = excluded.tracker, listed = excluded.listed, busy = excluded.busy, "
            "interval_s = excluded.interval_s, last_seen = excluded.last_seen, stopped = excluded.stopped",
            (agent_id, key, json.dumps(info, sort_keys=True), tracker, int(listed), int(busy), interval_s, now,
             now, int(stopped)))

    def devices(self) -> list[dict[str, Any]]:
        out = []
        for row in self.db.execute("SELECT * FROM devices ORDER BY key, agent_id"):
            item = dict(row)
            item["info"] = json.loads(item["info"])
            for name in ("listed", "busy", "stopped"):
                item[name] = bool(item[name])
            out.append(item)
        return out

    def forget_devices_before(self, when: float) -> None:
        """Drop devices not heard from since ``when`` (a day by default: offline ones stay visible a while)."""
        self.db.execute("DELETE FROM devices WHERE last_seen < ?", (when,))


def _dump_spec(spec: TuningJob) -> str:
    """The job as YAML, as the worker runs it (``tunefarm tune SPEC``)."""
    return yaml.safe_dump(spec.to_dict(), sort_keys=False)
