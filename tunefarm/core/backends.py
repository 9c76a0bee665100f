"""The backends a comparison row can name, each described once: which agent runner serves it, the model file
that runner takes, where the runner's class lives on the agent and the colour of its bars in the report.

Adding a backend (the vendor-library backends of the placement issues: oneDNN, cuDNN, cuBLAS) is one entry
here and its runner module under ``device_agents/runners/``; the tables the roles used to keep apart are
derived from this one: the agent's runners (``device_agents/runners/__init__.py`` ``RUNNERS``), the model
formats (``core/wire.py`` ``MODEL_FORMAT``, ``runner_name``), the rows a compare file may name
(``core/comparespec.py`` ``BACKENDS``, ``TVM_BACKENDS``) and the report's colours (``host/reports/compare.py``).
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str  # what a compare row names
    runner: str  # the agent runner that serves it (tvm-tuned and tvm-untuned name builds: both run on "tvm")
    runner_class: str  # "module:Class" of that runner on the agent, imported on first use
    model_format: str  # the model file the runner takes (core/wire.py MODEL_FORMAT)
    color: str  # its bars in the compare report's plots
    tvm_build: bool = False  # a build of the job's TVM model (tuned or not): the host compiles it for the row
    job_only: bool = False  # made by a tuning job's evaluation only; a compare file cannot name it


_TVM = "tunefarm.device_agents.runners.tvm:TVMRunner"
_TORCH = "tunefarm.device_agents.runners.torch"

BACKENDS: dict[str, Backend] = {b.name: b for b in (
    # The model file: a Relax executable the host compiled and exported as a shared library
    # (``tvm.compile(...).export_library``), a PyTorch model (a torchvision architecture + weights, or a
    # torch.export program; see runners/torch.py) or an ONNX file.
    Backend("tvm-tuned", "tvm", _TVM, "tvm-library", "#1b9e77", tvm_build=True),
    Backend("tvm-untuned", "tvm", _TVM, "tvm-library", "#a6d854", tvm_build=True),
    # Builds of the job's model with operator groups on vendor libraries (host/placement): every group a vendor
    # can run, and the groups that measured faster there. Only a job's evaluation makes them (job_only).
    Backend("tvm-vendor", "tvm", _TVM, "tvm-library", "#66a61e", tvm_build=True, job_only=True),
    Backend("tvm-placed", "tvm", _TVM, "tvm-library", "#1f78b4", tvm_build=True, job_only=True),
    Backend("torch", "torch", f"{_TORCH}:TorchRunner", "torch", "#d95f02"),
    Backend("torch-compile", "torch-compile", f"{_TORCH}:TorchCompileRunner", "torch", "#e6ab02"),
    Backend("onnxruntime", "onnxruntime", "tunefarm.device_agents.runners.onnxruntime:OnnxRuntimeRunner", "onnx",
            "#7570b3"),
    Backend("tensorrt", "tensorrt", "tunefarm.device_agents.runners.tensorrt:TensorRTRunner", "onnx", "#e7298a"),
)}


# A tuning job's TVM builds in the order its evaluation runs them, and those its model is chosen from (placement).
JOB_BUILDS = tuple(name for name, b in BACKENDS.items() if b.tvm_build and name != "tvm-untuned") + ("tvm-untuned",)
MODEL_CANDIDATES = JOB_BUILDS[:-1]

# Vendor libraries that operator groups can be placed on (host/placement/vendors.py describes each); a job's
# placement.backends names them.
VENDOR_BACKENDS = ("onednn", "cublas", "cudnn")


def runners() -> dict[str, tuple[str, str]]:
    """Agent runner name -> (module, class), in the order of :data:`BACKENDS`."""
    out: dict[str, tuple[str, str]] = {}
    for backend in BACKENDS.values():
        module, _, cls = backend.runner_class.partition(":")
        out.setdefault(backend.runner, (module, cls))
    return out
