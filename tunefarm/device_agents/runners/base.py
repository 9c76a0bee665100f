"""The interface every model runner on an agent implements, and the one timing loop they share.

A runner turns a model file into something runnable (``activate``), runs it on named numpy inputs
(``infer``), measures it (``measure``) and lets go of what it holds (``deactivate``); it is used as a
context manager, as Polygraphy's runners are. Heavy frameworks are imported inside ``activate`` so a
machine without one pays nothing until that backend is asked for, and says why it cannot serve it.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tunefarm.core.errors import TunefarmError
from tunefarm.core.stats import latency_stats, timed_samples
from tunefarm.core.threads import runtime_threads


class RunnerUnavailable(TunefarmError):
    """This device cannot run the backend (not installed, no GPU, ...); the message says why."""


class BaseRunner:
    """One backend on this device. Subclasses set ``name`` and implement the ``*_impl`` methods."""

    name = "base"

    def __init__(self, model_path: str, options: dict[str, Any] | None = None):
        self.model_path = model_path
        self.options = dict(options or {})
        self.active = False

    # -- what a backend implements
    @classmethod
    def unavailable_reason(cls, options: dict[str, Any] | None = None) -> str | None:
        """Why this device cannot run the backend with ``options``, or None if it can. Cheap: no heavy imports."""
        return None

    def activate_impl(self) -> None:
        raise NotImplementedError

    def infer_impl(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def deactivate_impl(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        """Versions and device, for the report."""
        return {}

    # -- the interface
    def activate(self) -> None:
        reason = self.unavailable_reason(self.options)
        if reason:
            raise RunnerUnavailable(reason)
        self.activate_impl()
        self.active = True

    def infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        if not self.active:
            raise TunefarmError(f"runner {self.name} is not active")
        return self.infer_impl(feed)

    def deactivate(self) -> None:
        if self.active:
            self.deactivate_impl()
            self.active = False

    def __enter__(self) -> "BaseRunner":
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def measure(self, feed: dict[str, np.ndarray], warmup: int, repeat: int) -> dict[str, Any]:
        """Latency stats of ``infer`` on ``feed`` (wall clock on this device, after warm-up runs).

        Backends that can time on the device (TensorRT with CUDA events) override this.
        """
        samples, warm = timed_samples(lambda: self.infer_impl(feed), warmup, repeat,
                                      duration_s=float(self.options.get("duration_s", 0.0)),
                                      budget_s=float(self.options.get("budget_s", 300.0)), sync=self.sync)
        stats = latency_stats(samples, warmup=warm)
        return {"latency": stats, "throughput_per_s": batch_size(feed) * len(samples) / sum(samples)}

    def sync(self) -> None:
        """Wait for queued device work (CUDA backends); nothing on the CPU."""

    def cpu_threads(self) -> int | None:
        """Intra-op threads for a CPU run: the ``threads`` option, else the agent's own count (the
        ``TVM_NUM_THREADS`` its RPC server runs with), so that a peer never runs on more or fewer
        threads than TVM does on this agent."""
        return int(self.options["threads"]) if self.options.get("threads") else runtime_threads()


def batch_size(feed: dict[str, np.ndarray]) -> int:
    """The leading dimension of the first input (1 for scalars)."""
    first = next(iter(feed.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1
