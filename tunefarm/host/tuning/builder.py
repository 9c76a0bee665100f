"""The farm's builders, each one MetaSchedule ``Builder`` (``build(list[BuilderInput]) -> list[BuilderResult]``).

* :class:`WarmBuilder` builds on this host in a process pool that stays warm across batches.
* :class:`AgentBuilder` hands the candidates to the agents registered under a build key.
* :class:`FarmBuilder`, the tuning job's builder, answers a candidate measured before from the
  :class:`~tunefarm.host.tuning.measured_cache.MeasuredCache` and hands the rest to one of the two.

Why a warm pool: stock ``LocalBuilder`` starts a fresh process pool for every batch, and each fresh
worker runs ``import tvm.s_tir.tensor_intrin``, which registers every architecture's tensor intrinsics
(CUDA, ROCm, Hexagon, ARM...) and takes ~20 s of CPU on this project's 2-core machines, per worker, per
batch. A candidate handed to the builder is already scheduled (any tensorize already inlined the
intrinsic's body), so building it needs no intrinsic registry. WarmBuilder keeps one pool alive across
batches (recycled every ``recycle_after`` builds, the reason stock restarts it being a slow leak in
long-lived workers) and builds exactly as stock does otherwise (``tunefarm.core.building``).
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import tempfile
import threading
import time

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.builder import BuilderInput, BuilderResult, PyBuilder
from tvm.support.popen_pool import MapResult, PopenPoolExecutor, PopenWorker, StatusKind, kill_child_processes

from tunefarm.core.building import STRAGGLER_MIN_S, STRAGGLER_SHARE, straggler_cut
from tunefarm.core.threads import usable_cpus
from tunefarm.core.torchless import TorchlessWorker as _TorchlessWorker

KEEP_TIMEOUTS = 16  # timed-out candidates a builder keeps
BUILD_TIMEOUTS_DIR = "build-timeouts"  # where a job (under its logs/) or a share (its work dir) keeps them


class _BuildPool(PopenPoolExecutor):
    """PopenPoolExecutor whose workers are :class:`_TorchlessWorker` (its ``_worker_run`` is TVM 0.27's with
    that class), and whose calls submitted with a token can be cut (:meth:`cut`: the worker process running
    it killed; the call answers as an exception and its worker starts afresh at its next call, as after TVM's
    own timeout)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._running: dict[int, tuple[PopenWorker, float]] = {}  # token -> the worker running it, since when
        self._token = threading.local()  # the token of the call this pool thread runs (submit_tracked)

    def _worker_run(self, fn, args, kwargs):
        token = getattr(self._token, "value", None)
        with self._lock:
            tid = threading.get_ident()
            proc = self._worker_map.get(tid)
            if proc is None:
                proc = self._worker_map[tid] = _TorchlessWorker(
                    self._initializer, self._initargs, self._maximum_process_uses, self._stdout, self._stderr)
        proc.send(fn, args, kwargs, self._timeout)
        if token is not None:
            with self._lock:
                self._running[token] = (proc, time.monotonic())
        try:
            return proc.recv()
        finally:
            if token is not None:
                with self._lock:
                    self._running.pop(token, None)
                    was_cut, proc.tunefarm_cut = getattr(proc, "tunefarm_cut", False), False
                if was_cut and proc._proc is not None:  # pylint: disable=protected-access
                    proc.kill()  # cut as it answered: its next call must start a new process, not write to a dead one

    def _run_tracked(self, token, fn, args) -> MapResult:
        self._token.value = token
        try:
            return self._worker_run_with_error_catching(fn, args, {})  # TVM's: the MapResult of the call
        finally:
            self._token.value = None

    def submit_tracked(self, token: int, fn, *args) -> concurrent.futures.Future:
        """``fn(*args)`` in a worker; the future's result is a MapResult (as map_with_error_catching's)."""
        return self._threadpool.submit(self._run_tracked, token, fn, args)

    def cut(self, token: int, ran_s: float = 0.0) -> bool:
        """Kill the worker process running ``token``'s call, if it has been running for ``ran_s`` seconds (its
        thread, reading the reply, sees the process gone and cleans up); False if it is not (queued, or done)."""
        with self._lock:
            proc, since = self._running.get(token, (None, 0.0))
            child = getattr(proc, "_proc", None)
            if child is None or time.monotonic() - since < ran_s:
                return False
            proc.tunefarm_cut = True
            try:
                kill_child_processes(child.pid)  # what the build started (TVM's kill does the same)
            except Exception:  # pylint: disable=broad-except  # psutil missing, or they are gone
                pass
            try:
                os.kill(child.pid, signal.SIGKILL)
            except OSError:
                return False
            return True


def _warm_worker():
    # Import the build path once per worker instead of once per candidate.
    import tvm.driver  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
    import tvm.s_tir.transform  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel


