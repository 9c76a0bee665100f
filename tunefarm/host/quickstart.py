"""``tunefarm quickstart``: the whole farm on localhost in one command.

Starts a real tracker and one real agent (``tunefarm tracker`` / ``tunefarm agent``, as a user
would) on free loopback ports, runs the embedded job (configs/jobs/quickstart.yaml) against
them, prints the report and stops both. Their logs land beside the job's, under logs/quickstart/.
"""
from __future__ import annotations

from pathlib import Path

from tunefarm.core.jobspec import load_job
from tunefarm.testing.localfarm import LocalFarm

DEFAULT_JOB = Path(__file__).resolve().parents[2] / "configs" / "jobs" / "quickstart.yaml"


def run_quickstart(job_file: str | None = None, logs_dir: str = "logs") -> dict:
    from tunefarm.host.console import ConsoleEvents  # pylint: disable=import-outside-toplevel
    from tunefarm.host.tuning.job import run_job  # pylint: disable=import-outside-toplevel

    events = ConsoleEvents()
    job = load_job(job_file or DEFAULT_JOB)
    out_dir = Path(logs_dir) / job.name
    out_dir.mkdir(parents=True, exist_ok=True)
    with LocalFarm(out_dir) as farm:
        events.print(f"tracker on {farm.addr} (log: {out_dir / 'tracker.log'})")
        farm.add_agent(job.device.key, name="agent")
        events.print(f"agent on key '{job.device.key}' (log: {out_dir / 'agent.log'})")
        job.device.tracker = farm.addr
        return run_job(job, logs_dir, evaluate=True, events=events)
