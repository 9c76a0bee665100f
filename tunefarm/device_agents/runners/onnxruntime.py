"""ONNX Runtime runner: an ONNX file on the CPU execution provider, or CUDA's where ONNX Runtime has it.

Options: ``device`` (``cpu`` | ``cuda``), ``threads`` (intra-op threads; default: the agent's threads).
"""
from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np

from tunefarm.device_agents.runners.base import BaseRunner, RunnerUnavailable


class OnnxRuntimeRunner(BaseRunner):
    name = "onnxruntime"

    @classmethod
    def unavailable_reason(cls, options=None):
        options = options or {}
        if importlib.util.find_spec("onnxruntime") is None:
            return "ONNX Runtime is not installed on this device"
        device = str(options.get("device", "cpu"))
        if device not in ("cpu", "cuda"):
            return f"unknown device {device!r} for the ONNX Runtime runner (cpu or cuda)"
        return None

    def activate_impl(self) -> None:
        import onnxruntime as ort  # pylint: disable=import-outside-toplevel

        self.ort = ort
        provider = "CUDAExecutionProvider" if self.options.get("device") == "cuda" else "CPUExecutionProvider"
        if provider not in ort.get_available_providers():
            raise RunnerUnavailable(f"this ONNX Runtime ({ort.__version__}) has no {provider} "
                                    f"(it has {', '.join(ort.get_available_providers())})")
        opts = ort.SessionOptions()
        self.threads = self.cpu_threads()
        if self.threads:
            opts.intra_op_num_threads = self.threads
        self.session = ort.InferenceSession(self.model_path, sess_options=opts, providers=[provider])
        self.provider = provider
        self.input_names = [i.name for i in self.session.get_inputs()]

    def infer_impl(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        # Inputs are matched by position: the host names them after its own model, ONNX after the export.
        return self.session.run(None, dict(zip(self.input_names, feed.values())))

    def deactivate_impl(self) -> None:
        self.session = None

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"version": self.ort.__version__, "provider": self.provider, "precision": "fp32"}
        if self.provider == "CPUExecutionProvider":
            info["threads"] = self.threads or self.session.get_session_options().intra_op_num_threads
        return info
