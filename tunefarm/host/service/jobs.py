"""The job queue and each job's lifecycle: queued -> running -> done / failed / cancelled, and back to
queued on a resume or after a host restart.

Each job runs as ``tunefarm tune SPEC --logs-dir LOGS`` in its own process group (a worker), at most one
per device key (the others on that key wait in order), several keys at once (``max_running_jobs``). A
worker writes the same job dir ``tunefarm tune`` writes, so running a job again resumes it from its
database: the queue relies on that after a restart (:meth:`JobQueue.recover`).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hmac
import os
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import psutil

from tunefarm.core.errors import TunefarmError
from tunefarm.core.jobspec import JOB_NAME_RE, TuningJob, job_from_dict, parse_yaml
from tunefarm.core.procs import signal_group, start_tunefarm
from tunefarm.core.runresult import read_run_result
from tunefarm.host.service.config import FarmConfig
from tunefarm.host.service.errors import ApiError
from tunefarm.host.service.farmdir import FarmDir
from tunefarm.host.service.log import log
from tunefarm.host.service.pids import STOP_GRACE_S, process_alive, stop_group
from tunefarm.host.service.store import CANCELLED, DONE, FAILED, FINAL_STATES, QUEUED, RUNNING, JobExists, JobStore
from tunefarm.host.service.tracker_proc import HostTracker


@dataclasses.dataclass
class Upload:
    """The model file that came with a submission."""

    filename: str
    body: bytes


UPLOAD_PREFIX = "upload-"  # a submission's model file in LOGS/farm/tmp/ until its job is stored
SUBMISSION = "job"  # how a submitted job file is named in its errors
DIR_MARK = ".tunefarm-farm-job"  # in a job directory the farm created: the mark recorded with the job


def upload_too_big(size: int, limit: int) -> str:
    return (f"upload of {size / 2**20:.1f} MiB is over this farm's limit of {limit / 2**20:.0f} MiB "
            "(max_upload_mb in the farm config)")


class JobQueue:
    """The queue in the store, and the workers that run its jobs."""

    def __init__(self, config: FarmConfig, logs_dir: Path, farm: FarmDir, store: JobStore, tracker: HostTracker,
                 tvm_pool: concurrent.futures.Executor | None = None):
        self.config = config
        self.tvm_pool = tvm_pool  # where TVM work runs (the target check); None: asyncio's default pool
        self.logs_dir = logs_dir
        self.farm = farm
        self.store = store
        self.tracker = tracker
        self.procs: dict[str, subprocess.Popen] = {}
        self.kill_at: dict[str, float] = {}  # cancelled jobs: when to SIGKILL if still running
        self.stopping = False

    @property
    def upload_limit(self) -> int:
        """The largest model file a submission may carry, in bytes."""
        return int(self.config.max_upload_mb * 1024 * 1024)

    async def submit(self, job: TuningJob, upload: Upload | None, skip_eval: bool,
                     devices: Callable[[], Awaitable[list[dict[str, Any]]]]) -> dict[str, Any]:
        """Queue a submitted job: the stored job, or an ApiError saying which rule it breaks.

        The rules: its name is not taken; an ONNX job comes with its model file (within the upload
        limit), other jobs with none; a builtin model is known; a target other than ``from-agent`` is one
        TVM accepts; an agent that is online serves its device key (``devices``: the devices view's list,
        tracker and heartbeats); the ONNX file is readable. Nothing is stored for a refused job.

        The event loop runs other requests while this one awaits (the tracker, TVM, the ONNX check), so
        the name is checked again in the store's transaction that inserts the job (:meth:`JobStore.add_job`),
        and the upload goes to this request's own temporary file, moved into the job's upload dir only
        once the job is stored: a refused request removes its own file, never another's.
        """
        self._refuse_taken(job.name, self.store.job(job.name))
        self._refuse_foreign_dir(job.name)
        if job.model.source == "onnx":
            if upload is None or not upload.body:
                raise ApiError(400, "model.source is onnx but no model file came with the job "
                                    "(tunefarm submit uploads model.path)")
            if len(upload.body) > self.upload_limit:
                raise ApiError(413, upload_too_big(len(upload.body), self.upload_limit))
        elif upload is not None:
            raise ApiError(400, f"a model file was uploaded but model.source is {job.model.source}, not onnx")
        if job.model.source == "builtin":
            from tunefarm.host.models import BUILTIN_MODELS  # pylint: disable=import-outside-toplevel

            if job.model.name not in BUILTIN_MODELS:
                raise ApiError(400, f"unknown builtin model {job.model.name!r}; known: "
                                    f"{', '.join(sorted(BUILTIN_MODELS))}")
        loop = asyncio.get_running_loop()
        if job.target != "from-agent":
            problem = await loop.run_in_executor(self.tvm_pool, target_problem, job.target)
            if problem:
                raise ApiError(400, f"job target: {problem}")
        try:
            listed = await devices()
        except TunefarmError as err:
            raise ApiError(503, f"the farm's tracker does not answer, so no job can run now: {err}") from None
        # Served: the tracker lists an agent on the key, or one reports by heartbeat (an agent in an RPC
        # session, or restarting its server after one, is off the tracker's list for a while).
        served: dict[str, int] = {}
        for dev in listed:
            if dev["status"] == "online":
                served[dev["key"]] = served.get(dev["key"], 0) + 1
        if not served.get(job.device.key):
            known = ", ".join(f"{k} ({n})" for k, n in sorted(served.items())) or "none"
            raise ApiError(409, f"no agent serves device key '{job.device.key}' on this farm (keys with agents: "
                                f"{known}); start one: tunefarm agent --farm URL --key {job.device.key}")
        staged = None
        try:
            if job.model.source == "onnx":
                staged = await loop.run_in_executor(None, self._stage_upload, upload.body)
                problem = await loop.run_in_executor(None, onnx_problem, staged)
                if problem:
                    raise ApiError(400, f"the uploaded model is not a readable ONNX file: {problem}")
                name = Path(upload.filename or "model.onnx").name
                if not JOB_NAME_RE.match(name):
                    name = "model.onnx"
                job.model.path = str(self.farm.uploads(job.name) / name)
            job.device.tracker = self.tracker.addr
            model = f"{job.model.source}:{job.model.name or Path(job.model.path).name}"
            try:
                record = self.store.add_job(job, model, skip_eval)
            except JobExists as err:
                self._refuse_taken(job.name, {"state": str(err)})
            try:
                record = self._make_job_dir(job.name)
            except OSError as err:
                self.store.delete_job(job.name)
                if isinstance(err, FileExistsError):  # made since the check above (that awaited)
                    self._refuse_foreign_dir(job.name)
                raise ApiError(500, f"could not create the job directory {self.logs_dir / job.name}: "
                                    f"{err.strerror or err}") from None
            if staged is not None:
                try:
                    Path(job.model.path).parent.mkdir(parents=True, exist_ok=True)
                    os.replace(staged, job.model.path)
                except OSError as err:
                    self.store.delete_job(job.name)
                    shutil.rmtree(self.logs_dir / job.name, ignore_errors=True)  # the one it just created
                    raise ApiError(500, f"could not keep the uploaded model: {err}") from None
                staged = None
        finally:
            if staged is not None:
                staged.unlink(missing_ok=True)
        log(f"job {job.name}: submitted ({model} on key '{job.device.key}', {job.tuning.max_trials_global} trials)")
        return record

    @staticmethod
    def _refuse_taken(name: str, existing: dict[str, Any] | None) -> None:
        if existing is not None:
            raise ApiError(409, f"a job named '{name}' is already on this farm ({existing['state']}); "
                                f"resume it (tunefarm resume {name}) or give the job a new name")

    def _refuse_foreign_dir(self, name: str) -> None:
        """A job's directory is one the farm creates: a name whose LOGS/<name> exists already (another run's,
        a copy, a link) is refused, or the job would resume from it and a delete would remove it."""
        if os.path.lexists(self.logs_dir / name):
            raise ApiError(409, f"{self.logs_dir / name} already exists on the host and is not a job of this farm; "
                                "give the job another name (or move that directory away)")

    def _make_job_dir(self, name: str) -> dict[str, Any]:
        """Create LOGS/<name> (it must not exist) with the farm's mark in it, and record the mark: a delete
        removes only a directory that holds the mark recorded for its job. Returns the stored job."""
        mark = secrets.token_hex(16)
        path = self.logs_dir / name
        os.mkdir(path)
        fd = os.open(path / DIR_MARK, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(mark + "\n")
        return self.store.update_job(name, dir_mark=mark)

    def _owns_dir(self, job: dict[str, Any]) -> bool:
        """Whether LOGS/<job> is the directory the farm created for ``job``: a directory (not a link) that
        holds the mark recorded with the job."""
        path = self.logs_dir / job["id"]
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode) or not job.get("dir_mark"):
                return False
            fd = os.open(path / DIR_MARK, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as fh:
                return hmac.compare_digest(fh.read(64).strip(), job["dir_mark"])
        except OSError:
            return False

    def _stage_upload(self, body: bytes) -> Path:
        """``body`` in a new file of its own under the farm's tmp dir (blocking: call from a pool thread)."""
        self.farm.tmp.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=UPLOAD_PREFIX, suffix=".onnx", dir=self.farm.tmp)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(body)
        except BaseException:
            os.unlink(name)
            raise
        return Path(name)

    def recover(self) -> None:
        """Jobs left ``running`` by a host that died: stop any orphaned worker, then queue them again; and
        remove the uploads of submissions it was still checking."""
        for staged in self.farm.tmp.glob(UPLOAD_PREFIX + "*"):
            staged.unlink(missing_ok=True)
        for job in self.store.jobs((RUNNING,)):
            orphan = process_alive(job["pid"], job["pid_started"])
            if orphan is not None:
                log(f"job {job['id']}: stopping its worker (pid {job['pid']}) left from before the restart")
                stop_group(job["pid"], job["pid_started"])
            if job["cancel_requested"]:
                self.store.update_job(job["id"], note="cancelled (the host restarted before the job stopped)",
                                      state=CANCELLED, finished=time.time(), pid=None)
            else:
                self.store.update_job(job["id"], note=f"the host stopped while this job ran (attempt "
                                      f"{job['attempts']}); queued to resume from its database",
                                      state=QUEUED, pid=None)
                log(f"job {job['id']}: queued again; it resumes from its database")

    def stop_workers(self) -> None:
        """Stop every worker (the host stops): their jobs go back to the queue, cancelled ones end cancelled."""
        self.stopping = True
        for job_id, proc in list(self.procs.items()):
            log(f"job {job_id}: stopping its worker; it resumes when the host starts again")
            stop_group(proc.pid, None)
            proc.wait()
            job = self.store.job(job_id)
            if job["cancel_requested"]:
                self.store.update_job(job_id, note="cancelled", state=CANCELLED, finished=time.time(), pid=None)
            else:
                self.store.update_job(job_id, note="the host stopped; queued to resume when it starts again",
                                      state=QUEUED, pid=None)
        self.procs.clear()

    def _start(self, job: dict[str, Any]) -> None:
        if not os.path.lexists(self.logs_dir / job["id"]):  # removed by hand since: the farm makes it again
            self._make_job_dir(job["id"])
        spec_path = self.farm.spec(job["id"])
        spec_path.write_text(job["spec"])
        attempt = job["attempts"] + 1
        run_log = self.farm.run_log(job["id"])
        with open(run_log, "a", encoding="utf-8") as fh:
            fh.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} attempt {attempt} ===\n")
        result = self.farm.run_result(job["id"])
        result.unlink(missing_ok=True)  # an earlier attempt's: not this one's word
        args = ["tune", spec_path, "--logs-dir", self.logs_dir, "--tracker", self.tracker.addr, "--result-file", result]
        if job["skip_eval"]:
            args.append("--skip-eval")
        proc = start_tunefarm(args, log_path=run_log, env={"COLUMNS": "160"})
        try:
            started = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            started = None
        self.procs[job["id"]] = proc
        self.store.update_job(job["id"], note=f"started (attempt {attempt}, pid {proc.pid})", state=RUNNING,
                              started=time.time(), finished=None, attempts=attempt, pid=proc.pid,
                              pid_started=started, exit_code=None, error=None)
        log(f"job {job['id']}: started on key '{job['key']}' (attempt {attempt}, pid {proc.pid})")

    def _last_error(self, job_id: str) -> str | None:
        """The one-line error the job's last run ended with (its result file), or None."""
        result = read_run_result(self.farm.run_result(job_id))
        return result["error"] if result is not None else None

    def _reap(self) -> None:
        for job_id, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                if job_id in self.kill_at and time.monotonic() > self.kill_at[job_id]:
                    signal_group(proc.pid, signal.SIGKILL)
                continue
            del self.procs[job_id]
            self.kill_at.pop(job_id, None)
            job = self.store.job(job_id)
            now = time.time()
            if job["cancel_requested"]:
                self.store.update_job(job_id, note="cancelled", state=CANCELLED, finished=now, exit_code=code,
                                      pid=None)
                log(f"job {job_id}: cancelled")
            elif code == 0:
                self.store.update_job(job_id, note="done", state=DONE, finished=now, exit_code=0, pid=None)
                log(f"job {job_id}: done")
            else:
                error = self._last_error(job_id) or f"`tunefarm tune` exited with code {code}"
                self.store.update_job(job_id, note=f"failed: {error}", state=FAILED, finished=now, exit_code=code,
                                      error=error, pid=None)
                log(f"job {job_id}: failed: {error}")

    def schedule(self) -> None:
        """Reap finished workers, then start the oldest queued job of every idle key."""
        if self.stopping:
            return
        try:
            self._reap()
            busy_keys = {j["key"] for j in self.store.jobs((RUNNING,))}
            for job in self.store.jobs((QUEUED,)):
                if len(self.procs) >= self.config.max_running_jobs:
                    break
                if job["key"] in busy_keys:
                    continue
                busy_keys.add(job["key"])
                try:
                    self._start(job)
                except OSError as err:
                    self.store.update_job(job["id"], note=f"failed to start: {err}", state=FAILED,
                                          finished=time.time(), error=f"could not start the worker: {err}")
        except Exception as err:  # pylint: disable=broad-except
            log(f"error in the scheduler (it keeps running): {type(err).__name__}: {err}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        job = self.store.job(job_id)
        if job["state"] == QUEUED:
            return self.store.update_job(job_id, note="cancelled while queued", state=CANCELLED,
                                         finished=time.time())
        if job["state"] != RUNNING:
            raise ApiError(409, f"job {job_id} is {job['state']}; only queued or running jobs can be cancelled")
        job = self.store.update_job(job_id, note="cancel requested", cancel_requested=True)
        proc = self.procs.get(job_id)
        if proc is not None and proc.poll() is None:
            signal_group(proc.pid, signal.SIGTERM)
            self.kill_at[job_id] = time.monotonic() + STOP_GRACE_S
        return job

    def resume(self, job_id: str, trials: int | None) -> dict[str, Any]:
        job = self.store.job(job_id)
        if job["state"] in (QUEUED, RUNNING):
            raise ApiError(409, f"job {job_id} is already {job['state']}")
        fields: dict[str, Any] = {}
        note = "resumed; continues from its database"
        if trials is not None:
            spec = self.store.spec(job)
            if trials <= spec.tuning.max_trials_global:
                raise ApiError(400, f"--trials {trials} is not above the job's budget of "
                                    f"{spec.tuning.max_trials_global}")
            spec.tuning.max_trials_global = trials
            try:  # the typed spec's own ranges (jobspec.RANGES): 10**23 trials is a 400, not an overflow
                spec = job_from_dict(spec.to_dict(), "resume")
            except TunefarmError as err:
                raise ApiError(400, f"--trials {trials}: {err}") from None
            fields["spec"] = spec
            note += f"; budget raised to {trials} trials"
        elif job["state"] == DONE:
            raise ApiError(409, f"job {job_id} is done and its budget is spent; resume it with more trials "
                                "(tunefarm resume JOB --trials N)")
        return self.store.update_job(job_id, note=note, state=QUEUED, cancel_requested=False, error=None,
                                     exit_code=None, finished=None, **fields)


    def delete(self, job_id: str) -> list[str]:
        """Remove a finished, failed or cancelled job: its queue entry, spec, upload, run log and job
        directory. A queued or running job is refused (409: cancel it first). Returns what was removed."""
        job = self.store.job(job_id)
        if job["state"] not in FINAL_STATES or job_id in self.procs:
            raise ApiError(409, f"job {job_id} is {job['state']}; cancel it first (tunefarm cancel {job_id}), "
                                "then delete it")
        job_dir = self.logs_dir / job_id
        if os.path.lexists(job_dir) and not self._owns_dir(job):
            raise ApiError(409, f"{job_dir} was not created by this farm for job {job_id}; nothing was deleted "
                                "(move that directory away, then delete the job)")
        removed = []
        for path in (self.farm.spec(job_id), self.farm.run_log(job_id), self.farm.uploads(job_id), job_dir):
            if remove_path(path):
                removed.append(str(path))
        self.store.delete_job(job_id)
        log(f"job {job_id}: deleted ({', '.join(removed) or 'no files'})")
        return removed


def remove_path(path: Path) -> bool:
    """Remove a file, a link (never what it points to) or a directory tree; whether there was one."""
    if path.is_symlink() or path.is_file():
        path.unlink()
        return True
    if path.is_dir():
        shutil.rmtree(path)
        return True
    return False


def parse_submission(text: str) -> TuningJob:
    """A submitted job file's text as a TuningJob; a 400 ApiError with the one-line reason. The YAML is
    bounded before anything is built (jobspec.parse_yaml): an alias bomb is refused, not expanded."""
    try:
        data = parse_yaml(text, SUBMISSION)
    except TunefarmError as err:
        message = str(err)
        malformed = f"{SUBMISSION}: malformed YAML"
        if message.startswith(malformed):
            message = "malformed job YAML" + message[len(malformed):]
        raise ApiError(400, message) from None
    try:
        if isinstance(data, dict) and isinstance(data.get("model"), dict) and data["model"].get("source") == "onnx":
            data["model"].setdefault("path", "uploaded.onnx")  # the upload decides; see submit()
        return job_from_dict(data, "job")
    except TunefarmError as err:
        raise ApiError(400, str(err)) from None


def target_problem(spec: Any) -> str | None:
    """Why TVM refuses a job's target (a preset name, a tag or a target dict), in one line, or None
    (blocking, imports TVM: call in the service's TVM pool)."""
    from tunefarm.core.targets import target_from_spec  # pylint: disable=import-outside-toplevel

    try:
        target_from_spec(spec)
    except TunefarmError as err:
        return str(err)
    return None


def onnx_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable ONNX model (its first line), or None."""
    import onnx  # pylint: disable=import-outside-toplevel

    try:
        onnx.load(str(path), load_external_data=False)
    except Exception as err:  # pylint: disable=broad-except
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    return None
