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
    assert compare_outputs(want, want, 1e-3, 1e-3)["check"] == "allclose(rtol=0.001, atol=0.001)"
