"""The job directory, ``LOGS/<job>/``: the one module that names its files and reads and writes them.

A job directory is a MetaSchedule ``JSONDatabase`` work_dir plus tunefarm's own files::

    database_workload.json        MetaSchedule: one line per workload (structural hash, IRModule)
    database_tuning_record.json   MetaSchedule: one line per measured candidate (trace, run seconds)
    job.yaml                      the job as it was run (the spec, validated)
    job_state.json                what the directory was tuned for (model fingerprint, target), warm start
    tasks.json                    the tasks: name, weight, workload hash
    progress.jsonl                one JSON line per measured batch (tunefarm follow, the dashboard's chart)
    profile.json                  where the tuning time went (MetaSchedule's profiler scopes, grouped)
    report.json, report.md        the evaluation (tuned vs untuned vs peers)
    verified.jsonl                every new best measured again before it counted (tuning/verify.py)

Everything else (the tuning engine, the reports, the compare, the host service, the benchmarks) reaches
these files through here, and every "is this record a valid measurement" question goes through
:func:`is_valid_run`.
"""
from __future__ import annotations

import json
import os
import re
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

from tunefarm.core.errors import TunefarmError

DB_WORKLOAD = "database_workload.json"
DB_RECORDS = "database_tuning_record.json"
SPEC = "job.yaml"
STATE = "job_state.json"
TASKS = "tasks.json"
PROGRESS = "progress.jsonl"
PROFILE = "profile.json"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
VERIFIED = "verified.jsonl"  # the timing verifier's log: which records were measured twice (tuning/verify.py)
DATABASE_FILES = (DB_WORKLOAD, DB_RECORDS)
# What a laptop may download from a job (besides plots): the reports, the progress log, the database.
PLACEMENT = "placement.json"  # host/placement/result.py writes it
SHARED_FILES = (REPORT_MD, REPORT_JSON, PROGRESS, DB_WORKLOAD, DB_RECORDS, TASKS, STATE, SPEC, VERIFIED, PLACEMENT)

# MetaSchedule stores a candidate that failed to build or run with run seconds of 1e10.
_FAILED_RUN_S = 1e9


def is_valid_run(run_secs: Iterable[float] | None) -> bool:
    """Whether a record's run seconds are a real measurement (not MetaSchedule's failure marker)."""
    secs = [float(x) for x in run_secs] if run_secs is not None else []
    return bool(secs) and min(secs) < _FAILED_RUN_S


def mean_run_s(run_secs: Iterable[float] | None) -> float | None:
    """Mean run seconds of a valid record, None for a failed one."""
    if not is_valid_run(run_secs):
        return None
    secs = [float(x) for x in run_secs]  # type: ignore[union-attr]
    return sum(secs) / len(secs)


def records_per_workload(database) -> dict[str, list[float]]:
    """Structural hash of each workload -> mean run seconds of each of its valid records."""
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    out: dict[str, list[float]] = {}
    for rec in database.get_all_tuning_records():
        mean = mean_run_s(rec.run_secs)
        out.setdefault(str(tvm_ffi.structural_hash(rec.workload.mod)), []).extend([] if mean is None else [mean])
    return out


_SAID: set[tuple[str, int, tuple[int, ...]]] = set()  # damage already reported by this process


def _good_line(line: bytes, workloads: int | None) -> Any:
    """A database line's JSON if it has the shape MetaSchedule writes (workloads is None: a workload line
    ``[hash, module]``; else a record line ``[workload index, [...]]``), else None."""
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, list) or len(data) != 2:
        return None
    if workloads is None:
        return data if all(isinstance(x, str) for x in data) else None
    index, body = data
    ok = isinstance(index, int) and not isinstance(index, bool) and 0 <= index < workloads and isinstance(body, list)
    return data if ok else None


