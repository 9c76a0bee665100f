"""FarmRunner on a real tracker and agent: one session per batch, a library per candidate, deadlines.

The candidates are plain TE kernels built by WarmBuilder (what MetaSchedule hands the runner is the
same: a built artifact plus its arguments' shapes), so each test controls how long a candidate runs.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import agent_id_of

pytestmark = pytest.mark.timeout(300)


def _kernels(target, **sizes):
    """name -> BuilderInput of a naive kernel: ``add`` (n elements) or ``matmul`` (n x n x n)."""
    import tvm
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    out = {}
    for name, n in sizes.items():
        if name.startswith("add"):
            a = te.placeholder((n,), name="a")
            b = te.compute((n,), lambda i: a[i] + 1.0, name="b")
            func = te.create_prim_func([a, b])
        else:
            a = te.placeholder((n, n), name="a")
            w = te.placeholder((n, n), name="w")
            k = te.reduce_axis((0, n), "k")
            c = te.compute((n, n), lambda i, j: te.sum(a[i, k] * w[k, j], axis=k), name="c")
            func = te.create_prim_func([a, w, c])
        out[name] = ms.builder.BuilderInput(tvm.IRModule({"main": func}), target)
    return out


def _runner_inputs(kernels: dict, target):
    from tvm.s_tir import meta_schedule as ms

    from tunefarm.host.tuning.builder import WarmBuilder

    builder = WarmBuilder(workers=1, timeout_sec=120)
    try:
        built = builder.build(list(kernels.values()))
    finally:
        builder.shutdown()
    assert all(b.error_msg is None for b in built), [b.error_msg for b in built]
    return [ms.runner.RunnerInput(b.artifact_path, "cpu", ms.arg_info.ArgInfo.from_prim_func(k.mod["main"]))
            for b, k in zip(built, kernels.values())]


def _sessions_started(log: Path) -> int:
    return sum(1 for line in log.read_text().splitlines() if "session from" in line and "started" in line)


def test_one_session_per_batch_and_each_candidate_runs_its_own_library(tracker, start_agent, tmp_path):
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from tunefarm.device_agents.probe import llvm_target
    from tunefarm.host.tuning.runner import FarmRunner

    host, port = tracker
    log = tmp_path / "agent.log"
    agent = start_agent(host, port, "cpu", log)
    target = tvm.target.Target(llvm_target())
    # Every artifact is called tvm_tmp_mod.tar on the host; in one session they must not share a path
    # (dlopen would hand back the library already loaded): a slow and a fast kernel, interleaved.
    inputs = _runner_inputs(_kernels(target, add1=16, matmul1=256, add2=16, matmul2=256), target)
    runner = FarmRunner(host, port, "cpu", timeout_sec=60,
                        evaluator_config=ms.runner.EvaluatorConfig(number=1, repeat=3, min_repeat_ms=0))
    before = _sessions_started(log)
    results = [f.result() for f in runner.run(inputs)]
    runner.shutdown()
    assert [r.error_msg for r in results] == [None] * 4
    add1, mm1, add2, mm2 = [min(float(x) for x in r.run_secs) for r in results]
    assert mm1 > 20 * max(add1, add2) and mm2 > 20 * max(add1, add2), (add1, mm1, add2, mm2)
    assert _sessions_started(log) - before == 1  # the whole batch in one session on the one agent
    assert dict(runner.stats.per_agent) == {agent_id_of(agent): 4}


def test_a_candidate_past_its_deadline_twice_fails_and_the_rest_are_measured(tracker, start_agent, tmp_path):
    import time

    import tvm
    from tvm.s_tir import meta_schedule as ms

    from tunefarm.device_agents.probe import llvm_target
    from tunefarm.host.tuning.runner import FarmRunner

    host, port = tracker
    start_agent(host, port, "cpu", tmp_path / "agent.log")
    target = tvm.target.Target(llvm_target())
    # A naive 1024^3 matmul runs for seconds (time_evaluator runs it twice); the deadline is 0.5 s.
    inputs = _runner_inputs(_kernels(target, matmul=1024, add=16), target)
    runner = FarmRunner(host, port, "cpu", timeout_sec=0.5, device_wait_sec=120,
                        evaluator_config=ms.runner.EvaluatorConfig(number=1, repeat=1, min_repeat_ms=0))
    t0 = time.monotonic()
    futures = runner.run(inputs)
    slow = futures[0].result()
    t_slow = time.monotonic() - t0
    fast = futures[1].result()
    runner.shutdown()
    assert slow.run_secs is None and "no result within 0.5 s" in slow.error_msg
    # Past its first deadline it went back to the queue once (its agent might be frozen or cut off) and was
    # started again on the next session; past the second it failed — when that deadline passed, not when the
    # kernel finally ended (the agent is busy in each abandoned session until then).
    assert runner.stats.requeued == 1
    assert t_slow < 60
    assert fast.error_msg is None and float(fast.run_secs[0]) < 0.01
    assert runner.stats.failures["timeout"] == 1 and sum(runner.stats.per_agent.values()) == 1


def test_time_split_counts_nested_profiler_scopes_once():
    from tunefarm.host.tuning.progress import time_split

    profile = {"Total": 100.0, "SendToBuilder": 50.0, "SendToRunner": 5.0, "JoinRunnerFutures": 1.0,
               "EvoSearch/Evolve/Misc": 4.0, "EvoSearch/Evolve/Misc/CopyMeasuredWorkloads": 3.0,
               "EvoSearch/SampleInitPopulation": 6.0, "MeasureCallback/UpdateCostModel": 2.0}
    split = time_split(profile, 80.0)
    assert split["search_s"] == 10.0  # Misc (4, its child inside) + SampleInitPopulation (6)
    assert (split["build_s"], split["measure_s"], split["model_update_s"]) == (50.0, 6.0, 2.0)
    assert split["other_s"] == 12.0
    # The farm's database callback times itself inside the scope MetaSchedule puts around Python callbacks.
    nested = time_split({**profile, "MeasureCallback/PyMeasureCallback": 7.0, "MeasureCallback/AddToDatabase": 6.0},
                        80.0)
    assert nested["model_update_s"] == 9.0 and nested["other_s"] == 5.0


def test_a_dead_session_is_told_from_a_failing_candidate():
    """What decides whether a candidate is measured again (its session died under it) or fails (it failed
    on a live session): the errors TVM's RPC client raises for each."""
    from tunefarm.host.tuning.runner import session_lost

    for err in (ConnectionResetError(104, "Connection reset by peer"), TimeoutError(), BrokenPipeError(),
                RuntimeError("RPCSession: socket closed"), RuntimeError("Socket error: recv failed (errno 104)")):
        assert session_lost(err), err
    for err in (RuntimeError("InternalError: Check failed: (n == 3) is false: Memory verification failed"),
                ValueError("Invalid argument to kernel")):
        assert not session_lost(err), err


