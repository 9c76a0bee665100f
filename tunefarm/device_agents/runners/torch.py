"""PyTorch runners: eager and ``torch.compile``, on the CPU or a CUDA GPU.

The model arrives in one of two files, neither of which holds Python code to unpickle:
  ``*.pt``   ``{"torchvision": name, "state_dict": ...}`` (``torch.save``, loaded with ``weights_only=True``):
             the torchvision architecture is built here and the weights loaded into it, so ``eager`` runs
             the original ``nn.Module``, as a user's PyTorch program would;
  ``*.pt2``  a ``torch.export`` program (``torch.export.save``) for any other model: ``eager`` runs its graph
             module op by op with PyTorch's eager kernels (the report names which form ran; on an H100,
             ResNet-18 ran in 1.55 ms as a graph module and 1.70 ms as the nn.Module, within run-to-run noise).
``compile`` hands the module to ``torch.compile`` (Inductor), whose compilation happens in the first
calls and is reported apart from the timed runs.
Options: ``device`` (``cpu`` | ``cuda``), ``threads`` (CPU intra-op threads; default: the agent's threads),
``allow_tf32`` (CUDA: let cuDNN convolutions and matmuls use TF32; default: PyTorch's own, which allows it
for cuDNN), ``precision`` (``fp16``: the module and its inputs in half precision, outputs back in fp32;
CUDA only), ``cudnn_benchmark`` (CUDA: let cuDNN pick its fastest algorithms), ``mode`` (torch.compile's
mode; ``reduce-overhead`` records CUDA graphs). The precision class reported is ``fp16`` for a half module,
``tf32`` when TF32 is allowed on a GPU, else ``fp32``; ``cuda_graphs`` says whether CUDA graphs replay it.
"""
from __future__ import annotations

import importlib.util
import sys
import time
from typing import Any

import numpy as np

from tunefarm.device_agents.runners.base import BaseRunner


def cuda_device_count() -> int:
    """CUDA GPUs the driver reports, without importing a framework (0 without a driver)."""
    import ctypes  # pylint: disable=import-outside-toplevel

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return int(count.value)


