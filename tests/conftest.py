"""Shared fixtures: a real tracker on a free loopback port, and real agents that join it.

Everything runs as the ``tunefarm`` commands a user types, started through
``tunefarm.testing.localfarm`` (the farm quickstart and the benchmarks use) and ``tunefarm.core.procs``,
and always stopped at teardown. Failures here are AssertionErrors that carry the end of the process's log.

* ``tracker``: a running ``tunefarm tracker`` (a LocalFarm's); yields ``(host, port)``; its log is
  ``tmp_path / "tracker.log"``.
* ``start_agent(host, port, key, log_path, target="auto", extra_args=(), env=None)``: starts
  ``tunefarm agent`` and returns its ``Popen`` once the tracker lists it; stopped at teardown.
* ``agent_pair``: a tracker on a free loopback port and two agents on key 'pair', both listed; yields
  ``(port, [agent0, agent1])``; logs ``tmp_path / "tracker.log"``, ``"agent0.log"``, ``"agent1.log"``.
* ``cpu_farm`` (one per module): a LocalFarm with one agent on key 'cpu', shared by the module's tests; yields
  ``{"port", "base", "agent"}``; a module's ``FARM_OPEN_KEYS`` are open to stock TVM servers.
* plain helpers for tests that manage processes themselves: :func:`start_tracker`,
  :func:`spawn_agent`, :func:`wait_listed`, :func:`start_agents`, :func:`listed_agents`, :func:`agent_id_of`,
  :func:`run_cli`, :func:`tracker_answers`, :func:`start_host` (``tunefarm host serve``).
* :func:`closed_by_peer`: whether the other end closes a socket (a hostile peer's, in the tests of the limits).
"""
from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Sequence

import pytest
import requests

# Hermetic caches: the farm's builds of vendor runtimes (oneDNN plugin, OpenCL runtime) live under
# $XDG_CACHE_HOME/tunefarm/. A plugin a developer built into ~/.cache would turn placement on in every tuning test
# here and not in CI; tests that need a build make their own (``onednn_cache``).
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="tunefarm-test-cache-")

from tunefarm.core.errors import TunefarmError  # noqa: E402  (after the cache is set for every process below)
from tunefarm.core.procs import free_port, start_tunefarm, stop_process, wait_until  # noqa: E402
from tunefarm.testing import localfarm
from tunefarm.testing.localfarm import HOST, LocalFarm, listed_agents, tracker_answers  # noqa: F401 (for tests)

TRACKER_START_S = 60.0
AGENT_LISTED_S = 90.0  # probe + two TVM imports on a busy 2-core machine

# `make test-fast` (pytest -m fast): unit tests for the inner loop, no tuning, no farm of processes; the whole
# selection runs in about a minute on 2 cores (each test under 15 s; the Makefile gives each 120 s). Whole files,
# then single tests of files that otherwise start trackers and agents or tune. tests/test_fast_selection.py keeps
# every name here pointing at a test that exists.
FAST_FILES = (
    "test_budget.py", "test_cli_help.py", "test_comparator.py", "test_cxx_build.py", "test_devices.py",
    "test_docs.py", "test_fast_selection.py", "test_intrinsics.py", "test_jobdir.py", "test_jobspec.py", "test_latency_stats.py",
    "test_layout.py", "test_packaging.py", "test_pipeline.py", "test_plan.py", "test_progress.py",
    "test_service_units.py", "test_stats.py", "test_tuning_report.py", "test_warm_start.py",
)
FAST_TESTS = (
    "test_hostile_tracker.py::test_device_info_from_the_network_is_checked",
    "test_multi_gpu_agent.py::test_gpus_is_parsed_and_checked_against_the_cards_found",
    "test_opencl.py::test_opencl_kernels_are_cross_compiled_and_exported",
    "test_tensorrt.py::test_runner_modules_import_without_their_frameworks",
    "test_threads.py::test_a_pinned_tvm_process_keeps_its_threads_on_its_cpus",
)


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
    for item in items:
        name = item.path.name
        if name in FAST_FILES or f"{name}::{item.originalname}" in FAST_TESTS:
            item.add_marker(pytest.mark.fast)


