"""TVM runner: a Relax executable the host compiled (``tvm.compile(...).export_library``), on this agent's
CPU, CUDA GPU or OpenCL device, timed with TVM's own ``time_evaluator``.

The host builds the model (tuned records applied, or none) for the agent's target and sends the ``.so``
in the session like any other model file; the runner loads it into a ``relax.VirtualMachine`` on the
device named by the ``device`` option and checks nothing itself (the host compares the outputs). One run
is timed apart (first run: lazy initialisation, code loading); then, as ``core.stats.evaluator_plan``
says from a single timed run, warm-up runs and the timed samples, each one ``invoke_stateful`` of
``main`` on inputs already on the device, timed on the device: no RPC round trip in the figure.

Threads: the TVM runtime of the session is the agent's (the RPC server set ``TVM_NUM_THREADS`` before
TVM started); the runner reports ``runtime.NumThreads`` for CPU runs and cannot change it per row.
Sessions are forked from the agent's RPC server, which must not initialise CUDA: nothing here runs
before a session asks for this runner.
Options: ``device`` (``cpu`` | ``cuda`` | ``opencl``), ``device_index``, ``budget_s``.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from tunefarm.core import onednn
from tunefarm.core.stats import evaluator_plan, latency_stats
from tunefarm.core.threads import POOL_SPINS
from tunefarm.device_agents.runners.base import BaseRunner, RunnerUnavailable, batch_size

DEVICES = ("cpu", "cuda", "opencl")
ONEDNN_MODULE_KIND = onednn.MODULE_KIND.encode()  # found in a model library with oneDNN parts


def file_mentions(path: str, needle: bytes, chunk: int = 1 << 22) -> bool:
    """Whether the file at ``path`` contains ``needle`` (read in chunks: a model library with its weights can be
    hundreds of MB). False for a file that cannot be read (loading it will say why)."""
    tail = b""
    try:
        with open(path, "rb") as handle:
            while block := handle.read(chunk):
                if needle in tail + block:
                    return True
                tail = block[-(len(needle) - 1):]
    except OSError:
        return False
    return False


class TVMRunner(BaseRunner):
    name = "tvm"

    @classmethod
    def unavailable_reason(cls, options=None):
        options = options or {}
        if str(options.get("precision", "fp32")) not in ("fp32", "fp16", "bf16", "tf32"):
            return f"unknown precision {options.get('precision')!r} for a TVM build (fp32, fp16, bf16 or tf32)"
        device = str(options.get("device", "cpu"))
        if device not in DEVICES:
            return f"unknown device {device!r} for the TVM runner ({', '.join(DEVICES)})"
        if options.get("threads"):
            return ("the TVM runner runs with the agent's own thread count (start the agent with --threads N); "
                    "a row cannot change it")
        if options.get("pool_spin", "mixed") not in POOL_SPINS:
            return f"unknown pool_spin for a TVM build ({' or '.join(POOL_SPINS)})"
        return None

    def activate_impl(self) -> None:
        # pylint: disable=import-outside-toplevel
        import tvm
        from tvm import relax

        self.tvm = tvm
        self.device_type = str(self.options.get("device", "cpu"))
        self.dev = tvm.device(self.device_type, int(self.options.get("device_index", 0)))
        if not self.dev.exist:
            hint = ""
            from tvm.base import _LOADED_LIBS  # pylint: disable=import-outside-toplevel

            if self.device_type == "opencl" and "tvm_runtime_opencl" not in _LOADED_LIBS and str(
                    tvm.support.libinfo().get("USE_OPENCL", "OFF")).upper() not in ("ON", "1"):
                hint = " (this TVM runtime has no OpenCL backend: start the agent with --opencl)"
            raise RunnerUnavailable(f"TVM's runtime on this device sees no {self.dev}{hint}")
        from tunefarm.core.threads import mixed_pool_env  # pylint: disable=import-outside-toplevel

        # A CPU model with oneDNN parts runs oneDNN's OpenMP pool and TVM's pool by turns: neither pool's idle
        # threads may spin on the cores the other needs next (core.threads.MIXED_POOLS, measured). Set before the
        # plugin loads libgomp and before TVM's pool first runs; this session process runs this one model.
        # ``pool_spin: stock`` (a row's option) leaves both libraries' own spins: the placement's probe times a
        # build both ways (host/placement/evaluation.probe_spins), as neither setting wins for every model.
        self.pools: dict[str, str] = {}
        self.spin = "mixed"
        if self.device_type == "cpu" and file_mentions(self.model_path, ONEDNN_MODULE_KIND):
            self.spin = str(self.options.get("pool_spin", "mixed"))
            if self.spin == "mixed":
                self.pools = mixed_pool_env()
                os.environ.update(self.pools)
        # A library with oneDNN parts needs the plugin's module loader before load_module: the agent names its
        # plugin in $TUNEFARM_ONEDNN_PLUGIN (its RPC server's sessions inherit it).
        self.onednn_plugin = onednn.load_if_named()
        from tunefarm.core import cudalibs  # pylint: disable=import-outside-toplevel

        # Likewise cuBLAS/cuDNN parts: the agent names its plugins' directory in $TUNEFARM_CUDA_LIBS.
        self.cuda_plugins = cudalibs.load_if_named() if self.device_type == "cuda" else []
        try:
            library = tvm.runtime.load_module(self.model_path)
        except Exception as err:  # pylint: disable=broad-except  # TVM raises several types here
            if "dnnl" in str(err) and self.onednn_plugin is None:
                raise RunnerUnavailable("the model has oneDNN parts but this agent has no oneDNN plugin (run "
                                        "`tunefarm runtime onednn` on it, with libdnnl-dev installed, and restart "
                                        "the agent)") from None
            for lib in ("cublas", "cudnn"):
                if f"{lib}_json" in str(err) and cudalibs.loaded(lib) is None:
                    raise RunnerUnavailable(f"the model has {lib} parts but this agent has no {lib} plugin (run "
                                            "`tunefarm runtime cuda-libs` on it and restart the agent)") from None
            raise
        self.vm = relax.VirtualMachine(library, self.dev)

    def _device_inputs(self, feed: dict[str, np.ndarray]) -> list:
        return [self.tvm.runtime.tensor(x, self.dev) for x in feed.values()]

    def infer_impl(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = self.vm["main"](*self._device_inputs(feed))
        return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]

    def measure(self, feed, warmup, repeat):
        budget_s = float(self.options.get("budget_s", 300.0))
        self.vm.set_input("main", *self._device_inputs(feed))

        def evaluate(number: int, times: int):
            return self.vm.time_evaluator("invoke_stateful", self.dev, number=number, repeat=times)("main")

        single = evaluate(1, 1).mean
        n_warm, samples = evaluator_plan(single, warmup, repeat, budget_s)
        if n_warm > 0:
            evaluate(n_warm, 1)
        results = list(evaluate(1, samples).results)
        return {"latency": latency_stats(results, warmup=n_warm + 1, timer="time_evaluator"),
                "throughput_per_s": batch_size(feed) * len(results) / sum(results)}

    def describe(self) -> dict[str, Any]:
        import tvm_ffi  # pylint: disable=import-outside-toplevel

        # The host compiled the module; the class it compiled it in comes with the row (a job's tuning.precision).
        info: dict[str, Any] = {"version": str(self.tvm.__version__), "device": str(self.dev),
                                "precision": str(self.options.get("precision", "fp32"))}
        if self.device_type == "cpu":
            info["threads"] = int(tvm_ffi.get_global_func("runtime.NumThreads")())
        if getattr(self, "onednn_plugin", None) is not None:
            # oneDNN's OpenMP pool: the agent sets OMP_NUM_THREADS to its thread count (core.threads.thread_env)
            info["onednn"] = {"plugin": str(self.onednn_plugin), "omp_threads": os.environ.get("OMP_NUM_THREADS")}
        if getattr(self, "pools", None):
            info["pool_spin"] = dict(self.pools)  # how idle TVM and OpenMP threads waited in this row
        elif getattr(self, "spin", "mixed") == "stock":
            info["pool_spin"] = {}  # asked for the libraries' own spins: nothing set
        if getattr(self, "cuda_plugins", None):
            info["cuda_libs"] = [str(p) for p in self.cuda_plugins]
        return info
