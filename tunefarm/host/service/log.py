"""The host service's log: one timestamped line per event, on its standard output."""
from __future__ import annotations

import time


def log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} farm: {message}", flush=True)

