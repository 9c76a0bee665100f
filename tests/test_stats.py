"""core.stats, the one timing routine and statistics summary: pure logic, no processes."""
from __future__ import annotations

import time

import numpy as np
import pytest

from tunefarm.core.stats import (MIN_SAMPLES, TIMERS, compare_outputs, evaluator_plan, latency_stats, method_text,
                                 sampling_done, timed_samples)


def test_latency_stats_summarises_milliseconds_and_names_its_timer():
    stats = latency_stats([0.001, 0.002, 0.003, 0.004, 0.010], warmup=3, timer="time_evaluator")
    assert stats["median_ms"] == pytest.approx(3.0)
    assert stats["min_ms"] == pytest.approx(1.0) and stats["mean_ms"] == pytest.approx(4.0)
    assert stats["p99_ms"] >= stats["p90_ms"] >= stats["median_ms"]
    assert stats["std_ms"] == pytest.approx(float(np.std([1, 2, 3, 4, 10], ddof=1)))
    assert (stats["samples"], stats["warmup"], stats["number"], stats["timer"]) == (5, 3, 1, "time_evaluator")
    assert stats["method"].startswith(TIMERS["time_evaluator"]) and "3 warm-up runs, then 5 timed samples" in stats["method"]
    assert latency_stats([0.002], warmup=0)["std_ms"] == 0.0
    with pytest.raises(ValueError, match="no latency samples"):
        latency_stats([], warmup=0)
    with pytest.raises(ValueError, match="unknown timer 'stopwatch'"):
        latency_stats([0.1], warmup=0, timer="stopwatch")


def test_a_slow_build_gets_fewer_samples_never_under_the_minimum():
    assert evaluator_plan(0.001, warmup=10, repeat=50, budget_s=60) == (10, 50)
    assert evaluator_plan(2.0, warmup=10, repeat=50, budget_s=60) == (7, 30)  # 15 s of warm-up, 60 s of samples
    assert evaluator_plan(100.0, warmup=10, repeat=50, budget_s=60) == (1, MIN_SAMPLES)
    assert evaluator_plan(0.0, warmup=4, repeat=9, budget_s=60) == (4, 9)  # no single-run time: as asked
    assert evaluator_plan(100.0, warmup=0, repeat=50, budget_s=60)[0] == 0  # no warm-up asked, none done


def test_sampling_stops_at_repeat_and_duration_or_at_the_budget():
    assert not sampling_done(9, 5.0, 5.0, repeat=10, duration_s=0.0, budget_s=60)
    assert sampling_done(10, 0.1, 0.1, repeat=10, duration_s=0.0, budget_s=60)
    assert not sampling_done(10, 0.5, 0.5, repeat=10, duration_s=1.0, budget_s=60)  # duration not reached
    assert not sampling_done(MIN_SAMPLES - 1, 99.0, 99.0, repeat=50, duration_s=0.0, budget_s=60)
    assert sampling_done(MIN_SAMPLES, 99.0, 99.0, repeat=50, duration_s=0.0, budget_s=60)


def test_timed_samples_keeps_to_its_budget_with_the_minimum_of_samples():
    calls = []

    def slow():
        calls.append(time.perf_counter())
        time.sleep(0.02)

    samples, warm = timed_samples(slow, warmup=3, repeat=100, budget_s=0.05)
    assert warm == 1  # the first warm-up run already spent a quarter of the budget
    assert len(samples) == MIN_SAMPLES and len(calls) == warm + MIN_SAMPLES
    assert all(s >= 0.02 for s in samples)
    synced = []
    samples, warm = timed_samples(lambda: time.sleep(0.005), warmup=2, repeat=3, duration_s=0.1, sync=lambda: synced.append(1))
    assert warm == 2 and sum(samples) >= 0.1 and len(samples) >= 3
    assert len(synced) == warm + len(samples)


def test_compare_outputs_errors_and_verdict():
    want = [np.array([1.0, 2.0, 4.0], dtype=np.float32)]
    num = compare_outputs([np.array([1.0, 2.0, 4.004])], want, rtol=1e-3, atol=1e-3)
    assert num["ok"] and num["max_abs_err"] == pytest.approx(0.004, rel=1e-3)
    assert num["rel_l2_err"] == pytest.approx(0.004 / np.sqrt(21), rel=1e-3)
    assert not compare_outputs([np.array([1.0, 2.0, 4.1])], want, rtol=1e-3, atol=1e-3)["ok"]
    bad = compare_outputs([np.zeros((2, 2))], want, rtol=1e-3, atol=1e-3)
    assert not bad["ok"] and bad["max_abs_err"] is None and "shape mismatch" in bad["detail"]
    assert not compare_outputs([], want, rtol=1e-3, atol=1e-3)["ok"]  # a missing output is a mismatch


def test_method_text_states_counts_budget_timers_threads_and_precision():
    text = method_text(warmup=3, repeat=15, budget_s=120)
    assert "3 warm-up runs, then 15 timed samples" in text and "slower than 120 s" in text
    assert f"never under {MIN_SAMPLES}" in text
    assert all(desc in text for desc in TIMERS.values())
    assert "runtime.NumThreads" in text and "fp32" in text and "\n" not in text


