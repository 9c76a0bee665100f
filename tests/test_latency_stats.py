"""core.stats.latency_stats, the one summary of latency samples every report prints: pure logic."""
from __future__ import annotations

import numpy as np
import pytest

from tunefarm.core.stats import latency_stats


def test_seconds_in_milliseconds_out_with_the_distribution():
    samples = [0.010, 0.012, 0.011, 0.030, 0.013, 0.012, 0.011, 0.010, 0.014, 0.100]
    stats = latency_stats(samples, warmup=4, number=2)
    ms = np.array(samples) * 1e3
    assert stats["median_ms"] == pytest.approx(12.0)
    assert stats["p90_ms"] == pytest.approx(np.percentile(ms, 90))
    assert stats["p99_ms"] == pytest.approx(np.percentile(ms, 99))
    assert stats["mean_ms"] == pytest.approx(ms.mean()) and stats["min_ms"] == pytest.approx(10.0)
    assert stats["std_ms"] == pytest.approx(ms.std(ddof=1))  # the sample's spread, not the population's
    assert stats["p99_ms"] >= stats["p90_ms"] >= stats["median_ms"] >= stats["min_ms"]
    assert (stats["samples"], stats["warmup"], stats["number"]) == (10, 4, 2)
    assert "4 warm-up runs, then 10 timed samples" in stats["method"]


def test_one_sample_has_no_spread_and_none_is_an_error():
    one = latency_stats(iter([0.005]), warmup=0)  # any iterable of seconds
    assert one["std_ms"] == 0.0 and one["median_ms"] == one["p99_ms"] == one["min_ms"] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="no latency samples"):
        latency_stats([], warmup=3)
