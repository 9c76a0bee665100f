"""``tunefarm quickstart``: the whole farm on localhost in one command.

Starts a real tracker and one real agent (``tunefarm tracker`` / ``tunefarm agent``, as a user
would) on free loopback ports, runs the embedded job (configs/jobs/quickstart.yaml) against
them, prints the report and stops both. Their logs land beside the job's, under logs/quickstart/.
"""
from __future__ import annotations

from pathlib import Path

from tunefarm.core.errors import TunefarmError
from tunefarm.core.jobspec import load_job
from tunefarm.core.procs import free_port, start_tunefarm, stop_process, wait_until

DEFAULT_JOB = Path(__file__).resolve().parents[2] / "configs" / "jobs" / "quickstart.yaml"


def run_quickstart(job_file: str | None = None, logs_dir: str = "logs") -> dict:
    from tunefarm.host.tuning import _console, run_job  # pylint: disable=import-outside-toplevel
    from tunefarm.tracker.client import TrackerClient, check_tracker  # pylint: disable=import-outside-toplevel

    def reachable() -> bool:
        try:
            check_tracker("127.0.0.1", port)
            return True
        except TunefarmError:
            return False

    console = _console()
    job = load_job(job_file or DEFAULT_JOB)
    out_dir = Path(logs_dir) / job.name
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    tracker_proc = start_tunefarm(["tracker", "--host", "127.0.0.1", "--port", port], out_dir / "tracker.log")
    agent_proc = None
    try:
        try:
            wait_until(lambda: tracker_proc.poll() is not None or reachable(), 60, what="the tracker")
        except TimeoutError:
            raise TunefarmError(f"the tracker did not start; see {out_dir / 'tracker.log'}") from None
        if tracker_proc.poll() is not None:
            raise TunefarmError(f"the tracker exited at start; see {out_dir / 'tracker.log'}")
        client = TrackerClient("127.0.0.1", port)
        console.print(f"tracker on 127.0.0.1:{port} (log: {out_dir / 'tracker.log'})")
        agent_proc = start_tunefarm(["agent", "--tracker", f"127.0.0.1:{port}", "--key", job.device.key,
                                     "--host", "127.0.0.1", "--port", free_port()], out_dir / "agent.log")
        try:
            wait_until(lambda: agent_proc.poll() is not None or client.servers_for_key(job.device.key) > 0, 120,
                       what="the local agent")
        except TimeoutError:
            raise TunefarmError(f"the local agent did not register; see {out_dir / 'agent.log'}") from None
        if agent_proc.poll() is not None:
            raise TunefarmError(f"the local agent exited at start; see {out_dir / 'agent.log'}")
        console.print(f"agent on key '{job.device.key}' (log: {out_dir / 'agent.log'})")
        job.device.tracker = f"127.0.0.1:{port}"
        return run_job(job, logs_dir, evaluate=True, console=console)
    finally:
        if agent_proc is not None:
            stop_process(agent_proc)
        stop_process(tracker_proc)