def test_reduced_precision_rows_are_checked_by_relative_l2_and_top1():
    from tunefarm.core.stats import REDUCED_REL_L2

    want = [np.array([[0.1, 2.0, -1.0], [3.0, 0.5, 0.2]])]
    close = [want[0] * (1 + REDUCED_REL_L2 / 4)]  # fp16-like error: not allclose at 1e-3, well within L2
    assert not compare_outputs(close, want, rtol=1e-3, atol=1e-3)["ok"]
    num = compare_outputs(close, want, rtol=1e-3, atol=1e-3, precision="fp16")
    assert num["ok"] and num["top1_agreement"] == 1.0 and "relative L2" in num["check"]
    swapped = [np.array([[0.1, 2.0, 2.01], [3.0, 0.5, 0.2]])]  # the first sample's class changes
    bad = compare_outputs(swapped, want, rtol=1e-3, atol=1e-3, precision="fp16")
    assert not bad["ok"] and bad["top1_agreement"] == 0.5
    far = [want[0] * 1.1]
    assert not compare_outputs(far, want, rtol=1e-3, atol=1e-3, precision="tf32")["ok"]
    assert compare_outputs(want, want, 1e-3, 1e-3)["check"] == (
        "fp32: relative L2 error <= rtol=0.001 per output, and every element within atol=0.001 x the output's "
        "largest reference magnitude + rtol x |reference|, and top-1 agreement")
    assert compare_outputs(want, want, 1e-3, 1e-3, precision="bf16")["check"] == (
        "bf16: relative L2 error <= 0.01 per output, and top-1 agreement")


def test_fp32_numerics_are_relative_to_the_references_scale():
    """Issue 36: outputs of at most 1.9e-9 passed allclose(atol=1e-3) whatever they were. The check is the
    same at every scale: a right output passes, a wrong one fails, at 1e-9 as at 1e6."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((2, 8, 32))  # 3-D: not class scores, so no top-1 check
    other = rng.standard_normal((2, 8, 32))
    for scale in (1e-9, 1.0, 1e6):
        want = [base * scale]
        wrong = compare_outputs([other * scale], want, rtol=1e-3, atol=1e-3)
        assert not wrong["ok"] and wrong["rel_l2_err"] > 0.5, (scale, wrong)
        right = [want[0] * (1 + 1e-6 * rng.standard_normal(want[0].shape))]  # fp32 rounding-sized error
        num = compare_outputs(right, want, rtol=1e-3, atol=1e-3)
        assert num["ok"] and num["rel_l2_err"] < 1e-5 and num["top1_agreement"] is None, (scale, num)
        assert num["ref_max_abs"] == pytest.approx(float(np.max(np.abs(want[0]))))
    tiny_wrong = compare_outputs([other * 1e-9], [base * 1e-9], rtol=1e-3, atol=1e-3)
    assert tiny_wrong["max_abs_err"] < 1e-8  # far inside the old absolute atol: that check passed it
    # rtol bounds the relative L2 error: 5e-4 passes at 1e-3 and fails at 1e-4, at any scale
    want = [base * 1e-9]
    off = [want[0] * (1 + 5e-4)]
    assert compare_outputs(off, want, rtol=1e-3, atol=1e-3)["ok"]
    assert not compare_outputs(off, want, rtol=1e-4, atol=1e-3)["ok"]


def test_fp32_numerics_catch_an_outlier_a_tiny_output_and_a_swapped_class():
    rng = np.random.default_rng(1)
    want = rng.standard_normal(10_000)
    # One element off by 0.05 out of 10,000: a relative L2 error of 5e-4 (within rtol), but that element is
    # off by more than atol x the largest magnitude + rtol x its own.
    outlier = want.copy()
    outlier[1234] += 0.05
    num = compare_outputs([outlier], [want], rtol=1e-3, atol=1e-3)
    assert num["rel_l2_err"] < 1e-3 and not num["ok"], num
    # Two outputs of very different scales: each is held to its own. Concatenated, the large one would hide
    # that the small one is wrong.
    big, small = rng.standard_normal(100), rng.standard_normal(100) * 1e-9
    bad = compare_outputs([big, -small], [big, small], rtol=1e-3, atol=1e-3)
    assert not bad["ok"] and bad["rel_l2_err"] == pytest.approx(2.0), bad
    assert bad["rel_l2_per_output"][0] == 0.0 and bad["rel_l2_per_output"][1] == pytest.approx(2.0)
    ok = compare_outputs([big, small], [big, small * (1 + 1e-7)], rtol=1e-3, atol=1e-3)
    assert ok["ok"] and len(ok["rel_l2_per_output"]) == 2
    concatenated = np.linalg.norm(np.concatenate([big - big, 2 * small])) / np.linalg.norm(np.concatenate([big, small]))
    assert concatenated < 1e-3  # what a single relative L2 over all outputs would have passed
    # Class scores: a changed top-1 class fails an fp32 row too, even within the error bounds.
    scores = np.array([[1.0, 1.0004, 0.2], [3.0, 0.5, 0.2]])
    swapped = np.array([[1.0004, 1.0, 0.2], [3.0, 0.5, 0.2]])
    num = compare_outputs([swapped], [scores], rtol=1e-3, atol=1e-3)
    assert num["rel_l2_err"] < 1e-3 and num["top1_agreement"] == 0.5 and not num["ok"], num
    # An all-zero reference: only all zeros match it; NaN never passes.
    zeros = np.zeros(8)
    assert compare_outputs([zeros], [zeros], rtol=1e-3, atol=1e-3)["ok"]
    assert not compare_outputs([zeros + 1e-20], [zeros], rtol=1e-3, atol=1e-3)["ok"]
    assert not compare_outputs([np.full(8, np.nan)], [np.ones(8)], rtol=1e-3, atol=1e-3)["ok"]
