"""Tuning jobs as data: YAML validated into typed objects, with one-line errors for bad input.

A job file (see configs/jobs/) looks like::

    name: resnet18-nuc
    model: {source: torchvision, name: resnet18, input_shape: [1, 3, 224, 224]}
    device: {key: nuc, tracker: 127.0.0.1:9190}
    target: from-agent            # or a preset name, or a TVM target JSON dict
    tuning: {max_trials_global: 2000, max_trials_per_task: 128, num_trials_per_iter: 16, cost_model: xgb-farm}
    builder: {workers: 2, timeout_sec: 60}   # or {key: build}: agents on key 'build' compile
    search: {workers: 0}          # N: the tasks searched by N `tunefarm search-worker`s on key 'search'
    runner: {timeout_sec: 60, number: 3, repeat: 1, min_repeat_ms: 50, device_wait_sec: 120}
    evaluate: {warmup: 10, repeat: 50, rtol: 1.0e-3, atol: 1.0e-3, baselines: [torch, onnxruntime]}
    placement: {backends: auto}   # or off, or [onednn], [cudnn, cublas]: operator groups placed on vendor libraries by measurement
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import yaml

from .errors import TunefarmError

JOB_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")  # \Z: "$" would let "x\n" pass
RESERVED_NAMES = {"farm"}  # LOGS/farm/ is the host service's own directory (token, queue, uploads)
MAX_YAML_BYTES = 1 << 20  # a job or compare file
MAX_YAML_NODES = 100_000  # scalars, lists and mappings, with every alias expanded
MAX_INPUT_ELEMENTS = 1 << 27  # one model input (512 MiB of fp32)

# Allowed ranges of the numeric fields: (section, field) -> (lowest, highest); None = unbounded that side.
RANGES: dict[tuple[str, str], tuple[float | None, float | None]] = {
    ("tuning", "max_trials_global"): (1, 10_000_000), ("tuning", "max_trials_per_task"): (1, 10_000_000),
    ("tuning", "num_trials_per_iter"): (1, 4096), ("tuning", "population_size"): (1, 65536),
    ("tuning", "seed"): (0, 2 ** 31 - 1), ("tuning", "warm_start_top_k"): (0, 1024),
    ("builder", "workers"): (0, 1024), ("search", "workers"): (0, 256), ("builder", "timeout_sec"): (1, 86400),
    ("builder", "straggler_factor"): (0, 1000),
    ("runner", "timeout_sec"): (1, 86400), ("runner", "number"): (1, 10_000), ("runner", "repeat"): (1, 10_000),
    ("runner", "min_repeat_ms"): (0, 1_000_000), ("runner", "device_wait_sec"): (0, 7 * 86400),
    ("evaluate", "warmup"): (0, 100_000), ("evaluate", "repeat"): (1, 100_000),
    ("evaluate", "min_repeat_ms"): (0, 1_000_000), ("evaluate", "rtol"): (0, 1000), ("evaluate", "atol"): (0, 1000),
}
MAX_TEXT = 1024  # a key, a tracker address, a model name or path


@dataclasses.dataclass
class ModelSpec:
    source: str = "torchvision"  # torchvision | onnx | builtin
    name: str = ""
    path: str | None = None  # ONNX file (relative paths: to the job file)
    input_shape: list[int] | None = None


@dataclasses.dataclass
class DeviceSpec:
    key: str = ""
    tracker: str = "127.0.0.1:9190"


@dataclasses.dataclass
class TuningSpec:
    max_trials_global: int = 64
    max_trials_per_task: int | None = None
    num_trials_per_iter: int = 16
    # "" (auto): xgb-farm where the farm has a cost model for the target, else xgb; xgb: cold; xgb-farm: the
    # farm's model (tuning/farm_model.py), an error where there is none; random: for comparison.
    cost_model: str = ""
    # Evolutionary search population per round: stock's 512. On ResNet-18 with one round of 8 per task,
    # 128 ended at 134 ms and 512 at 68.5 ms on one thread (2026-11-25); with threads fixed (2026-12-02,
    # bench/results/tuning_speed-resnet18.md) both gave 50.8-50.9 ms, 512 searching 3.7x longer. The default
    # stays stock's: on a real farm the trials, not the search, are the expensive part.
    population_size: int = 512
    seed: int | None = 0
    warm_start: bool = True  # seed a new job from earlier jobs' records for the same target
    warm_start_top_k: int = 8  # records taken per shared workload
    # The graph pipeline (tunefarm.host.tuning.pipeline); None: the default for the target's kind.
    fold_batchnorm: bool | None = None  # fold inference BatchNorm into the conv weights before tuning
    weight_prepack: bool | None = None  # CPU: let each kernel pick a packed weight layout (layout rewrite)
    precision: str = "fp32"  # fp32 | fp16 (ToMixedPrecision; on CUDA the tensor-core space)
    layout: str | None = None  # NCHW | NHWC (convs converted before legalization); None: the target's default


@dataclasses.dataclass
class SearchSpec:
    # 0: MetaSchedule's search runs in this process. N: the job's tasks are dealt to N search workers
    # (`tunefarm search-worker`, registered under `key`), each searching and building its share and measuring
    # on the job's device key; their records come back into the job's one database.
    workers: int = 0
    key: str = "search"


@dataclasses.dataclass
class BuilderSpec:
    workers: int = 0  # 0: one per host core
    timeout_sec: float = 60.0
    key: str = ""  # build on the agents registered under this key instead of on the host
    # host builds: once 7/8 of a batch has built, a candidate still building at this many times that moment
    # (and past STRAGGLER_MIN_S) is cut as a build timeout; 0: only timeout_sec (builder.py, WarmBuilder)
    straggler_factor: float = 4.0


@dataclasses.dataclass
class RunnerSpec:
    timeout_sec: float = 60.0  # one candidate: wait for a device + upload + run
    number: int = 3
    repeat: int = 1
    min_repeat_ms: int = 50
    enable_cpu_cache_flush: bool = False
    device_wait_sec: float = 120.0  # how long to wait for an agent on the key before giving up


@dataclasses.dataclass
class EvaluateSpec:
    warmup: int = 10
    repeat: int = 50  # timed runs (each one its own sample)
    min_repeat_ms: int = 0  # per sample; 0: one model run per sample
    rtol: float = 1e-3  # relative to the reference's scale: see core.stats.compare_outputs
    atol: float = 1e-3  # in units of each output's largest reference magnitude, not absolute
    baselines: list[str] = dataclasses.field(default_factory=lambda: ["torch", "onnxruntime"])
    require_speedup: bool = True  # fail the job when the tuned build is not faster than untuned
    cuda_graph: bool = False  # CUDA targets: compile the TVM builds with Relax's CUDA-graph rewriting


@dataclasses.dataclass
class PlacementSpec:
    # Vendor libraries that operator groups may be placed on, by measurement (host/placement): "auto" (every one
    # the target's agents and this host can run), "off", or a list of names (core/backends.py VENDOR_BACKENDS).
    backends: Any = "auto"


@dataclasses.dataclass
class TuningJob:
    name: str
    model: ModelSpec
    device: DeviceSpec
    target: Any = "from-agent"  # "from-agent", a preset name, or a target JSON dict
    tuning: TuningSpec = dataclasses.field(default_factory=TuningSpec)
    search: SearchSpec = dataclasses.field(default_factory=SearchSpec)
    builder: BuilderSpec = dataclasses.field(default_factory=BuilderSpec)
    runner: RunnerSpec = dataclasses.field(default_factory=RunnerSpec)
    evaluate: EvaluateSpec = dataclasses.field(default_factory=EvaluateSpec)
    placement: PlacementSpec = dataclasses.field(default_factory=PlacementSpec)
    source_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source_path")
        return data


def _check_ranges(section: str, obj, where: str) -> None:
    """Numeric fields within RANGES (finite), strings bounded: a budget of 10**30 is refused here, not
    in a worker hours later."""
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if isinstance(value, str) and len(value) > MAX_TEXT:
            raise TunefarmError(f"{where}.{field.name}: longer than {MAX_TEXT} characters")
        bounds = RANGES.get((section, field.name))
        if bounds is None or value is None:
            continue
        low, high = bounds
        # bool is an int in Python: `max_trials_per_task: true` must not pass as 1
        if not isinstance(value, (int, float)) or isinstance(value, bool):  # e.g. an optional field (default None)
            raise TunefarmError(f"{where}.{field.name}: expected a number, got {value!r}")
        if (isinstance(value, float) and not math.isfinite(value)) or (low is not None and value < low) or (
                high is not None and value > high):
            raise TunefarmError(f"{where}.{field.name}: {value!r} is out of range [{low}, {high}]")


def section(cls, data: Any, where: str):
    """``data`` (a mapping, or None for the defaults) as the dataclass ``cls``: known fields only, each of its
    default's type and within RANGES (``where``'s last part names the section); TunefarmError otherwise."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise TunefarmError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise TunefarmError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    obj = cls(**data)
    defaults = cls()
    for name in fields:
        value, default = getattr(obj, name), getattr(defaults, name)
        if default is None or value is None:
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise TunefarmError(f"{where}.{name}: expected {type(default).__name__}, got {value!r}")
    _check_ranges(where.rpartition(": ")[2], obj, where)
    return obj