def _keep_aside(path: Path) -> Path:
    """A copy of ``path`` beside it (``NAME.damaged``, ``NAME.damaged.2``, ...); an identical copy is reused."""
    data = path.read_bytes()
    for i in range(1, 1000):
        copy = path.with_name(path.name + ".damaged" + (f".{i}" if i > 1 else ""))
        if not os.path.lexists(copy):
            copy.write_bytes(data)
            return copy
        if copy.is_file() and not copy.is_symlink() and copy.stat().st_size == len(data) and copy.read_bytes() == data:
            return copy
    raise TunefarmError(f"{path}: too many damaged copies beside it")


def check_database(job_dir: "JobDir", live: bool) -> dict[str, bytes] | None:
    """None if the job's database files are whole (every line has MetaSchedule's shape); else their whole
    lines, as file name -> bytes (records renumbered where a damaged workload line was left out, the records
    of that workload left out with it). The damage is said once on stderr (how many lines, which, where the
    copy is), and each damaged file is copied aside first. ``live``: a last line without its newline is one
    being written, left out without a word (read side); otherwise it is damage too (the writer's side)."""
    found: dict[str, bytes] = {}
    for name in DATABASE_FILES:
        try:
            found[name] = job_dir.file(name).read_bytes()
        except FileNotFoundError:
            return None  # a new directory: TVM creates the files
    out: dict[str, bytes] = {}
    damaged: dict[str, list[int]] = {}
    tails = False
    renumber: dict[int, int] = {}
    orphans = 0
    for name in DATABASE_FILES:
        pieces = found[name].split(b"\n")
        tail = pieces.pop()  # after the last newline: b"" for a whole file
        bad: list[int] = []
        kept: list[bytes] = []
        for number, line in enumerate(pieces, 1):
            if name == DB_WORKLOAD:
                if not line.strip():
                    continue
                if _good_line(line, None) is None:
                    bad.append(number)
                    continue
                renumber[len(renumber) + len(bad)] = len(kept)  # TVM counts lines: this one's old index
                kept.append(line)
            else:
                if not line.strip():
                    continue
                data = _good_line(line, len(renumber) + len(damaged.get(DB_WORKLOAD, [])))
                if data is None:
                    bad.append(number)
                    continue
                if data[0] not in renumber:
                    orphans += 1
                    continue
                if renumber[data[0]] != data[0]:
                    line = re.sub(rb"^\s*\[\s*\d+", b"[" + str(renumber[data[0]]).encode(), line, count=1)
                kept.append(line)
        if tail.strip():
            tails = True
            if not live:
                bad.append(len(pieces) + 1)
        if bad:
            damaged[name] = bad
        out[name] = b"".join(line + b"\n" for line in kept)
    if not damaged and not tails and not orphans:
        return None
    if damaged or orphans:
        parts = []
        for name, bad in damaged.items():
            path = job_dir.file(name)
            shown = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            key = (str(path), len(found[name]), tuple(bad))
            if key in _SAID:
                continue
            _SAID.add(key)
            copy = _keep_aside(path)
            parts.append(f"{path}: {len(bad)} damaged line(s) left out (line {shown}); the damaged file is kept "
                         f"as {copy.name}")
        if parts:
            extra = f"; {orphans} record(s) of a damaged workload left out" if orphans else ""
            print(f"tunefarm: warning: {'; '.join(parts)}{extra}", file=sys.stderr, flush=True)
    return out


