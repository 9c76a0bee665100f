"""``tunefarm agent``: join this machine to the farm and keep it joined.

The agent probes the machine, resolves the target it serves, then supervises one child process
(:mod:`tunefarm.device_agents.rpc_server`, the stock TVM RPC server) that registers with the tracker.
The stock server already reconnects to a tracker that comes back within about 60 s; the agent covers
the rest: it restarts the child when it exits (tracker away for longer, a crashed session) with
backoff, and when the tracker is reachable but has not listed this agent for a while (a listen
loop that died while its process lives).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import click

from tunefarm.core.errors import TrackerUnreachable, TunefarmError
from tunefarm.core.procs import popen_waiter, start_process, stop_group
from tunefarm.core.threads import THREADS_ENV, keep_tvm_threads_inside, resolve_threads, thread_env
from tunefarm.core.wire import INFO_FIELD, DeviceInfo, parse_hostport

CHECK_INTERVAL_S = 3.0  # how often the tracker is asked whether it lists us
# Reachable tracker, not listed for this long: restart the child. Its stock listen loop needs up to
# ~3 s to re-register after a tracker restart (2 s ping + the 1 s retry rpc_server sets; stock 5 s), so
# stay well above that.
UNLISTED_RESTART_S = 15.0
# ... counted from when the child listens: before that it is still importing (TVM, a search worker's
# MetaSchedule), which takes longer than that on a small board. A child not listening after this long is stuck.
STARTUP_LIMIT_S = 300.0
UNLISTED_RESTART_ENV = "TUNEFARM_AGENT_UNLISTED_RESTART_S"
BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 10.0
HEALTHY_AFTER_S = 30.0  # a child that ran this long resets the backoff
STOP_GRACE_S = 5.0
PORT_RANGE = 100


# 'gpu<i>' in a child of `tunefarm agent --gpus` (device_agents.gpus.TAG_ENV): its lines say which card
_NAME = " ".join(("agent", os.environ.get("TUNEFARM_AGENT_TAG", ""))).strip()


def _log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {_NAME}: {message}", flush=True)


def _warn(message: str) -> None:
    click.echo(f"tunefarm: warning: {message}", err=True)


def _print_summary(info: DeviceInfo, tracker: str, compiler: str, threads_from: str) -> None:
    cuda = ", ".join(("gpu" + str(d["gpu"]) + " " if "gpu" in d else "") + f"{d.get('name')} "
                     f"(sm_{str(d.get('compute_capability', '')).replace('.', '')})" for d in info.cuda) or "none"
    opencl_devices = [d["name"] for p in info.opencl.get("platforms", []) for d in p.get("devices", [])]
    lines = [
        f"tunefarm agent {info.agent_id}",
        f"  key      {info.key}",
        f"  tracker  {tracker}",
        f"  target   {json.dumps(info.target, sort_keys=True)}",
        f"  cpu      {info.cpu_model} ({info.num_cores} cores)",
        f"  threads  {info.threads} ({threads_from}; TVM, PyTorch and ONNX Runtime runs here use this many)",
        (f"  peak     {info.peak_gflops:g} GFLOP/s (" + ("measured sgemm" if info.target.get("kind") == "llvm" else
                                                       "from the device's attributes") + "; a candidate faster "
         "than its FLOPs allow at four times this is rejected)") if info.peak_gflops else
        "  peak     unknown for this device (no timing floor; every new best is still measured twice)",
        f"  cc       {'yes (' + compiler + ')' if info.has_cc else 'NO'}",
        f"  cuda     {cuda}",
        f"  opencl   {', '.join(opencl_devices) or 'none'} (TVM runtime OpenCL: "
        f"{'yes' if info.opencl.get('tvm_runtime_opencl') else 'no'}" + (
            f"; {ocl['name']}: {ocl.get('max_threads_per_block')} work-items per work-group, "
            f"{ocl.get('max_shared_memory_per_block')} bytes local memory, warp size {ocl.get('warp_size')}"
            if (ocl := info.opencl.get("device") or {}).get("name") else "") + ")",
        f"  onednn   " + (f"yes (oneDNN {dnnl.get('version')}, {dnnl.get('isa')}, {dnnl.get('cpu_runtime')} threads: "
                            f"OMP_NUM_THREADS={info.threads}; {dnnl.get('plugin')})"
                            if (dnnl := info.vendor.get("onednn") or {}).get("available") else
                            f"no ({dnnl.get('reason', 'not probed')})"),
        f"  cuda-libs " + "; ".join(
            f"{name} " + (f"yes ({e.get('version', '?')}; {e.get('plugin')})" if e.get("available") else
                          f"no ({e.get('reason', 'not probed')})")
            for name in ("cublas", "cudnn") for e in [info.vendor.get(name) or {}]),
        f"  runners  {', '.join(info.runners)}",
        f"  tvm      {info.tvm_version}",
    ]
    if info.cuda and info.target.get("kind") == "llvm":
        lines.append(f"  hint     this agent serves the CPU; to serve {info.cuda[0].get('name')} instead, start it "
                     f"with --target '{json.dumps(info.cuda[0]['target'], sort_keys=True)}'")
    print("\n".join(lines), flush=True)


def _gpu_child_target(index: int, target: str, info: DeviceInfo) -> str:
    """A --gpus child's target: 'auto' is its one visible card's CUDA target; each card entry says its index."""
    for dev in info.cuda:
        dev["gpu"] = index  # nvidia-smi's index of the card (CUDA_VISIBLE_DEVICES); its own index here is 0
    if (target or "auto").strip() != "auto":
        return target
    if info.cuda:
        return json.dumps(info.cuda[0]["target"])
    _warn(f"gpu{index}: no CUDA device visible (CUDA_VISIBLE_DEVICES={index}): this agent serves this machine's CPU")
    return target


def _stopped(pid: int) -> bool:
    import psutil  # pylint: disable=import-outside-toplevel

    try:
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.Error:
        return False


class _RPCServerSupervisor:
    """Runs the rpc_server child and restarts it when it dies or drops off the tracker."""

    def __init__(self, info: DeviceInfo, tracker_host: str, tracker_port: int, host: str, port: int,
                 custom_addr: str | None, child_env: dict[str, str] | None = None, serve: tuple[str, ...] = ()):
        self.info = info
        self.serve = tuple(serve)  # modules whose RPC functions the server registers besides the agent's
        self.child_env = dict(child_env or {})
        self.tracker_host = tracker_host
        self.tracker_port = tracker_port
        self.host = host
        self.port = port
        self.custom_addr = custom_addr
        self.stop = threading.Event()
        self.child: subprocess.Popen | None = None
        self.child_started = 0.0
        self.child_listening: float | None = None  # when the child was first seen listening
        self.backoff = BACKOFF_START_S
        self.listed = False
        self.tracker_down = False
        self.unlisted_since: float | None = None
        self.unlisted_restart_s = float(os.environ.get(UNLISTED_RESTART_ENV, UNLISTED_RESTART_S))

    @property
    def tracker_addr(self) -> str:
        return f"{self.tracker_host}:{self.tracker_port}"

    def _command(self) -> list[str]:
        cmd = [sys.executable, "-m", "tunefarm.device_agents.rpc_server",
               "--tracker", self.tracker_addr, "--key", self.info.key, "--host", self.host,
               "--port", str(self.port), "--port-end", str(self.port + PORT_RANGE),
               "--info-json", self.info.dumps(), "--parent-pid", str(os.getpid())]
        if self.custom_addr:
            cmd += ["--custom-addr", self.custom_addr]
        for module in self.serve:
            cmd += ["--serve", module]
        return cmd

    def start_child(self) -> None:
        # TVM sizes its CPU thread pool once, from TVM_NUM_THREADS, when the pool first starts (in the
        # sessions forked from the child); without it TVM takes hardware_concurrency()/2 on x86-64.
        # oneDNN's OpenMP pool (and PyTorch's) gets the same count: both pools run in one session process.
        env = dict(os.environ, PYTHONUNBUFFERED="1", **thread_env(self.info.threads), **self.child_env)
        keep_tvm_threads_inside(env)  # a pinned agent (taskset): TVM would bind its threads outside the mask
        # Its own session (and process group): stopping the child takes its forked RPC sessions
        # with it, and a Ctrl-C on the agent's terminal reaches only the agent, which stops it.
        self.child = start_process(self._command(), env=env, inherit_output=True)
        self.child_started = time.monotonic()
        self.child_listening = None
        self.listed = False
        self.unlisted_since = None
        _log(f"started rpc server (pid {self.child.pid}), ports [{self.port}, {self.port + PORT_RANGE})")

    def stop_child(self) -> int | None:
        child, self.child = self.child, None
        if child is None:
            return None
        if child.poll() is None:
            signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGKILL)
            if _stopped(child.pid):
                # Frozen (SIGSTOP): woken for a graceful stop it would first re-register with the tracker and be
                # handed out while dying; it has nothing to clean up that its process group's kill does not.
                signals = signals[1:]
            stop_group(child.pid, popen_waiter(child), STOP_GRACE_S, signals, wake=True)
        return child.poll()

    def _tracker_lists_us(self) -> bool | None:
        """True/False: whether the tracker lists this agent's server; None: tracker unreachable."""
        from tunefarm.tracker.client import TrackerClient, server_key  # pylint: disable=import-outside-toplevel

        try:
            with TrackerClient(self.tracker_host, self.tracker_port, timeout=3.0) as client:
                summary = client.summary()
        except TrackerUnreachable:
            return None
        for entry in summary.get("server_info", []):
            data = entry.get(INFO_FIELD)
            if (server_key(entry) == self.info.key and isinstance(data, dict)
                    and data.get("agent_id") == self.info.agent_id):
                return True
        return False

    def _child_in_session(self) -> bool:
        """Whether the child is serving an RPC session (the stock server forks one process per session)."""
        import psutil  # pylint: disable=import-outside-toplevel

        if self.child is None:
            return False
        try:
            return bool(psutil.Process(self.child.pid).children())
        except psutil.Error:
            return False

    def _listening_since(self, now: float) -> float | None:
        """When the child was first seen with a listening TCP socket (its RPC server up), or None yet."""
        if self.child_listening is None and self.child is not None:
            import psutil  # pylint: disable=import-outside-toplevel

            try:
                if any(c.status == psutil.CONN_LISTEN for c in psutil.Process(self.child.pid).net_connections("tcp")):
                    self.child_listening = now
            except psutil.Error:
                pass
        return self.child_listening

    def check_registration(self) -> None:
        now = time.monotonic()
        listed = self._tracker_lists_us()
        if listed is None:
            if not self.tracker_down:
                _log(f"tracker {self.tracker_addr} unreachable; the rpc server keeps retrying")
            self.tracker_down, self.listed, self.unlisted_since = True, False, None
            return
        if self.tracker_down:
            _log(f"tracker {self.tracker_addr} is reachable again")
        self.tracker_down = False
        if listed:
            if not self.listed:
                _log(f"registered with tracker {self.tracker_addr} under key '{self.info.key}'")
            self.listed, self.unlisted_since = True, None
            self.backoff = BACKOFF_START_S
            return
        if self.listed:
            _log(f"tracker {self.tracker_addr} no longer lists this agent")
        self.listed = False
        if self.unlisted_since is None:
            self.unlisted_since = now
        if self._child_in_session():
            # A server is off the tracker's list while it serves a session; a tracker that restarted
            # meanwhile lists it again once the session ends. Never kill a session for this.
            self.unlisted_since = now
            return
        listening = self._listening_since(now)
        if listening is None:
            if now - self.child_started > STARTUP_LIMIT_S:
                _log(f"rpc server not listening {now - self.child_started:.0f} s after it started; restarting it")
                self.stop_child()
            return  # still starting (imports): the unlisted clock starts when it listens
        if now - self.unlisted_since > self.unlisted_restart_s and now - listening > self.unlisted_restart_s:
            _log(f"tracker {self.tracker_addr} has not listed this agent for {now - self.unlisted_since:.0f} s "
                 "although it is reachable; restarting the rpc server")
            self.stop_child()

    def run(self) -> None:
        next_check = 0.0
        while not self.stop.is_set():
            if self.child is None:
                self.start_child()
                next_check = time.monotonic() + CHECK_INTERVAL_S
            code = self.child.poll()
            if code is not None:
                ran = time.monotonic() - self.child_started
                self.child = None
                if ran > HEALTHY_AFTER_S:
                    self.backoff = BACKOFF_START_S
                _log(f"rpc server exited with code {code} after {ran:.0f} s; restarting in {self.backoff:g} s")
                if self.stop.wait(self.backoff):
                    break
                self.backoff = min(self.backoff * 2, BACKOFF_MAX_S)
                continue
            if time.monotonic() >= next_check:
                self.check_registration()
                next_check = time.monotonic() + CHECK_INTERVAL_S
                if self.child is None:  # check_registration stopped it
                    continue
            self.stop.wait(0.5)
        code = self.stop_child()
        _log("stopped" + (f" (rpc server exit code {code})" if code is not None else ""))


