"""How a ``tunefarm tune`` run ended, as a file: what the service reads instead of the run's log text.

``tunefarm tune --result-file PATH`` writes ``{"exit_code": int, "error": str | null}`` there as it exits (the
one-line error it printed, or null); the service (host/service/jobs.py) names the path, removes what an
earlier attempt left, and reads it when the process has ended. A run that was killed or crashed leaves no
file: the service then says the exit code alone. The file sits beside the run's log, not in the tuning job's
directory: a first run that measured nothing leaves no job directory (tuning/jobdir.py ``remove_unmeasured``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MAX_ERROR = 2000  # characters of the error kept (an error is one line; a path or a key in it may be long)


def write_run_result(path: str | Path, exit_code: int, error: str | None) -> None:
    """Write the result atomically (a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    text = None if error is None else str(error)[:MAX_ERROR]
    tmp.write_text(json.dumps({"exit_code": int(exit_code), "error": text}))
    os.replace(tmp, path)


def read_run_result(path: str | Path) -> dict[str, Any] | None:
    """The result a run wrote, or None when there is none or it is not one (a file of another shape)."""
    try:
        data = json.loads(Path(path).read_text(errors="replace"))
    except (OSError, ValueError):
        return None
    if (not isinstance(data, dict) or not isinstance(data.get("exit_code"), int)
            or not (data.get("error") is None or isinstance(data.get("error"), str))):
        return None
    return {"exit_code": data["exit_code"], "error": None if data["error"] is None else data["error"][:MAX_ERROR]}