def test_over_a_slow_link_a_worker_sends_several_candidates_per_call(tracker, start_agent, tmp_path):
    """An agent reached through the farm's delay proxy (25 ms each way: a 50 ms round trip, advertised with
    --custom-addr): after its first candidate the worker sends the rest in chunks, one round trip each, and
    every candidate still gets its own valid result on the one session."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from tunefarm.core.procs import free_port
    from tunefarm.device_agents.probe import llvm_target
    from tunefarm.host.tuning.runner import FarmRunner
    from tunefarm.testing import delayproxy
    from tunefarm.tracker.client import TrackerClient

    host, port = tracker
    rpc_port = free_port("127.0.0.1")
    log = tmp_path / "agent.log"
    start_agent(host, port, "slow", log, extra_args=("--port", str(rpc_port), "--custom-addr", "127.0.0.2"))
    with TrackerClient(host, port) as client:
        (item,) = [i for i in client.devices() if i["key"] == "slow"]
    assert item["addrs"] == [f"127.0.0.2:{rpc_port}"]  # what the host is told to connect to: the proxy
    proxy = delayproxy.start(f"127.0.0.2:{rpc_port}", f"127.0.0.1:{rpc_port}", 25)
    try:
        target = tvm.target.Target(llvm_target())
        inputs = _runner_inputs(_kernels(target, **{f"add{i}": 16 * (i + 1) for i in range(12)}), target)
        runner = FarmRunner(host, port, "slow", timeout_sec=60,
                            evaluator_config=ms.runner.EvaluatorConfig(number=1, repeat=2, min_repeat_ms=0))
        before = _sessions_started(log)
        results = [f.result() for f in runner.run(inputs)]
        runner.shutdown()
    finally:
        proxy.kill()
        proxy.wait(10)
    assert [r.error_msg for r in results] == [None] * 12
    assert all(len(r.run_secs) == 2 and all(float(x) > 0 for x in r.run_secs) for r in results)
    assert sum(size * calls for size, calls in runner.stats.chunks.items()) == 12  # each measured once
    # first alone, then chunks
    assert runner.stats.chunks[1] == 1 and max(runner.stats.chunks) > 1, dict(runner.stats.chunks)
    assert _sessions_started(log) - before == 1


def test_the_batch_call_refuses_malformed_input_and_the_agent_goes_on(tracker, start_agent, tmp_path):
    """tunefarm.measure.batch as a hostile host could call it: a header that is not JSON, sizes that do not
    add up, too many candidates, a path for a name. Each is refused (or that candidate fails and the rest are
    not run); nothing crashes the agent, and a good call on the same agent then measures."""
    import json

    import tvm

    from tunefarm.core.wire import MEASURE_BATCH_FUNC
    from tunefarm.device_agents.measure_service import MAX_BATCH, NOT_RUN
    from tunefarm.device_agents.probe import llvm_target
    from tunefarm.testing.localfarm import listed_agents
    from tunefarm.tracker.client import request_session

    host, port = tracker
    agent = start_agent(host, port, "cpu", tmp_path / "agent.log")
    target = tvm.target.Target(llvm_target())
    (inp,) = _runner_inputs(_kernels(target, add=64), target)
    blob = Path(inp.artifact_path).read_bytes()
    item = {"name": "good.tar", "size": len(blob), "args_info": [a.as_json() for a in inp.args_info],
            "device_type": "cpu"}
    evaluator = json.dumps({"number": 1, "repeat": 1, "min_repeat_ms": 0, "enable_cpu_cache_flush": False})

    def call(data: bytes, header) -> str:
        session = request_session((host, port), "cpu", 60, 120)
        return str(session.get_function(MEASURE_BATCH_FUNC)(bytearray(data), header, evaluator))

    for data, header, says in ((blob, "{not json", "Expecting"),
                               (blob + b"x", json.dumps([item]), "sizes add up to"),
                               (blob * (MAX_BATCH + 1), json.dumps([item] * (MAX_BATCH + 1)), "a list of 1 to"),
                               (blob, json.dumps([{**item, "size": "7"}]), "needs name, size")):
        with pytest.raises(Exception, match=says):
            call(data, header)
    bad = [{**item, "name": "../../outside.tar"}, item]
    answer = json.loads(call(blob * 2, json.dumps(bad)))
    assert "must be a plain .tar or .so file name" in answer[0]["error"] and answer[1] == {"error": NOT_RUN}
    assert agent.poll() is None and len(listed_agents(host, port, "cpu")) == 1
    (good,) = json.loads(call(blob, json.dumps([item])))
    assert len(good["costs"]) == 1 and good["costs"][0] > 0


def test_a_session_serves_the_next_batch_and_batches_side_by_side_do_not_wait_for_it(tracker, start_agent,
                                                                                     tmp_path):
    """One agent: the second batch measures on the session the first one opened (kept between batches).
    Two batches at once (MetaSchedule's first round sends every task's batch before joining any): the one that
    finishes first gives its session back to the tracker, not to the idle list, so the other gets the agent."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from tunefarm.device_agents.probe import llvm_target
    from tunefarm.host.tuning.runner import FarmRunner

    host, port = tracker
    log = tmp_path / "agent.log"
    start_agent(host, port, "cpu", log)
    target = tvm.target.Target(llvm_target())
    inputs = _runner_inputs(_kernels(target, add1=16, add2=32, add3=64, add4=128), target)
    runner = FarmRunner(host, port, "cpu", timeout_sec=60, device_wait_sec=60,
                        evaluator_config=ms.runner.EvaluatorConfig(number=1, repeat=1, min_repeat_ms=0))
    try:
        before = _sessions_started(log)
        results = [f.result() for f in runner.run(inputs[:2])] + [f.result() for f in runner.run(inputs[2:])]
        assert [r.error_msg for r in results] == [None] * 4
        assert _sessions_started(log) - before == 1 and runner.stats.sessions_reused == 1
        side_by_side = runner.run(inputs[:2]) + runner.run(inputs[2:])
        results = [f.result() for f in side_by_side]
        assert [r.error_msg for r in results] == [None] * 4, [r.error_msg for r in results]
    finally:
        runner.shutdown()


