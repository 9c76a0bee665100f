"""The host's tracker: an external one from the config, or the host's own ``tunefarm tracker`` process. That
one runs in its own process group, so it outlives a ``kill -9`` of the host, and the next host adopts it
(``tracker.json`` in the farm dir says which process it is): its agents stay registered.
"""
from __future__ import annotations

import json
import time
from typing import Any

import psutil

from tunefarm.core.errors import TrackerUnreachable, TunefarmError
from tunefarm.core.procs import start_tunefarm
from tunefarm.core.wire import parse_hostport
from tunefarm.host.service.config import FarmConfig
from tunefarm.host.service.farmdir import FarmDir
from tunefarm.host.service.log import log
from tunefarm.host.service.pids import process_alive, stop_group

TRACKER_START_S = 60.0


def tracker_answers(host: str, port: int) -> bool:
    from tunefarm.tracker.client import check_tracker  # pylint: disable=import-outside-toplevel

    try:
        check_tracker(host, port, timeout=2.0)
        return True
    except TrackerUnreachable:
        return False


class HostTracker:
    """The TVM tracker the farm's jobs and agents use, as the host sees it: its address and, when this host
    started it (or adopted it after a restart), its process."""

    def __init__(self, config: FarmConfig, farm: FarmDir):
        self.config = config
        self.farm = farm
        self.addr = ""
        self.pid: tuple[int, float] | None = None  # the tracker this host started (or adopted)

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
        proc = start_tunefarm(["tracker", "--host", cfg.tracker_bind, "--port", cfg.tracker_port],
                              log_path=self.farm.tracker_log)
        deadline = time.monotonic() + TRACKER_START_S
        while not tracker_answers(local, cfg.tracker_port):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = self.farm.tracker_log.read_text(errors="replace").strip().splitlines()[-1:]
                raise TunefarmError(f"the tracker on {cfg.tracker_bind}:{cfg.tracker_port} did not start"
                                    + (f": {tail[0]}" if tail else ""))
            time.sleep(0.3)
        started = psutil.Process(proc.pid).create_time()
        self.pid = (proc.pid, started)
        state_path.write_text(json.dumps({"pid": proc.pid, "started": started, "port": cfg.tracker_port}))
        log(f"tracker: started on {cfg.tracker_bind}:{cfg.tracker_port} (pid {proc.pid}); "
             f"log {self.farm.tracker_log}")

    def devices(self) -> list[dict[str, Any]]:
        """The tracker's view per key (blocking: call from a pool thread)."""
        from tunefarm.tracker.client import TrackerClient  # pylint: disable=import-outside-toplevel

        host, port = parse_hostport(self.addr)
        with TrackerClient(host, port, timeout=3.0) as client:
            return client.devices()

    def stop(self) -> None:
        """Stop the tracker this host started (an external one is left alone)."""
        if self.pid is not None:
            log("stopping the tracker")
            stop_group(*self.pid)
            self.farm.tracker_state.unlink(missing_ok=True)
