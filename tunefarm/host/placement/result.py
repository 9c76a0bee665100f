"""``placement.json``: what a job's placement measured and decided, written into the job directory, exported by
``pull`` and read back by :func:`tunefarm.host.placement.apply.compile_pulled`.

It is read from files that may have travelled (a pulled bundle, a shared directory): :func:`read` checks every
field it uses and refuses anything else with a one-line error, and keys are only ever compared, never executed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunefarm.core.backends import MODEL_CANDIDATES
from tunefarm.core.errors import TunefarmError
from tunefarm.core.threads import MIXED_POOLS
from tunefarm.host.placement.vendors import VENDORS
from tunefarm.host.tuning.jobdir import PLACEMENT

FILE = PLACEMENT
FORMAT = 1
BUILDS = MODEL_CANDIDATES  # the whole-model builds a placement compares
MAX_BYTES = 4 << 20
MAX_KEYS = 4096


def chosen_offload(data: dict[str, Any]) -> dict[str, list[str] | None]:
    """The offload (vendor -> group keys) of the build the placement chose."""
    return {name: list(keys) for name, keys in data["offload"].items()}


def write(job_dir: Path, data: dict[str, Any]) -> Path:
    path = Path(job_dir) / FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"format": FORMAT, **data}, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def read(path: str | Path) -> dict[str, Any]:
    """A placement file, checked: ``format``, ``chosen`` (one of :data:`BUILDS`), ``offload`` (known vendor ->
    list of key strings) and ``environment`` (the chosen build's idle-spin variables, core.threads.MIXED_POOLS
    names with decimal values; ``{}`` where the file has none). One-line TunefarmError otherwise."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_BYTES:
            raise TunefarmError(f"{path} is larger than {MAX_BYTES >> 20} MiB: not a placement file")
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TunefarmError(f"cannot read placement file {path}: {err}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TunefarmError(f"{path} is not a placement file of format {FORMAT}")
    if data.get("chosen") not in BUILDS:
        raise TunefarmError(f"{path}: 'chosen' must be one of {', '.join(BUILDS)}")
    offload = data.get("offload")
    if not isinstance(offload, dict) or not all(
            name in VENDORS and isinstance(keys, list) and len(keys) <= MAX_KEYS
            and all(isinstance(k, str) and len(k) < 2000 for k in keys) for name, keys in offload.items()):
        raise TunefarmError(f"{path}: 'offload' must map backends ({', '.join(VENDORS)}) to lists of group keys")
    env = data.get("environment", {})  # absent in files written before the spin probe: nothing to set
    if not isinstance(env, dict) or any(name not in MIXED_POOLS or not isinstance(value, str) or not value.isascii()
                                        or not value.isdigit() or len(value) > 12 for name, value in env.items()):
        raise TunefarmError(f"{path}: 'environment' may only set {', '.join(MIXED_POOLS)} to decimal numbers")
    data["environment"] = dict(env)
    return data
