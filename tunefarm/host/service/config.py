"""The host service's configuration (``tunefarm host serve --config configs/farm.yaml``), as data.

Every field has a default, so the config file is optional; command-line options override it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from tunefarm.core.errors import TunefarmError
from tunefarm.core.farm import DEFAULT_FARM_PORT
from tunefarm.core.wire import DEFAULT_TRACKER_PORT, parse_hostport


@dataclasses.dataclass
class FarmConfig:
    bind: str = "127.0.0.1"  # the HTTP API and dashboard; 0.0.0.0 to serve other machines
    port: int = DEFAULT_FARM_PORT
    logs_dir: str = "logs"  # job dirs land in LOGS_DIR/<job>/, the farm's own files in LOGS_DIR/farm/
    token: str | None = None  # the API token; prefer token_file (kept out of the config)
    token_file: str | None = None  # default: LOGS_DIR/farm/token, generated (mode 0600) on first start
    tracker: str | None = None  # HOST:PORT of an external tracker; unset: the host runs its own
    tracker_bind: str = "127.0.0.1"  # the host's own tracker; agents on other machines need 0.0.0.0
    tracker_port: int = DEFAULT_TRACKER_PORT
    max_running_jobs: int = 4  # at most one per device key in any case
    max_upload_mb: float = 256.0  # model files uploaded with a job
    device_offline_after_s: float = 10.0  # no heartbeat for this long: the device shows offline
    # The farm key agents and workers prove to the host's tracker (tunefarm.core.credential); unset: the
    # default key file (~/.config/tunefarm/farm.key, created if missing). Agents on other machines need a copy.
    farm_key_file: str | None = None
    # Device keys on which the host's tracker admits stock TVM servers and clients without the farm key.
    open_keys: list = dataclasses.field(default_factory=list)


def load_farm_config(path: str | Path | None, **overrides: Any) -> FarmConfig:
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise TunefarmError(f"farm config not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise TunefarmError(f"{path}: malformed YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise TunefarmError(f"{path}: a farm config must be a YAML mapping")
    where = str(path or "farm config")
    fields = {f.name: f for f in dataclasses.fields(FarmConfig)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise TunefarmError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    config = FarmConfig(**data)
    defaults = FarmConfig()
    for name in fields:
        value, default = getattr(config, name), getattr(defaults, name)
        if value is None or default is None:
            if value is not None and not isinstance(value, str):
                raise TunefarmError(f"{where}: {name} must be a string")
            continue
        if isinstance(default, list):
            ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
            if not ok:
                raise TunefarmError(f"{where}: {name} must be a list of non-empty strings (got {value!r})")
            continue
        if isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        else:
            ok = isinstance(value, str) and bool(value)
        if not ok:
            kind = "a non-empty string" if isinstance(default, str) else "a positive number"
            raise TunefarmError(f"{where}: {name} must be {kind} (got {value!r})")
    if config.tracker is not None:
        parse_hostport(config.tracker)  # one-line error for a bad address now
    for name in ("port", "tracker_port"):
        if not 0 < getattr(config, name) < 65536:
            raise TunefarmError(f"{where}: {name} out of range")
    return config
