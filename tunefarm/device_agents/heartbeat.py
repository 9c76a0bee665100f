"""An agent's reports to the host service (``--farm``): its DeviceInfo and state every few seconds, and
the tracker address the farm tells agents to use."""
from __future__ import annotations

import threading
import time

from tunefarm.core.farm import HEARTBEAT_PATH, HEARTBEAT_S, FarmHTTP, auth_header


def _log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} agent: {message}", flush=True)


def tracker_from_farm(url: str, token: str) -> str:
    """The tracker address the farm tells agents to register with."""
    return FarmHTTP(url, token).info()["tracker"]


class FarmHeartbeat(threading.Thread):
    """With ``--farm``: POST this agent's DeviceInfo and state to the host service every few seconds, so it
    shows in ``tunefarm devices --farm`` and the dashboard (offline once the heartbeats stop)."""

    def __init__(self, supervisor, farm_url: str, token: str):
        super().__init__(name="farm-heartbeat", daemon=True)
        self.supervisor = supervisor
        self.url = farm_url.rstrip("/") + HEARTBEAT_PATH
        self.token = token
        self.interval = HEARTBEAT_S
        self.failing: str | None = None

    def send(self, stopping: bool = False) -> None:
        import requests  # pylint: disable=import-outside-toplevel

        sup = self.supervisor
        body = {"info": sup.info.to_json(), "tracker": sup.tracker_addr, "listed": sup.listed,
                "busy": sup._child_in_session(), "interval_s": self.interval, "stopping": stopping}
        try:
            resp = requests.post(self.url, json=body, headers=auth_header(self.token), timeout=5)
            problem = None if resp.ok else (
                "the farm refused this agent's token (--token / TUNEFARM_TOKEN)" if resp.status_code == 401
                else f"HTTP {resp.status_code} from the farm")
        except requests.RequestException as err:
            problem = f"cannot reach the farm: {type(err).__name__}"
        if problem and problem != self.failing:
            _log(f"heartbeat to {self.url}: {problem}; retrying every {self.interval:g} s")
        elif not problem and (self.failing or self.failing is None) and not stopping:
            _log(f"reporting to the farm at {self.url.rsplit('/api/', 1)[0]}")
        self.failing = problem or ""

    def run(self) -> None:
        while not self.supervisor.stop.is_set():
            self.send()
            self.supervisor.stop.wait(self.interval)
