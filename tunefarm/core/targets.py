"""Targets as data: TVM target JSON dicts, and named presets stored as YAML in configs/targets/."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from .errors import TunefarmError

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "targets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if p.is_file())


def is_preset(name: str) -> bool:
    """Whether ``name`` is the name of a preset: one of the files in configs/targets/, compared as a name,
    never made into a path (``/some/dir/evil`` or ``../x`` is no preset)."""
    return isinstance(name, str) and name in preset_names()


def load_preset(name: str) -> dict[str, Any]:
    """A preset's ``target:``, parsed with the bounds a job file has (jobspec.parse_yaml); one-line errors."""
    from .jobspec import MAX_YAML_BYTES, parse_yaml  # pylint: disable=import-outside-toplevel

    if not is_preset(name):
        raise TunefarmError(f"unknown target preset {name!r}; presets: {', '.join(preset_names()) or 'none'}")
    path = PRESET_DIR / f"{name}.yaml"
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_YAML_BYTES + 1)
        text = raw.decode("utf-8")
    except OSError as err:
        raise TunefarmError(f"target preset {path} is unreadable: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise TunefarmError(f"target preset {path} is not UTF-8 text") from None
    data = parse_yaml(text, f"target preset {path}")
    target = data.get("target") if isinstance(data, dict) else None
    if not isinstance(target, (dict, str)):
        raise TunefarmError(f"target preset {path} has no 'target:' mapping")
    return target


def target_from_spec(spec: Any):
    """A ``tvm.target.Target`` from a preset name, a JSON string, a dict or a TVM tag string."""
    import tvm  # pylint: disable=import-outside-toplevel

    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("{"):
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as err:
                raise TunefarmError(f"bad target JSON: {err.msg} at column {err.colno}") from None
        elif is_preset(text):
            spec = load_preset(text)
        elif text in tvm.target.list_tags():
            spec = text
        else:
            raise TunefarmError(f"unknown target {text!r}: not a preset ({', '.join(preset_names())}), "
                                "not a TVM tag, not a JSON dict")
    if isinstance(spec, dict) and isinstance(spec.get("host"), str) and spec["host"] in tvm.target.list_tags():
        spec = dict(spec)
    try:
        return tvm.target.Target(spec)
    except Exception as err:  # TVM raises several types for bad targets
        first = str(err).strip().splitlines()
        raise TunefarmError(f"bad target {json.dumps(spec) if isinstance(spec, dict) else spec}: "
                            f"{first[-1] if first else type(err).__name__}") from None


def _plain(value):
    """TVM FFI containers (Map, Array, String) -> plain JSON values."""
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if isinstance(value, str):
        return str(value)
    if hasattr(value, "__iter__"):
        return [_plain(v) for v in value]
    return str(value)


def target_to_json(target) -> dict[str, Any]:
    """A Target as the JSON dict that ``tvm.target.Target`` accepts back."""
    data = _plain(target.export())
    if not data.get("tag"):
        data.pop("tag", None)
    if isinstance(data.get("host"), dict) and not data["host"].get("tag"):
        data["host"].pop("tag", None)
    return data


def describe_target(target: dict[str, Any]) -> str:
    """A short human form of a target JSON dict, e.g. 'llvm mcpu=znver4 cores=16'."""
    if not target:
        return "-"
    head = target.get("tag") or target.get("kind", "?")
    parts = [str(head)]
    for name, label in (("device", "device"), ("mcpu", "mcpu"), ("arch", "arch"), ("num-cores", "cores")):
        if name in target:
            parts.append(f"{label}={target[name]}")
    host = target.get("host")
    if isinstance(host, dict):
        parts.append(f"host={host.get('kind', '?')}")
    return " ".join(parts)


OPENCL_RUNTIME_HINT = ("serving an OpenCL target needs TVM's OpenCL backend on the device (the PyPI wheel is built "
                       "without it): start the agent there with `tunefarm agent --opencl`; see docs/opencl.md")


def runtime_problem(target: dict[str, Any], info) -> str | None:
    """Why the agent described by ``info`` (a ``DeviceInfo``) cannot run kernels built for ``target``, or None.

    Only what the agent reported is used: its CUDA devices, and whether its TVM runtime runs OpenCL.
    """
    kind = target.get("kind")
    tag = str(target.get("tag") or "")
    if kind == "opencl" and not (info.opencl or {}).get("tvm_runtime_opencl"):
        seen = [d.get("name") for p in (info.opencl or {}).get("platforms", []) for d in p.get("devices", [])]
        where = f"it sees OpenCL device(s) {', '.join(map(str, seen))} but " if seen else ""
        return (f"agent {info.agent_id} cannot run OpenCL kernels: {where}its TVM runtime has no OpenCL; "
                + OPENCL_RUNTIME_HINT)
    if (kind == "cuda" or tag.startswith("nvidia/")) and not info.cuda:
        return f"agent {info.agent_id} has no CUDA device that its TVM runtime can use"
    return None