class TorchRunner(BaseRunner):
    """PyTorch eager on an exported program."""

    name = "torch"
    compiled = False

    @classmethod
    def unavailable_reason(cls, options=None):
        options = options or {}
        if importlib.util.find_spec("torch") is None:
            return f"PyTorch is not installed on this device (for {sys.executable})"
        device = str(options.get("device", "cpu"))
        if device not in ("cpu", "cuda"):
            return f"unknown device {device!r} for the PyTorch runner (cpu or cuda)"
        if str(options.get("precision", "fp32")) not in ("fp32", "fp16"):
            return f"unknown precision {options.get('precision')!r} for the PyTorch runner (fp32 or fp16)"
        if str(options.get("precision", "fp32")) == "fp16" and device != "cuda":
            return "precision fp16 is for the PyTorch runner on a CUDA GPU"
        if str(options.get("mode", "default")) not in ("default", "reduce-overhead", "max-autotune",
                                                       "max-autotune-no-cudagraphs"):
            return f"unknown torch.compile mode {options.get('mode')!r}"
        if device == "cuda" and cuda_device_count() == 0:
            return "no CUDA GPU on this device"
        return None

    def activate_impl(self) -> None:
        import torch  # pylint: disable=import-outside-toplevel

        self.torch = torch
        self.device = torch.device(str(self.options.get("device", "cpu")))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            from tunefarm.device_agents.runners.base import RunnerUnavailable  # pylint: disable=import-outside-toplevel

            raise RunnerUnavailable(f"this PyTorch ({torch.__version__}) cannot use the CUDA GPU "
                                    f"(built for CUDA {torch.version.cuda or 'none'})")
        threads = self.cpu_threads()
        if threads:
            torch.set_num_threads(threads)
        if self.device.type == "cuda" and "allow_tf32" in self.options:
            allow = bool(self.options["allow_tf32"])
            torch.backends.cudnn.allow_tf32 = allow
            torch.backends.cuda.matmul.allow_tf32 = allow
        if self.device.type == "cuda" and "cudnn_benchmark" in self.options:
            torch.backends.cudnn.benchmark = bool(self.options["cudnn_benchmark"])
        self.half = str(self.options.get("precision", "fp32")) == "fp16"
        self.mode = str(self.options.get("mode", "default"))
        if str(self.model_path).endswith(".pt2"):
            module = torch.export.load(self.model_path).module()
            self.form = "torch.export graph module"
        else:
            module = self._torchvision_module(torch)
        self.module = module.to(self.device)
        if self.half:
            self.module = self.module.half()
        self.fn = (torch.compile(self.module, mode=None if self.mode == "default" else self.mode) if self.compiled
                   else self.module)
        self.compile_s = None

    def _torchvision_module(self, torch):
        from tunefarm.core.errors import TunefarmError  # pylint: disable=import-outside-toplevel

        data = torch.load(self.model_path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or "torchvision" not in data or "state_dict" not in data:
            raise TunefarmError(f"{self.model_path}: expected a torchvision model file or a .pt2 program")
        try:
            import torchvision  # pylint: disable=import-outside-toplevel
        except ImportError:
            from tunefarm.device_agents.runners.base import RunnerUnavailable  # pylint: disable=import-outside-toplevel

            raise RunnerUnavailable("torchvision is not installed on this device (the model is a torchvision "
                                    "architecture)") from None
        module = torchvision.models.get_model(str(data["torchvision"]), weights=None)
        module.load_state_dict(data["state_dict"])
        self.form = f"torchvision {data['torchvision']} nn.Module ({torchvision.__version__})"
        return module.eval()

    def infer_impl(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            xs = [self._input(torch.from_numpy(x)) for x in feed.values()]
            out = self.fn(*xs)
        outs = out if isinstance(out, (tuple, list)) else [out]
        return [o.detach().float().cpu().numpy() for o in outs]

    def _input(self, tensor):
        tensor = tensor.to(self.device)
        return tensor.half() if self.half and tensor.is_floating_point() else tensor

    def first_run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        t0 = time.perf_counter()
        outs = self.infer_impl(feed)
        if self.compiled:
            self.compile_s = time.perf_counter() - t0
        return outs

    def measure(self, feed, warmup, repeat):
        # Inputs stay on the device for the timed runs: the figure is the model, as for TVM's time_evaluator.
        torch = self.torch
        xs = [self._input(torch.from_numpy(x)) for x in feed.values()]

        def run():
            with torch.inference_mode():
                self.fn(*xs)

        from tunefarm.core.stats import latency_stats, timed_samples  # pylint: disable=import-outside-toplevel
        from tunefarm.device_agents.runners.base import batch_size  # pylint: disable=import-outside-toplevel

        samples, warm = timed_samples(run, warmup, repeat, duration_s=float(self.options.get("duration_s", 0.0)),
                                      budget_s=float(self.options.get("budget_s", 300.0)), sync=self.sync)
        return {"latency": latency_stats(samples, warmup=warm),
                "throughput_per_s": batch_size(feed) * len(samples) / sum(samples)}

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def describe(self) -> dict[str, Any]:
        torch = self.torch
        info: dict[str, Any] = {"version": torch.__version__, "device": str(self.device), "model_form": self.form}
        if self.device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(self.device)
            tf32 = {"cudnn": bool(torch.backends.cudnn.allow_tf32),
                    "matmul": bool(torch.backends.cuda.matmul.allow_tf32)}
            info["tf32_allowed"] = tf32
            info["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
            info["precision"] = "fp16" if self.half else "tf32" if any(tf32.values()) else "fp32"
            info["cuda_graphs"] = bool(self.compiled and self.mode in ("reduce-overhead", "max-autotune"))
        else:
            info["threads"] = torch.get_num_threads()
            info["precision"] = "fp32"
        if self.compiled:
            info["compile_s"] = None if self.compile_s is None else round(self.compile_s, 3)
            info["compile_mode"] = self.mode
        return info


class TorchCompileRunner(TorchRunner):
    """``torch.compile`` (Inductor) on an exported program."""

    name = "torch-compile"
    compiled = True
