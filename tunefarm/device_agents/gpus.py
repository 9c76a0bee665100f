"""``tunefarm agent --gpus all|0,1,...``: one agent per GPU of this machine, supervised as one command.

Each card gets its own ``tunefarm agent`` process (a *child*), started with:

* only its card visible: ``CUDA_VISIBLE_DEVICES=<i>`` (with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, so that ``i`` is
  the card ``nvidia-smi`` calls ``GPU i``), and NVLink multicast off (``NCCL_NVLS_ENABLE=0``,
  ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``, ``NVSHMEM_DISABLE_NVLS=1``: the farm needs no NCCL, and a program that
  uses multicast can take a shared host's GPUs out of service);
* its own RPC port range, ``[PORT + i*100, PORT + (i+1)*100)`` for the i-th card of the list (disjoint);
* an agent id naming the card, ``<hostname>:gpu<i>``, the same after every restart;
* its share of the CPU: ``TVM_NUM_THREADS`` / ``OMP_NUM_THREADS`` = physical cores // cards (at least 1) and
  builds ``build_many`` runs at once = logical CPUs // cards (at least 1), unless ``--threads`` (or
  ``$TVM_NUM_THREADS``) gives each child a count; the child's DeviceInfo.threads says it;
* ``--target auto``: the card's own CUDA target (and peak, from its attributes), as the single agent's hint
  says; with no CUDA device visible (a machine without GPUs) the child serves this machine's CPU.

The supervisor restarts a child that exits (crash, kill -9) after a back-off (1 s doubling to 30 s, back to 1 s
once a child ran 60 s), logs each restart, and logs each card joining and leaving the tracker's list. One
Ctrl-C / SIGTERM stops every child (each stops its RPC server); a child whose supervisor dies gets SIGTERM
(Linux PDEATHSIG). A child that fails its very first start (a bad target, an unreachable tracker) stops them
all with its error, as the single agent would have.

``--gpus all`` takes every card ``nvidia-smi -L`` lists (TVM's CUDA runtime when there is no nvidia-smi); none
found is a one-line error. Explicit indices on a machine where no GPU is found are allowed, with a warning
line: the children then serve the CPU (a GPU box's supervision tried on a laptop or CI machine; what
tests/test_multi_gpu_agent.py does). On a machine with GPUs, an index it does not have is an error.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import click

from tunefarm.core.errors import TrackerUnreachable, TunefarmError
from tunefarm.core.procs import popen_waiter, signal_group, start_process
from tunefarm.device_agents.build_service import BUILD_WORKERS_ENV

MAX_GPUS = 64
PORT_RANGE = 100  # as device_agents.agent.PORT_RANGE: each child's RPC server tries [port, port + 100)
BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 30.0
HEALTHY_AFTER_S = 60.0  # a child that ran this long restarts after BACKOFF_START_S again
CHECK_INTERVAL_S = 3.0  # how often the tracker is asked which cards it lists
STOP_GRACE_S = 15.0  # a child stops its RPC server within ~5 s (device_agents.agent.STOP_GRACE_S)
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
TAG_ENV = "TUNEFARM_AGENT_TAG"  # 'gpu<i>': the child's log lines (agent and RPC server) say which card
_PR_SET_PDEATHSIG = 1


def _log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} agents: {message}", flush=True)


def _warn(message: str) -> None:
    click.echo(f"tunefarm: warning: {message}", err=True)


def gpu_agent_id(index: int) -> str:
    return f"{socket.gethostname()}:gpu{index}"


def parse_gpus(text: str) -> str | list[int]:
    """``--gpus``: ``'all'`` or the list of card indices; a one-line TunefarmError for anything else."""
    spec = str(text).strip()
    if spec.lower() == "all":
        return "all"
    parts = [p.strip() for p in spec.split(",")]
    if not spec or not all(re.fullmatch(r"\d{1,3}", p) for p in parts):
        raise TunefarmError(f"--gpus takes 'all' or card indices such as 0,1 (as nvidia-smi -L numbers them), "
                            f"got {text!r}")
    indices = [int(p) for p in parts]
    if len(set(indices)) != len(indices):
        raise TunefarmError(f"--gpus names a card twice: {text!r}")
    if len(indices) > MAX_GPUS or max(indices) >= MAX_GPUS:
        raise TunefarmError(f"--gpus: at most {MAX_GPUS} cards, indices below {MAX_GPUS}; got {text!r}")
    return indices


def _nvidia_smi_cards() -> list[tuple[int, str]] | None:
    """``[(index, name)]`` from ``nvidia-smi -L``; None when there is no working nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        proc = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None  # no driver loaded: ask CUDA
    return parse_nvidia_smi_list(proc.stdout)


