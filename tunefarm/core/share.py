"""A search share: the part of a job the host hands a search worker (tunefarm/host/search_workers/).

Its JSON form is what ``tunefarm.search.start`` takes (host/search_workers/protocol.py). The host builds it
from the job file's own specs (:class:`~tunefarm.core.jobspec.BuilderSpec`, ``RunnerSpec``, the search
settings of ``TuningSpec``); a worker takes it only through :meth:`SearchShare.from_json`, which checks it as
:class:`~tunefarm.core.wire.DeviceInfo` is checked: whoever gets a session on the worker's key may call
``start``, so every field is typed and bounded before anything runs. What TVM parses (the tasks' modules, the
target, the seed records) is parsed by the worker's search, whose error is the share's ``error``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from .errors import TunefarmError
from .jobspec import BuilderSpec, RunnerSpec, TuningSpec, section
from .wire import parse_hostport

MAX_SHARE_TASKS = 4096
SEED_RECORDS = 32  # the job's best records per task handed to a share (its search starts from them)
# A share's search runs on the worker: no cost model loaded from a file (the XGB model is a pickle).
SHARE_COST_MODELS = ("xgb", "random")
SHARE_FIELDS = frozenset({"tasks", "trials", "target", "pipeline", "tuning", "seed", "cost_model", "builder",
                          "runner", "tracker", "device_key"})
TASK_FIELDS = frozenset({"name", "mod", "weight", "left", "records"})


def _int_in(value: Any, low: int, high: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"a share's {what} must be an integer in [{low}, {high}]")
    return value


def _text(value: Any, what: str, limit: int = 1024) -> str:
    if not isinstance(value, str) or not value or len(value) > limit or not value.isprintable():
        raise ValueError(f"a share's {what} must be printable text of 1-{limit} characters")
    return value


@dataclasses.dataclass
class ShareTask:
    """One task of a share: its module (``tvm.ir.save_json`` text), weight, trials left and best records."""

    name: str
    mod: str
    weight: float  # MetaSchedule's task weights are floats (1.0, 2.0, ...)
    left: int  # trials the task may still measure (the job's per-task cap, less what it measured)
    records: list  # at most SEED_RECORDS of the job's best records, MetaSchedule's JSON

    @classmethod
    def from_json(cls, data: Any) -> "ShareTask":
        if not isinstance(data, dict) or set(data) != TASK_FIELDS:
            raise ValueError("a share's task must be an object of name, mod, weight, left and records")
        _text(data["name"], "task name", 200)
        if not isinstance(data["mod"], str) or not data["mod"]:
            raise ValueError("a share's task module must be TVM's JSON text")
        weight = data["weight"]
        if (not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight)
                or not 1 <= weight <= 10 ** 9):
            raise ValueError("a share's task weight must be a number in [1, 1000000000]")
        _int_in(data["left"], 0, 10_000_000, "trials left of a task")
        if not isinstance(data["records"], list) or len(data["records"]) > SEED_RECORDS:
            raise ValueError(f"a share's task carries at most {SEED_RECORDS} seed records")
        return cls(**data)


@dataclasses.dataclass
class SearchShare:
    """One share of a job's search: its tasks, its part of the run's budget and the job's settings."""

    tasks: list[ShareTask]
    trials: int  # the share's part of the run's budget
    target: dict[str, Any]  # the job's target JSON
    pipeline: dict[str, Any] | None  # the job's Pipeline.to_json() (its design space), or None
    population_size: int
    num_trials_per_iter: int
    seed: int | None
    cost_model: str  # SHARE_COST_MODELS
    builder: BuilderSpec
    runner: RunnerSpec
    tracker: str  # host:port of the farm's tracker (its runner measures on the job's device key there)
    device_key: str

    def to_json(self) -> dict[str, Any]:
        """The wire form (``start``'s argument, as JSON)."""
        return {"tasks": [dataclasses.asdict(t) for t in self.tasks], "trials": self.trials, "target": self.target,
                "pipeline": self.pipeline,
                "tuning": {"population_size": self.population_size, "num_trials_per_iter": self.num_trials_per_iter},
                "seed": self.seed, "cost_model": self.cost_model, "builder": dataclasses.asdict(self.builder),
                "runner": dataclasses.asdict(self.runner), "tracker": self.tracker, "device_key": self.device_key}

    @classmethod
    def from_json(cls, data: Any) -> "SearchShare":
        """A share from what arrived over the network; ValueError (one line) for anything else: exactly the
        fields of :meth:`to_json`, the job file's own ranges for the search, builder and runner settings
        (core.jobspec; left out: the job file's defaults), at most :data:`MAX_SHARE_TASKS` tasks of at most
        :data:`SEED_RECORDS` seed records, a tracker address, a key."""
        if not isinstance(data, dict) or set(data) != SHARE_FIELDS:
            raise ValueError(f"a share must be a JSON object of exactly the fields {', '.join(sorted(SHARE_FIELDS))}")
        tasks = data["tasks"]
        if not isinstance(tasks, list) or not 1 <= len(tasks) <= MAX_SHARE_TASKS:
            raise ValueError(f"a share needs a list of 1-{MAX_SHARE_TASKS} tasks")
        tasks = [ShareTask.from_json(task) for task in tasks]
        _int_in(data["trials"], 0, 10_000_000, "trials")
        if not isinstance(data["target"], dict):
            raise ValueError("a share's target must be a JSON object")
        if data["pipeline"] is not None and not isinstance(data["pipeline"], dict):
            raise ValueError("a share's pipeline must be a JSON object")
        if data["cost_model"] not in SHARE_COST_MODELS:
            raise ValueError(f"a share's cost model must be one of {', '.join(SHARE_COST_MODELS)}")
        tuning = data["tuning"]
        if not isinstance(tuning, dict) or set(tuning) != {"population_size", "num_trials_per_iter"}:
            raise ValueError("a share's tuning settings must be population_size and num_trials_per_iter")
        try:
            search = section(TuningSpec, {**tuning, "seed": data["seed"]}, "share: tuning")  # the job file's ranges
            builder = section(BuilderSpec, data["builder"], "share: builder")
            runner = section(RunnerSpec, data["runner"], "share: runner")
        except (TunefarmError, TypeError) as err:
            raise ValueError(str(err)) from None
        try:
            parse_hostport(_text(data["tracker"], "tracker address"))
        except TunefarmError as err:
            raise ValueError(f"a share's tracker address: {err}") from None
        return cls(tasks=tasks, trials=data["trials"], target=data["target"], pipeline=data["pipeline"],
                   population_size=search.population_size, num_trials_per_iter=search.num_trials_per_iter,
                   seed=search.seed, cost_model=data["cost_model"], builder=builder, runner=runner,
                   tracker=data["tracker"], device_key=_text(data["device_key"], "device key", 256))
