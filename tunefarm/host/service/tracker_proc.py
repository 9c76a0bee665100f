"""The host's tracker: an external one from the config, or the host's own ``tunefarm tracker`` process. That
one runs in its own process group, so it outlives a ``kill -9`` of the host, and the next host adopts it
(``tracker.json`` in the farm dir says which process it is): its agents stay registered.
"""
from __future__ import annotations

import json
import subprocess
import threading
import time
from typing import Any

import psutil

from tunefarm.core.errors import TunefarmError
from tunefarm.tracker.client import tracker_answers
from tunefarm.core.procs import start_tunefarm
from tunefarm.core.wire import parse_hostport
from tunefarm.host.service.config import FarmConfig
from tunefarm.host.service.farmdir import FarmDir
from tunefarm.host.service.log import log
from tunefarm.host.service.pids import kill_group_leftovers, process_alive, stop_group

TRACKER_START_S = 60.0


class HostTracker:
    """The TVM tracker the farm's jobs and agents use, as the host sees it: its address and, when this host
    started it (or adopted it after a restart), its process, which :meth:`check` starts again if it dies."""

    def __init__(self, config: FarmConfig, farm: FarmDir):
        self.config = config
        self.farm = farm
        self.addr = ""
        self.pid: tuple[int, float] | None = None  # the tracker this host started (or adopted)
        self.proc: subprocess.Popen | None = None  # that tracker, when this host started it (its child)
        self._lock = threading.Lock()  # check() runs in a pool thread, stop() in the host's
        self._stopped = False

    def start(self) -> None:
        """Use the configured tracker, or adopt the one a previous host started, or start one."""
        cfg = self.config
        if cfg.tracker:
            host, port = parse_hostport(cfg.tracker)
            self.addr = f"{host}:{port}"
            if not tracker_answers(host, port):
                log(f"warning: the configured tracker {self.addr} does not answer yet")
            log(f"tracker: external, {self.addr}")
            return
        local = "127.0.0.1" if cfg.tracker_bind in ("0.0.0.0", "") else ("::1" if cfg.tracker_bind == "::"
                                                                         else cfg.tracker_bind)
        self.addr = f"{local}:{cfg.tracker_port}"
        state_path = self.farm.tracker_state
        if tracker_answers(local, cfg.tracker_port):
            state = json.loads(state_path.read_text()) if state_path.is_file() else {}
            if process_alive(state.get("pid"), state.get("started")) and state.get("port") == cfg.tracker_port:
                self.pid = (state["pid"], state["started"])
                log(f"tracker: {self.addr}, still running from before (pid {state['pid']}); "
                     "its agents stay registered")
            else:
                log(f"tracker: {self.addr} is already served by another process; using it")
            return
        self._start_own()

    def _start_own(self) -> None:
        """Start ``tunefarm tracker`` on the configured port and wait until it answers."""
        cfg = self.config
        local = parse_hostport(self.addr)[0]
        args = ["tracker", "--host", cfg.tracker_bind, "--port", cfg.tracker_port]
        for key in cfg.open_keys:
            args += ["--open-key", key]
        proc = start_tunefarm(args, log_path=self.farm.tracker_log)
        deadline = time.monotonic() + TRACKER_START_S
        while not tracker_answers(local, cfg.tracker_port):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = self.farm.tracker_log.read_text(errors="replace").strip().splitlines()[-1:]
                if proc.poll() is None:
                    stop_group(proc.pid, None)
                raise TunefarmError(f"the tracker on {cfg.tracker_bind}:{cfg.tracker_port} did not start"
                                    + (f": {tail[0]}" if tail else ""))
            time.sleep(0.3)
        started = psutil.Process(proc.pid).create_time()
        self.pid, self.proc = (proc.pid, started), proc
        self.farm.tracker_state.write_text(json.dumps({"pid": proc.pid, "started": started,
                                                       "port": cfg.tracker_port}))
        log(f"tracker: started on {cfg.tracker_bind}:{cfg.tracker_port} (pid {proc.pid}); "
             f"log {self.farm.tracker_log}")

    def check(self) -> None:
        """If the tracker this host runs has died (killed, crashed), start it again on the same port; the
        agents register again by themselves. An external tracker, or one another process serves, is left
        to whoever runs it. Blocking: call from a pool thread."""
        with self._lock:
            if self._stopped or self.pid is None or process_alive(*self.pid) is not None:
                return
            pid, started = self.pid
            code = self.proc.poll() if self.proc is not None and self.proc.pid == pid else None
            log(f"tracker (pid {pid}) died" + (f" with exit code {code}" if code is not None else "")
                + f"; starting it again on port {self.config.tracker_port}")
            # What is left of it (TVM's tracker runs in a child process of `tunefarm tracker`, which may
            # outlive it) would hold the port.
            kill_group_leftovers(pid, started)
            self.pid = self.proc = None
            try:
                self._start_own()
            except TunefarmError as err:
                log(f"error: {err}; trying again in a few seconds")
                self.pid = (pid, started)  # still ours to restart: the next check tries again

    def devices(self) -> list[dict[str, Any]]:
        """The tracker's view per key (blocking: call from a pool thread)."""
        from tunefarm.tracker.client import TrackerClient  # pylint: disable=import-outside-toplevel

        host, port = parse_hostport(self.addr)
        with TrackerClient(host, port, timeout=3.0) as client:
            return client.devices()

    def stop(self) -> None:
        """Stop the tracker this host started (an external one is left alone)."""
        with self._lock:
            self._stopped = True
            if self.pid is not None:
                log("stopping the tracker")
                stop_group(*self.pid)
                self.farm.tracker_state.unlink(missing_ok=True)
