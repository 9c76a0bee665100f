"""The host service's log: one timestamped line per event, on its standard output."""
from __future__ import annotations

import time

from tunefarm.core.safe_text import printable


def log(message: str) -> None:
    """One line; job names, keys and agent ids in it came from the network: control characters are escaped."""
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} farm: {printable(message)}", flush=True)
