"""What the API shows of jobs and devices, as JSON a browser can parse."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def clean(value: Any) -> Any:
    """NaN/inf -> None, recursively: browsers' JSON.parse rejects them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


def read_events(path: Path, start: int = 0) -> list[dict[str, Any]]:
    """Complete lines of a ``progress.jsonl`` from line ``start`` on, each with its line number ``n``."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")[:-1]  # the last piece is empty or a line still being written
    out = []
    for i in range(start, len(lines)):
        try:
            event = json.loads(lines[i])
        except ValueError:
            continue
        if isinstance(event, dict):
            event["n"] = i
            out.append(clean(event))
    return out

