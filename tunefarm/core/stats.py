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
    return (f"Every row of a comparison runs on one agent of its key (the agent its first row got; a row that "
            f"ran elsewhere says why), in an RPC session of its own, through that agent's runner for "
            f"its backend: a first run (reported apart), then "
            f"{METHOD.format(warmup=warmup, samples=repeat, number=1)} (a row slower than {budget_s:g} s in "
            f"total gets fewer samples, never under {MIN_SAMPLES}). On the agent, TVM builds are timed by "
            f"{TIMERS['time_evaluator']}; PyTorch and ONNX Runtime by {TIMERS['wall_clock']}; TensorRT with "
            f"{TIMERS['cuda_events']}. Throughput = batch size / mean latency (one request at a time). Every row's "
            "outputs are compared with the reference framework's on the same inputs and weights, relative to the "
            "reference's scale (relative L2 error per output; fp32 rows also every element within atol x the "
            "output's largest magnitude + rtol x |reference|; top-1 agreement on class scores). Threads (CPU "
            "rows): the agent's TVM runtime count (runtime.NumThreads, set by the agent); PyTorch and ONNX Runtime "
            "run with the same count unless the row's options say otherwise. Precision: each row states its class "
            "(fp32 unless the row asks for another).")


# The numerics check is relative to the reference's scale, never absolute: a model whose outputs are all
# around 1e-9 would pass any absolute tolerance with whatever it computes. Every row, for each output:
#   * relative L2 error ||got - want|| / ||want|| within the row's tolerance (fp32: ``rtol``; fp16, bf16,
#     TF32 rows, held against the fp32 reference: REDUCED_REL_L2);
#   * fp32 only: every element within ``atol * max|want| + rtol * |want|`` (allclose, with ``atol`` in units
#     of that output's largest reference magnitude instead of absolute units);
#   * the same top-1 class on every sample where the first output is a batch of class scores.
REDUCED_PRECISIONS = ("fp16", "bf16", "tf32")
REDUCED_REL_L2 = 1e-2


def top1_agreement(got: list[np.ndarray], want: list[np.ndarray]) -> float | None:
    """The fraction of samples whose argmax over the last axis of the first output agrees (None: not a
    batch of class scores)."""
    if not got or not want or got[0].ndim != 2 or got[0].shape != want[0].shape or got[0].shape[1] < 2:
        return None
    return float(np.mean(np.argmax(got[0], axis=1) == np.argmax(want[0], axis=1)))


def _rel_l2(got: np.ndarray, want: np.ndarray) -> float:
    """||got - want|| / ||want||; against an all-zero reference: 0 if got is all zero too, else infinite."""
    diff = float(np.linalg.norm(got - want))
    norm = float(np.linalg.norm(want))
    if norm == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / norm


def check_text(rtol: float, atol: float, precision: str = "fp32", top1: bool = False) -> str:
    """What the numerics check of a row of ``precision`` with these tolerances requires, in words."""
    if str(precision) in REDUCED_PRECISIONS:
        text = f"{precision}: relative L2 error <= {REDUCED_REL_L2:g} per output"
    else:
        text = (f"fp32: relative L2 error <= rtol={rtol:g} per output, and every element within "
                f"atol={atol:g} x the output's largest reference magnitude + rtol x |reference|")
    return text + (", and top-1 agreement" if top1 else "")


def compare_outputs(got, want, rtol: float, atol: float, precision: str = "fp32") -> dict:
    """Numerics of one backend against the reference, relative to the reference's scale (see above).

    Returns the verdict ``ok``, the check applied in words (``check``), ``rel_l2_err`` (the largest relative
    L2 error over the outputs; ``rel_l2_per_output`` each), ``max_abs_err``, ``max_rel_err``, ``ref_max_abs``
    (the reference's largest magnitude: the scale the errors are to be read against) and ``top1_agreement``
    (None: the first output is not a batch of class scores).
    """
    got = [np.asarray(g, dtype=np.float64) for g in got]
    want = [np.asarray(w, dtype=np.float64) for w in want]
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        return {"ok": False, "max_abs_err": None, "max_rel_err": None, "rel_l2_err": None, "rtol": rtol,
                "atol": atol, "detail": f"shape mismatch: {[g.shape for g in got]} vs {[w.shape for w in want]}"}
    abs_err = max((float(np.max(np.abs(g - w))) if g.size else 0.0 for g, w in zip(got, want)), default=0.0)
    rel_err = max((float(np.max(np.abs(g - w) / (np.abs(w) + 1e-12))) if g.size else 0.0
                   for g, w in zip(got, want)), default=0.0)
    per_output = [_rel_l2(g, w) for g, w in zip(got, want)]
    rel_l2 = max(per_output, default=0.0)
    scales = [float(np.max(np.abs(w))) if w.size else 0.0 for w in want]
    top1 = top1_agreement(got, want)
    out = {"max_abs_err": abs_err, "max_rel_err": rel_err, "rel_l2_err": rel_l2, "rel_l2_per_output": per_output,
           "ref_max_abs": max(scales, default=0.0), "top1_agreement": top1, "rtol": rtol, "atol": atol,
           "check": check_text(rtol, atol, precision, top1 is not None)}
    reduced = str(precision) in REDUCED_PRECISIONS
    ok = all(err <= (REDUCED_REL_L2 if reduced else rtol) for err in per_output)  # NaN fails
    if not reduced:
        ok = ok and all(bool(np.all(np.abs(g - w) <= atol * scale + rtol * np.abs(w)))
                        for g, w, scale in zip(got, want, scales))
    ok = ok and (top1 is None or top1 == 1.0)
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
