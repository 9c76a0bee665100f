"""FarmBuilder: MetaSchedule's Builder interface, with build workers that stay warm.

Stock ``LocalBuilder`` starts a fresh process pool for every batch, and each fresh worker runs
``import tvm.s_tir.tensor_intrin``, which registers every architecture's tensor intrinsics (CUDA,
ROCm, Hexagon, ARM...) and takes ~20 s of CPU on this project's 2-core machines, per worker, per
batch. A candidate handed to the builder is already scheduled (any tensorize already inlined the
intrinsic's body), so building it needs no intrinsic registry. FarmBuilder keeps one pool alive
across batches (recycled every ``recycle_after`` builds, the reason stock restarts it being a slow
leak in long-lived workers) and builds exactly as stock does otherwise: ``RemoveWeightLayoutRewriteBlock``
then ``tvm.driver.build``, exported as a ``.tar`` that the agent links with its ``cc``.
"""
from __future__ import annotations

import os
import tempfile

from tvm.s_tir.meta_schedule.builder import BuilderInput, BuilderResult, PyBuilder
from tvm.ir.utils import derived_object
from tvm.support.popen_pool import PopenPoolExecutor, StatusKind


def _warm_worker():
    # Import the build path once per worker instead of once per candidate.
    import tvm.driver  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
    import tvm.s_tir.transform  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel


def _build_one(mod, target):
    from tunefarm.core.building import build_candidate  # pylint: disable=import-outside-toplevel

    return build_candidate(mod, target, os.path.join(tempfile.mkdtemp(prefix="tunefarm-build-"), "tvm_tmp_mod.tar"))


@derived_object
class FarmBuilder(PyBuilder):
    """Builds candidates in a warm process pool on this host, or on the agents of ``build_key``.

    With ``build_key`` set, each agent registered under that key builds candidates for the farm
    (``tunefarm.builder.build`` in its RPC server): one RPC session per agent for the batch, the
    candidates shared out as the agents finish them; artifacts come back to the host, so any agent
    of the measuring key can run them.
    """

    def __init__(self, workers: int = 0, timeout_sec: float = 60.0, recycle_after: int = 512,
                 cache=None, build_key: str = "",
                 tracker: tuple[str, int] | None = None, device_wait_sec: float = 120.0):
        super().__init__()
        self.cache = cache
        self.build_key = build_key
        self.tracker = tracker
        self.device_wait_sec = device_wait_sec
        self.remote_builds: dict[str, int] = {}  # agent id -> candidates built there
        self.workers = workers or max(1, os.cpu_count() or 1)
        self.timeout_sec = timeout_sec
        self.recycle_after = recycle_after
        self._pool = None
        self._built = 0

    def _get_pool(self) -> PopenPoolExecutor:
        if self._pool is None or self._built >= self.recycle_after:
            if self._pool is not None:
                self._pool.shutdown()
            self._pool = PopenPoolExecutor(max_workers=self.workers, timeout=self.timeout_sec,
                                           initializer=_warm_worker)
            self._built = 0
        return self._pool

    def build(self, build_inputs: list[BuilderInput]) -> list[BuilderResult]:
        results: list[BuilderResult | None] = [None] * len(build_inputs)
        hashes = [self.cache.key(b.mod) if self.cache else None for b in build_inputs]
        todo = []
        for i, key in enumerate(hashes):
            if self.cache is not None and self.cache.has(key):
                # Measured before (in this run or a run this job resumes): nothing to build or measure.
                results[i] = BuilderResult(self.cache.artifact_for(key), None)
            else:
                todo.append(i)
        if todo:
            built = self._build_many([build_inputs[i] for i in todo])
            for i, res in zip(todo, built):
                results[i] = res
                if self.cache is not None and res.artifact_path is not None:
                    self.cache.note_artifact(res.artifact_path, hashes[i])
        self._built += len(todo)
        return results  # type: ignore[return-value]

    def _build_many(self, build_inputs: list[BuilderInput]) -> list[BuilderResult]:
        if self.build_key:
            return self._build_on_agents(build_inputs)
        pool = self._get_pool()
        results = []
        for res in pool.map_with_error_catching(lambda x: _build_one(*x),
                                                [(b.mod, b.target) for b in build_inputs]):
            if res.status == StatusKind.COMPLETE:
                results.append(BuilderResult(res.value, None))
            elif res.status == StatusKind.TIMEOUT:
                results.append(BuilderResult(None, f"FarmBuilder: timeout, killed after {self.timeout_sec} s"))
            else:
                results.append(BuilderResult(None, "FarmBuilder: an exception occurred\n" + str(res.value)))
        return results

    def _build_on_agents(self, build_inputs: list[BuilderInput]) -> list[BuilderResult]:
        # pylint: disable=import-outside-toplevel
        import json
        import queue
        import threading
        import uuid

        import tvm

        from tunefarm.core.targets import target_to_json
        from tunefarm.core.wire import AGENT_ID_FUNC, BUILDER_BUILD_MANY_FUNC, BUILDER_PARALLELISM_FUNC
        from tunefarm.tracker.client import request_session
        from tunefarm.tracker.client import TrackerClient

        agents = TrackerClient(*self.tracker).wait_for_key(self.build_key, self.device_wait_sec)
        todo: queue.Queue = queue.Queue()
        for i, inp in enumerate(build_inputs):
            todo.put((i, inp))
        results: list[BuilderResult | None] = [None] * len(build_inputs)
        lock = threading.Lock()
        batch = uuid.uuid4().hex[:8]

        def work():
            try:
                sess = request_session(self.tracker, self.build_key, self.device_wait_sec,
                                       session_timeout=int(self.timeout_sec * len(build_inputs)) + 60)
                agent_id = str(sess.get_function(AGENT_ID_FUNC)())
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
                        if error:
                            results[i] = BuilderResult(None, f"FarmBuilder: build on agent {agent_id} failed\n{error}")
                            continue
                        path = os.path.join(tempfile.mkdtemp(prefix="tunefarm-build-"), "tvm_tmp_mod.tar")
                        with open(path, "wb") as fh:
                            fh.write(sess.download(name + ".tar"))
                        results[i] = BuilderResult(path, None)
                        with lock:
                            self.remote_builds[agent_id] = self.remote_builds.get(agent_id, 0) + 1
                except Exception as err:  # pylint: disable=broad-except
                    for i, _ in chunk:
                        results[i] = BuilderResult(None, f"FarmBuilder: build on agent {agent_id} failed\n{err}")

        threads = [threading.Thread(target=work, daemon=True) for _ in range(min(agents, len(build_inputs)))]
        for thread in threads:
            thread.start()
        deadline = self.timeout_sec * len(build_inputs) + self.device_wait_sec
        for thread in threads:
            thread.join(deadline)
        return [r if r is not None else BuilderResult(None, f"FarmBuilder: no agent on key '{self.build_key}' "
                                                            "built this candidate") for r in results]

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
