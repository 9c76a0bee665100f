"""The laptop's commands: ``tunefarm submit / jobs / follow / cancel / resume / delete / pull`` and
``tunefarm devices --farm``, printing what :class:`~tunefarm.client.api.FarmClient` returns.

Every failure is a one-line :class:`TunefarmError` (the CLI prints it and exits non-zero).
"""
from __future__ import annotations

import json
import tarfile
import tempfile
import time
from pathlib import Path

from tunefarm.client.api import FarmClient
from tunefarm.core.errors import TunefarmError
from tunefarm.core.safe_text import printable
from tunefarm.core.farm import FarmUnreachable

FOLLOW_RECONNECT_S = 300.0  # how long `follow` keeps trying while the farm is away (e.g. restarting)


def _console():
    from rich.console import Console  # pylint: disable=import-outside-toplevel

    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=max(console.width, 160))
    return console


def _text(value) -> str:
    """Agent- or user-supplied text (an agent id, a key, a target, a model, an error) as it reads: rich would
    take ``[/x]`` in it for markup (and fail on it), and a terminal would obey its control characters (written
    as ``\\xNN`` escapes instead, :func:`tunefarm.core.safe_text.printable`)."""
    from rich.markup import escape  # pylint: disable=import-outside-toplevel

    return escape(printable(value))


def _ms(value) -> str:
    return "-" if value is None else f"{value:.4g} ms"


def _ago(when) -> str:
    if not when:
        return "-"
    secs = max(0, time.time() - when)
    if secs < 90:
        return f"{secs:.0f} s ago"
    if secs < 5400:
        return f"{secs / 60:.0f} min ago"
    return f"{secs / 3600:.1f} h ago"


def submit(job_file: str, farm: str | None, skip_eval: bool, follow_after: bool) -> None:
    client = FarmClient.from_settings(farm)
    job = client.submit(job_file, skip_eval=skip_eval)
    where = f"position {job.get('queue_position')} on key '{job['key']}'" if job["state"] == "queued" else job["state"]
    print(printable(f"submitted {job['id']} to {client.url} ({job['model']}, {job['budget']} trials; {where})"))
    print(printable(f"  follow: tunefarm follow {job['id']}    pull: tunefarm pull {job['id']} -o DIR"))
    if follow_after:
        follow(job["id"], farm)


def list_jobs(farm: str | None, as_json: bool) -> None:
    client = FarmClient.from_settings(farm)
    jobs = client.jobs()
    if as_json:
        print(json.dumps(jobs, indent=2))
        return
    from rich.table import Table  # pylint: disable=import-outside-toplevel

    console = _console()
    if not jobs:
        console.print(f"no jobs on {_text(client.url)} (submit one: tunefarm submit JOB.yaml)")
        return
    table = Table(title=f"jobs on {_text(client.url)}")
    for col in ("job", "state", "key", "model", "trials", "best est.", "attempts", "submitted", "note"):
        table.add_column(col, justify="right" if col in ("trials", "attempts") else "left")
    colors = {"queued": "yellow", "running": "cyan", "done": "green", "failed": "red", "cancelled": "magenta"}
    for job in jobs:
        note = job.get("error") or (f"queue position {job['queue_position']}" if job.get("queue_position") else "")
        table.add_row(_text(job["id"]), f"[{colors.get(job['state'], 'white')}]{_text(job['state'])}[/]",
                      _text(job["key"]), _text(job["model"]), f"{job['trials']}/{job['budget']}",
                      _ms(job.get("best_ms")), str(job["attempts"]), _ago(job["created"]), _text(note))
    console.print(table)


