"""FarmRunner: MetaSchedule's Runner interface, measuring candidates on the farm's agents.

Each candidate is measured exactly as stock ``RPCRunner`` does it (same upload, argument
allocation and ``time_evaluator`` code, imported from TVM), with the gaps a farm cannot inherit
closed here:
  * a client-side deadline per candidate (``timeout_sec``: waiting for a free agent, upload and
    run together), so a batch is bounded by ceil(batch / workers) * timeout_sec;
  * before each batch the tracker is asked how many agents serve the key: none -> wait up to
    ``device_wait_sec`` with a visible message, then fail with a one-line NoDeviceError; several ->
    as many candidates in flight as agents, so every agent on the key is used;
  * each measurement records which agent ran it (``tunefarm.agent.id`` on the agent).
A killed agent costs only its in-flight candidates: they come back as errors (MetaSchedule scores
them as failed) and the next batch goes to the agents that remain.
"""
from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from typing import Callable

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, RPCConfig, RunnerInput, RunnerResult
from tvm.s_tir.meta_schedule.runner.runner import PyRunner, PyRunnerFuture
from tvm.support.popen_pool import PopenPoolExecutor

from tunefarm.core.errors import TrackerUnreachable


def _measure_one(rpc_config, evaluator_config, alloc_repeat, artifact_path, device_type, args_info):
    """Runs in a pool worker: one candidate on whichever agent the tracker hands out."""
    # pylint: disable=import-outside-toplevel
    import os.path as osp

    from tvm.s_tir.meta_schedule.runner import rpc_runner as stock

    from tunefarm.tracker.client import server_key

    session = None
    remote_path = None
    try:
        # A request for a key nobody serves waits at the tracker until the deadline kills it; when the
        # agents are gone, fail now so the batch ends quickly and the next one waits visibly instead.
        tracker = rpc_config.connect_tracker()
        if not any(server_key(s) == rpc_config.tracker_key for s in tracker.summary().get("server_info", [])):
            raise RuntimeError(f"no agent serves key '{rpc_config.tracker_key}' any more")
        session = tracker.request(key=rpc_config.tracker_key, priority=rpc_config.session_priority,
                                  session_timeout=rpc_config.session_timeout_sec)
        try:
            agent_id = session.get_function("tunefarm.agent.id")()
        except Exception:  # pylint: disable=broad-except
            agent_id = "unknown (not a tunefarm agent)"
        device = session.device(device_type, 0)
        _, remote_path = osp.split(artifact_path)
        rt_mod = stock.default_upload_module(session, artifact_path, remote_path)
        args = stock.default_alloc_argument(session, device, args_info, alloc_repeat)
        costs = stock.default_run_evaluator(session, rt_mod, device, evaluator_config, args)
        return list(costs), str(agent_id)
    finally:
        stock.default_cleanup(session, remote_path)


@derived_object
class FarmRunnerFuture(PyRunnerFuture):
    """A candidate in flight; ``result()`` never raises and never blocks past the deadline."""

    def __init__(self, future: concurrent.futures.Future, timeout_sec: float, on_done: Callable):
        super().__init__()
        self.future = future
        self.timeout_sec = timeout_sec
        self.on_done = on_done

    def done(self) -> bool:
        return self.future.done()

    def result(self) -> RunnerResult:
        try:
            costs, agent_id = self.future.result()
        except TimeoutError:
            self.on_done(None, "timeout")
            return RunnerResult(None, f"FarmRunner: no result within {self.timeout_sec:g} s "
                                      "(agent busy, gone or too slow); candidate dropped")
        except Exception as err:  # pylint: disable=broad-except
            self.on_done(None, "error")
            return RunnerResult(None, f"FarmRunner: measurement failed\n{err}")
        self.on_done(agent_id, "ok", costs)
        return RunnerResult(costs, None)


@derived_object
class FarmRunner(PyRunner):
    """Measures on every agent registered under ``key`` at the tracker."""

    def __init__(self, tracker_host: str, tracker_port: int, key: str, *,
                 evaluator_config: EvaluatorConfig | None = None, timeout_sec: float = 60.0,
                 device_wait_sec: float = 120.0, max_workers: int = 16,
                 on_wait: Callable | None = None, cache=None):
        super().__init__()
        from tunefarm.tracker.client import TrackerClient  # pylint: disable=import-outside-toplevel

        self.key = key
        self.tracker = TrackerClient(tracker_host, tracker_port)
        self.rpc_config = RPCConfig(tracker_host=tracker_host, tracker_port=tracker_port, tracker_key=key,
                                    session_priority=1, session_timeout_sec=int(timeout_sec) + 1)
        self.evaluator_config = EvaluatorConfig._normalized(evaluator_config)  # pylint: disable=protected-access
        self.timeout_sec = timeout_sec
        self.device_wait_sec = device_wait_sec
        self.max_workers = max_workers
        self.on_wait = on_wait
        self.cache = cache  # MeasuredCache shared with the builder
        self._pool = None
        self._pool_size = 0
        self._lock = threading.Lock()
        self.per_agent = collections.Counter()  # agent id -> candidates measured
        self.failures = collections.Counter()  # "timeout" / "error" -> count

    def agents_available(self) -> int:
        """Agents on the key now; waits (bounded) while there are none."""
        try:
            return self.tracker.wait_for_key(self.key, self.device_wait_sec, on_wait=self.on_wait)
        except TrackerUnreachable as err:
            raise TrackerUnreachable(f"lost the tracker during tuning: {err}") from None

    def _get_pool(self, size: int) -> PopenPoolExecutor:
        size = max(1, min(size, self.max_workers))
        if self._pool is None or size != self._pool_size:
            if self._pool is not None:
                self._pool.shutdown()
            self._pool = PopenPoolExecutor(max_workers=size, timeout=self.timeout_sec)
            self._pool_size = size
        return self._pool

    def _record(self, agent_id, status):
        with self._lock:
            if agent_id is not None:
                self.per_agent[agent_id] += 1
            else:
                self.failures[status] += 1

    def run(self, runner_inputs: list[RunnerInput]) -> list[FarmRunnerFuture]:
        futures: list[FarmRunnerFuture | None] = [None] * len(runner_inputs)
        todo = []
        for i, inp in enumerate(runner_inputs):
            cached = self.cache.lookup(str(inp.artifact_path)) if self.cache is not None else None
            if cached is not None:
                done = concurrent.futures.Future()
                done.set_result((cached, "cache"))
                futures[i] = FarmRunnerFuture(done, self.timeout_sec, lambda *_: None)
            else:
                todo.append(i)
        if not todo:
            return futures  # type: ignore[return-value]
        agents = self.agents_available()
        pool = self._get_pool(agents)
        for i in todo:
            inp = runner_inputs[i]
            fut = pool.submit(_measure_one, self.rpc_config, self.evaluator_config, 1,
                              str(inp.artifact_path), str(inp.device_type),
                              tuple(a.as_json() for a in inp.args_info))
            futures[i] = FarmRunnerFuture(fut, self.timeout_sec, self._recorder(str(inp.artifact_path)))
        return futures  # type: ignore[return-value]

    def _recorder(self, artifact_path: str):
        def record(agent_id, status, costs=None):
            self._record(agent_id, status)
            if costs is not None and self.cache is not None:
                self.cache.add_result(artifact_path, costs)
        return record

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

