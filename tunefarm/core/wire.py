"""Wire formats shared by the tracker, the agents and the host.

An agent registers with the stock TVM tracker like any ``tvm.rpc`` server. Its registration
(``UPDATE_INFO``) carries one extra field, ``"tunefarm"``, holding the agent's ``DeviceInfo`` as a
JSON dict; the stock tracker stores the dict as it is and returns it in ``SUMMARY`` under
``server_info``. Stock tools (``python -m tvm.exec.query_rpc_tracker``) keep working unchanged.
"""
from __future__ import annotations

import dataclasses
import json
import socket
from typing import Any

from .backends import BACKENDS
from .errors import TunefarmError

# Field of a server's tracker info dict that holds tunefarm's DeviceInfo.
INFO_FIELD = "tunefarm"
# Set by the farm's tracker on a server's info: whether its connection proved the farm key
# (tunefarm.core.credential); only such a server's DeviceInfo is believed.
VERIFIED_FIELD = "tunefarm_verified"
# In the farm tracker's SUMMARY: servers refused lately for want of the farm key.
REFUSED_FIELD = "tunefarm_refused"
DEFAULT_TRACKER_PORT = 9190

# The model file each agent runner takes (core/backends.py describes each backend).
MODEL_FORMAT = {b.runner: b.model_format for b in BACKENDS.values()}


def runner_name(backend: str) -> str:
    """The agent runner that serves ``backend`` (``tvm-tuned`` and ``tvm-untuned``: ``tvm``)."""
    return BACKENDS[backend].runner if backend in BACKENDS else backend

# Global functions an agent's RPC server registers (sessions are forked from it and inherit them); the
# host calls them by these names in a session. Each returns a string (JSON where it is structured).
AGENT_INFO_FUNC = "tunefarm.agent.info"  # () -> the agent's DeviceInfo as JSON
AGENT_ID_FUNC = "tunefarm.agent.id"  # () -> "hostname:pid"
AGENT_TARGET_FUNC = "tunefarm.agent.target"  # () -> the TVM target JSON the agent serves
RUNNER_RUN_FUNC = "tunefarm.runner.run"  # (backend, model_file, inputs_file, warmup, repeat, options_json)
RUNNER_AVAILABLE_FUNC = "tunefarm.runner.available"  # (options_json) -> {backend: None | why not}
BUILDER_BUILD_FUNC = "tunefarm.builder.build"  # (mod_file, target_json, out_name)
BUILDER_BUILD_MANY_FUNC = "tunefarm.builder.build_many"  # (names_json, target_json) -> errors JSON
# (names_json, target_json, options_json: {"timeout_s", "straggler_factor"}) -> errors JSON: build_many with each
# candidate's build killed on the agent past timeout_s or cut as a straggler (its error then starts with
# BUILD_TIMEOUT_WORD); hosts fall back to build_many on older agents
BUILDER_BUILD_TIMED_FUNC = "tunefarm.builder.build_many_timed"
BUILD_TIMEOUT_WORD = "timeout"
# (artifact bytes, file name, args_info JSON, evaluator JSON, device type) -> run seconds JSON: one candidate
# measured in one RPC round trip (tunefarm/device_agents/measure_service.py)
MEASURE_FUNC = "tunefarm.measure.candidate"
# (artifacts' bytes back to back, header JSON, evaluator JSON) -> per-candidate results JSON: several candidates
# in one round trip, for slow links (the same file)
MEASURE_BATCH_FUNC = "tunefarm.measure.batch"
MEASURE_NOT_RUN = "not run: an earlier candidate of the call failed"  # its answer for the ones after a failure
BUILDER_PARALLELISM_FUNC = "tunefarm.builder.parallelism"  # () -> candidates built at once


