"""``tunefarm host serve``: the host as a service for laptops that submit jobs and go home.

One process (tornado, one thread for the event loop) holds:

* the TVM tracker: started as ``tunefarm tracker`` in its own process (adopted again after a host
  restart, since it outlives a ``kill -9`` of the host), or an external one from the config;
* the HTTP API (token required) and the dashboard (``/``, ``/jobs/<id>``);
* the job queue and the devices that reported, in SQLite (:mod:`tunefarm.host.service.store`);
* workers: each job runs as ``tunefarm tune SPEC --logs-dir LOGS`` in its own process group, at most
  one per device key (the others on that key wait in order), several keys at once.

A job's output is the same job dir ``tunefarm tune`` writes (``LOGS/<job>/``: database,
``progress.jsonl``, reports), so re-running a job resumes it without re-measuring: the host relies on
that when it starts and finds jobs that were running when it died.

Tornado serves the HTTP side because TVM's RPC already depends on it (no new server dependency),
and it streams responses, which ``tunefarm follow`` uses to get each measured batch as it lands.
"""
from __future__ import annotations

import concurrent.futures
import fcntl
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import tornado.httpserver
import tornado.ioloop
import tornado.netutil
import tornado.web
import yaml

from tunefarm.core.errors import TunefarmError
from tunefarm.core.jobspec import job_from_dict
from tunefarm.core.procs import start_tunefarm
from tunefarm.host.service.auth import cookie_secret, load_token
from tunefarm.host.service.config import FarmConfig
from tunefarm.host.service.errors import ApiError
from tunefarm.host.service.farmdir import FarmDir
from tunefarm.host.service.handlers import (STATIC_DIR, BundleHandler, DevicesHandler, FileHandler, HeartbeatHandler,
                                            InfoHandler, JobActionHandler, JobHandler, JobsHandler, LoginHandler,
                                            LogoutHandler, NotFoundHandler, PageHandler, ProgressHandler,
                                            TasksHandler, log_request)
from tunefarm.host.service.log import log
from tunefarm.host.service.pids import STOP_GRACE_S, process_alive, stop_group
from tunefarm.host.service.store import CANCELLED, DONE, FAILED, QUEUED, RUNNING, JobStore
from tunefarm.host.service.tracker_proc import HostTracker
from tunefarm.host.service.views import FarmViews

SCHEDULE_INTERVAL_MS = 500