def _ready() -> int:
    """A warm-up call: the worker has started and run its initializer (its pid, for whoever asks)."""
    return os.getpid()


def _artifact_path() -> str:
    """A fresh ``.tar`` path of its own (MetaSchedule's RemoveBuildArtifact deletes its directory)."""
    return os.path.join(tempfile.mkdtemp(prefix="tunefarm-build-"), "tvm_tmp_mod.tar")


def _build_one(mod, target):
    from tunefarm.core.building import build_candidate  # pylint: disable=import-outside-toplevel

    return build_candidate(mod, target, _artifact_path())


@derived_object
class WarmBuilder(PyBuilder):
    """Builds candidates on this host in ``workers`` processes that stay warm across batches."""

    def __init__(self, workers: int = 0, timeout_sec: float = 60.0, recycle_after: int = 512,
                 straggler_factor: float = 4.0):
        super().__init__()
        self.workers = workers or usable_cpus()
        self.timeout_sec = timeout_sec
        self.recycle_after = recycle_after
        self.straggler_factor = straggler_factor
        self._pool = None
        self._built = 0

    def _get_pool(self) -> _BuildPool:
        if self._pool is None or self._built >= self.recycle_after:
            if self._pool is not None:
                self._pool.shutdown()
            self._pool = _BuildPool(max_workers=self.workers, timeout=self.timeout_sec, initializer=_warm_worker)
            self._built = 0
        return self._pool

    def warm(self) -> list:
        """Start the pool's workers now, in the background (futures of their pids), so the first batch does
        not wait for them: a fresh worker starts Python, TVM and the build path (a 2-worker pool, started
        without PyTorch: 2.6-2.8 s on the 2-core development machine; with it 6-8 s)."""
        pool = self._get_pool()
        return [pool.submit(_ready) for _ in range(self.workers)]

    def build(self, build_inputs: list[BuilderInput]) -> list[BuilderResult]:
        pool = self._get_pool()
        self._built += len(build_inputs)
        done, cut = run_batch(pool, _build_one, [(b.mod, b.target) for b in build_inputs], self.straggler_factor)
        results = []
        for n, res in enumerate(done):
            if res.status == StatusKind.COMPLETE:
                results.append(BuilderResult(res.value, None))
            elif res.status == StatusKind.TIMEOUT:
                results.append(BuilderResult(None, f"FarmBuilder: timeout, killed after {self.timeout_sec} s"))
            elif n in cut:
                results.append(BuilderResult(None, f"FarmBuilder: timeout (straggler), killed {cut[n]:.1f} s into its batch: "
                                                   f"still building at {self.straggler_factor:g}x the time "
                                                   f"{STRAGGLER_SHARE:.1%} of its batch took"))
            else:
                results.append(BuilderResult(None, "FarmBuilder: an exception occurred\n" + str(res.value)))
        return results

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def run_batch(pool: _BuildPool, fn, arg_lists: list[tuple], factor: float,
              min_s: float | None = None) -> tuple[list[MapResult], dict[int, float]]:
    """``fn(*args)`` for each of ``arg_lists`` in ``pool``: each one's MapResult, in order, and the calls cut as
    stragglers (:func:`straggler_cut`; index -> seconds into the batch when cut)."""
    started = time.monotonic()
    finished: list[float] = []
    lock = threading.Lock()

    def note(_future):
        with lock:
            finished.append(time.monotonic() - started)

    futures = [pool.submit_tracked(n, fn, *args) for n, args in enumerate(arg_lists)]
    for future in futures:
        future.add_done_callback(note)
    cut_at = straggler_cut(finished, len(futures), factor, STRAGGLER_MIN_S if min_s is None else min_s)
    cut: dict[int, float] = {}
    pending = set(range(len(futures)))
    while pending:
        waited = concurrent.futures.wait([futures[n] for n in pending], timeout=0.2,
                                         return_when=concurrent.futures.FIRST_COMPLETED)[0]
        pending = {n for n in pending if futures[n] not in waited}
        with lock:
            limit = cut_at()
        now = time.monotonic() - started
        if pending and limit is not None and now >= limit:
            for n in sorted(pending):  # one queued behind the stragglers gets as long once it runs
                if n not in cut and pool.cut(n, limit):
                    cut[n] = round(now, 1)
    return [f.result() for f in futures], cut