def parse_nvidia_smi_list(text: str) -> list[tuple[int, str]]:
    """``nvidia-smi -L``'s ``GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-...)`` lines as ``[(0, 'NVIDIA H100 80GB
    HBM3')]`` (a card's MIG lines, indented, are not cards)."""
    return [(int(m.group(1)), m.group(2).strip()) for m in
            (re.match(r"GPU (\d+):\s*(.*?)\s*(\(UUID:.*)?$", line) for line in text.splitlines()) if m]


def find_gpus() -> tuple[list[tuple[int, str]], str]:
    """The cards of this machine as ``[(index, name)]`` and what said so."""
    cards = _nvidia_smi_cards()
    if cards is not None:
        return cards, "nvidia-smi -L"
    from tunefarm.device_agents.probe import probe_cuda  # pylint: disable=import-outside-toplevel

    env_mask = os.environ.pop("CUDA_VISIBLE_DEVICES", None)  # this process only looks; its children get their own
    try:
        return [(d["index"], d["name"]) for d in probe_cuda(MAX_GPUS)], "TVM's CUDA runtime, there being no nvidia-smi"
    finally:
        if env_mask is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = env_mask


def choose_cards(spec: str | list[int], found: list[tuple[int, str]], source: str) -> tuple[list[int], bool]:
    """The card indices to serve and whether they are real cards (False: explicit indices on a machine where
    no GPU was found; the children serve the CPU)."""
    known = dict(found)
    if spec == "all":
        if not found:
            raise TunefarmError(f"--gpus all: no GPU found on this machine (asked {source})")
        return sorted(known), True
    if not found:
        return list(spec), False
    missing = [i for i in spec if i not in known]
    if missing:
        raise TunefarmError(f"--gpus: no GPU {', '.join(map(str, missing))} on this machine ({source} lists "
                            f"{', '.join(f'{i} ({n})' for i, n in sorted(known.items()))})")
    return list(spec), True


