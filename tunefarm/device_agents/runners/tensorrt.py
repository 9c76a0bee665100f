"""TensorRT runner (NVIDIA GPUs): ONNX -> engine (fp32 or fp16) -> trtexec-grade measurement.

Needs ``tensorrt`` (10 or later: named I/O tensors, ``execute_async_v3``) and ``cuda-python`` (buffers,
streams, events, CUDA graphs); both are imported in ``activate`` only, so an agent without them starts
as usual and answers "not available on this device" with the reason, never a number.

Engines are cached on the agent by GPU name, TensorRT version, model hash, precision, input shapes and
workspace size; the timing cache (the tactic timings TensorRT reuses across builds) is kept per GPU and
TensorRT version. Both live under ``$TUNEFARM_CACHE_DIR/tensorrt`` (default ``~/.cache/tunefarm``).

Measurement, per iteration on one stream, with CUDA events around each phase:
    [start] H2D copies [in] execute (or a CUDA graph of it) [out] D2H copies [end]
``latency`` is start->end (copies + compute, as trtexec's "Latency"), ``gpu_compute`` is in->out only
(trtexec's "GPU Compute Time"), ``host_wall`` is the host's view of each iteration. Iterations go on until
both ``repeat`` iterations and ``duration_s`` seconds are done, after ``warmup`` iterations.
Options: ``precision`` (fp32 | fp16), ``cuda_graphs`` (bool), ``duration_s``, ``workspace_mb``,
``device_index``, ``cache_dir``.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from tunefarm.core.errors import TunefarmError
from tunefarm.core.stats import latency_stats, sampling_done
from tunefarm.device_agents.runners.base import BaseRunner, RunnerUnavailable, batch_size
from tunefarm.device_agents.runners.torch import cuda_device_count

PRECISIONS = ("fp32", "fp16")
CACHE_ENV = "TUNEFARM_CACHE_DIR"


def _cudart_spec() -> bool:
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except ModuleNotFoundError:
            continue
    return False


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # pylint: disable=import-outside-toplevel
    except ImportError:
        from cuda import cudart  # pylint: disable=import-outside-toplevel,no-name-in-module
    return cudart


def cache_root(options: dict[str, Any] | None = None) -> Path:
    options = options or {}
    base = options.get("cache_dir") or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tunefarm"
    return Path(base) / "tensorrt"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "x"


class _Cuda:
    """The few CUDA runtime calls the runner makes, each checked (cuda-python returns (error, value...))."""

    def __init__(self):
        self.rt = _import_cudart()

    def __call__(self, name: str, *args):
        result = getattr(self.rt, name)(*args)
        err, rest = result[0], result[1:]
        if err != self.rt.cudaError_t.cudaSuccess:
            text = self.rt.cudaGetErrorString(err)[1]
            raise TunefarmError(f"CUDA {name} failed: {text.decode() if isinstance(text, bytes) else text}")
        return rest[0] if len(rest) == 1 else (rest or None)


class TensorRTRunner(BaseRunner):
    name = "tensorrt"

    @classmethod
    def unavailable_reason(cls, options=None):
        options = options or {}
        if importlib.util.find_spec("tensorrt") is None:
            return "TensorRT is not installed on this device (pip install tensorrt cuda-python, NVIDIA GPU)"
        if not _cudart_spec():
            return "cuda-python is not installed on this device (the TensorRT runner needs it: pip install cuda-python)"
        if cuda_device_count() == 0:
            return "no CUDA GPU on this device"
        if str(options.get("precision", "fp32")) not in PRECISIONS:
            return f"unknown precision {options.get('precision')!r} for TensorRT ({' or '.join(PRECISIONS)})"
        return None

    # ------------------------------------------------------------ build (or load from the cache)
    def activate_impl(self) -> None:
        import tensorrt as trt  # pylint: disable=import-outside-toplevel

        self.trt = trt
        major = int(trt.__version__.split(".")[0])
        if major < 10:
            raise RunnerUnavailable(f"TensorRT {trt.__version__} is too old: the runner uses the TensorRT 10 API")
        self.cuda = _Cuda()
        self.device_index = int(self.options.get("device_index", 0))
        self.cuda("cudaSetDevice", self.device_index)
        props = self.cuda("cudaGetDeviceProperties", self.device_index)
        name = props.name
        self.gpu_name = (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).rstrip("\x00")
        self.precision = str(self.options.get("precision", "fp32"))
        self.logger = trt.Logger(trt.Logger.WARNING)
        shapes = [tuple(int(d) for d in s) for s in self.options.get("input_shapes", [])]
        model = Path(self.model_path).read_bytes()
        workspace_mb = int(self.options.get("workspace_mb", 4096))
        key_text = "|".join([self.gpu_name, trt.__version__, hashlib.sha256(model).hexdigest(), self.precision,
                             repr(shapes), str(workspace_mb)])
        root = cache_root(self.options)
        root.mkdir(parents=True, exist_ok=True)
        self.engine_path = root / f"{_slug(self.gpu_name)}-trt{trt.__version__}-{self.precision}-" \
                                  f"{hashlib.sha256(key_text.encode()).hexdigest()[:20]}.engine"
        self.timing_cache_path = root / f"timing-{_slug(self.gpu_name)}-trt{trt.__version__}.cache"
        self.engine_cache_hit = self.engine_path.is_file()
        self.build_s = 0.0
        if self.engine_cache_hit:
            blob = self.engine_path.read_bytes()
        else:
            t0 = time.perf_counter()
            blob = self._build(model, shapes, workspace_mb)
            self.build_s = time.perf_counter() - t0
            tmp = self.engine_path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(blob)
            tmp.replace(self.engine_path)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(blob)
        if self.engine is None:
            raise TunefarmError(f"TensorRT could not load the engine {self.engine_path} (delete it to rebuild)")
        self.context = self.engine.create_execution_context()
        self._allocate(shapes)

    def _build(self, model: bytes, shapes: list[tuple[int, ...]], workspace_mb: int) -> bytes:
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)  # TensorRT 10: every network has an explicit batch
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(self.model_path)):  # from the file: ONNX external data next to it works
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise TunefarmError(f"TensorRT cannot parse the ONNX model: {errors[0] if errors else 'unknown error'}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
        if self.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        profile = None
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            if any(int(d) < 0 for d in tensor.shape):
                if i >= len(shapes):
                    raise TunefarmError(f"input {tensor.name!r} has dynamic dimensions and no shape was given")
                profile = profile or builder.create_optimization_profile()
                profile.set_shape(tensor.name, shapes[i], shapes[i], shapes[i])
        if profile is not None:
            config.add_optimization_profile(profile)
        old_cache = self.timing_cache_path.read_bytes() if self.timing_cache_path.is_file() else b""
        timing_cache = config.create_timing_cache(old_cache)
        config.set_timing_cache(timing_cache, ignore_mismatch=False)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise TunefarmError(f"TensorRT failed to build a {self.precision} engine (see the agent's log)")
        tmp = self.timing_cache_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
        tmp.replace(self.timing_cache_path)
        return bytes(memoryview(serialized))

    def _allocate(self, shapes: list[tuple[int, ...]]) -> None:
        """Pinned host and device buffers for every named I/O tensor; addresses bound to the context."""
        trt, cuda = self.trt, self.cuda
        self.inputs: list[dict[str, Any]] = []
        self.outputs: list[dict[str, Any]] = []
        self.allocations: list[tuple[str, int]] = []
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        in_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        for i, name in enumerate(in_names):
            shape = shapes[i] if i < len(shapes) else tuple(self.engine.get_tensor_shape(name))
            self.context.set_input_shape(name, shape)
        for name in names:
            is_input = name in in_names
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            nbytes = max(1, int(np.prod(shape)) * dtype.itemsize)
            host_ptr = cuda("cudaMallocHost", nbytes)
            self.allocations.append(("cudaFreeHost", int(host_ptr)))
            host = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(int(host_ptr)))
            host = host[:int(np.prod(shape)) * dtype.itemsize].view(dtype).reshape(shape)
            dev_ptr = cuda("cudaMalloc", nbytes)
            self.allocations.append(("cudaFree", int(dev_ptr)))
            self.context.set_tensor_address(name, int(dev_ptr))
            (self.inputs if is_input else self.outputs).append(
                {"name": name, "shape": shape, "dtype": dtype, "host": host, "device": int(dev_ptr),
                 "nbytes": int(np.prod(shape)) * dtype.itemsize})
        self.stream = cuda("cudaStreamCreate")
        self.events = [cuda("cudaEventCreate") for _ in range(4)]
        self.graph = self.graph_exec = None

    # ------------------------------------------------------------ run
    def _h2d(self) -> None:
        kind = self.cuda.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        for buf in self.inputs:
            self.cuda("cudaMemcpyAsync", buf["device"], buf["host"].ctypes.data, buf["nbytes"], kind, self.stream)

    def _d2h(self) -> None:
        kind = self.cuda.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for buf in self.outputs:
            self.cuda("cudaMemcpyAsync", buf["host"].ctypes.data, buf["device"], buf["nbytes"], kind, self.stream)

    def _execute(self) -> None:
        if self.graph_exec is not None:
            self.cuda("cudaGraphLaunch", self.graph_exec, self.stream)
        elif not self.context.execute_async_v3(int(self.stream)):
            raise TunefarmError("TensorRT execute_async_v3 failed (see the agent's log)")

    def _set_inputs(self, feed: dict[str, np.ndarray]) -> None:
        values = list(feed.values())
        if len(values) != len(self.inputs):
            raise TunefarmError(f"the engine takes {len(self.inputs)} input(s), got {len(values)}")
        for buf, value in zip(self.inputs, values):
            if tuple(value.shape) != buf["shape"]:
                raise TunefarmError(f"input {buf['name']!r}: shape {tuple(value.shape)}, engine wants {buf['shape']}")
            np.copyto(buf["host"], value.astype(buf["dtype"], copy=False))

    def infer_impl(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        self._set_inputs(feed)
        self._h2d()
        self._execute()
        self._d2h()
        self.cuda("cudaStreamSynchronize", self.stream)
        return [buf["host"].copy() for buf in self.outputs]

    def _capture_graph(self) -> None:
        """Record one execute into a CUDA graph (after a normal run, so TensorRT's lazy setup is done)."""
        rt = self.cuda.rt
        self.cuda("cudaStreamBeginCapture", self.stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
        ok = self.context.execute_async_v3(int(self.stream))
        self.graph = self.cuda("cudaStreamEndCapture", self.stream)
        if not ok:
            raise TunefarmError("TensorRT execute_async_v3 failed while capturing a CUDA graph")
        self.graph_exec = self.cuda("cudaGraphInstantiate", self.graph, 0)

    def measure(self, feed, warmup, repeat):
        self._set_inputs(feed)
        for _ in range(max(1, warmup)):
            self.infer_impl(feed)
        if self.options.get("cuda_graphs"):
            self._capture_graph()
            self.infer_impl(feed)
        duration_s = float(self.options.get("duration_s", 0.0))
        budget_s = float(self.options.get("budget_s", 300.0))
        start, e_in, e_out, end = self.events
        total, compute, wall = [], [], []
        t_begin = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            self.cuda("cudaEventRecord", start, self.stream)
            self._h2d()
            self.cuda("cudaEventRecord", e_in, self.stream)
            self._execute()
            self.cuda("cudaEventRecord", e_out, self.stream)
            self._d2h()
            self.cuda("cudaEventRecord", end, self.stream)
            self.cuda("cudaEventSynchronize", end)
            wall.append(time.perf_counter() - t0)
            total.append(self.cuda("cudaEventElapsedTime", start, end) / 1e3)
            compute.append(self.cuda("cudaEventElapsedTime", e_in, e_out) / 1e3)
            elapsed = time.perf_counter() - t_begin
            if sampling_done(len(wall), elapsed, elapsed, repeat, duration_s, budget_s):
                break
        warm = max(1, warmup) + (1 if self.options.get("cuda_graphs") else 0)
        return {"latency": latency_stats(total, warmup=warm, timer="cuda_events"),
                "gpu_compute": latency_stats(compute, warmup=warm, timer="cuda_events"),
                "host_wall": latency_stats(wall, warmup=warm, timer="wall_clock"),
                "throughput_per_s": batch_size(feed) * len(wall) / sum(wall),
                "timing": "CUDA events: latency = H2D + execute + D2H, gpu_compute = execute only"
                          + (" (a CUDA graph of it)" if self.graph_exec is not None else "")}

    def deactivate_impl(self) -> None:
        cuda = getattr(self, "cuda", None)
        if cuda is None:
            return
        for name, handle in (("cudaGraphExecDestroy", self.graph_exec), ("cudaGraphDestroy", self.graph)):
            if handle is not None:
                cuda(name, handle)
        for event in getattr(self, "events", []):
            cuda("cudaEventDestroy", event)
        if getattr(self, "stream", None) is not None:
            cuda("cudaStreamDestroy", self.stream)
        for free, ptr in reversed(getattr(self, "allocations", [])):
            cuda(free, ptr)
        self.context = self.engine = None

    def describe(self) -> dict[str, Any]:
        return {"version": self.trt.__version__, "gpu": self.gpu_name, "precision": self.precision,
                "engine_cache_hit": self.engine_cache_hit, "build_s": round(self.build_s, 3),
                "engine": str(self.engine_path), "cuda_graphs": self.graph_exec is not None}
