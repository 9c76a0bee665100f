"""One way to time a model and summarise its latency samples, used by every backend and every report."""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

METHOD = ("{warmup} warm-up runs, then {samples} timed samples of {number} run(s) each; "
          "median, p90, p99, mean, std and min over the samples")


def latency_stats(samples_s, warmup: int, number: int = 1) -> dict:
    """Summary of per-run latencies (seconds in, milliseconds out)."""
    arr = np.asarray(list(samples_s), dtype=np.float64) * 1e3
    if arr.size == 0:
        raise ValueError("no latency samples")
    return {
        "median_ms": float(np.median(arr)),
        "p90_ms": float(np.percentile(arr, 90)),
        "p99_ms": float(np.percentile(arr, 99)),
        "mean_ms": float(arr.mean()),
        "std_ms": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
        "min_ms": float(arr.min()),
        "samples": int(arr.size),
        "warmup": int(warmup),
        "number": int(number),
        "method": METHOD.format(warmup=warmup, samples=arr.size, number=number),
    }


def compare_outputs(got, want, rtol: float, atol: float) -> dict:
    """Numerics of one backend against the reference: max errors and the allclose verdict."""
    got = [np.asarray(g, dtype=np.float64) for g in got]
    want = [np.asarray(w, dtype=np.float64) for w in want]
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        return {"ok": False, "max_abs_err": None, "max_rel_err": None, "rtol": rtol, "atol": atol,
                "detail": f"shape mismatch: {[g.shape for g in got]} vs {[w.shape for w in want]}"}
    abs_err = max(float(np.max(np.abs(g - w))) if g.size else 0.0 for g, w in zip(got, want))
    rel_err = max(float(np.max(np.abs(g - w) / (np.abs(w) + 1e-12))) if g.size else 0.0 for g, w in zip(got, want))
    ok = all(np.allclose(g, w, rtol=rtol, atol=atol) for g, w in zip(got, want))
    return {"ok": bool(ok), "max_abs_err": abs_err, "max_rel_err": rel_err, "rtol": rtol, "atol": atol}


def timed_samples(fn: Callable[[], Any], warmup: int, repeat: int, duration_s: float = 0.0,
                  budget_s: float = 300.0, sync: Callable[[], Any] | None = None) -> tuple[list[float], int]:
    """Per-run wall-clock seconds of ``fn`` after ``warmup`` runs: ``(samples, warm-up runs done)``.

    Samples are taken until there are ``repeat`` of them and ``duration_s`` has passed (as trtexec's
    ``--iterations``/``--duration``), but a slow model gets fewer (never under 5) rather than running
    past ``budget_s``. ``sync`` (e.g. a CUDA synchronize) ends each timed run.
    """
    sync = sync or (lambda: None)
    start = time.perf_counter()
    done = 0
    for _ in range(max(0, warmup)):
        fn()
        sync()
        done += 1
        if time.perf_counter() - start > budget_s / 4:
            break
    samples: list[float] = []
    t_begin = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - t_begin
        if len(samples) >= repeat and elapsed >= duration_s:
            break
        if len(samples) >= 5 and time.perf_counter() - start > budget_s:
            break
    return samples, done
