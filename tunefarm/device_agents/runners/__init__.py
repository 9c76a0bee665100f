"""Model runners on an agent: TVM, PyTorch (eager, torch.compile), ONNX Runtime and TensorRT behind one interface.

The agent's RPC server registers :func:`run` and :func:`available` as the global functions
``tunefarm.runner.run`` and ``tunefarm.runner.available``, so the host reaches them through the same
tracker and RPC session as TVM's own measurements::

    sess.upload("model.onnx"); sess.upload("inputs.npz")
    result = json.loads(sess.get_function("tunefarm.runner.run")(
        "onnxruntime", "model.onnx", "inputs.npz", warmup, repeat, json.dumps(options)))
    outputs = np.load(io.BytesIO(sess.download(result["outputs_file"])))

File names are relative to the session's work directory (where ``upload`` puts files). Each runner
module imports its framework only when used (see ``base.BaseRunner``). ``tvm-tuned`` and ``tvm-untuned``
name builds, not runners: both run on the ``tvm`` runner (``core.wire.runner_name``), with the host's
exported library as the model file.
"""
from __future__ import annotations

import importlib
import json
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from tunefarm.core.backends import runners

# runner name -> (module, class), from the backends' one description (core/backends.py). Modules are imported
# on first use.
RUNNERS: dict[str, tuple[str, str]] = runners()


def runner_class(backend: str):
    from tunefarm.core.errors import TunefarmError  # pylint: disable=import-outside-toplevel
    from tunefarm.core.wire import runner_name  # pylint: disable=import-outside-toplevel

    name = runner_name(backend)
    if name not in RUNNERS:
        raise TunefarmError(f"unknown runner {backend!r}; known: {', '.join(RUNNERS)}")
    module, cls = RUNNERS[name]
    return getattr(importlib.import_module(module), cls)


def available(options: dict[str, Any] | None = None) -> dict[str, str | None]:
    """backend -> None if this device can run it, else the reason it cannot. No framework is imported."""
    return {name: runner_class(name).unavailable_reason(options) for name in RUNNERS}


def available_runners() -> list[str]:
    return [name for name, reason in available().items() if reason is None]


def run(backend: str, model_path: str, inputs_path: str, outputs_path: str, warmup: int, repeat: int,
        options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run ``backend`` on the model and inputs (``.npz``), write outputs (``.npz``), measure it.

    Returns ``{"available": False, "reason": ...}`` when this device cannot run the backend, ``{"error":
    ...}`` when it failed, else the outputs file, latency stats (``core.stats.latency_stats``), throughput
    and what the runner describes of itself (versions, device, compile/build times, extra timings).
    """
    from tunefarm.device_agents.runners.base import RunnerUnavailable  # pylint: disable=import-outside-toplevel

    options = dict(options or {})
    with np.load(inputs_path) as data:
        feed = {name: data[name] for name in data.files}
    options.setdefault("input_shapes", [list(x.shape) for x in feed.values()])
    try:
        cls = runner_class(backend)
        reason = cls.unavailable_reason(options)
        if reason:
            return {"backend": backend, "available": False, "reason": reason}
        runner = cls(model_path, options)
        t0 = time.perf_counter()
        with runner:
            setup_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            first = getattr(runner, "first_run", runner.infer)
            outputs = first(feed)
            first_s = time.perf_counter() - t0
            measured = runner.measure(feed, int(warmup), int(repeat))
            described = runner.describe()
    except RunnerUnavailable as err:
        return {"backend": backend, "available": False, "reason": str(err)}
    except Exception as err:  # pylint: disable=broad-except  # reported to the host, which marks the row failed
        from tunefarm.core.errors import first_line  # pylint: disable=import-outside-toplevel

        return {"backend": backend, "available": True, "error": f"{type(err).__name__}: {first_line(str(err))}",
                "traceback": traceback.format_exc(limit=6)}
    np.savez(outputs_path, *[np.asarray(o) for o in outputs])
    measured["latency"]["first_run_ms"] = first_s * 1e3
    return {"backend": backend, "available": True, "outputs_file": Path(outputs_path).name,
            "setup_s": round(setup_s, 3), **measured, **described}


def register_rpc_functions() -> None:
    """Register ``tunefarm.runner.run`` / ``tunefarm.runner.available`` in this (RPC server) process.

    Sessions are forked from the server process and inherit them; paths are resolved in the
    session's work directory through ``tvm.rpc.server.workpath``.
    """
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    from tunefarm.core.wire import RUNNER_AVAILABLE_FUNC, RUNNER_RUN_FUNC  # pylint: disable=import-outside-toplevel

    def workpath(name: str) -> str:
        func = tvm_ffi.get_global_func("tvm.rpc.server.workpath", allow_missing=True)
        return str(func(name)) if func is not None else name

    def run_rpc(backend, model_file, inputs_file, warmup, repeat, options_json):
        options = json.loads(str(options_json) or "{}")
        out = workpath(f"outputs-{backend}.npz")
        result = run(str(backend), workpath(str(model_file)), workpath(str(inputs_file)), out, int(warmup),
                     int(repeat), options)
        return json.dumps(result, default=str)

    def available_rpc(options_json):
        return json.dumps(available(json.loads(str(options_json) or "{}")))

    tvm_ffi.register_global_func(RUNNER_RUN_FUNC, run_rpc, override=True)
    tvm_ffi.register_global_func(RUNNER_AVAILABLE_FUNC, available_rpc, override=True)