def test_a_kept_session_goes_to_another_runner_waiting_at_the_tracker(tracker, start_agent, tmp_path,
                                                                       monkeypatch):
    """Two runners on one agent (two search workers of a job, or two jobs): a session kept between batches is
    handed back as soon as the other runner's request waits at the tracker, however long sessions may be kept
    (here 600 s, past the other's device_wait_sec of 20 s: without the hand-back its batch failed)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from tunefarm.device_agents.probe import llvm_target
    from tunefarm.host.tuning import sessions as sessions_mod
    from tunefarm.host.tuning.runner import FarmRunner

    def kept(runner):  # the batch's thread gives its session to the idle list just after the last result
        deadline = time.monotonic() + 10
        while not runner.sessions.kept() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(runner.sessions.kept()) == 1

    monkeypatch.setattr(sessions_mod, "SESSION_IDLE_S", 600.0)
    host, port = tracker
    start_agent(host, port, "cpu", tmp_path / "agent.log")
    target = tvm.target.Target(llvm_target())
    inputs = _runner_inputs(_kernels(target, add1=16, add2=32, add3=64), target)
    config = ms.runner.EvaluatorConfig(number=1, repeat=1, min_repeat_ms=0)
    first = FarmRunner(host, port, "cpu", timeout_sec=60, device_wait_sec=20, evaluator_config=config)
    second = FarmRunner(host, port, "cpu", timeout_sec=60, device_wait_sec=20, evaluator_config=config)
    try:
        assert [f.result().error_msg for f in first.run(inputs[:1])] == [None]
        kept(first)  # for its next batch
        assert [f.result().error_msg for f in second.run(inputs[1:2])] == [None]
        assert first.sessions.kept() == []
        kept(second)
        assert [f.result().error_msg for f in first.run(inputs[2:])] == [None]  # and back again
        assert second.sessions.kept() == []
        assert first.stats.per_agent.total() == 2 and second.stats.per_agent.total() == 1
    finally:
        first.shutdown()
        second.shutdown()


def test_a_candidate_whose_build_times_out_is_kept_to_rebuild(tmp_path):
    """FarmBuilder keeps the scheduled module of a candidate killed at the build timeout (it held its batch),
    and it loads back and builds: a real WarmBuilder pool whose timeout no build can meet."""
    import tvm
    import tvm_ffi

    from tunefarm.core.building import build_candidate
    from tunefarm.core.targets import target_to_json
    from tunefarm.host.tuning.builder import KEEP_TIMEOUTS, FarmBuilder, WarmBuilder, load_kept

    target = tvm.target.Target({"kind": "llvm", "num-cores": 1})
    kernels = _kernels(target, matmul=64, add=1024)
    keep = tmp_path / "build-timeouts"
    builder = FarmBuilder(WarmBuilder(workers=1, timeout_sec=0.001), keep_dir=keep)
    try:
        results = builder.build(list(kernels.values()))
    finally:
        builder.shutdown()
    assert all(r.artifact_path is None and "timeout" in r.error_msg for r in results), [r.error_msg for r in results]
    assert builder.build_failures == {"timeout": 2} and len(builder.kept) == 2 <= KEEP_TIMEOUTS
    assert sorted(p.name for p in keep.iterdir()) == sorted(Path(p).name for p in builder.kept)
    for path, kernel in zip(builder.kept, kernels.values()):
        mod, kept_target = load_kept(path)
        assert tvm_ffi.structural_equal(mod, kernel.mod) and target_to_json(kept_target) == target_to_json(target)
    assert Path(build_candidate(mod, kept_target, str(tmp_path / "again.tar"))).stat().st_size > 0


def test_a_warmed_pool_starts_its_workers_before_the_first_batch_and_builds_on_them():
    """WarmBuilder.warm() starts every worker in the background (a search worker's first batch then does not
    wait for Python and TVM to start); the batch that follows runs on those same processes."""
    import psutil
    import tvm

    from tunefarm.host.tuning.builder import FarmBuilder, WarmBuilder

    target = tvm.target.Target({"kind": "llvm", "num-cores": 1})
    kernels = _kernels(target, matmul=32, add=512)
    builder = FarmBuilder(WarmBuilder(workers=2, timeout_sec=120))
    try:
        pids = {f.result(timeout=120) for f in builder.warm()}
        assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids), pids
        workers = {c.pid for c in psutil.Process().children()}
        assert pids <= workers, (pids, workers)
        results = builder.build(list(kernels.values()))
        assert all(r.error_msg is None and Path(r.artifact_path).stat().st_size > 0 for r in results), results
        assert {c.pid for c in psutil.Process().children()} == workers  # no worker started again
    finally:
        builder.shutdown()
    assert FarmBuilder(object()).warm() == []  # an inner builder without a pool (agents build): nothing to start


def test_build_workers_start_without_pytorch_and_still_build():
    """A WarmBuilder worker is TVM's popen worker with ``import torch`` refused (tvm_ffi's package init tries
    it wherever PyTorch is installed, and it was two thirds of a worker's start): torch is installed here,
    the worker has no torch module and builds, and the worker that replaces one killed at the timeout is the
    same kind."""
    import importlib.util

    import tvm

    from tunefarm.host.tuning.builder import WarmBuilder

    assert importlib.util.find_spec("torch") is not None  # the check below means something only with PyTorch

    def torch_there():
        return repr(__import__("sys").modules.get("torch", "absent"))

    target = tvm.target.Target({"kind": "llvm", "num-cores": 1})
    kernels = _kernels(target, matmul=32, add=512)
    builder = WarmBuilder(workers=1, timeout_sec=120)
    quick = WarmBuilder(workers=1, timeout_sec=1)
    try:
        assert builder._get_pool().submit(torch_there).result(120) == "None"  # pylint: disable=protected-access
        results = builder.build(list(kernels.values()))
        assert all(r.error_msg is None and Path(r.artifact_path).stat().st_size > 0 for r in results), results
        pool = quick._get_pool()  # pylint: disable=protected-access
        assert pool.submit(torch_there).result(120) == "None"
        slept = list(pool.map_with_error_catching(lambda s: __import__("time").sleep(s), [10]))
        assert [r.status.name for r in slept] == ["TIMEOUT"]
        assert pool.submit(torch_there).result(120) == "None"  # a fresh worker, started the same way
    finally:
        builder.shutdown()
        quick.shutdown()


def test_a_straggler_is_cut_once_the_rest_of_its_batch_is_done_and_the_pool_goes_on():
    """run_batch (WarmBuilder.build's loop) on a real 2-process pool: seven quick calls and one that would sleep
    ten minutes. Once seven of the eight are done (STRAGGLER_SHARE) the sleeper is cut at factor x that moment
    (min_s 1 s here, 10 s in a job): its worker process is killed, the others' results stand, and the pool's next
    batch — real builds — runs on a fresh worker. The rule itself: nothing before 7/8 of a batch of at least 8
    is done, never with factor 0."""
    import psutil
    import tvm

    from tunefarm.host.tuning.builder import WarmBuilder, run_batch, straggler_cut

    builder = WarmBuilder(workers=2, timeout_sec=900)
    pool = builder._get_pool()  # pylint: disable=protected-access
    try:
        before = {c.pid for c in psutil.Process().children()}
        done, cut = run_batch(pool, time.sleep, [(0.01,)] * 7 + [(600,)], 4.0, min_s=1.0)
        assert list(cut) == [7] and 1.0 <= cut[7] < 600, cut
        assert [r.status.name for r in done] == ["COMPLETE"] * 7 + ["EXCEPTION"], done
        target = tvm.target.Target({"kind": "llvm", "num-cores": 1})
        results = builder.build(list(_kernels(target, matmul=32, add=512).values()))
        assert all(r.error_msg is None and Path(r.artifact_path).stat().st_size > 0 for r in results), results
        assert {c.pid for c in psutil.Process().children()} != before  # the cut worker was replaced
        # a call is cut only once it has run as long as asked (one queued behind stragglers gets its own time)
        future = pool.submit_tracked(99, time.sleep, 600)
        deadline = time.monotonic() + 60
        while 99 not in pool._running and time.monotonic() < deadline:  # pylint: disable=protected-access
            time.sleep(0.05)
        assert 99 in pool._running and not pool.cut(99, 3600)  # pylint: disable=protected-access
        assert pool.cut(99, 0.0) and future.result(timeout=60).status.name == "EXCEPTION"
        assert not pool.cut(99, 0.0)  # done: nothing to cut
    finally:
        builder.shutdown()
    finished: list[float] = []
    cut_at = straggler_cut(finished, 8, 4.0, 10.0)
    finished += [0.5] * 6
    assert cut_at() is None
    finished.append(3.0)
    assert cut_at() == 12.0  # 4 x the moment the 7th of 8 finished
    assert straggler_cut([0.1] * 7, 8, 4.0, 10.0)() == 10.0  # never before min_s
    assert straggler_cut([0.1] * 7, 7, 4.0, 10.0)() is None  # a batch under 8 waits for every candidate
    assert straggler_cut([0.1] * 7, 8, 0.0, 10.0)() is None  # factor 0: off


def _unrolled(n: int, target):
    """A BuilderInput whose build is slow for real: an elementwise kernel of ``n`` elements, fully unrolled
    (LLVM compiles n statements: 20,000 took 18 s on the 2-core development machine)."""
    import tvm
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    a = te.placeholder((n,), name="a")
    b = te.compute((n,), lambda i: a[i] * 1.5 + 1.0, name="b")
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": te.create_prim_func([a, b])}))
    sch.unroll(sch.get_loops(sch.get_sblock("b"))[0])
    return ms.builder.BuilderInput(sch.mod, target)


def test_a_build_agent_kills_a_candidate_past_the_build_timeout_and_builds_the_rest(tracker, start_agent, tmp_path):
    """builder.timeout_sec holds on build agents too: a real agent on key 'build' kills the build of a candidate
    that compiles far longer than the timeout (its answer a build timeout, kept to rebuild), builds the others,
    and the batch returns at the timeout, not when that compile would have ended."""
    import tvm

    from tunefarm.host.tuning.builder import AgentBuilder, FarmBuilder

    host, port = tracker
    agent = start_agent(host, port, "build", tmp_path / "build.log")
    target = tvm.target.Target({"kind": "llvm", "num-cores": 1})
    kernels = list(_kernels(target, add1=64, add2=128, matmul=32).values())
    builder = FarmBuilder(AgentBuilder((host, port), "build", timeout_sec=3, device_wait_sec=30),
                          keep_dir=tmp_path / "build-timeouts")
    started = time.monotonic()
    results = list(builder.build(kernels[:2] + [_unrolled(60000, target)] + kernels[2:]))
    took = time.monotonic() - started
    slow = results.pop(2)
    assert all(r.error_msg is None and Path(r.artifact_path).stat().st_size > 0 for r in results), results
    assert slow.artifact_path is None and "timeout, killed after 3 s on the agent" in slow.error_msg, slow.error_msg
    assert slow.error_msg.startswith(f"FarmBuilder: timeout on agent {agent_id_of(agent)}"), slow.error_msg
    assert builder.build_failures == {"timeout": 1} and len(builder.kept) == 1
    assert builder.builder.remote_builds == {agent_id_of(agent): 3}
    assert took < 30, took  # the unrolled kernel alone compiles for minutes here
    # the agent is free again at once (its build process killed): the next batch builds
    assert all(r.error_msg is None for r in builder.build(kernels[:1])), "the agent did not serve the next batch"


def test_a_build_agent_cuts_stragglers_of_its_call_and_answers_what_failed_or_died():
    """run_builds (a build agent's loop over one call's candidates, each in a forked process) on real processes:
    eight jobs, seven quick and one that would sleep ten minutes; once seven are done the eighth is killed at
    the straggler factor x that moment (at least min_s), and its answer says so. A job that raises answers its
    error; one whose process dies answers its exit code; with no limits every job is waited for."""
    import os

    from tunefarm.device_agents.build_service import run_builds

    def job(seconds):
        if seconds == "raise":
            raise RuntimeError("no such target")
        if seconds == "die":
            os._exit(3)
        time.sleep(seconds)
        return ""

    started = time.monotonic()
    answers = run_builds([0.01] * 7 + [600], 8, 0.0, 4.0, fn=job, min_s=1.0)
    took = time.monotonic() - started
    assert answers[:7] == [""] * 7 and answers[7].startswith("timeout (straggler), killed on the agent"), answers
    assert 1.0 <= took < 20, took
    answers = run_builds([0.01, "raise", "die", 0.5], 2, 0.0, 0.0, fn=job)
    assert answers[0] == answers[3] == "", answers
    assert answers[1] == "RuntimeError: no such target", answers
    assert "ended without an answer (exit code 3)" in answers[2], answers
    # the per-candidate timeout, with the straggler rule off (a call of fewer than 8 candidates never cuts)
    answers = run_builds([0.01, 600], 2, 1.0, 4.0, fn=job)
    assert answers == ["", "timeout, killed after 1 s on the agent"], answers