def read_events(path: str | Path, start: int = 0) -> list[dict[str, Any]]:
    """Complete JSON lines of a JSON-lines file from line ``start`` on, each with its line number ``n``.

    The last piece of the file is skipped while it has no newline (a line still being written); a torn
    line in the middle (a writer killed mid-line) is skipped, never glued to the next one.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")[:-1]
    out = []
    for i in range(max(0, start), len(lines)):
        try:
            event = json.loads(lines[i])
        except ValueError:
            continue
        if isinstance(event, dict):
            event["n"] = i
            out.append(event)
    return out


def append_event(path: str | Path, event: dict[str, Any]) -> None:
    """Append one JSON line; if the file ends in a torn line (a writer killed mid-write), end it first so
    that this event stays a line of its own."""
    path = Path(path)
    with open(path, "ab+") as fh:
        if fh.tell() > 0:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")
        fh.write(json.dumps(event).encode("utf-8") + b"\n")


class JobDir:
    """One job directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"JobDir({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    def file(self, name: str) -> Path:
        return self.path / name

    # -- the MetaSchedule database
    def has_database(self) -> bool:
        return all((self.path / name).is_file() for name in DATABASE_FILES)

    def open_database(self):
        """The job's database, read-only use; a one-line error if the directory has none.

        Damaged lines (a writer killed mid-line, a torn copy) are left out, said once on stderr, and the
        damaged file is copied aside (check_database); the files themselves are not changed here (a worker
        may be appending to them: a last line without its newline is one being written)."""
        from tvm.s_tir import meta_schedule as ms  # pylint: disable=import-outside-toplevel

        if not self.has_database():
            raise TunefarmError(f"{self.path} is not a tuning job directory (no MetaSchedule database in it)")
        whole = check_database(self, live=True)
        if whole is None:
            return ms.database.JSONDatabase(work_dir=str(self.path), allow_missing=False)
        with tempfile.TemporaryDirectory(prefix="tunefarm-db-") as work:  # TVM reads it all when it opens
            for name, data in whole.items():
                Path(work, name).write_bytes(data)
            return ms.database.JSONDatabase(work_dir=work, allow_missing=False)

    def database(self):
        """The job's database, created if missing (the tuning engine's). Damaged lines are repaired away
        first (check_database: said once, the damaged file copied aside), or TVM could not open it."""
        from tvm.s_tir import meta_schedule as ms  # pylint: disable=import-outside-toplevel

        self.path.mkdir(parents=True, exist_ok=True)
        whole = check_database(self, live=False)
        if whole is not None:
            for name, data in whole.items():
                tmp = self.file(name + ".repair")
                tmp.write_bytes(data)
                os.replace(tmp, self.file(name))
        return ms.database.JSONDatabase(work_dir=str(self.path))

    # -- tunefarm's own files
    def read_json(self, name: str, default: Any = None) -> Any:
        path = self.path / name
        if not path.is_file():
            return default
        return json.loads(path.read_text())

    def write_json(self, name: str, data: Any) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / name).write_text(json.dumps(data, indent=2, default=str))

    def has_state(self) -> bool:
        return (self.path / STATE).is_file()

    def read_state(self) -> dict[str, Any]:
        return self.read_json(STATE, {})

    def pipeline(self):
        """The graph pipeline this directory was tuned with (tunefarm.host.tuning.pipeline)."""
        from tunefarm.host.tuning.pipeline import job_dir_pipeline  # pylint: disable=import-outside-toplevel

        return job_dir_pipeline(self.read_state())

    def mark_run_ended(self, how: str) -> None:
        """Note in job_state.json how the last tuning run ended ("finished", "stopped"); a run that fails
        or is killed leaves "running" (warm start takes records only from runs that ended)."""
        state = self.read_state()
        state["last_run"] = how
        self.write_state(state)

    def mark_run_started(self) -> None:
        state = self.read_state()
        state["last_run"] = "running"
        self.write_state(state)

    def run_ended(self) -> bool:
        return self.read_state().get("last_run") in ("finished", "stopped")

    def verified(self) -> dict[str, set[str]] | None:
        """Workload hash -> trace hashes of its verified records, from verified.jsonl (the timing verifier's
        log, tuning/verify.py); None when the directory has none (tuned before timings were verified)."""
        path = self.file(VERIFIED)
        if not path.is_file():
            return None
        out: dict[str, set[str]] = {}
        for entry in read_events(path):
            if entry.get("status") == "verified" and isinstance(entry.get("trace"), str):
                out.setdefault(str(entry.get("workload")), set()).add(entry["trace"])
        return out

    def write_state(self, state: dict[str, Any]) -> None:
        self.write_json(STATE, state)

    def read_tasks(self) -> list[dict[str, Any]]:
        path = self.path / TASKS
        if not path.is_file():
            raise TunefarmError(f"{path} is missing: was this directory written by `tunefarm tune`?")
        return json.loads(path.read_text())

    def write_tasks(self, tasks: list[dict[str, Any]]) -> None:
        self.write_json(TASKS, tasks)

    def write_spec(self, job) -> None:
        import yaml  # pylint: disable=import-outside-toplevel

        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / SPEC).write_text(yaml.safe_dump(job.to_dict(), sort_keys=False))

    def events(self, start: int = 0) -> list[dict[str, Any]]:
        return read_events(self.path / PROGRESS, start)

    def append_event(self, event: dict[str, Any]) -> None:
        append_event(self.path / PROGRESS, event)

    def read_profile(self) -> dict[str, Any]:
        return self.read_json(PROFILE, {})

    def write_profile(self, profile: dict[str, Any]) -> None:
        self.write_json(PROFILE, profile)

    def write_report(self, report: dict[str, Any], markdown: str) -> None:
        self.write_json(REPORT_JSON, report)
        (self.path / REPORT_MD).write_text(markdown)

    def is_empty(self) -> bool:
        return not self.path.is_dir() or not any(self.path.iterdir())