@derived_object
class AgentBuilder(PyBuilder):
    """Builds candidates on the agents registered under ``key`` (``tunefarm.builder.build_many_timed`` in their
    RPC server, ``build_many`` on agents older than it): one RPC session per agent for the batch, one candidate
    per core of that agent at a time, the candidates shared out as the agents finish them. Artifacts come back
    to the host, so any agent of the measuring key can run them. ``remote_builds`` counts the candidates each
    agent built.

    The agent kills a candidate's build past ``timeout_sec``, and cuts stragglers among the candidates of one
    call as the host does in a batch (:func:`straggler_cut`, ``straggler_factor``: so on agents with 8 cores or
    more; the host hears a call's answers together, so it cannot tell a straggler from the rest of its call).
    The batch returns once every candidate has its answer: a thread still waiting for a busy agent's session is
    not waited for."""

    def __init__(self, tracker: tuple[str, int], key: str, timeout_sec: float = 60.0,
                 device_wait_sec: float = 120.0, straggler_factor: float = 4.0):
        super().__init__()
        self.tracker = tracker
        self.key = key
        self.timeout_sec = timeout_sec
        self.device_wait_sec = device_wait_sec
        self.straggler_factor = straggler_factor
        self.remote_builds: dict[str, int] = {}  # agent id -> candidates built there

    def build(self, build_inputs: list[BuilderInput]) -> list[BuilderResult]:
        # pylint: disable=import-outside-toplevel
        import json
        import queue
        import threading
        import uuid

        import tvm

        from tunefarm.core.targets import target_to_json
        from tunefarm.core.wire import (AGENT_ID_FUNC, BUILD_TIMEOUT_WORD, BUILDER_BUILD_MANY_FUNC,
                                        BUILDER_BUILD_TIMED_FUNC, BUILDER_PARALLELISM_FUNC)
        from tunefarm.tracker.client import TrackerClient, request_session

        with TrackerClient(*self.tracker) as client:
            agents = client.wait_for_key(self.key, self.device_wait_sec)
        todo: queue.Queue = queue.Queue()
        for i, inp in enumerate(build_inputs):
            todo.put((i, inp))
        results: list[BuilderResult | None] = [None] * len(build_inputs)
        lock = threading.Lock()
        answered = threading.Condition(lock)  # notified as each candidate gets its answer
        batch = uuid.uuid4().hex[:8]
        options = json.dumps({"timeout_s": float(self.timeout_sec), "straggler_factor": float(self.straggler_factor)})

        def answer(i: int, result: BuilderResult) -> None:
            with answered:
                results[i] = result
                answered.notify_all()

        def work():
            try:
                sess = request_session(self.tracker, self.key, self.device_wait_sec,
                                       session_timeout=int(self.timeout_sec * len(build_inputs)) + 60)
                agent_id = str(sess.get_function(AGENT_ID_FUNC)())
                try:
                    timed = sess.get_function(BUILDER_BUILD_TIMED_FUNC)

                    def build_many(names, target):
                        return timed(names, target, options)
                except Exception:  # pylint: disable=broad-except  # an agent older than it
                    build_many = sess.get_function(BUILDER_BUILD_MANY_FUNC)
                width = int(sess.get_function(BUILDER_PARALLELISM_FUNC)())
            except Exception:  # pylint: disable=broad-except
                return  # this agent is gone or busy; the others take its share
            while True:
                chunk = []
                while len(chunk) < width:  # one candidate per core of this agent at a time
                    try:
                        chunk.append(todo.get_nowait())
                    except queue.Empty:
                        break
                if not chunk:
                    return
                names = [f"cand-{batch}-{i}" for i, _ in chunk]
                try:
                    target_json = json.dumps(target_to_json(chunk[0][1].target))
                    for name, (_, inp) in zip(names, chunk):
                        sess.upload(bytearray(tvm.ir.save_json(inp.mod).encode()), name + ".json")
                    errors = json.loads(build_many(json.dumps(names), target_json))
                    for name, (i, _), error in zip(names, chunk, errors):
                        error = str(error)[:4000]  # the agent's word
                        if error.startswith(BUILD_TIMEOUT_WORD):
                            answer(i, BuilderResult(None, f"FarmBuilder: timeout on agent {agent_id}: {error}"))
                        elif error:
                            answer(i, BuilderResult(None, f"FarmBuilder: build on agent {agent_id} failed\n{error}"))
                        else:
                            path = _artifact_path()
                            with open(path, "wb") as fh:
                                fh.write(sess.download(name + ".tar"))
                            with lock:
                                self.remote_builds[agent_id] = self.remote_builds.get(agent_id, 0) + 1
                            answer(i, BuilderResult(path, None))
                except Exception as err:  # pylint: disable=broad-except
                    for i, _ in chunk:
                        answer(i, BuilderResult(None, f"FarmBuilder: build on agent {agent_id} failed\n{err}"))

        threads = [threading.Thread(target=work, daemon=True) for _ in range(min(agents, len(build_inputs)))]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + self.timeout_sec * len(build_inputs) + self.device_wait_sec
        with answered:  # until every candidate has its answer (not until every thread ends), or the deadline
            while (any(r is None for r in results) and any(t.is_alive() for t in threads)
                   and time.monotonic() < deadline):
                answered.wait(0.2)
        return [r if r is not None else BuilderResult(None, f"FarmBuilder: no agent on key '{self.key}' "
                                                            "built this candidate") for r in results]

    def shutdown(self) -> None:
        """Nothing to stop: sessions end with their batch."""


