"""Comparison configs as data: models x (device key, backend) rows, validated with one-line errors.

A compare file (see configs/compare/) looks like::

    name: seed-resnet
    tracker: 127.0.0.1:9190
    device_wait_sec: 60            # how long a row waits for an agent on its key before it is marked
    evaluate: {warmup: 10, repeat: 50, budget_s: 60, rtol: 1.0e-3, atol: 1.0e-3}
    baseline: torch@cpu            # the row label speed-ups are computed against
    models:
      - {source: torchvision, name: resnet18, input_shape: [1, 3, 224, 224]}
    rows:
      - {backend: tvm-tuned, key: cpu, logs: "logs/{model}-cpu"}   # a tuning job's directory
      - {backend: tvm-untuned, key: cpu}
      - {backend: torch, key: cpu}
      - {backend: tensorrt, key: gpu, options: {precision: fp16}, rtol: 0.05, atol: 0.05}

Every row runs for every model. A row's label defaults to ``backend[-precision][-device]@key``;
``logs`` may contain ``{model}`` (the model's name) and is relative to the current directory. All rows
on one key run on the same agent of it (a row that could not says why in the report).

``rtol``/``atol`` (``evaluate``'s, or a row's own) are relative to the reference's scale
(``core.stats.compare_outputs``): an fp32 row passes when each output's relative L2 error
``||got - want|| / ||want||`` is at most ``rtol`` and every element is within ``atol`` x that output's
largest reference magnitude + ``rtol`` x ``|want|``, with the same top-1 class on every sample where the
output is a batch of class scores. Before, ``atol`` was absolute: a model whose outputs are all around
1e-9 passed whatever it computed. fp16, bf16 and TF32 rows keep their own check (relative L2 error
<= 1e-2, top-1 agreement).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


from .backends import BACKENDS as ALL_BACKENDS
from .errors import TunefarmError
from .jobspec import JOB_NAME_RE, ModelSpec, read_yaml, section

BACKENDS = tuple(name for name, b in ALL_BACKENDS.items() if not b.job_only)  # core/backends.py describes each
TVM_BACKENDS = tuple(name for name in BACKENDS if ALL_BACKENDS[name].tvm_build)


@dataclasses.dataclass
class CompareEvaluate:
    warmup: int = 10
    repeat: int = 50
    budget_s: float = 60.0  # per row: a slow build gets fewer samples (never under 5) rather than more time
    rtol: float = 1e-3  # relative L2 error bound per output (and per element, x |reference|)
    atol: float = 1e-3  # per element, in units of the output's largest reference magnitude (not absolute)


@dataclasses.dataclass
class CompareRow:
    backend: str = ""
    key: str = ""
    label: str = ""
    logs: str | None = None  # tvm-tuned: the tuning job's directory
    target: Any = None  # TVM rows: None/"from-agent" (the agents' own), a preset name or a target JSON dict
    options: dict = dataclasses.field(default_factory=dict)  # runner options (device, precision, cuda_graphs, ...)
    rtol: float | None = None
    atol: float | None = None

    def logs_for(self, model_name: str) -> Path | None:
        return Path(self.logs.replace("{model}", model_name)) if self.logs else None


@dataclasses.dataclass
class CompareConfig:
    name: str
    models: list[ModelSpec]
    rows: list[CompareRow]
    baseline: str
    tracker: str = "127.0.0.1:9190"
    device_wait_sec: float = 60.0
    evaluate: CompareEvaluate = dataclasses.field(default_factory=CompareEvaluate)
    source_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source_path")
        return data


def default_label(row: CompareRow) -> str:
    parts = [row.backend]
    if row.options.get("precision"):
        parts.append(str(row.options["precision"]))
    if row.options.get("device") and row.options["device"] != "cpu":
        parts.append(str(row.options["device"]))
    return f"{'-'.join(parts)}@{row.key}"


def compare_from_dict(data: Any, source_path: str | None = None) -> CompareConfig:
    where = source_path or "compare"
    if not isinstance(data, dict):
        raise TunefarmError(f"{where}: a compare file must be a YAML mapping")
    known = {f.name for f in dataclasses.fields(CompareConfig)} - {"source_path"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise TunefarmError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    name = data.get("name")
    if not isinstance(name, str) or not JOB_NAME_RE.match(name):
        raise TunefarmError(f"{where}: 'name' must be letters, digits, '.', '_' or '-' (got {name!r})")
    models_data = data.get("models")
    if not isinstance(models_data, list) or not models_data:
        raise TunefarmError(f"{where}: 'models' must be a non-empty list of model mappings")
    models = []
    for i, item in enumerate(models_data):
        model = section(ModelSpec, item, f"{where}: models[{i}]")
        if model.source not in ("torchvision", "onnx", "builtin"):
            raise TunefarmError(f"{where}: models[{i}].source must be torchvision, onnx or builtin")
        if model.source == "onnx":
            if not model.path:
                raise TunefarmError(f"{where}: models[{i}].path is required for an ONNX model")
            if source_path and not Path(model.path).is_absolute():
                model.path = str((Path(source_path).parent / model.path).resolve())
        elif not model.name:
            raise TunefarmError(f"{where}: models[{i}].name is required")
        models.append(model)
    rows_data = data.get("rows")
    if not isinstance(rows_data, list) or not rows_data:
        raise TunefarmError(f"{where}: 'rows' must be a non-empty list of {{backend, key}} mappings")
    rows = []
    for i, item in enumerate(rows_data):
        row = section(CompareRow, item, f"{where}: rows[{i}]")
        if row.backend not in BACKENDS:
            raise TunefarmError(f"{where}: rows[{i}].backend must be one of {', '.join(BACKENDS)} (got {row.backend!r})")
        if not row.key:
            raise TunefarmError(f"{where}: rows[{i}].key is required (the key agents registered under)")
        if row.backend == "tvm-tuned" and not row.logs:
            raise TunefarmError(f"{where}: rows[{i}] (tvm-tuned) needs logs: the tuning job's directory")
        if not isinstance(row.options, dict):
            raise TunefarmError(f"{where}: rows[{i}].options must be a mapping")
        row.label = row.label or default_label(row)
        rows.append(row)
    labels = [r.label for r in rows]
    dupes = sorted({l for l in labels if labels.count(l) > 1})
    if dupes:
        raise TunefarmError(f"{where}: row labels must be unique; repeated: {', '.join(dupes)} (set label:)")
    baseline = data.get("baseline", labels[0])
    if baseline not in labels:
        raise TunefarmError(f"{where}: baseline {baseline!r} is not a row label; labels: {', '.join(labels)}")
    wait = data.get("device_wait_sec", 60.0)
    if not isinstance(wait, (int, float)) or isinstance(wait, bool) or wait < 0:
        raise TunefarmError(f"{where}: device_wait_sec must be a number of seconds >= 0")
    tracker = data.get("tracker", "127.0.0.1:9190")
    if not isinstance(tracker, str):
        raise TunefarmError(f"{where}: tracker must be HOST:PORT")
    evaluate = section(CompareEvaluate, data.get("evaluate"), f"{where}: evaluate")
    if evaluate.repeat < 1 or evaluate.warmup < 0:
        raise TunefarmError(f"{where}: evaluate.repeat must be >= 1 and warmup >= 0")
    return CompareConfig(name=name, models=models, rows=rows, baseline=baseline, tracker=tracker,
                         device_wait_sec=float(wait), evaluate=evaluate, source_path=source_path)


def load_compare(path: str | Path) -> CompareConfig:
    return compare_from_dict(read_yaml(path, "compare"), str(path))
