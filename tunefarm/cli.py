"""The ``tunefarm`` command line: one sub-command per thing a user does.

Heavy modules (tvm, torch) are imported inside the commands so that ``--help`` answers at once.
Every user-facing failure is a :class:`TunefarmError`, printed as one line with a non-zero exit.
"""
from __future__ import annotations

import os

import click

from tunefarm.cli_common import one_line_errors as _one_line_errors
from tunefarm.cli_runtime import runtime
from tunefarm.core.errors import TunefarmError
from tunefarm.core.farm import DEFAULT_FARM_PORT, FARM_ENV
from tunefarm.core.wire import DEFAULT_TRACKER_PORT


# `tunefarm --help` lists the commands by where they run; each role's commands in this order.
ROLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Host (the machine that tunes)", ("quickstart", "tracker", "host", "tune", "search-worker")),
    ("Device (each machine that measures)", ("agent", "runtime")),
    ("Laptop (submit to the host service, follow, pull)",
     ("submit", "jobs", "follow", "pull", "cancel", "resume", "delete", "devices")),
    ("Analysis (tuned jobs, backends, cost models)", ("logs", "compare", "models")),
)


class RoleGroup(click.Group):
    """A click group whose help lists its commands under the role that runs them (ROLES); a command no role
    names is listed under "Other commands" (tests/test_cli_help.py keeps that section empty)."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        commands = {name: cmd for name in self.list_commands(ctx)
                    if (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden}
        if not commands:
            return
        limit = formatter.width - 6 - max(len(name) for name in commands)
        sections = [(title, [n for n in names if n in commands]) for title, names in ROLES]
        listed = {n for _, names in sections for n in names}
        sections.append(("Other commands", [n for n in commands if n not in listed]))
        for title, names in sections:
            if names:
                with formatter.section(title):
                    formatter.write_dl([(n, commands[n].get_short_help_str(limit)) for n in names])


@click.group(cls=RoleGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="tunefarm")
def main():
    """tunefarm: tune deep-learning models with TVM MetaSchedule on a farm of devices.

    \b
    Start here:
      tunefarm quickstart   tracker + local agent + a short tuning run + report, on localhost

    Then: a tracker on the host (tunefarm tracker, or tunefarm host serve with its job queue), an agent on
    each device (tunefarm agent --key KEY), and jobs tuned on the host (tunefarm tune JOB) or submitted from
    a laptop (tunefarm submit JOB; follow, pull).
    """
    from tunefarm.core.threads import keep_tvm_threads_inside  # pylint: disable=import-outside-toplevel

    keep_tvm_threads_inside(os.environ)  # pinned (taskset): TVM would bind its threads outside the mask


@main.command()
@click.option("--host", default="0.0.0.0", show_default=True,
              help="Address to listen on. TVM RPC has no authentication: keep it on a trusted network.")
@click.option("--port", default=DEFAULT_TRACKER_PORT, show_default=True, type=int, help="TCP port.")
@click.option("--open-key", "open_keys", multiple=True, metavar="KEY",
              help="Admit stock TVM servers and clients (no farm key) on this device key. Repeatable.")
@click.option("--farm-key-file", default=None, metavar="PATH",
              help="The farm key (default: $TUNEFARM_FARM_KEY, $TUNEFARM_FARM_KEY_FILE, ~/.config/tunefarm/farm.key, "
                   "created if missing). Agents and hosts prove it before they register or take a session.")
@_one_line_errors
def tracker(host, port, open_keys, farm_key_file):
    """Run TVM's RPC tracker; log devices joining and leaving. Ctrl-C/SIGTERM stops it.

    Only processes holding the farm key register servers or take sessions (a challenge-response on TVM's
    tracker protocol); every request is checked, a malformed one closes its connection.
    """
    from tunefarm.tracker.server import run_tracker

    run_tracker(host, port, open_keys=list(open_keys), farm_key_file=farm_key_file)


@main.command()
@click.option("--tracker", "tracker_addr", default=None, metavar="HOST:PORT",
              help="Tracker address (default with --farm: the farm's tracker).")
@click.option("--key", required=True, help="Device key to register under (several agents may share one).")
@click.option("--target", default="auto", show_default=True,
              help="'auto' (probe this machine), a preset name (see configs/targets/), or a target JSON dict.")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address the RPC server listens on.")
@click.option("--port", default=9090, show_default=True, type=int, help="First RPC port to try.")
@click.option("--custom-addr", default=None, help="Address to advertise to the tracker (default: as seen by it).")
@click.option("--farm", default=None, metavar="URL",
              help="Also report to this host service (heartbeat: shows in `tunefarm devices --farm` and the "
                   "dashboard). Default: $TUNEFARM_FARM if set.")
@click.option("--token", default=None, help="The farm's token (better: $TUNEFARM_TOKEN or the client config).")
@click.option("--threads", type=int, default=None,
              help="Threads of this agent's TVM runtime (and of its PyTorch / ONNX Runtime runs); also the "
                   "target's num-cores. Default: $TVM_NUM_THREADS, else the target's num-cores, else the "
                   "physical cores this process may run on.")
@click.option("--farm-key-file", default=None, metavar="PATH",
              help="The farm key, a copy of the tracker host's (default: $TUNEFARM_FARM_KEY, "
                   "$TUNEFARM_FARM_KEY_FILE, ~/.config/tunefarm/farm.key).")
@click.option("--opencl", is_flag=True,
              help="Serve this machine's OpenCL device: build TVM's OpenCL backend for the installed wheel (once, "
                   "cached; see `tunefarm runtime opencl`), check it, and default the target to the device's own "
                   "limits.")
@click.option("--tvm-source", default=None, metavar="PATH",
              help="With --opencl: the TVM source tree to build the backend from (default: $TUNEFARM_TVM_SOURCE; "
                   "needed only the first time).")
@click.option("--gpus", default=None, metavar="CARDS",
              help="'all' (every card nvidia-smi -L lists) or card indices such as 0,1: one agent per GPU, "
                   "supervised as one command; each sees only its card, has its own ports (PORT + 100*n), the id "
                   "HOSTNAME:gpuI and a share of the cores; a crashed one is restarted. See docs/multi-gpu.md.")
@click.option("--gpu-child", type=int, default=None, hidden=True)  # set by --gpus for each card's agent
@click.option("--supervisor-pid", type=int, default=None, hidden=True)
@_one_line_errors
def agent(tracker_addr, key, target, host, port, custom_addr, farm, token, threads, farm_key_file, opencl,
          tvm_source, gpus, gpu_child, supervisor_pid):
    """Join this machine to the farm: a supervised tvm.rpc server registered under KEY.

    The agent probes the machine (CPU model and flags -> llvm target with mcpu and num-cores; CUDA; OpenCL),
    sets the thread count of its TVM runtime (TVM's own default is half the hardware threads on x86-64),
    prints the target and threads it serves, re-registers when the tracker comes back, and restarts its RPC server
    if the server's loop dies. With --gpus: one such agent per GPU card, with its card's target and a share of
    the cores (docs/multi-gpu.md).
    """
    from tunefarm.device_agents.agent import run_agent

    if gpus is not None:
        from tunefarm.device_agents.gpus import parse_gpus

        parse_gpus(gpus)  # garbage is one line before anything else
        if opencl:
            raise TunefarmError("--gpus starts one agent per CUDA card; --opencl serves one OpenCL device")
    farm_url = None
    if farm or os.environ.get(FARM_ENV):
        from tunefarm.core.farm import farm_settings

        farm_url, token = farm_settings(farm, token)
        if tracker_addr is None:
            from tunefarm.device_agents.heartbeat import tracker_from_farm

            tracker_addr = tracker_from_farm(farm_url, token)
    if tracker_addr is None:
        raise TunefarmError("give the tracker (--tracker HOST:PORT) or the farm (--farm URL)")
    if tvm_source and not opencl:
        raise TunefarmError("--tvm-source is for --opencl (the source of TVM's OpenCL backend)")
    if gpus is not None:
        from tunefarm.device_agents.gpus import run_gpu_agents

        run_gpu_agents(gpus, tracker_addr, key, target=target, host=host, port=port, custom_addr=custom_addr,
                       farm_url=farm_url, token=token, threads=threads, farm_key_file=farm_key_file)
        return
    run_agent(tracker_addr, key, target=target, host=host, port=port, custom_addr=custom_addr,
              farm_url=farm_url, token=token, threads=threads, farm_key_file=farm_key_file,
              opencl=opencl, tvm_source=tvm_source, gpu_child=gpu_child, supervisor_pid=supervisor_pid)


@main.command("search-worker")
@click.option("--tracker", "tracker_addr", required=True, metavar="HOST:PORT", help="The farm's tracker.")
@click.option("--key", default="search", show_default=True,
              help="Key to register under (a job's search.key; its search.workers asks for that many).")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address the RPC server listens on.")
@click.option("--port", default=9290, show_default=True, type=int, help="First RPC port to try.")
@click.option("--custom-addr", default=None, help="Address to advertise to the tracker (default: as seen by it).")
@click.option("--farm-key-file", default=None, metavar="PATH",
              help="The farm key, a copy of the tracker host's (default: $TUNEFARM_FARM_KEY, "
                   "$TUNEFARM_FARM_KEY_FILE, ~/.config/tunefarm/farm.key).")
@_one_line_errors
def search_worker(tracker_addr, key, host, port, custom_addr, farm_key_file):
    """Lend this machine's cores to the farm's search: a job with `search: {workers: N}` deals its tasks to N
    search workers, each running MetaSchedule's search and builds for its share on this machine's cores
    (pin it with taskset to give it fewer) and measuring on the job's device key; the host merges the records.

    A search worker is a farm agent on KEY whose RPC server also serves the search
    (tunefarm.host.search_workers.worker); it needs this package's host dependencies (TVM, xgboost) and must reach
    the tracker and the device agents.
    """
    from tunefarm.device_agents.agent import run_agent

    run_agent(tracker_addr, key, target="auto", host=host, port=port, custom_addr=custom_addr,
              farm_key_file=farm_key_file, serve=("tunefarm.host.search_workers.worker",))


@main.command()
@click.option("--tracker", "tracker_addr", default=None, metavar="HOST:PORT", help="Ask this tracker.")
@click.option("--farm", default=None, metavar="URL",
              help="Ask this host service (devices that report to it: online/offline, busy, job).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_one_line_errors
def devices(tracker_addr, farm, as_json):
    """Table of device keys: agents, free/busy/pending, and what each agent serves.

    With --farm (or $TUNEFARM_FARM, or the client config, and no --tracker): the devices that report to the
    host service: online/offline, busy, last seen, the job on their key.
    """
    if tracker_addr and farm:
        raise TunefarmError("give --tracker or --farm, not both")
    if tracker_addr:
        from tunefarm.tracker.client import print_devices

        print_devices(tracker_addr, as_json=as_json)
        return
    from tunefarm.core.farm import configured_farm

    if not (farm or configured_farm()):
        raise TunefarmError("which devices? give --tracker HOST:PORT or --farm URL")
    from tunefarm.client.commands import print_farm_devices

    print_farm_devices(farm, as_json)


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--tracker", "tracker_addr", default=None, metavar="HOST:PORT",
              help="Override the job's tracker address.")
@click.option("--logs-dir", default="logs", show_default=True, help="Jobs write to LOGS_DIR/<job-name>/.")
@click.option("--skip-eval", is_flag=True, help="Tune only; do not compile, verify or time the model.")
@click.option("--plan", "plan_only", is_flag=True,
              help="Print the tasks, their weights, what the job dir already holds and the minimum budget; tune "
                   "nothing, write nothing; exit 2 after the plan if the budget is below that minimum. Needs the "
                   "tracker (and an agent on the key) only when target is from-agent.")
@click.option("--result-file", default=None, type=click.Path(dir_okay=False), hidden=True,
              help="Write how the run ended (exit code, one-line error) there as JSON (the farm service reads it).")
@_one_line_errors
def tune(job_file, tracker_addr, logs_dir, skip_eval, plan_only, result_file):
    """Tune the model described by JOB_FILE (YAML, see configs/jobs/) on the farm.

    Re-running the same job resumes: records already measured are kept and not measured again.
    After tuning, the model is compiled with the best records, run on the device through RPC,
    checked against PyTorch/ONNX Runtime and timed; report.json and report.md land in the job dir.
    Ctrl-C stops tuning; the records measured so far are kept.
    """
    import signal

    from tunefarm.host.tuning.job import plan_job_file, run_job_file

    # A background job of a non-interactive shell starts with SIGINT ignored (see follow): take it back.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if plan_only:
        plan_job_file(job_file, tracker_override=tracker_addr, logs_dir=logs_dir)
        return
    if result_file is None:
        run_job_file(job_file, tracker_override=tracker_addr, logs_dir=logs_dir, evaluate=not skip_eval)
        return
    from tunefarm.core.runresult import write_run_result

    try:
        run_job_file(job_file, tracker_override=tracker_addr, logs_dir=logs_dir, evaluate=not skip_eval)
    except TunefarmError as err:
        write_run_result(result_file, err.exit_code, str(err))
        raise
    except KeyboardInterrupt:
        write_run_result(result_file, 130, "interrupted")
        raise
    write_run_result(result_file, 0, None)


@main.command()
@click.option("--logs-dir", default="logs", show_default=True, help="The logs directory the jobs tuned into.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_one_line_errors
def models(logs_dir, as_json):
    """The farm's cost models: one per target (and TVM version), each trained on every trusted job's records.

    A model is rebuilt when a job for its target finishes, from the measured records of every job directory
    tuned for that target whose last run ended, whose timings were checked and in which no agent was caught
    faking one. New jobs for the target start from it (tuning.cost_model: xgb-farm, the default when one
    exists; xgb starts cold). Kept under LOGS_DIR/.cost_models/ as NumPy arrays and XGBoost's JSON model
    (nothing pickled).
    """
    import json

    from tunefarm.host.tuning.farm_model import list_models, models_root

    found = list_models(logs_dir)
    if as_json:
        click.echo(json.dumps(found, indent=2, sort_keys=True))
        return
    if not found:
        click.echo(f"no farm cost models under {models_root(logs_dir)} (one is built when a tuning job finishes)")
        return
    from tunefarm.core.targets import describe_target

    def plain(value) -> str:  # files on disk, printed: no control characters reach the terminal
        return "".join(c if c.isprintable() else "?" for c in str(value))

    for meta in found:
        jobs = meta.get("jobs") if isinstance(meta.get("jobs"), dict) else {}
        click.echo(plain(meta.get("key")))
        click.echo(f"  target    {plain(describe_target(meta.get('target') or {}))} (TVM {plain(meta.get('tvm'))})")
        click.echo(f"  trained   {plain(meta.get('records'))} records of {plain(meta.get('workloads'))} workloads, from "
                   + plain(", ".join(f"{k} ({v})" for k, v in sorted(jobs.items()))))
        click.echo(f"  took      training {plain(meta.get('train_s'))} s, features {plain(meta.get('extract_s'))} s; "
                   f"at {plain(meta.get('trained_at'))}")
        for name, why in sorted((meta.get("skipped") or {}).items()):
            click.echo(f"  not from  {plain(name)}: {plain(why)}")


@main.group()
def logs():
    """Inspect and export tuning logs (MetaSchedule JSON databases)."""


@logs.command("best")
@click.argument("job_dir", type=click.Path(file_okay=False))
@click.option("-o", "--output", required=True, help="Directory to write a JSONDatabase with the best records.")
@_one_line_errors
def logs_best(job_dir, output):
    """Write the best record per workload as a JSONDatabase that plain TVM can apply."""
    from tunefarm.host.tuning.logs import export_best

    export_best(job_dir, output, say=print)


@logs.command("show")
@click.argument("job_dir", type=click.Path(file_okay=False))
@_one_line_errors
def logs_show(job_dir):
    """Per-task table: trials, best latency, whether the task has a tuned schedule."""
    from rich.console import Console

    from tunefarm.host.console import ConsoleEvents
    from tunefarm.host.tuning.logs import show

    show(job_dir, ConsoleEvents(Console()))


@main.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option("--tracker", "tracker_addr", default=None, metavar="HOST:PORT",
              help="Override the config's tracker address.")
@click.option("-o", "--output", default=None, metavar="DIR",
              help="Where report.md, report.json and the plots go (default: logs/compare-<name>/).")
@_one_line_errors
def compare(config_file, tracker_addr, output):
    """Compare backends on the farm: models x (device key, backend) rows from CONFIG_FILE (YAML).

    \b
    Backends: tvm-tuned (a tuning job's logs), tvm-untuned, torch, torch-compile, onnxruntime,
    tensorrt. Each row runs on an agent of its key through the tracker and an RPC session; its
    outputs are checked against the reference (PyTorch, or ONNX Runtime for ONNX models) and it is
    timed after warm-up over many samples (median, p90, p99, ...), with throughput and the speed-up
    against the config's baseline row. A row that cannot run (no agent on the key within
    device_wait_sec, a backend the device lacks such as TensorRT, no tuning logs) is reported with
    its reason, never with a number. Writes report.md, report.json, latency.png and tuning.png.
    Exits 3 if a row's outputs differ from the reference. Example: configs/compare/seed-resnet.yaml.
    """
    from tunefarm.host.compare import run_compare

    run_compare(config_file, tracker_override=tracker_addr, output=output)


@main.command()
@click.option("--job", "job_file", default=None, help="Job file (default: configs/jobs/quickstart.yaml).")
@click.option("--logs-dir", default="logs", show_default=True)
@_one_line_errors
def quickstart(job_file, logs_dir):
    """Tracker + one local agent on free loopback ports, a short tuning run, and the report."""
    from tunefarm.host.quickstart import run_quickstart

    run_quickstart(job_file=job_file, logs_dir=logs_dir)


# -- the host service and the laptop's commands -------------------------------------------------------------
_FARM_OPTION = click.option("--farm", default=None, metavar="URL",
                            help="The host service (default: $TUNEFARM_FARM, then ~/.config/tunefarm/client.yaml); "
                                 "the token comes from $TUNEFARM_TOKEN or that file.")


@main.group()
def host():
    """The host as a service: tracker, job queue, workers, HTTP API and dashboard."""


@host.command("serve")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
              help="Farm config (YAML, see configs/farm.yaml); options below override it.")
@click.option("--bind", default=None, help="Address of the HTTP API and dashboard [config default: 127.0.0.1].")
@click.option("--port", default=None, type=int, help=f"HTTP port [config default: {DEFAULT_FARM_PORT}].")
@click.option("--logs-dir", default=None, help="Job dirs and the farm's own files (LOGS_DIR/farm/) [logs].")
@click.option("--tracker", "tracker_addr", default=None, metavar="HOST:PORT",
              help="Use this external tracker instead of starting one.")
@click.option("--tracker-port", default=None, type=int, help=f"Port of the host's own tracker [{DEFAULT_TRACKER_PORT}].")
@_one_line_errors
def host_serve(config_file, bind, port, logs_dir, tracker_addr, tracker_port):
    """Run the host service until Ctrl-C/SIGTERM.

    Jobs submitted from laptops (tunefarm submit) wait in a queue kept in SQLite (LOGS_DIR/farm/) and run
    as `tunefarm tune` workers, one per device key at a time. A host stopped or killed mid-job resumes
    its unfinished jobs from their databases when it starts again. On the first start, a token is
    generated, printed and kept in LOGS_DIR/farm/token (mode 0600); every API call needs it.
    """
    from tunefarm.host.service.app import serve

    serve(config_file, bind=bind, port=port, logs_dir=logs_dir, tracker=tracker_addr, tracker_port=tracker_port)


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@_FARM_OPTION
@click.option("--skip-eval", is_flag=True, help="Tune only; do not compile, verify or time the model.")
@click.option("--follow", "follow_after", is_flag=True, help="Then follow its progress (like tunefarm follow).")
@_one_line_errors
def submit(job_file, farm, skip_eval, follow_after):
    """Queue JOB_FILE on the farm (an ONNX model file is uploaded with it). The job runs on the host."""
    from tunefarm.client import commands

    commands.submit(job_file, farm, skip_eval, follow_after)


@main.command()
@_FARM_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_one_line_errors
def jobs(farm, as_json):
    """The farm's jobs: queued, running, done, failed, cancelled."""
    from tunefarm.client import commands

    commands.list_jobs(farm, as_json)


@main.command()
@click.argument("job_id")
@_FARM_OPTION
@_one_line_errors
def follow(job_id, farm):
    """Live progress of JOB_ID: each measured batch as it lands. Ctrl-C stops following, not the job."""
    import signal

    from tunefarm.client import commands

    # A process started from a non-interactive shell's background job inherits SIGINT ignored, and Python
    # then leaves it ignored: Ctrl-C (or kill -INT) would not stop following. Take it back explicitly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    commands.follow(job_id, farm)


@main.command()
@click.argument("job_id")
@_FARM_OPTION
@_one_line_errors
def cancel(job_id, farm):
    """Cancel JOB_ID (queued or running). Its records are kept; tunefarm resume continues it."""
    from tunefarm.client import commands

    commands.cancel(job_id, farm)


@main.command()
@click.argument("job_id")
@_FARM_OPTION
@click.option("--trials", type=int, default=None, help="Raise the job's budget (max_trials_global) to N.")
@_one_line_errors
def resume(job_id, farm, trials):
    """Queue a failed or cancelled JOB_ID again (or a done one with more --trials); nothing is re-measured."""
    from tunefarm.client import commands

    commands.resume(job_id, farm, trials)


@main.command()
@click.argument("job_id")
@_FARM_OPTION
@_one_line_errors
def delete(job_id, farm):
    """Delete a finished, failed or cancelled JOB_ID from the farm, for good.

    Removes its queue entry, its spec, its uploaded model, its run log and its job directory on the host
    (the tuning database with every record: pull it first if you want to keep it). A queued or running
    job is refused: cancel it first.
    """
    from tunefarm.client import commands

    commands.delete(job_id, farm)


@main.command()
@click.argument("job_id")
@_FARM_OPTION
@click.option("-o", "--output", required=True, metavar="DIR", help="An empty or new directory.")
@_one_line_errors
def pull(job_id, farm, output):
    """Download JOB_ID: best records (best/), the full database (database/), report and plots."""
    from tunefarm.client import commands

    commands.pull(job_id, farm, output)


main.add_command(runtime)

if __name__ == "__main__":
    main()