def run_agent(tracker_addr: str, key: str, target: str = "auto", host: str = "0.0.0.0", port: int = 9090,
              custom_addr: str | None = None, farm_url: str | None = None, token: str | None = None,
              threads: int | None = None, farm_key_file: str | None = None, opencl: bool = False,
              tvm_source: str | None = None, serve: tuple[str, ...] = (), gpu_child: int | None = None,
              supervisor_pid: int | None = None) -> None:
    """Probe, resolve ``target``, check the tracker, then supervise the RPC server until SIGINT/SIGTERM.
    ``serve``: modules whose ``register()`` adds RPC functions to the server (the caller's choice: the CLI's
    search worker serves the host's search this way).

    ``opencl``: first make sure TVM's OpenCL backend is built for this wheel and works here
    (:func:`tunefarm.device_agents.opencl_runtime.ensure_runtime`, from ``tvm_source`` if it must be
    built), load it, and serve the OpenCL device (``target`` 'auto': the device's own limits).

    ``gpu_child``: this agent is card ``gpu_child``'s of a ``tunefarm agent --gpus`` supervisor (pid
    ``supervisor_pid``; device_agents.gpus), which made only that card visible: agent id ``<host>:gpu<i>``, and
    ``target`` 'auto' is the card's CUDA target (this machine's CPU when no CUDA device is visible)."""
    from tunefarm.device_agents.probe import (check_c_compiler, find_c_compiler, probe,  # pylint: disable=import-outside-toplevel
                                              resolve_target, target_warnings)
    from tunefarm.tracker.client import check_tracker  # pylint: disable=import-outside-toplevel

    tracker_host, tracker_port = parse_hostport(tracker_addr)
    agent_id = f"{socket.gethostname()}:{os.getpid()}"
    if supervisor_pid is not None:
        from tunefarm.device_agents.gpus import die_with_supervisor  # pylint: disable=import-outside-toplevel

        die_with_supervisor(supervisor_pid)
    if gpu_child is not None:
        from tunefarm.device_agents.gpus import gpu_agent_id  # pylint: disable=import-outside-toplevel

        agent_id = gpu_agent_id(gpu_child)
    runtime = None
    if opencl:
        from tunefarm.device_agents import opencl_runtime  # pylint: disable=import-outside-toplevel

        runtime = opencl_runtime.ensure_runtime(tvm_source, log=_log)
        # This process and the RPC server it starts (LD_LIBRARY_PATH, read at `import tvm`) load it.
        opencl_runtime.load_in_process(runtime.lib_dir)
    info = probe(key=key, agent_id=agent_id)
    if gpu_child is not None:
        target = _gpu_child_target(gpu_child, target, info)
    try:
        explicit = resolve_threads(threads)[0] if threads is not None or os.environ.get(THREADS_ENV) else None
        if runtime is not None and (target or "auto").strip() == "auto":
            target = json.dumps(opencl_runtime.opencl_target(runtime.device, info.target))
        info.target = resolve_target(target, info, threads=explicit)
        info.threads, threads_from = resolve_threads(threads, info.target)
        if gpu_child is not None and threads_from == "--threads":
            threads_from = "this card's share of the cores, from --gpus"
    except ValueError as err:
        raise TunefarmError(str(err)) from None
    from tunefarm.device_agents.probe import peak_gflops  # pylint: disable=import-outside-toplevel

    info.peak_gflops = peak_gflops(info.target, info)
    _print_summary(info, f"{tracker_host}:{tracker_port}", find_c_compiler() or "", threads_from)
    if not info.has_cc:
        _warn(f"no working C compiler on this machine ({check_c_compiler()[1]}): MetaSchedule's .tar "
              "candidates cannot be linked here, so every measurement on this agent will fail. "
              "Install gcc (or set CC).")
    for line in target_warnings(info.target, info):
        _warn(line)
    if host in ("0.0.0.0", "::", ""):
        _warn("TVM RPC has no authentication: anyone who can reach this agent's port can run code on it; "
              "keep it on a trusted network")
    if runtime is not None:
        for line in opencl_runtime.target_problems(info.target, runtime.device):
            _warn(line)
    check_tracker(tracker_host, tracker_port)
    from tunefarm.core.credential import KEY_ENV, load_farm_key  # pylint: disable=import-outside-toplevel

    # Checked here (one line if missing) and handed to the RPC server, which proves it at registration.
    farm_key = load_farm_key(farm_key_file, create=False).decode()

    supervisor = _RPCServerSupervisor(info, tracker_host, tracker_port, host, port, custom_addr,
                                      child_env={KEY_ENV: farm_key}, serve=serve)

    def on_signal(signum, _frame):
        _log(f"stopping (signal {signum})")
        supervisor.stop.set()

    old_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    from tunefarm.device_agents.heartbeat import FarmHeartbeat  # pylint: disable=import-outside-toplevel

    heartbeat = FarmHeartbeat(supervisor, farm_url, token) if farm_url else None
    if heartbeat is not None:
        heartbeat.start()
    try:
        supervisor.run()
    finally:
        supervisor.stop_child()
        if heartbeat is not None:
            heartbeat.join(6.0)
            heartbeat.send(stopping=True)  # shows offline at once, not after the heartbeat window
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