def no_delay(sock) -> None:
    """Turn Nagle's algorithm off on ``sock`` (for a listening socket: on every connection it accepts).

    TVM's tracker and RPC handshakes write a message as two sends (length, then body) and then wait
    for the answer: with Nagle on, the body waits for the peer's delayed ACK, ~40 ms on Linux, at
    every round trip. Measured here: a SUMMARY took 88 ms, a session request 100 ms; with no_delay on
    the host's tracker socket, the tracker and the agent's listener, both drop to about a millisecond
    (bench/results/farm_overhead-*.md).
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass  # not a TCP socket (unix socket, closed): nothing to do


def parse_hostport(text: str, default_port: int = DEFAULT_TRACKER_PORT) -> tuple[str, int]:
    """'host:port' (or 'host') -> (host, port), with a one-line error for anything else."""
    text = (text or "").strip()
    if not text:
        raise TunefarmError("tracker address is empty; expected HOST:PORT, e.g. 127.0.0.1:9190")
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, default_port
    if not host:
        raise TunefarmError(f"bad tracker address {text!r}; expected HOST:PORT")
    try:
        port_num = int(port)
    except ValueError:
        raise TunefarmError(f"bad port in tracker address {text!r}; expected HOST:PORT") from None
    if not 0 < port_num < 65536:
        raise TunefarmError(f"port out of range in tracker address {text!r}")
    return host.strip("[]"), port_num


# Bounds on what an agent may say about itself (its tracker registration, its heartbeats).
MAX_TEXT = 1024  # one string
MAX_ITEMS = 256  # one list or object
MAX_DEPTH = 6


def _check_bounded(value: Any, where: str, depth: int = 0) -> None:
    """ValueError unless ``value`` is plain JSON within the bounds above."""
    if depth > MAX_DEPTH:
        raise ValueError(f"DeviceInfo field {where!r} is nested too deeply")
    if isinstance(value, str):
        if len(value) > MAX_TEXT:
            raise ValueError(f"DeviceInfo field {where!r} has a string over {MAX_TEXT} characters")
    elif isinstance(value, dict):
        if len(value) > MAX_ITEMS:
            raise ValueError(f"DeviceInfo field {where!r} has over {MAX_ITEMS} entries")
        for key, item in value.items():
            _check_bounded(key, where, depth + 1)
            _check_bounded(item, where, depth + 1)
    elif isinstance(value, list):
        if len(value) > MAX_ITEMS:
            raise ValueError(f"DeviceInfo field {where!r} has over {MAX_ITEMS} entries")
        for item in value:
            _check_bounded(item, where, depth + 1)
    elif not (value is None or isinstance(value, (bool, int, float))):
        raise ValueError(f"DeviceInfo field {where!r} holds a {type(value).__name__}")


@dataclasses.dataclass
class DeviceInfo:
    """What an agent tells the farm about its machine."""

    key: str
    hostname: str = ""
    agent_id: str = ""  # hostname:pid, unique per running agent
    cpu_model: str = ""
    num_cores: int = 0  # physical cores this agent may run on
    threads: int = 0  # TVM_NUM_THREADS of its RPC server: what TVM, PyTorch and ONNX Runtime runs use
    target: dict[str, Any] = dataclasses.field(default_factory=dict)  # the TVM target JSON it serves
    has_cc: bool = False  # can link MetaSchedule's .tar candidates
    cuda: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    opencl: dict[str, Any] = dataclasses.field(default_factory=dict)
    runners: list[str] = dataclasses.field(default_factory=list)  # backends this agent can run
    tvm_version: str = ""
    peak_gflops: float = 0.0  # fp32 peak (CPU: a measured sgemm; GPU: tensor-core peak from its attributes); 0: unknown
    # vendor libraries TVM can offload to here, by name ("onednn": {"available": bool, "version", "isa", "plugin",
    # or "reason"}); core.onednn.probe() fills oneDNN's
    vendor: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> "DeviceInfo":
        """A DeviceInfo from what arrived over the network; ValueError (naming the field) for anything that
        is not one: wrong types, oversized strings or lists, deep nesting. Unknown fields are dropped."""
        if not isinstance(data, dict):
            raise ValueError(f"DeviceInfo must be a JSON object, got {type(data).__name__}")
        defaults = cls(key="").to_json()
        kept = {}
        for name, value in data.items():
            if name not in defaults:
                continue
            want = type(defaults[name])
            if want is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"DeviceInfo field {name!r} must be an integer")
            if want is float:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1e9:
                    raise ValueError(f"DeviceInfo field {name!r} must be a number between 0 and 1e9")
                kept[name] = float(value)
                continue
            if not isinstance(value, want):
                raise ValueError(f"DeviceInfo field {name!r} must be {want.__name__}, got {type(value).__name__}")
            _check_bounded(value, name)
            kept[name] = value
        if not kept.get("key"):
            raise ValueError("DeviceInfo needs its 'key'")
        if not all(isinstance(d, dict) for d in kept.get("cuda", [])):
            raise ValueError("DeviceInfo field 'cuda' must be a list of objects")
        if not all(isinstance(r, str) for r in kept.get("runners", [])):
            raise ValueError("DeviceInfo field 'runners' must be a list of strings")
        if not 0 <= kept.get("num_cores", 0) <= 1 << 16 or not 0 <= kept.get("threads", 0) <= 1 << 16:
            raise ValueError("DeviceInfo fields 'num_cores' and 'threads' must be between 0 and 65536")
        return cls(**kept)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)
