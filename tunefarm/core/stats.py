"""One way to time a model and summarise its latency samples, used by every backend and every report.

Every figure the farm reports comes from :func:`latency_stats` over samples taken one of three ways
(``TIMERS``): TVM's ``time_evaluator``, the one wall-clock loop :func:`timed_samples`, or CUDA events.
How many samples and warm-up runs a row gets follows one rule (:func:`sampling_done`,
:func:`evaluator_plan`): as asked, but a slow model gets fewer, never under ``MIN_SAMPLES``, rather than
running past its time budget. :func:`method_text` is the paragraph every report prints about it.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np

MIN_SAMPLES = 5  # a slow model gets fewer samples than asked, never fewer than this

METHOD = ("{warmup} warm-up runs, then {samples} timed samples of {number} run(s) each; "
          "median, p90, p99, mean, std and min over the samples")

# How a backend's samples were taken: the key goes into each row's latency stats ("timer").
TIMERS = {
    "time_evaluator": "TVM's time_evaluator on the device (invoke_stateful: no RPC round trip in the figure)",
    "wall_clock": "a wall-clock loop (perf_counter around each run, inputs already on the device, the device "
                  "synchronised after each run)",
    "cuda_events": "CUDA events on the run's stream (latency = H2D + execute + D2H; GPU compute apart)",
}


def latency_stats(samples_s, warmup: int, number: int = 1, timer: str = "wall_clock") -> dict:
    """Summary of per-run latencies (seconds in, milliseconds out); ``timer`` is a key of ``TIMERS``."""
    arr = np.asarray(list(samples_s), dtype=np.float64) * 1e3
    if arr.size == 0:
        raise ValueError("no latency samples")
    if timer not in TIMERS:
        raise ValueError(f"unknown timer {timer!r}; known: {', '.join(TIMERS)}")
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
        "timer": timer,
        "method": f"{TIMERS[timer]}: " + METHOD.format(warmup=warmup, samples=arr.size, number=number),
    }


def method_text(warmup: int, repeat: int, budget_s: float) -> str:
    """The method paragraph of every report (the tuning report's evaluation, ``tunefarm compare``, benches)."""
    return (f"Every row runs on an agent of its key, in an RPC session of its own, through that agent's runner for "
            f"its backend: a first run (reported apart), then "
            f"{METHOD.format(warmup=warmup, samples=repeat, number=1)} (a row slower than {budget_s:g} s in "
            f"total gets fewer samples, never under {MIN_SAMPLES}). On the agent, TVM builds are timed by "
            f"{TIMERS['time_evaluator']}; PyTorch and ONNX Runtime by {TIMERS['wall_clock']}; TensorRT with "
            f"{TIMERS['cuda_events']}. Throughput = batch size / mean latency (one request at a time). Every row's "
            "outputs are compared with the reference framework's on the same inputs and weights. Threads (CPU "
            "rows): the agent's TVM runtime count (runtime.NumThreads, set by the agent); PyTorch and ONNX Runtime "
            "run with the same count unless the row's options say otherwise. Precision: each row states its class "
            "(fp32 unless the row asks for another).")


# Reduced-precision rows (fp16, bf16, TF32) are not held to fp32's allclose against the fp32 reference: their
# check is a relative L2 error at most this and the same top-1 class on every sample (classifier outputs).
REDUCED_PRECISIONS = ("fp16", "bf16", "tf32")
REDUCED_REL_L2 = 1e-2


def top1_agreement(got: list[np.ndarray], want: list[np.ndarray]) -> float | None:
    """The fraction of samples whose argmax over the last axis of the first output agrees (None: not a
    batch of class scores)."""
    if not got or not want or got[0].ndim != 2 or got[0].shape != want[0].shape or got[0].shape[1] < 2:
        return None
    return float(np.mean(np.argmax(got[0], axis=1) == np.argmax(want[0], axis=1)))


def compare_outputs(got, want, rtol: float, atol: float, precision: str = "fp32") -> dict:
    """Numerics of one backend against the reference: max errors, relative L2 error and the verdict of the
    check for the row's precision class (fp32: allclose with ``rtol``/``atol``; fp16, bf16, TF32: relative
    L2 error <= REDUCED_REL_L2 and top-1 agreement on classifier outputs), which ``check`` names."""
    got = [np.asarray(g, dtype=np.float64) for g in got]
    want = [np.asarray(w, dtype=np.float64) for w in want]
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        return {"ok": False, "max_abs_err": None, "max_rel_err": None, "rel_l2_err": None, "rtol": rtol,
                "atol": atol, "detail": f"shape mismatch: {[g.shape for g in got]} vs {[w.shape for w in want]}"}
    abs_err = max(float(np.max(np.abs(g - w))) if g.size else 0.0 for g, w in zip(got, want))
    rel_err = max(float(np.max(np.abs(g - w) / (np.abs(w) + 1e-12))) if g.size else 0.0 for g, w in zip(got, want))
    flat_got = np.concatenate([g.ravel() for g in got]) if got else np.zeros(0)
    flat_want = np.concatenate([w.ravel() for w in want]) if want else np.zeros(0)
    rel_l2 = float(np.linalg.norm(flat_got - flat_want) / max(float(np.linalg.norm(flat_want)), 1e-300))
    out = {"max_abs_err": abs_err, "max_rel_err": rel_err, "rel_l2_err": rel_l2, "rtol": rtol, "atol": atol}
    if str(precision) in REDUCED_PRECISIONS:
        top1 = top1_agreement(got, want)
        ok = rel_l2 <= REDUCED_REL_L2 and (top1 is None or top1 == 1.0)
        out.update(top1_agreement=top1, check=f"{precision}: relative L2 <= {REDUCED_REL_L2:g}"
                                              + (" and top-1 agreement" if top1 is not None else ""))
    else:
        ok = all(np.allclose(g, w, rtol=rtol, atol=atol) for g, w in zip(got, want))
        out["check"] = f"allclose(rtol={rtol:g}, atol={atol:g})"
    return {"ok": bool(ok), **out}


def sampling_done(samples: int, sampling_s: float, spent_s: float, repeat: int, duration_s: float,
                  budget_s: float) -> bool:
    """Whether to stop taking samples: ``repeat`` of them over at least ``duration_s`` of sampling (as
    trtexec's ``--iterations``/``--duration``), or ``budget_s`` spent with at least ``MIN_SAMPLES``."""
    if samples >= repeat and sampling_s >= duration_s:
        return True
    return samples >= MIN_SAMPLES and spent_s > budget_s


def evaluator_plan(single_run_s: float, warmup: int, repeat: int, budget_s: float) -> tuple[int, int]:
    """``(warm-up runs, timed samples)`` for a timer that is told its counts up front (``time_evaluator``),
    from one run's time: the same rule as :func:`timed_samples` (warm-up within a quarter of the budget;
    fewer samples for a slow build, never under ``MIN_SAMPLES``)."""
    if single_run_s <= 0:
        return warmup, repeat
    warm = min(warmup, max(1, int(budget_s / 4 / single_run_s)))
    samples = int(max(MIN_SAMPLES, min(repeat, math.floor(budget_s / single_run_s))))
    return warm, samples


def timed_samples(fn: Callable[[], Any], warmup: int, repeat: int, duration_s: float = 0.0,
                  budget_s: float = 300.0, sync: Callable[[], Any] | None = None) -> tuple[list[float], int]:
    """Per-run wall-clock seconds of ``fn`` after ``warmup`` runs: ``(samples, warm-up runs done)``.

    The one wall-clock loop: samples are taken until :func:`sampling_done`; warm-up stops early once a
    quarter of ``budget_s`` is spent. ``sync`` (e.g. a CUDA synchronize) ends each timed run.
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
        if sampling_done(len(samples), time.perf_counter() - t_begin, time.perf_counter() - start, repeat,
                         duration_s, budget_s):
            break
    return samples, done