def unlinked(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` lies below ``folder`` with no symbolic link on the way (nor is one itself)."""
    try:
        where = Path(os.path.realpath(folder)) / Path(path).relative_to(folder)
        return Path(os.path.realpath(path)) == where
    except (OSError, ValueError):  # ValueError: not below folder at all
        return False


def plain_file(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` is a regular file below ``folder``, reached with no symbolic link, and no hard link
    either (one name only): a job directory's file must not stand for the farm's token or another's data."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and unlinked(path, folder)


# The files a job directory is read from (warm start, the farm's cost model, the service's views).
READ_FILES = (STATE, DB_WORKLOAD, DB_RECORDS, TASKS, VERIFIED, SPEC, PROGRESS)


def own_files(job_dir: JobDir, logs_dir: str | Path) -> bool:
    """Whether ``job_dir`` is a directory of ``logs_dir`` itself (not a link) and each of its READ_FILES,
    where present, a plain file of its own (plain_file)."""
    if not unlinked(job_dir.path, logs_dir) or not job_dir.path.is_dir():
        return False
    return all(plain_file(job_dir.file(name), logs_dir) for name in READ_FILES
               if os.path.lexists(job_dir.file(name)))


def job_dirs(logs_dir: str | Path) -> list[JobDir]:
    """Every job directory under ``logs_dir`` (those with a job state), sorted by name; a directory that is
    a link, or holds a job file that is a link (symbolic or hard), is left out: warm start and the farm's
    cost model would read what it points to."""
    found = [JobDir(p.parent) for p in sorted(Path(logs_dir).glob(f"*/{STATE}"))]
    return [d for d in found if own_files(d, logs_dir)]


def workload_counts(database) -> dict[str, dict[str, Any]]:
    """Structural hash of each workload -> ``{"records", "failed", "best_s"}``: all its records, the failed
    ones among them, and the best mean run seconds of the valid ones (None without any)."""
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    out: dict[str, dict[str, Any]] = {}
    for rec in database.get_all_tuning_records():
        row = out.setdefault(str(tvm_ffi.structural_hash(rec.workload.mod)), {"records": 0, "failed": 0, "best_s": None})
        row["records"] += 1
        mean = mean_run_s(rec.run_secs)
        if mean is None:
            row["failed"] += 1
        elif row["best_s"] is None or mean < row["best_s"]:
            row["best_s"] = mean
    return out


def has_records(job_dir: JobDir) -> bool:
    """Whether the job directory's database holds any tuning record (read as text: no TVM needed)."""
    path = job_dir.file(DB_RECORDS)
    return path.is_file() and bool(path.read_text().strip())


def remove_unmeasured(job_dir: JobDir) -> bool:
    """Remove a job directory that holds no tuning record (a job that failed before measuring anything);
    True if removed. Callers pass only directories their own run created."""
    import shutil  # pylint: disable=import-outside-toplevel

    if not job_dir.path.is_dir() or has_records(job_dir):
        return False
    shutil.rmtree(job_dir.path, ignore_errors=True)
    return True