def _tail(path: str | Path, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_tracker(port: int, log_path: str | Path, host: str = HOST, open_keys: tuple[str, ...] = ()) -> subprocess.Popen:
    """``tunefarm tracker`` on ``host:port``, returned once it answers the tracker handshake."""
    try:
        return localfarm.start_tracker(port, log_path, host=host, wait_s=TRACKER_START_S, open_keys=open_keys)
    except TunefarmError as err:
        raise AssertionError(f"{err}:\n{_tail(log_path)}") from None


def agent_id_of(proc: subprocess.Popen) -> str:
    """The agent_id of an agent started by :func:`spawn_agent` (hostname:pid of the agent process)."""
    return localfarm.agent_id(proc)


def spawn_agent(host: str, port: int, key: str, log_path: str | Path, target: str = "auto",
                extra_args: Sequence[str] = (), env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``tunefarm agent`` (RPC ports from a free one on loopback) without waiting for it."""
    return localfarm.spawn_agent(f"{host}:{port}", key, log_path, "--target", target, *extra_args, env=env)


def wait_listed(proc: subprocess.Popen, host: str, port: int, key: str, log_path: str | Path,
                timeout: float = AGENT_LISTED_S) -> None:
    """Wait until the tracker lists agent ``proc`` on ``key``; fail with the agent's log otherwise."""
    try:
        localfarm.wait_agent_listed(proc, host, port, key, log_path, timeout)
    except TunefarmError as err:
        raise AssertionError(f"{err}; agent log:\n{_tail(log_path)}") from None


def start_agents(host: str, port: int, key: str, log_paths: Sequence[str | Path]) -> list[subprocess.Popen]:
    """Start one ``tunefarm agent`` on ``key`` per log path, all at once; return them once the tracker lists
    every one (all stopped if one is not listed)."""
    procs: list[subprocess.Popen] = []
    try:
        for log_path in log_paths:
            procs.append(spawn_agent(host, port, key, log_path))
        for proc, log_path in zip(procs, log_paths):
            wait_listed(proc, host, port, key, log_path)
    except BaseException:
        for proc in procs:
            stop_process(proc)
        raise
    return procs


def start_host(base: Path, http_port: int, tracker_port: int, *extra_args) -> subprocess.Popen:
    """``tunefarm host serve`` on loopback (logs ``base / "logs"``, its log ``base / "host.log"``), returned once
    its API answers (401 without a token)."""
    proc = start_tunefarm(["host", "serve", "--logs-dir", base / "logs", "--port", http_port,
                           "--tracker-port", tracker_port, *extra_args], log_path=base / "host.log")

    def up():
        if proc.poll() is not None:
            return True
        try:
            return requests.get(f"http://{HOST}:{http_port}/api/info", timeout=2).status_code == 401
        except requests.ConnectionError:
            return False

    wait_until(up, 90, what="the host service")
    assert proc.poll() is None, _tail(base / "host.log")
    return proc


def closed_by_peer(sock: socket.socket, within_s: float) -> bool:
    """True if the other end closes ``sock`` (EOF or reset) within ``within_s`` seconds."""
    sock.settimeout(within_s)
    try:
        while True:
            if not sock.recv(4096):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def run_cli(args: Sequence, log_path: str | Path, timeout: float = 60.0,
            env: dict[str, str] | None = None) -> tuple[int, str, float]:
    """Run one ``tunefarm`` command to completion: ``(exit code, stdout+stderr, seconds)``."""
    start = time.monotonic()
    proc = start_tunefarm(list(args), log_path=log_path, env=env)
    try:
        code = proc.wait(timeout)
    finally:
        stop_process(proc)
    return code, Path(log_path).read_text(errors="replace"), time.monotonic() - start


@pytest.fixture
def tracker(tmp_path):
    """A running ``tunefarm tracker`` on a free loopback port: ``(host, port)``."""
    try:
        farm = LocalFarm(tmp_path, tracker_wait_s=TRACKER_START_S).__enter__()
    except TunefarmError as err:
        raise AssertionError(f"{err}:\n{_tail(tmp_path / 'tracker.log')}") from None
    try:
        yield farm.tracker_addr
    finally:
        farm.close()


@pytest.fixture
def start_agent():
    """``start_agent(host, port, key, log_path, target="auto", extra_args=(), env=None)`` -> Popen, once listed."""
    procs: list[subprocess.Popen] = []

    def start(host: str, port: int, key: str, log_path: str | Path, target: str = "auto",
              extra_args: Sequence[str] = (), env: dict[str, str] | None = None) -> subprocess.Popen:
        proc = spawn_agent(host, port, key, log_path, target=target, extra_args=extra_args, env=env)
        procs.append(proc)
        wait_listed(proc, host, port, key, log_path)
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            stop_process(proc)


@pytest.fixture
def agent_pair(tmp_path):
    """A tracker on a free loopback port and two agents on key 'pair', started together: ``(port, [agent0,
    agent1])`` once both are listed; stopped at teardown (agents first, then the tracker)."""
    port = free_port(HOST)
    tracker = start_tracker(port, tmp_path / "tracker.log")
    agents: list[subprocess.Popen] = []
    try:
        agents = start_agents(HOST, port, "pair", [tmp_path / f"agent{i}.log" for i in range(2)])
        yield port, agents
    finally:
        for agent in agents:
            stop_process(agent)
        stop_process(tracker)


@pytest.fixture(scope="module")
def cpu_farm(request, tmp_path_factory):
    """One LocalFarm for the test module that asks for it, shared by its tests: a tracker and one agent on key
    'cpu', listed before the first test; the keys in the module's ``FARM_OPEN_KEYS`` (if it has one) are open to
    stock TVM servers. Yields ``{"port", "base" (the farm's directory, with tracker.log and agent.log), "agent"
    (the agent's Popen)}``; stopped after the module's last test (the agent first, then the tracker)."""
    base = tmp_path_factory.mktemp("farm")
    farm = LocalFarm(base, tracker_wait_s=TRACKER_START_S, agent_wait_s=AGENT_LISTED_S,
                     open_keys=tuple(getattr(request.module, "FARM_OPEN_KEYS", ())))
    try:
        farm.__enter__()
        agent = farm.add_agent("cpu", name="agent")
    except TunefarmError as err:
        log = base / ("agent.log" if farm.agents else "tracker.log")
        farm.close()
        raise AssertionError(f"{err}:\n{_tail(log)}") from None
    try:
        yield {"port": farm.port, "base": base, "agent": agent}
    finally:
        farm.close()


def apply_best_with_plain_tvm(best_dir: Path, state: dict) -> None:
    """docs/tuning.md's recipe, in plain TVM: no tunefarm code. Applies the records in ``best_dir`` to the
    builtin 'matmul' model (same seed) fused the way ``state`` (the job's job_state.json: target and
    pipeline) says it was tuned, checks every TIR function is scheduled and numerics vs PyTorch."""
    import numpy as np
    import torch
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program
    from tvm.s_tir import meta_schedule as ms

    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64).eval()
    x = torch.randn(16, 64)
    mod = from_exported_program(torch.export.export(model, (x,)), keep_params_as_input=True,
                                unwrap_unit_return_tuple=True)
    mod, params = relax.frontend.detach_params(mod)
    names = [p.name for p in mod["main"].params[1:]]
    mod = relax.transform.BindParams("main", dict(zip(names, params["main"])))(mod)
    target = tvm.target.Target(state["target"])
    fold, prepack = state["pipeline"]["fold_batchnorm"], state["pipeline"]["weight_prepack"]
    with target:
        if fold:
            mod = relax.transform.FoldBatchnormToConv2D()(mod)
            mod = relax.transform.FoldConstant()(mod)
        mod = relax.transform.DecomposeOpsForInference()(mod)
        if prepack:
            mod = relax.transform.CanonicalizeBindings()(mod)
        mod = relax.pipeline.zero_pipeline()(mod)
        if prepack:
            mod = relax.transform.AttachAttrLayoutFreeBuffers()(mod)
    db = ms.database.JSONDatabase(work_dir=str(best_dir))
    assert len(db.get_all_tuning_records()) >= 1
    with target, db:
        applied = relax.transform.MetaScheduleApplyDatabase()(mod)
    prims = [f for _, f in applied.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert prims and all(f.attrs is not None and "tirx.is_scheduled" in f.attrs for f in prims)
    if prepack:
        with target:
            applied = relax.transform.SplitLayoutRewritePreproc()(applied)
            applied = relax.transform.LiftTransformParams()(applied)
            applied = relax.transform.FoldConstant()(applied)
    for gvar, func in list(applied.functions.items()):
        if isinstance(func, tvm.tirx.PrimFunc):
            applied[gvar] = func.with_attr("op_pattern", 8)  # keep tvm.compile from fusing them again
    vm = relax.VirtualMachine(tvm.compile(applied, target), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x.numpy())).numpy()
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-4, atol=1e-4)