@derived_object
class FarmBuilder(PyBuilder):
    """The tuning job's builder: a candidate measured before (in this run, or in a run this job resumes)
    gets a placeholder artifact from ``cache`` instead of a build (FarmRunner answers it from the cache);
    the others are built by ``builder`` (a :class:`WarmBuilder` or an :class:`AgentBuilder`)."""

    def __init__(self, builder, cache=None, keep_dir: str | os.PathLike | None = None):
        super().__init__()
        self.builder = builder
        self.cache = cache
        self.build_failures: dict[str, int] = {}  # "timeout" / "no agent" / "error" -> candidates
        # A candidate whose build ran into the timeout holds its whole batch (the builder returns when every
        # candidate is done): its scheduled module is kept here (at most KEEP_TIMEOUTS) to rebuild and look at.
        self.keep_dir = keep_dir
        self.kept: list[str] = []

    def build(self, build_inputs: list[BuilderInput]) -> list[BuilderResult]:
        results: list[BuilderResult | None] = [None] * len(build_inputs)
        keys = [self.cache.key(b.mod) if self.cache is not None else None for b in build_inputs]
        todo = []
        for i, key in enumerate(keys):
            if self.cache is not None and self.cache.has(key):
                results[i] = BuilderResult(self.cache.artifact_for(key), None)
            else:
                todo.append(i)
        if todo:
            for i, res in zip(todo, self.builder.build([build_inputs[i] for i in todo])):
                results[i] = res
                if res.artifact_path is None:
                    kind = _failure_kind(res.error_msg or "")
                    self.build_failures[kind] = self.build_failures.get(kind, 0) + 1
                    if kind == "timeout":
                        self._keep(build_inputs[i])
                elif self.cache is not None:
                    self.cache.note_artifact(res.artifact_path, keys[i])
        return results  # type: ignore[return-value]

    def warm(self) -> list:
        """Start the inner builder's workers in the background where it has any (WarmBuilder)."""
        return self.builder.warm() if hasattr(self.builder, "warm") else []

    def _keep(self, build_input: BuilderInput) -> None:
        if self.keep_dir is None or len(self.kept) >= KEEP_TIMEOUTS:
            return
        # pylint: disable=import-outside-toplevel
        import tvm
        import tvm_ffi

        from tunefarm.core.targets import target_to_json

        try:
            os.makedirs(self.keep_dir, exist_ok=True)
            name = f"timeout-{len(self.kept):02d}-{tvm_ffi.structural_hash(build_input.mod) & 0xFFFFFFFF:08x}.json"
            path = os.path.join(self.keep_dir, name)
            with open(path, "w", encoding="utf-8") as out:
                json.dump({"target": target_to_json(build_input.target), "mod": tvm.ir.save_json(build_input.mod)}, out)
        except (OSError, ValueError, TypeError):  # diagnostics only: never the run's failure
            return
        self.kept.append(path)

    def shutdown(self) -> None:
        self.builder.shutdown()


def load_kept(path: str | os.PathLike):
    """``(mod, target)`` of a candidate :class:`FarmBuilder` kept (to rebuild it: ``tunefarm.core.building``)."""
    import tvm  # pylint: disable=import-outside-toplevel

    with open(path, encoding="utf-8") as src:
        data = json.load(src)
    return tvm.ir.load_json(data["mod"]), tvm.target.Target(data["target"])


def _failure_kind(message: str) -> str:
    """The report's word for why a candidate did not build."""
    first = message.splitlines()[0] if message else ""
    if "timeout" in first:
        return "timeout"
    if "no agent on key" in first:
        return "no agent"
    return "error"


def job_builder(spec, tracker: tuple[str, int], device_wait_sec: float, cache=None,
                keep_dir: str | os.PathLike | None = None) -> FarmBuilder:
    """The builder a job's ``builder:`` section asks for (``key`` set: its agents build), behind the cache;
    candidates whose builds time out are kept in ``keep_dir``."""
    if spec.key:
        inner = AgentBuilder(tracker, spec.key, timeout_sec=spec.timeout_sec, device_wait_sec=device_wait_sec,
                             straggler_factor=spec.straggler_factor)
    else:
        inner = WarmBuilder(workers=spec.workers, timeout_sec=spec.timeout_sec,
                            straggler_factor=spec.straggler_factor)
    return FarmBuilder(inner, cache=cache, keep_dir=keep_dir)
