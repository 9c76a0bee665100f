"""One model-import path: a model spec becomes a reference (PyTorch or ONNX), inputs and a Relax module.

Sources:
  torchvision  any name in ``torchvision.models.list_models()``, random weights (``weights=None``);
               weights are never downloaded at run time.
  onnx         an ONNX file; the reference is ONNX Runtime.
  builtin      tiny real PyTorch models used by tests and smoke runs (see ``BUILTIN_MODELS``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tunefarm.core.errors import TunefarmError
from tunefarm.core.jobspec import ModelSpec


def _builtin_convnet():
    import torch

    class ConvNet(torch.nn.Module):
        """conv -> relu -> conv -> relu -> global pool -> linear: the shape of a small CNN."""

        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(16, 16, 3, padding=1)
            self.fc = torch.nn.Linear(16, 10)

        def forward(self, x):
            x = torch.relu(self.conv1(x))
            x = torch.relu(self.conv2(x))
            return self.fc(x.mean(dim=(2, 3)))

    return ConvNet()


def _builtin_matmul():
    import torch

    class MatMul(torch.nn.Module):
        """One dense layer with bias: a single matmul task."""

        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 64)

        def forward(self, x):
            return self.fc(x)

    return MatMul()


def _builtin_resblock():
    import torch

    class ResBlock(torch.nn.Module):
        """A ResNet basic block (conv-BN-ReLU, conv-BN, residual add, ReLU) with non-trivial BatchNorm
        statistics: the smallest model on which folding BatchNorm and prepacking conv weights show."""

        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(16, 16, 3, padding=1, bias=False)
            self.bn1 = torch.nn.BatchNorm2d(16)
            self.conv2 = torch.nn.Conv2d(16, 16, 3, padding=1, bias=False)
            self.bn2 = torch.nn.BatchNorm2d(16)
            gen = torch.Generator().manual_seed(1)
            for bn in (self.bn1, self.bn2):  # the stock init (mean 0, var 1, identity affine) would hide a bad fold
                bn.running_mean.copy_(torch.rand(16, generator=gen) * 2 - 1)
                bn.running_var.copy_(torch.rand(16, generator=gen) * 1.5 + 0.5)
                bn.weight.data.copy_(torch.rand(16, generator=gen) * 1.5 + 0.5)
                bn.bias.data.copy_(torch.rand(16, generator=gen) * 2 - 1)

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + x)

    return ResBlock()


BUILTIN_MODELS: dict[str, tuple[Callable[[], Any], tuple[int, ...]]] = {
    "convnet": (_builtin_convnet, (1, 3, 32, 32)),
    "matmul": (_builtin_matmul, (16, 64)),
    "resblock": (_builtin_resblock, (1, 16, 16, 16)),
}


@dataclasses.dataclass
class LoadedModel:
    """A model ready for the farm: the reference to check against and the Relax module to tune."""

    name: str
    kind: str  # "torch" or "onnx"
    inputs: list[np.ndarray]
    torch_module: Any = None  # torch.nn.Module in eval mode (kind == "torch")
    onnx_path: str | None = None  # kind == "onnx"
    input_names: list[str] = dataclasses.field(default_factory=list)
    fingerprint: str = ""  # hash of the model's structure and weights: tells runs apart

    def reference_outputs(self) -> list[np.ndarray]:
        """Outputs of the reference framework on ``inputs`` (PyTorch, or ONNX Runtime for ONNX)."""
        if self.kind == "torch":
            import torch

            with torch.no_grad():
                out = self.torch_module(*[torch.from_numpy(x) for x in self.inputs])
            outs = out if isinstance(out, (tuple, list)) else [out]
            return [o.detach().numpy() for o in outs]
        import onnxruntime as ort

        sess = ort.InferenceSession(self.onnx_path, providers=["CPUExecutionProvider"])
        return sess.run(None, dict(zip(self.input_names, self.inputs)))


def check_model_spec(spec: ModelSpec) -> None:
    """The cheap checks of ``load_model``, made before anything waits (for an agent, for the tracker): an ONNX
    file that exists, a builtin or torchvision name that exists. A one-line TunefarmError otherwise."""
    if spec.source == "onnx":
        if not spec.path or not Path(spec.path).is_file():
            raise TunefarmError(f"ONNX model file not found: {spec.path}")
    elif spec.source == "builtin":
        if spec.name not in BUILTIN_MODELS:
            raise TunefarmError(f"unknown builtin model {spec.name!r}; known: {', '.join(sorted(BUILTIN_MODELS))}")
    elif spec.source == "torchvision":
        import torchvision

        known = torchvision.models.list_models()
        if spec.name not in known:
            close = [m for m in known if spec.name.lower()[:4] in m][:6]
            hint = f"; did you mean: {', '.join(close)}" if close else ""
            raise TunefarmError(f"unknown torchvision model {spec.name!r}{hint}")


def load_model(spec: ModelSpec, seed: int = 0) -> LoadedModel:
    """Build the reference model and deterministic random inputs for ``spec``."""
    rng = np.random.default_rng(seed)
    if spec.source in ("torchvision", "builtin"):
        import torch

        torch.manual_seed(seed)
        if spec.source == "builtin":
            if spec.name not in BUILTIN_MODELS:
                raise TunefarmError(f"unknown builtin model {spec.name!r}; known: {', '.join(sorted(BUILTIN_MODELS))}")
            factory, default_shape = BUILTIN_MODELS[spec.name]
            module = factory()
        else:
            import torchvision

            known = torchvision.models.list_models()
            if spec.name not in known:
                close = [m for m in known if spec.name.lower()[:4] in m][:6]
                hint = f"; did you mean: {', '.join(close)}" if close else ""
                raise TunefarmError(f"unknown torchvision model {spec.name!r}{hint}")
            module = torchvision.models.get_model(spec.name, weights=None)
            default_shape = (1, 3, 224, 224)
        module = module.eval()
        shape = tuple(spec.input_shape or default_shape)
        inputs = [rng.standard_normal(shape).astype(np.float32)]
        digest = hashlib.sha256(spec.name.encode())
        for tensor in module.state_dict().values():
            digest.update(tensor.detach().cpu().numpy().tobytes()[:4096])
        digest.update(str(shape).encode())
        return LoadedModel(spec.name, "torch", inputs, torch_module=module, fingerprint=digest.hexdigest()[:16])

    if spec.source == "onnx":
        import onnx

        path = Path(spec.path)
        if not path.is_file():
            raise TunefarmError(f"ONNX model file not found: {path}")
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as err:  # onnx raises DecodeError and others for a bad file
            raise TunefarmError(f"cannot read ONNX model {path}: {err}") from None
        inits = {i.name for i in proto.graph.initializer}
        graph_inputs = [i for i in proto.graph.input if i.name not in inits]
        inputs, names = [], []
        for i, gin in enumerate(graph_inputs):
            dims = [d.dim_value if d.dim_value > 0 else 1 for d in gin.type.tensor_type.shape.dim]
            if spec.input_shape and i == 0:
                dims = list(spec.input_shape)
            dtype = onnx.helper.tensor_dtype_to_np_dtype(gin.type.tensor_type.elem_type)
            inputs.append(rng.standard_normal(dims).astype(dtype))
            names.append(gin.name)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        return LoadedModel(spec.name or path.stem, "onnx", inputs, onnx_path=str(path.resolve()),
                           input_names=names, fingerprint=digest)
    raise TunefarmError(f"unknown model source {spec.source!r}; use torchvision, onnx or builtin")


def to_relax(model: LoadedModel):
    """Import into Relax with the weights bound as constants (un-fused, un-legalized)."""
    from tvm import relax

    if model.kind == "torch":
        import torch
        from tvm.relax.frontend.torch import from_exported_program

        example = tuple(torch.from_numpy(x) for x in model.inputs)
        try:
            exported = torch.export.export(model.torch_module, example)
        except Exception as err:
            raise TunefarmError(f"torch.export failed for {model.name}: {str(err).splitlines()[0]}") from None
        mod = from_exported_program(exported, keep_params_as_input=True, unwrap_unit_return_tuple=True)
        mod, params = relax.frontend.detach_params(mod)
        if params.get("main"):
            names = [p.name for p in mod["main"].params[len(model.inputs):]]
            mod = relax.transform.BindParams("main", dict(zip(names, params["main"])))(mod)
        return mod
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    proto = onnx.load(model.onnx_path)
    shape_dict = {n: list(x.shape) for n, x in zip(model.input_names, model.inputs)}
    try:
        mod = from_onnx(proto, shape_dict=shape_dict, keep_params_in_input=False)
    except Exception as err:
        raise TunefarmError(f"TVM cannot import ONNX model {model.onnx_path}: {str(err).splitlines()[0]}") from None
    return mod


def export_onnx(model: LoadedModel, path: str | os.PathLike) -> str:
    """Write the model as ONNX (for ONNX Runtime / TensorRT baselines); ONNX models are copied as is."""
    path = str(path)
    if model.kind == "onnx":
        return model.onnx_path
    import torch

    example = tuple(torch.from_numpy(x) for x in model.inputs)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model.torch_module, example, path, input_names=[f"input{i}" for i in range(len(example))],
                      dynamo=False)
    return path