def tiny_database(path: Path, workloads: int = 2, records: int = 3) -> list[dict]:
    """A real MetaSchedule JSONDatabase in ``path`` (``workloads`` small matmuls, ``records`` traces each,
    written by TVM) and its tasks.json; returns the tasks. Seconds, not a tuning run."""
    import json

    import tvm
    import tvm_ffi
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    path.mkdir(parents=True, exist_ok=True)
    db = ms.database.JSONDatabase(work_dir=str(path))
    target = tvm.target.Target("llvm")
    tasks = []
    for w in range(workloads):
        n = 8 * (w + 1)
        a, b = te.placeholder((n, n), name="A"), te.placeholder((n, n), name="B")
        k = te.reduce_axis((0, n), name="k")
        c = te.compute((n, n), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
        mod = tvm.IRModule({"main": te.create_prim_func([a, b, c])})
        workload = db.commit_workload(mod)
        for r in range(records):
            sch = tvm.s_tir.Schedule(mod)
            sch.split(sch.get_loops(sch.get_sblock("C"))[0], [None, 2 ** (r % 3)])
            db.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, [1e-5 * (r + 1)], target,
                                                             ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
        tasks.append({"name": f"matmul{n}", "weight": 1, "workload_hash": str(tvm_ffi.structural_hash(mod))})
    (path / "tasks.json").write_text(json.dumps(tasks))
    return tasks


def tear_line(path: Path, index: int) -> bytes:
    """Cut line ``index`` (0-based) of ``path`` to its first 60 bytes, as a writer killed mid-line leaves it;
    returns the file's new bytes."""
    lines = path.read_bytes().split(b"\n")
    lines[index] = lines[index][:60]
    data = b"\n".join(lines)
    path.write_bytes(data)
    return data


# ---------------------------------------------------------------- oneDNN (tests/test_onednn.py, test_placement.py)


def _onednn_why_not() -> str | None:
    from tunefarm.device_agents.onednn_runtime import check_onednn_headers, find_cxx

    try:
        check_onednn_headers(find_cxx())
    except TunefarmError as err:
        return f"cannot build the oneDNN plugin here ({err}); .ci/run installs libdnnl-dev"
    return None


ONEDNN_WHY_NOT = _onednn_why_not()  # why the oneDNN tests skip (None: they run)


@pytest.fixture(scope="session")
def onednn_cache(tmp_path_factory):
    """``(XDG_CACHE_HOME, plugin path, the command's output)``: the plugin built once by ``tunefarm runtime onednn``."""
    cache = tmp_path_factory.mktemp("onednn-cache")
    code, out, _ = run_cli(["runtime", "onednn"], cache / "runtime.log", 600, env={"XDG_CACHE_HOME": str(cache)})
    assert code == 0, out
    (lib,) = list((cache / "tunefarm" / "onednn").glob("tvm-*/libtvm_dnnl_plugin.so"))
    return cache, lib, out


@pytest.fixture
def plugin(onednn_cache):
    """The plugin loaded into this (pytest) process, where the host-side codegen tests compile."""
    from tunefarm.core import onednn

    onednn.load_plugin(onednn_cache[1], export_env=False)
    return onednn_cache[1]
