"""Timings are checked before they are trusted: the physical floor, and a second measurement of every new best.

An agent that proved the farm key is still only a process that reports numbers. Before a measured candidate
enters the job's database (``search.AddMeasuredToDatabase`` asks :meth:`TimingVerifier.run_secs_to_commit`):

* **The physical floor.** A candidate faster than the workload's FLOPs (MetaSchedule's estimate) over the
  peak the key's agents report (``DeviceInfo.peak_gflops``, measured or computed by each agent at start;
  the lowest of them, so that a process reporting a huge peak cannot lower the floor) times
  :data:`FLOOR_MARGIN` cannot be real: it is committed as a failed run, and its agent gets a strike.
* **A second measurement of every new best.** A candidate that would become its workload's best record is
  measured again, on another agent of the key where there is one (the same agent in a fresh session
  otherwise), before it is committed, and is committed with the slower of the two times (a record is never
  better than what could be reproduced). If the second is slower by more than :data:`AGREE_FACTOR` the
  record is logged as disputed; if it is slower by more than :data:`STRIKE_FACTOR` and by more than
  :data:`STRIKE_MIN_GAP_S`, the agent that reported the first gets a strike (honest agents sharing loaded
  cores disagree by up to ~2x on small kernels: a strike needs a lie, not noise; a smaller lie still never
  counts, since the slower time is committed).
* An agent with :data:`STRIKES_TO_FLAG` strikes is **flagged**: every later result from it is committed as
  failed, and the report names it.

Every verification lands in the job directory's ``verified.jsonl`` (workload hash, the trace's hash, who
measured, who verified, both times). Since every new best is verified before it is committed, each
workload's best record is a verified one; ``logs best`` / ``pull`` export, and warm start imports, only
records found in that file (and warm start only from job directories whose last run finished).
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from typing import Any

from tunefarm.host.tuning.events import Events, esc

# A measured sgemm reaches ~70-90% of a CPU's peak when the machine is quiet, less when the agent started
# under load: four times it is beyond any real kernel and still catches a fake (a "1 us" for a 0.2-GFLOP
# conv is a thousand times too fast).
FLOOR_MARGIN = 4.0
AGREE_FACTOR = 1.5  # two agents of one key (the same kind of device) agree within this factor
# Two honest agents on one 2-core CI machine, builders running beside them, measured one 4-task job's
# kernels 17.8 us and 34.1 us (1.9x) three times in a run, and the farm flagged the honest one. A strike
# takes a disagreement no load explains.
STRIKE_FACTOR = 4.0
STRIKE_MIN_GAP_S = 10e-6
STRIKES_TO_FLAG = 3


def trace_hash(trace) -> str:
    """A stable name of a record's schedule: its trace, postprocessing removed, as TVM prints it. (The
    trace's JSON form is not stable: it holds IndexMap objects, and the database's reader re-derives the
    trace; the printed form of the same schedule is the same before and after the database.)"""
    return hashlib.sha256(str(trace.simplified(remove_postproc=True)).encode()).hexdigest()[:32]


def workload_flops(mod) -> float:
    import tvm.s_tir.analysis  # pylint: disable=import-outside-toplevel

    try:
        return float(tvm.s_tir.analysis.estimate_tir_flops(mod))
    except Exception:  # pylint: disable=broad-except
        return 0.0


def judge(first_s: float, second_s: float) -> tuple[float, str]:
    """The time to commit for a record measured twice (the slower: never better than both), and the verdict:
    ``"verified"`` (agree within :data:`AGREE_FACTOR`), ``"disputed"`` (do not), or ``"strike"`` (the second
    is slower beyond :data:`STRIKE_FACTOR` and :data:`STRIKE_MIN_GAP_S`: the first reporter lied)."""
    committed = max(first_s, second_s)
    if second_s <= first_s * AGREE_FACTOR:
        return committed, "verified"
    if second_s > first_s * STRIKE_FACTOR and second_s - first_s > STRIKE_MIN_GAP_S:
        return committed, "strike"
    return committed, "disputed"


def _mean(costs) -> float:
    values = [float(c) for c in costs]
    return sum(values) / len(values)


class TimingVerifier:
    """Checks one job's measurements against the floor and re-measures new bests (see the module doc).

    ``runner`` is the job's FarmRunner (who measured each artifact, and a way to measure one again);
    ``log_path`` the job directory's verified.jsonl."""

    def __init__(self, runner, log_path, events: Events | None = None):
        self.runner = runner
        self.log_path = log_path
        self.events = events or Events()
        self._lock = threading.Lock()
        self._flops: dict[str, float] = {}
        self.strikes: dict[str, int] = {}
        self.flagged: dict[str, str] = {}  # agent id -> why
        self._peak: float | None = None  # the key's lowest reported peak, asked once
        # unverifiable: a new best that could not be measured a second time (no agent free): committed as failed
        self.counts = {"verified": 0, "disputed": 0, "below_floor": 0, "from_flagged": 0, "unverifiable": 0}

    # ------------------------------------------------------------------ what the database gets
    def run_secs_to_commit(self, workload_key: str, mod, best_s: float | None, items) -> list[list[float] | None]:
        """For each (artifact path, trace, run_secs or None) of one batch of one task: the run seconds to
        commit (None: commit as failed). ``best_s``: the workload's best record before this batch."""
        flops = self._flops.get(workload_key)
        if flops is None:
            flops = self._flops[workload_key] = workload_flops(mod)
        out: list[list[float] | None] = []
        order = []
        for i, (path, _trace, secs) in enumerate(items):
            if secs is None:
                out.append(None)
                continue
            agent = self.runner.measured_by.get(path, "")
            if agent in self.flagged:
                self.counts["from_flagged"] += 1
                out.append(None)
                continue
            floor = self._floor_s(flops)
            if floor is not None and _mean(secs) < floor:
                self.counts["below_floor"] += 1
                self._strike(agent, f"{_mean(secs) * 1e6:.3g} us for {flops / 1e6:.3g} MFLOP is faster than its "
                                    f"reported peak allows (floor {floor * 1e6:.3g} us)")
                self._log({"workload": workload_key, "status": "below_floor", "measured_by": agent,
                           "run_s": _mean(secs), "floor_s": floor})
                out.append(None)
                continue
            out.append(list(secs))
            order.append(i)
        # New bests, fastest first: each is measured again before it may count as the best.
        order.sort(key=lambda i: _mean(out[i]))  # type: ignore[arg-type]
        for i in order:
            if best_s is not None and _mean(out[i]) >= best_s:  # type: ignore[arg-type]
                break
            path, trace, _ = items[i]
            committed = self._verify(workload_key, path, trace, out[i])  # type: ignore[arg-type]
            out[i] = committed
            if committed is not None:
                best_s = _mean(committed) if best_s is None else min(best_s, _mean(committed))
        return out

    def _floor_s(self, flops: float) -> float | None:
        if self._peak is None:
            self._peak = self.runner.peak_floor_gflops()
        peak = self._peak
        if not peak or flops <= 0:
            return None
        return flops / (peak * 1e9 * FLOOR_MARGIN)

    def _verify(self, workload_key: str, path: str, trace, secs: list[float]) -> list[float] | None:
        first = self.runner.measured_by.get(path, "")
        again = self.runner.remeasure(path, measured_by=first, shunned=frozenset(self.flagged))
        entry = {"workload": workload_key, "trace": trace_hash(trace), "measured_by": first, "run_s": _mean(secs),
                 "time": round(time.time(), 3)}
        if again is None:
            # Could not measure it again (agents gone or busy): it is not committed as a best.
            entry.update(status="unverifiable")
            self.counts["unverifiable"] += 1
            self._log(entry)
            return None
        costs, second = again
        entry.update(verified_by=second, verify_s=_mean(costs))
        if second in self.flagged:
            entry.update(status="unverifiable")
            self.counts["unverifiable"] += 1
            self._log(entry)
            return None
        _, verdict = judge(_mean(secs), _mean(costs))
        if verdict == "verified":
            self.counts["verified"] += 1
            entry.update(status="verified")
            self._log(entry)
            # The slower of the two: a record is never better than both measurements of it.
            return secs if _mean(secs) >= _mean(costs) else [float(c) for c in costs]
        # Not reproduced: the slower time counts; a lie beyond any noise is a strike for who reported it.
        self.counts["disputed"] += 1
        entry.update(status="verified", disputed=True, strike=verdict == "strike")
        self._log(entry)
        if verdict == "strike" and second != first:
            self._strike(first, f"reported {_mean(secs) * 1e6:.3g} us, {second} measured {_mean(costs) * 1e6:.3g} us")
        return [float(c) for c in costs]

    def _strike(self, agent: str, why: str) -> None:
        if not agent:
            return
        with self._lock:
            self.strikes[agent] = self.strikes.get(agent, 0) + 1
            newly = self.strikes[agent] >= STRIKES_TO_FLAG and agent not in self.flagged
            if newly:
                self.flagged[agent] = why
        if newly:  # the agent's id and its reason are the agent's own text
            self.events.print(f"[bold red]agent {esc(agent)} flagged[/]: {esc(why)}; its results are "
                              "discarded from now on")

    def _log(self, entry: dict[str, Any]) -> None:
        with self._lock, open(self.log_path, "a") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")

    def summary(self) -> dict[str, Any]:
        return {**self.counts, "strikes": dict(self.strikes), "flagged": dict(self.flagged)}
