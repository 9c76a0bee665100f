"""What every benchmark records about where it ran, and the thread count TVM runs with there.

Importing this module sets ``TVM_NUM_THREADS`` (if unset) to the physical cores this process may use,
as agents do: TVM's default is half the hardware threads on x86-64, and the stock ``LocalRunner``'s
workers inherit the environment. Import it before TVM.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from tunefarm.core.threads import THREADS_ENV, keep_tvm_threads_inside, threads_per_core, usable_cores

os.environ.setdefault(THREADS_ENV, str(usable_cores()))


def pin(cpus) -> None:
    """Pin this process (and what it starts from now on) to ``cpus``: TVM with as many threads, kept inside
    them (TVM binds its pool's threads to CPUs of the whole machine otherwise: tunefarm.core.threads).
    Call it before TVM's pool starts."""
    os.sched_setaffinity(0, set(cpus))
    os.environ[THREADS_ENV] = str(usable_cores())
    keep_tvm_threads_inside(os.environ)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def threads() -> int:
    """The thread count TVM (and, in the benchmarks that time them, PyTorch and ONNX Runtime) runs with."""
    return int(os.environ[THREADS_ENV])


def cpu_model() -> str:
    from tunefarm.device_agents.probe import cpu_model as probed  # pylint: disable=import-outside-toplevel

    return probed()


def load_avg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine(**extra: Any) -> dict[str, Any]:
    """The machine a result was measured on: host, CPU, cores, threads, load, versions, date."""
    import tvm  # pylint: disable=import-outside-toplevel

    return {"host": platform.node(), "cpu": cpu_model(), "cores": usable_cores(),
            "logical_cpus": len(os.sched_getaffinity(0)), "machine_cpus": os.cpu_count(),
            "threads_per_core": threads_per_core(range(os.cpu_count() or 1)), "threads": threads(),
            "load_avg_start": load_avg(),
            "python": platform.python_version(), "tvm": str(tvm.__version__),
            "date": time.strftime("%Y-%m-%d %H:%M"), **extra}


def default_name() -> str:
    """The results file name part: <hostname>-<cores>c."""
    return f"{platform.node()}-{len(os.sched_getaffinity(0))}c"


def finish(meta: dict[str, Any]) -> dict[str, Any]:
    """The machine record with the load at the end of the run added."""
    meta["load_avg_end"] = load_avg()
    return meta


def describe(meta: dict[str, Any]) -> str:
    """The machine record as the sentence every results file opens with."""
    start, end = meta.get("load_avg_start") or [float("nan")], meta.get("load_avg_end") or [float("nan")]
    whole = meta.get("machine_cpus")
    where = (f"{whole} CPUs, this benchmark's process pinned to {meta['cores']} cores" if whole and whole > meta.get(
        "logical_cpus", whole) else f"{meta['cores']} cores")
    smt = meta.get("threads_per_core", 1)
    where += f", {smt} hardware threads per core" if smt > 1 else ""
    return (f"Machine: {meta['host']}, {where} ({meta['cpu']}), TVM {meta['tvm']} with "
            f"{meta['threads']} threads, Python {meta['python']}; load average (1 min) {start[0]:.1f} at the start, "
            f"{end[0]:.1f} at the end.")


def write_rows(out: Path, name: str, meta: dict[str, Any], rows: dict[str, Any], lines: list[str]) -> str:
    """``out/NAME.json`` (meta and rows) and ``out/NAME.md`` (``lines``); the markdown text."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    text = "\n".join(lines) + "\n"
    (out / f"{name}.md").write_text(text)
    return text