class FarmService:
    """The host service: tracker, HTTP API + dashboard, job queue, workers."""

    def __init__(self, config: FarmConfig):
        self.config = config
        self.logs_dir = Path(config.logs_dir).resolve()
        self.farm = FarmDir(self.logs_dir / "farm")
        self.farm.create()
        # One host per logs dir: two would run the same queue twice. The kernel drops the lock when this
        # process dies, however it dies, so a kill -9 never leaves a stale lock behind.
        self._lock = open(self.farm.lock, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            owner = self._lock.read().strip() or "?"
            raise TunefarmError(f"another `tunefarm host serve` (pid {owner}) already uses {self.logs_dir}") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(str(os.getpid()))
        self._lock.flush()
        self.token = load_token(config, self.farm.token)
        self.store = JobStore(self.farm.database)
        self.procs: dict[str, subprocess.Popen] = {}
        self.kill_at: dict[str, float] = {}  # cancelled jobs: when to SIGKILL if still running
        self.tracker = HostTracker(config, self.farm)
        self.views = FarmViews(config, self.logs_dir, self.farm, self.store, self.tracker)
        # TVM work (per-task tables, best-records export) runs here, off the event loop, one at a time.
        self.tvm_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="farm-tvm")
        self.io_pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="farm-io")
        self.stopping = False

    # -- recovery and shutdown ----------------------------------------------------------------------
    def recover(self) -> None:
        """Jobs left ``running`` by a host that died: stop any orphaned worker, then queue them again."""
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

    def shutdown(self) -> None:
        """Stop workers (their jobs go back to the queue) and the tracker this host runs."""
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
        self.tracker.stop()
        self.tvm_pool.shutdown(wait=False, cancel_futures=True)
        self.io_pool.shutdown(wait=False, cancel_futures=True)
        self.store.close()

    # -- workers ------------------------------------------------------------------------------------
    def run_log(self, job_id: str) -> Path:
        return self.farm.run_log(job_id)

    def _start(self, job: dict[str, Any]) -> None:
        spec_path = self.farm.spec(job["id"])
        spec_path.write_text(job["spec"])
        attempt = job["attempts"] + 1
        log = self.run_log(job["id"])
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} attempt {attempt} ===\n")
        args = ["tune", spec_path, "--logs-dir", self.logs_dir, "--tracker", self.tracker.addr]
        if job["skip_eval"]:
            args.append("--skip-eval")
        proc = start_tunefarm(args, log_path=log, env={"COLUMNS": "160"})
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
        try:
            lines = self.run_log(job_id).read_text(errors="replace").splitlines()
        except OSError:
            return None
        for line in reversed(lines):
            if line.startswith("=== "):
                break
            if line.startswith("tunefarm: error: "):
                return line[len("tunefarm: error: "):]
        return None

    def _reap(self) -> None:
        for job_id, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                if job_id in self.kill_at and time.monotonic() > self.kill_at[job_id]:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
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
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self.kill_at[job_id] = time.monotonic() + STOP_GRACE_S
        return job

    def resume(self, job_id: str, trials: int | None) -> dict[str, Any]:
        job = self.store.job(job_id)
        if job["state"] in (QUEUED, RUNNING):
            raise ApiError(409, f"job {job_id} is already {job['state']}")
        fields: dict[str, Any] = {}
        note = "resumed; continues from its database"
        if trials is not None:
            spec = yaml.safe_load(job["spec"])
            if trials <= spec["tuning"]["max_trials_global"]:
                raise ApiError(400, f"--trials {trials} is not above the job's budget of "
                                    f"{spec['tuning']['max_trials_global']}")
            spec["tuning"]["max_trials_global"] = trials
            fields.update(spec=yaml.safe_dump(spec, sort_keys=False), budget=trials)
            note += f"; budget raised to {trials} trials"
        elif job["state"] == DONE:
            raise ApiError(409, f"job {job_id} is done and its budget is spent; resume it with more trials "
                                "(tunefarm resume JOB --trials N)")
        return self.store.update_job(job_id, note=note, state=QUEUED, cancel_requested=False, error=None,
                                     exit_code=None, finished=None, **fields)

    # -- submission ---------------------------------------------------------------------------------
    def parse_submission(self, text: str) -> Any:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ApiError(400, f"malformed job YAML{at}: {problem}") from None
        try:
            if isinstance(data, dict) and isinstance(data.get("model"), dict) and data["model"].get("source") == "onnx":
                data["model"].setdefault("path", "uploaded.onnx")  # the upload decides; see submit()
            return job_from_dict(data, "job")
        except TunefarmError as err:
            raise ApiError(400, str(err)) from None

    # -- run ----------------------------------------------------------------------------------------
    def make_app(self) -> tornado.web.Application:
        job = r"([A-Za-z0-9][A-Za-z0-9._-]{0,99})"
        handlers = [
            (r"/", PageHandler, {"page": "index.html"}),
            (rf"/jobs/{job}", PageHandler, {"page": "job.html"}),
            (r"/login", LoginHandler),
            (r"/logout", LogoutHandler),
            (r"/static/(.*)", tornado.web.StaticFileHandler, {"path": str(STATIC_DIR)}),
            (r"/api/info", InfoHandler),
            (r"/api/devices", DevicesHandler),
            (r"/api/devices/heartbeat", HeartbeatHandler),
            (r"/api/jobs", JobsHandler),
            (rf"/api/jobs/{job}", JobHandler),
            (rf"/api/jobs/{job}/(cancel|resume)", JobActionHandler),
            (rf"/api/jobs/{job}/progress", ProgressHandler),
            (rf"/api/jobs/{job}/tasks", TasksHandler),
            (rf"/api/jobs/{job}/bundle", BundleHandler),
            (rf"/api/jobs/{job}/files/([A-Za-z0-9._-]+)", FileHandler),
        ]
        return tornado.web.Application(handlers, service=self, cookie_secret=cookie_secret(self.token),
                                       default_handler_class=NotFoundHandler, log_function=log_request,
                                       static_hash_cache=True)

    def run(self) -> None:
        cfg = self.config
        self.recover()
        self.store.forget_devices_before(time.time() - 86400.0)  # offline for a day: gone from the list
        self.tracker.start()
        app = self.make_app()
        limit = int(cfg.max_upload_mb * 1024 * 1024)
        server = tornado.httpserver.HTTPServer(app, max_body_size=4 * limit + (1 << 20), xheaders=False)
        try:
            sockets = tornado.netutil.bind_sockets(cfg.port, address=cfg.bind)
        except OSError as err:
            self.shutdown()
            raise TunefarmError(f"cannot serve on {cfg.bind}:{cfg.port}: {err.strerror or err}") from None
        server.add_sockets(sockets)
        shown = "127.0.0.1" if cfg.bind in ("0.0.0.0", "") else cfg.bind
        shown = socket.gethostname() if cfg.bind in ("0.0.0.0", "::", "") else shown
        print(f"farm listening on http://{cfg.bind}:{cfg.port} (dashboard: http://{shown}:{cfg.port}/); "
              f"jobs in {self.logs_dir}; tracker {self.tracker.addr}", flush=True)
        if cfg.bind in ("0.0.0.0", "::", ""):
            print("note: the API is served on every interface; the token guards it, but it travels in clear "
                  "over HTTP: use a trusted network or a TLS proxy", flush=True)
        loop = tornado.ioloop.IOLoop.current()
        scheduler = tornado.ioloop.PeriodicCallback(self.schedule, SCHEDULE_INTERVAL_MS)
        scheduler.start()
        loop.add_callback(self.schedule)

        def on_signal(signum, _frame):
            log(f"stopping (signal {signum})")
            loop.add_callback_from_signal(loop.stop)

        old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            loop.start()
        finally:
            scheduler.stop()
            server.stop()
            self.shutdown()
            for sig, handler in old.items():
                signal.signal(sig, handler)
            log("stopped")


def serve(config_path: str | None, **overrides: Any) -> None:
    """``tunefarm host serve``."""
    from tunefarm.host.service.config import load_farm_config  # pylint: disable=import-outside-toplevel

    FarmService(load_farm_config(config_path, **overrides)).run()