def job_from_dict(data: Any, source_path: str | None = None) -> TuningJob:
    where = source_path or "job"
    if not isinstance(data, dict):
        raise TunefarmError(f"{where}: a job file must be a YAML mapping")
    known = {f.name for f in dataclasses.fields(TuningJob)} - {"source_path"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise TunefarmError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    name = data.get("name")
    if not isinstance(name, str) or not JOB_NAME_RE.fullmatch(name):
        raise TunefarmError(f"{where}: 'name' must be letters, digits, '.', '_' or '-' (got {name!r})")
    if name in RESERVED_NAMES:
        raise TunefarmError(f"{where}: the name {name!r} is reserved (the host service's own directory)")
    model = section(ModelSpec, data.get("model"), f"{where}: model")
    if model.source not in ("torchvision", "onnx", "builtin"):
        raise TunefarmError(f"{where}: model.source must be torchvision, onnx or builtin (got {model.source!r})")
    if model.source == "onnx":
        if not model.path:
            raise TunefarmError(f"{where}: model.path is required for an ONNX model")
        if source_path and not Path(model.path).is_absolute():
            model.path = str((Path(source_path).parent / model.path).resolve())
    elif not model.name:
        raise TunefarmError(f"{where}: model.name is required")
    if model.input_shape is not None and (
            not isinstance(model.input_shape, list)
            or not 1 <= len(model.input_shape) <= 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in model.input_shape)):
        raise TunefarmError(f"{where}: model.input_shape must be a list of 1 to 8 positive integers")
    if model.input_shape is not None and math.prod(model.input_shape) > MAX_INPUT_ELEMENTS:
        raise TunefarmError(f"{where}: model.input_shape {model.input_shape} has over {MAX_INPUT_ELEMENTS} "
                            "elements")
    device = section(DeviceSpec, data.get("device"), f"{where}: device")
    if not device.key:
        raise TunefarmError(f"{where}: device.key is required (the key agents registered under)")
    tuning = section(TuningSpec, data.get("tuning"), f"{where}: tuning")
    for option in ("fold_batchnorm", "weight_prepack"):
        if getattr(tuning, option) is not None and not isinstance(getattr(tuning, option), bool):
            raise TunefarmError(f"{where}: tuning.{option} must be true or false (got {getattr(tuning, option)!r})")
    if tuning.precision not in ("fp32", "fp16"):
        raise TunefarmError(f"{where}: tuning.precision must be fp32 or fp16 (got {tuning.precision!r})")
    if tuning.layout is not None and tuning.layout not in ("NCHW", "NHWC", "NCHWc"):
        raise TunefarmError(f"{where}: tuning.layout must be NCHW, NHWC or NCHWc (got {tuning.layout!r})")
    if tuning.cost_model not in ("", "auto", "xgb", "xgb-farm", "random"):
        raise TunefarmError(f"{where}: tuning.cost_model must be xgb, xgb-farm or random (got {tuning.cost_model!r})")
    if tuning.cost_model == "auto":
        tuning.cost_model = ""
    search = section(SearchSpec, data.get("search"), f"{where}: search")
    if search.workers and not search.key:
        raise TunefarmError(f"{where}: search.key is required with search.workers (the key search workers registered under)")
    target = data.get("target", "from-agent")
    if not isinstance(target, (str, dict)):
        raise TunefarmError(f"{where}: target must be 'from-agent', a preset name or a JSON mapping")
    if isinstance(target, str) and len(target) > MAX_TEXT:
        raise TunefarmError(f"{where}: target is longer than {MAX_TEXT} characters")
    placement = _placement(data.get("placement"), where)
    return TuningJob(
        name=name, model=model, device=device, target=target, tuning=tuning,
        search=search, placement=placement,
        builder=section(BuilderSpec, data.get("builder"), f"{where}: builder"),
        runner=section(RunnerSpec, data.get("runner"), f"{where}: runner"),
        evaluate=section(EvaluateSpec, data.get("evaluate"), f"{where}: evaluate"),
        source_path=source_path,
    )


