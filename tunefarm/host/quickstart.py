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


def prepare_onednn(events, log_path: Path) -> None:
    """oneDNN for the quickstart's placement: ``tunefarm runtime onednn`` (as a user runs it: built once, cached)
    so that the local agent runs oneDNN groups; where this machine cannot build it, one line says why and the
    model is placed on TVM's kernels only. Its output goes to ``log_path``."""
    # pylint: disable=import-outside-toplevel
    from tunefarm.core import onednn
    from tunefarm.core.procs import start_tunefarm, stop_process

    if onednn.disabled():
        return
    with events.status("oneDNN: its runtime plugin for this TVM (`tunefarm runtime onednn`: built once, cached)"):
        proc = start_tunefarm(["runtime", "onednn"], log_path=log_path)
        try:
            code = proc.wait(900)
        finally:
            stop_process(proc)
    from rich.markup import escape

    lines = [escape(l) for l in log_path.read_text(errors="replace").splitlines() if l.strip()]
    if code == 0:
        events.print(f"oneDNN: {lines[-1] if lines else 'plugin ready'} (operator groups go to oneDNN where it "
                     "measures faster)")
    else:
        events.print(f"[yellow]oneDNN: not available ({lines[-1] if lines else f'exit {code}'}); the model stays on "
                     f"TVM's kernels (log: {log_path})[/]")


def run_quickstart(job_file: str | None = None, logs_dir: str = "logs") -> dict:
    from tunefarm.host.console import ConsoleEvents  # pylint: disable=import-outside-toplevel
    from tunefarm.host.tuning.job import run_job  # pylint: disable=import-outside-toplevel

    events = ConsoleEvents()
    job = load_job(job_file or DEFAULT_JOB)
    out_dir = Path(logs_dir) / job.name
    out_dir.mkdir(parents=True, exist_ok=True)
    prepare_onednn(events, out_dir / "onednn.log")
    with LocalFarm(out_dir) as farm:
        events.print(f"tracker on {farm.addr} (log: {out_dir / 'tracker.log'})")
        farm.add_agent(job.device.key, name="agent")
        events.print(f"agent on key '{job.device.key}' (log: {out_dir / 'agent.log'})")
        job.device.tracker = farm.addr
        return run_job(job, logs_dir, evaluate=True, events=events)