def cpu_split(cards: int, threads: int | None) -> tuple[int, int, str]:
    """``(threads per child, parallel builds per child, the sentence that states the split)``."""
    from tunefarm.core.threads import usable_cores, usable_cpus  # pylint: disable=import-outside-toplevel

    cores, cpus = usable_cores(), usable_cpus()
    builds = max(1, cpus // cards)
    if threads is not None:
        each, how = threads, f"{threads} threads each as asked"
        if threads * cards > cores:
            how += f" ({threads * cards} in all on {cores} cores: they will contend)"
    else:
        each = max(1, cores // cards)
        how = f"{each} thread(s) each ({cores} cores // {cards})"
        if cores < cards:
            how += f" (fewer cores than cards: the agents share {cores})"
    return each, builds, (f"{cores} physical cores ({cpus} CPUs) split between {cards} agents: {how} "
                          f"(TVM_NUM_THREADS = OMP_NUM_THREADS), {builds} parallel build(s) each")


@dataclasses.dataclass
class _Child:
    index: int  # the card (CUDA_VISIBLE_DEVICES)
    port: int  # first port of its range
    cmd: list[str]
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    started: float = 0.0
    starts: int = 0
    next_start: float = 0.0
    backoff: float = BACKOFF_START_S
    listed: bool = False
    ever_listed: bool = False

    @property
    def name(self) -> str:
        return f"gpu{self.index}"


class GPUAgentsSupervisor:
    """Starts one child agent per card, restarts the ones that exit, stops them all on :attr:`stop`."""

    def __init__(self, children: list[_Child], key: str, tracker_host: str, tracker_port: int):
        self.children = children
        self.key = key
        self.tracker_host, self.tracker_port = tracker_host, tracker_port
        self.stop = threading.Event()
        self.tracker_down = False

    def _start(self, child: _Child) -> None:
        child.proc = start_process(child.cmd, env=child.env, inherit_output=True)
        child.started = time.monotonic()
        child.starts += 1
        _log(f"{child.name}: started agent {gpu_agent_id(child.index)} (pid {child.proc.pid}), "
             f"CUDA_VISIBLE_DEVICES={child.index}, ports [{child.port}, {child.port + PORT_RANGE})"
             + (f", start {child.starts}" if child.starts > 1 else ""))

    def _exited(self, child: _Child, code: int, now: float) -> None:
        ran = now - child.started
        child.proc, child.listed = None, False
        if child.starts == 1 and not child.ever_listed and code > 0:
            raise TunefarmError(f"the agent of gpu{child.index} failed at start (exit code {code}; its lines above "
                                "say why); stopped the others")
        if ran > HEALTHY_AFTER_S:
            child.backoff = BACKOFF_START_S
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        _log(f"{child.name}: agent {how} after {ran:.0f} s; restarting it in {child.backoff:g} s")
        child.next_start = now + child.backoff
        child.backoff = min(child.backoff * 2, BACKOFF_MAX_S)

    def _check_tracker(self) -> None:
        from tunefarm.core.wire import INFO_FIELD  # pylint: disable=import-outside-toplevel
        from tunefarm.tracker.client import TrackerClient, server_addr, server_key  # pylint: disable=import-outside-toplevel

        try:
            with TrackerClient(self.tracker_host, self.tracker_port, timeout=3.0) as client:
                summary = client.summary()
        except TrackerUnreachable:
            if not self.tracker_down:
                _log(f"tracker {self.tracker_host}:{self.tracker_port} unreachable; the agents keep retrying")
            self.tracker_down = True
            return
        if self.tracker_down:
            _log(f"tracker {self.tracker_host}:{self.tracker_port} is reachable again")
        self.tracker_down = False
        listed = {}
        for entry in summary.get("server_info", []):
            data = entry.get(INFO_FIELD)
            if server_key(entry) == self.key and isinstance(data, dict):
                listed[data.get("agent_id")] = server_addr(entry)
        for child in self.children:
            addr = listed.get(gpu_agent_id(child.index))
            if addr and not child.listed:
                _log(f"{child.name}: registered under key '{self.key}' as {gpu_agent_id(child.index)} ({addr})")
            elif not addr and child.listed and child.proc is not None:
                _log(f"{child.name}: no longer listed by the tracker (its agent re-registers it)")
            child.listed = bool(addr)
            child.ever_listed |= child.listed

    def run(self) -> None:
        next_check = time.monotonic() + CHECK_INTERVAL_S
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                for child in self.children:
                    if child.proc is None:
                        if now >= child.next_start:
                            self._start(child)
                        continue
                    code = child.proc.poll()
                    if code is not None:
                        self._exited(child, code, now)
                if now >= next_check:
                    self._check_tracker()
                    next_check = time.monotonic() + CHECK_INTERVAL_S
                self.stop.wait(0.25)
        finally:
            self.stop_all()

    def stop_all(self) -> None:
        """SIGTERM every child (each stops its RPC server), SIGKILL the ones still there after the grace."""
        running = [c for c in self.children if c.proc is not None and c.proc.poll() is None]
        for child in running:
            signal_group(child.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in running:
            if not popen_waiter(child.proc)(max(0.0, deadline - time.monotonic())):
                _log(f"{child.name}: agent still running {STOP_GRACE_S:g} s after SIGTERM; killing it")
                signal_group(child.proc.pid, signal.SIGKILL)
                popen_waiter(child.proc)(5.0)
        codes = ", ".join(f"{c.name} {c.proc.returncode}" for c in running)
        _log("stopped every agent" + (f" (exit codes: {codes})" if codes else ""))


def die_with_supervisor(pid: int) -> None:
    """In a child agent: SIGTERM when the supervisor dies (Linux), and exit now if it is already gone."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes  # pylint: disable=import-outside-toplevel

            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass
    if os.getppid() != pid:
        raise TunefarmError(f"the --gpus supervisor (pid {pid}) is gone")


def run_gpu_agents(gpus: str, tracker_addr: str, key: str, target: str = "auto", host: str = "0.0.0.0",
                   port: int = 9090, custom_addr: str | None = None, farm_url: str | None = None,
                   token: str | None = None, threads: int | None = None, farm_key_file: str | None = None) -> None:
    """``tunefarm agent --gpus``: plan the cards, print the plan and the CPU split, supervise until SIGINT/SIGTERM."""
    from tunefarm.core.credential import KEY_ENV, load_farm_key  # pylint: disable=import-outside-toplevel
    from tunefarm.core.farm import TOKEN_ENV  # pylint: disable=import-outside-toplevel
    from tunefarm.core.threads import THREADS_ENV, parse_threads  # pylint: disable=import-outside-toplevel
    from tunefarm.core.wire import parse_hostport  # pylint: disable=import-outside-toplevel
    from tunefarm.tracker.client import check_tracker  # pylint: disable=import-outside-toplevel

    spec = parse_gpus(gpus)
    tracker_host, tracker_port = parse_hostport(tracker_addr)
    found, source = find_gpus()
    cards, real = choose_cards(spec, found, source)
    if port < 1 or port + len(cards) * PORT_RANGE > 65536:
        raise TunefarmError(f"--port {port}: {len(cards)} cards need the ports [{port}, "
                            f"{port + len(cards) * PORT_RANGE}), past 65535")
    if threads is None and os.environ.get(THREADS_ENV):
        try:
            threads = parse_threads(os.environ[THREADS_ENV], f"${THREADS_ENV}")
        except ValueError as err:
            raise TunefarmError(str(err)) from None
    each, builds, split = cpu_split(len(cards), threads)
    check_tracker(tracker_host, tracker_port)
    farm_key = load_farm_key(farm_key_file, create=False).decode()  # one line here if missing, not N children's
    if not real:
        _warn(f"--gpus {gpus}: no GPU found on this machine (asked {source}): starting {len(cards)} agents "
              "anyway, each serving this machine's CPU unless --target says otherwise (CUDA_VISIBLE_DEVICES changes "
              "nothing here); use this to try the supervision, not to tune a GPU")
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        _warn("CUDA_VISIBLE_DEVICES is set; --gpus replaces it in each agent with that agent's card "
              "(indices are nvidia-smi's)")
    names = dict(found)
    print(f"tunefarm agent --gpus {gpus}: {len(cards)} agents on key '{key}', one per "
          f"{'GPU' if real else 'index (no GPU here: CPU)'}; tracker {tracker_host}:{tracker_port}", flush=True)
    children = []
    for n, index in enumerate(cards):
        first = port + n * PORT_RANGE
        print(f"  gpu{index:<3} {names.get(index, 'no GPU: serves the CPU'):<28} agent {gpu_agent_id(index)}  "
              f"ports [{first}, {first + PORT_RANGE})", flush=True)
        cmd = [sys.executable, "-m", "tunefarm", "agent", "--tracker", f"{tracker_host}:{tracker_port}",
               "--key", key, "--target", target, "--host", host, "--port", str(first), "--threads", str(each),
               "--gpu-child", str(index), "--supervisor-pid", str(os.getpid())]
        if custom_addr:
            cmd += ["--custom-addr", custom_addr]
        if farm_url:
            cmd += ["--farm", farm_url]
        env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES=str(index), CUDA_DEVICE_ORDER="PCI_BUS_ID",
                   **NO_MULTICAST_ENV, **{KEY_ENV: farm_key, BUILD_WORKERS_ENV: str(builds), TAG_ENV: f"gpu{index}",
                                         THREADS_ENV: str(each), "OMP_NUM_THREADS": str(each)})
        if token:
            env[TOKEN_ENV] = token
        children.append(_Child(index, first, cmd, env))
    print(f"  cpu     {split}", flush=True)

    supervisor = GPUAgentsSupervisor(children, key, tracker_host, tracker_port)

    def on_signal(signum, _frame):
        _log(f"stopping (signal {signum}): every agent")
        supervisor.stop.set()

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        supervisor.run()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