def _placement(data: Any, where: str) -> PlacementSpec:
    from .backends import VENDOR_BACKENDS  # pylint: disable=import-outside-toplevel

    if data is None:
        return PlacementSpec()
    if not isinstance(data, dict):
        raise TunefarmError(f"{where}: placement: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - {"backends"})
    if unknown:
        raise TunefarmError(f"{where}: placement: unknown field(s) {', '.join(map(str, unknown))}; known: backends")
    value = data.get("backends", "auto")
    if value is False:
        value = "off"
    if value in ("auto", "off"):
        return PlacementSpec(value)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or len(value) > 16:
        raise TunefarmError(f"{where}: placement.backends must be auto, off or a list of "
                            f"{', '.join(VENDOR_BACKENDS)} (got {str(value)[:80]!r})")
    unknown = [v for v in value if v not in VENDOR_BACKENDS]
    if unknown:
        raise TunefarmError(f"{where}: placement.backends names unknown backend(s) "
                            f"{', '.join(repr(v[:40]) for v in unknown)}; known: {', '.join(VENDOR_BACKENDS)}")
    return PlacementSpec(list(dict.fromkeys(value)) or "off")


def _expanded_nodes(node, memo: dict[int, int]) -> int:
    """How many nodes ``node`` stands for with every alias expanded (aliases share node objects)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = MAX_YAML_NODES + 1  # a node inside itself (a recursive alias) counts as too many
    if isinstance(node, yaml.MappingNode):
        total = 1 + sum(_expanded_nodes(k, memo) + _expanded_nodes(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        total = 1 + sum(_expanded_nodes(v, memo) for v in node.value)
    else:
        total = 1
    memo[id(node)] = min(total, MAX_YAML_NODES + 1)
    return memo[id(node)]


def parse_yaml(text: str, where: str) -> Any:
    """YAML text's data with its size bounded before anything is built: at most MAX_YAML_BYTES of text and
    MAX_YAML_NODES nodes with aliases expanded (a 400-byte alias bomb stands for millions). A one-line
    TunefarmError for malformed or oversized input."""
    if len(text) > MAX_YAML_BYTES:
        raise TunefarmError(f"{where}: over {MAX_YAML_BYTES // 1024} KiB of YAML")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_nodes(node, {}) > MAX_YAML_NODES:
            raise TunefarmError(f"{where}: the YAML stands for over {MAX_YAML_NODES} values once its aliases "
                                "are expanded")
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise TunefarmError(f"{where}: malformed YAML{at}: {problem}") from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path, what: str) -> Any:
    """A YAML file's data; a one-line TunefarmError for a missing file or malformed or oversized YAML."""
    path = Path(path)
    if not path.is_file():
        raise TunefarmError(f"{what} file not found: {path}")
    return parse_yaml(path.read_text(), str(path))


def load_job(path: str | Path) -> TuningJob:
    return job_from_dict(read_yaml(path, "job"), str(path))