def follow(job_id: str, farm: str | None) -> None:
    """Print each measured batch as it lands, with a progress bar, until the job is final.

    Ctrl-C stops following, not the job. While the farm is away (restarting), keeps retrying.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # pylint: disable=import-outside-toplevel

    client = FarmClient.from_settings(farm)
    job = client.job(job_id)
    console = _console()
    progress = Progress(TextColumn(f"[bold]{_text(job_id)}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console)
    bar = progress.add_task("tune", total=max(job["budget"], 1), completed=0, status=job["state"])
    line, state, lost_since = 0, None, None
    try:
        with progress:
            while True:
                try:
                    for event in client.events(job_id, start=line):
                        lost_since = None
                        if event["type"] == "progress":
                            line = event["n"] + 1
                            est = event.get("estimated_ms")
                            progress.console.print(
                                f"{time.strftime('%H:%M:%S', time.localtime(event['time']))}  "
                                f"batch of {event['batch']} on {_text(event['task'])}"
                                + (f" ({event['errors']} failed)" if event.get("errors") else "")
                                + f"  trials {event['trials']}/{job['budget']}  best est. {_ms(est)}")
                            progress.update(bar, completed=min(event["trials"], job["budget"]))
                        elif event["type"] == "state":
                            job = event["job"]
                            progress.update(bar, total=max(job["budget"], 1), status=job["state"])
                            if (job["state"], job["attempts"]) != state:
                                state = (job["state"], job["attempts"])
                                detail = (f" (attempt {job['attempts']})" if job["state"] == "running" else
                                          f" (position {job.get('queue_position')} on key '{_text(job['key'])}')"
                                          if job["state"] == "queued" else "")
                                progress.console.print(f"{time.strftime('%H:%M:%S')}  job {_text(job_id)}: "
                                                       f"{_text(job['state'])}{detail}")
                    if job["state"] in ("done", "failed", "cancelled"):
                        break
                except FarmUnreachable as err:
                    lost_since = lost_since or time.monotonic()
                    if time.monotonic() - lost_since > FOLLOW_RECONNECT_S:
                        raise
                    progress.console.print(f"{time.strftime('%H:%M:%S')}  {_text(err)}; retrying (the job goes on at "
                                           "the farm; Ctrl-C stops following)")
                    time.sleep(2.0)
    except KeyboardInterrupt:
        console.print(f"stopped following; {_text(job_id)} goes on at the farm (tunefarm follow {_text(job_id)} to "
                      "follow again)")
        return
    if job["state"] == "done":
        console.print(f"job {_text(job_id)} done: {job['trials']} trials, best est. {_ms(job.get('best_ms'))}; "
                      f"pull it: tunefarm pull {_text(job_id)} -o DIR")
    elif job["state"] == "failed":
        raise TunefarmError(f"job {job_id} failed: {job.get('error')}", exit_code=3)
    else:
        raise TunefarmError(f"job {job_id} was cancelled (tunefarm resume {job_id} continues it)", exit_code=3)


def cancel(job_id: str, farm: str | None) -> None:
    job = FarmClient.from_settings(farm).cancel(job_id)
    print(printable(f"{job_id}: {'cancelling (its worker is stopping)' if job['state'] == 'running' else job['state']}; "
                    f"tunefarm resume {job_id} continues it from its database"))


def resume(job_id: str, farm: str | None, trials: int | None) -> None:
    job = FarmClient.from_settings(farm).resume(job_id, trials)
    print(printable(f"{job_id}: {job['state']} ({job['trials']}/{job['budget']} trials measured; they are kept)"))


def delete(job_id: str, farm: str | None) -> None:
    result = FarmClient.from_settings(farm).delete(job_id)
    print(f"deleted {job_id}: its queue entry and {len(result['removed'])} of its files and directories "
          "(spec, upload, run log, job directory)")


def pull(job_id: str, farm: str | None, output: str) -> None:
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TunefarmError(f"{out} exists and is not an empty directory")
    client = FarmClient.from_settings(farm)
    client.job(job_id)  # a one-line 404 before anything is created
    with tempfile.TemporaryDirectory(prefix="tunefarm-pull-") as tmp:
        archive = Path(tmp) / "bundle.tar.gz"
        client.download_bundle(job_id, archive)
        out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(out, filter="data")  # no absolute paths, links out or device files
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    print(f"pulled {job_id} into {out}: best/ (best record per workload, a JSONDatabase), database/ "
          f"(every record), " + ", ".join(n for n in names if "/" not in n))
    print(f"  apply: ms.database.JSONDatabase(work_dir='{out / 'best'}') with MetaScheduleApplyDatabase "
          "(see the README)")


def print_farm_devices(farm: str | None, as_json: bool) -> None:
    client = FarmClient.from_settings(farm)
    view = client.devices()
    if as_json:
        print(json.dumps(view, indent=2, sort_keys=True))
        return
    from rich.table import Table  # pylint: disable=import-outside-toplevel

    from tunefarm.core.targets import describe_target  # pylint: disable=import-outside-toplevel

    console = _console()
    if view.get("tracker_error"):
        console.print(f"[red]tracker:[/] {_text(view['tracker_error'])}")
    if not view["devices"]:
        console.print(f"no devices have reported to {_text(client.url)} (start one: tunefarm agent --farm "
                      f"{_text(client.url)} --key KEY)")
        return
    table = Table(title=f"devices of {_text(client.url)} (tracker {_text(view['tracker'])})")
    for col in ("key", "agent", "status", "last seen", "target", "cpu", "job"):
        table.add_column(col)
    for dev in view["devices"]:
        status = dev["status"] + (", busy" if dev["busy"] else "")
        color = "green" if dev["status"] == "online" else "red"
        seen = f"{dev['last_seen_s']:.0f} s ago" if dev["last_seen_s"] is not None else dev["source"]
        table.add_row(_text(dev["key"]), _text(dev["agent_id"]), f"[{color}]{_text(status)}[/]", _text(seen),
                      _text(describe_target(dev["target"])),
                      _text(f"{dev['cpu'] or '?'} ({dev['num_cores']} cores, {dev.get('threads') or '?'} threads)"),
                      _text(dev["job"] or "-"))
    console.print(table)
