"""``tunefarm host serve``: the host as a service for laptops that submit jobs and go home.

One process (tornado, one thread for the event loop) holds, each part in its own module:

* the TVM tracker (``tracker_proc``): started as ``tunefarm tracker`` in its own process (adopted again
  after a host restart, since it outlives a ``kill -9`` of the host), or an external one from the config;
* the HTTP API (``handlers``; token required, ``auth``) and the dashboard (``/``, ``/jobs/<id>``), which
  show what ``views`` reads from the store and the job directories;
* the job queue and the devices that reported, in SQLite (``store``), and the queue's rules and workers
  (``jobs``): each job runs as ``tunefarm tune SPEC --logs-dir LOGS`` in its own process group, at most
  one per device key (the others on that key wait in order), several keys at once;
* the farm's own files under ``LOGS/farm/`` (``farmdir``).

A job's output is the same job dir ``tunefarm tune`` writes (``LOGS/<job>/``: database,
``progress.jsonl``, reports), so re-running a job resumes it without re-measuring: the host relies on
that when it starts and finds jobs that were running when it died.

Tornado serves the HTTP side because TVM's RPC already depends on it (no new server dependency),
and it streams responses, which ``tunefarm follow`` uses to get each measured batch as it lands.

This module wires the parts: :class:`FarmService` (one per logs dir), its routes and its event loop.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import tornado.httpserver
import tornado.ioloop
import tornado.netutil
import tornado.web

from tunefarm.core.credential import KEY_FILE_ENV, load_farm_key
from tunefarm.core.errors import TunefarmError
from tunefarm.host.service.auth import cookie_secret, load_token
from tunefarm.host.service.config import FarmConfig
from tunefarm.host.service.farmdir import FarmDir
from tunefarm.host.service.handlers import (SMALL_BODY, STATIC_DIR, BundleHandler, DevicesHandler, FileHandler,
                                            HeartbeatHandler, InfoHandler, JobActionHandler, JobHandler, JobsHandler,
                                            LoginHandler, LogoutHandler, NotFoundHandler, PageHandler,
                                            ProgressHandler, TasksHandler, log_request)
from tunefarm.host.service.jobs import JobQueue
from tunefarm.host.service.log import log
from tunefarm.host.service.store import JobStore
from tunefarm.host.service.tracker_proc import HostTracker
from tunefarm.host.service.views import FarmViews

SCHEDULE_INTERVAL_MS = 500
TRACKER_CHECK_MS = 2000  # how often the host looks whether its tracker still runs


class FarmService:
    """The host service: tracker, HTTP API + dashboard, job queue, workers; the handlers reach the parts
    through it (``self.settings["service"]``)."""

    def __init__(self, config: FarmConfig):
        self.config = config
        if config.farm_key_file:  # the tracker and the workers this host starts inherit it
            os.environ[KEY_FILE_ENV] = str(Path(config.farm_key_file).expanduser().resolve())
        load_farm_key()  # a one-line error now for a key file that is unreadable or readable by others
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
        self.store = JobStore(self.farm.database)  # before the token: a corrupt queue fails before it is shown
        self.token = load_token(config, self.farm.token)
        self.tracker = HostTracker(config, self.farm)
        self._tracker_check: concurrent.futures.Future | None = None
        self.views = FarmViews(self.store, self.logs_dir, self.farm, self.tracker, config.device_offline_after_s)
        # TVM work (per-task tables, best-records export, target checks) runs here, off the event loop, one at
        # a time.
        self.tvm_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="farm-tvm")
        self.io_pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="farm-io")
        self.jobs = JobQueue(config, self.logs_dir, self.farm, self.store, self.tracker, tvm_pool=self.tvm_pool)

    async def online_devices(self) -> list[dict[str, Any]]:
        """The devices view's list (the tracker's and the heartbeats'); TunefarmError if the tracker is away."""
        tracker_view = await asyncio.get_running_loop().run_in_executor(self.io_pool, self.tracker.devices)
        return self.views.devices_view(tracker_view, None)["devices"]

    def check_tracker(self) -> None:
        """Every few seconds: start the host's tracker again if it died (in a pool thread: it waits for the
        new one to answer)."""
        if self._tracker_check is None or self._tracker_check.done():
            self._tracker_check = self.io_pool.submit(self.tracker.check)

    def shutdown(self) -> None:
        """Stop workers (their jobs go back to the queue) and the tracker this host runs."""
        self.jobs.stop_workers()
        self.tracker.stop()
        self.tvm_pool.shutdown(wait=False, cancel_futures=True)
        self.io_pool.shutdown(wait=False, cancel_futures=True)
        self.store.close()

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
            (rf"/api/jobs/{job}", JobHandler),  # GET; DELETE removes a finished job
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
        self.jobs.recover()
        self.store.forget_devices_before(time.time() - 86400.0)  # offline for a day: gone from the list
        self.tracker.start()
        self.tvm_pool.submit(_import_tvm)  # the first target check then waits for no import
        app = self.make_app()
        # Small bodies by default (the sign-in form); each API handler sets its own limit before it reads a
        # body (handlers.ApiHandler.body_limit: a job submission may carry the upload limit).
        server = tornado.httpserver.HTTPServer(app, max_body_size=SMALL_BODY, xheaders=False)
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
        scheduler = tornado.ioloop.PeriodicCallback(self.jobs.schedule, SCHEDULE_INTERVAL_MS)
        scheduler.start()
        loop.add_callback(self.jobs.schedule)
        tracker_watch = tornado.ioloop.PeriodicCallback(self.check_tracker, TRACKER_CHECK_MS)
        tracker_watch.start()

        def on_signal(signum, _frame):
            log(f"stopping (signal {signum})")
            loop.add_callback_from_signal(loop.stop)

        old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            loop.start()
        finally:
            scheduler.stop()
            tracker_watch.stop()
            server.stop()
            self.shutdown()
            for sig, handler in old.items():
                signal.signal(sig, handler)
            log("stopped")


def serve(config_path: str | None, **overrides: Any) -> None:
    """``tunefarm host serve``."""
    from tunefarm.host.service.config import load_farm_config  # pylint: disable=import-outside-toplevel

    FarmService(load_farm_config(config_path, **overrides)).run()


def _import_tvm() -> None:
    import tvm  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
