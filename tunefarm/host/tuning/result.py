"""What a tuning run leaves (:class:`TuneResult`) and how its counts are told: the failures by kind and the
console's closing lines. Apart from job.py so that the report (host/reports/tuning.py) reads them without
importing the tuning job, which imports the evaluation, which writes the report.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

from tunefarm.core.jobspec import TuningJob
from tunefarm.host.tuning.plan import TuningPlan


@dataclasses.dataclass
class TuneResult:
    """What a tuning run leaves for the evaluation and the report (and for the benchmarks)."""

    plan: TuningPlan
    database: Any  # the job's JSONDatabase
    tracker: tuple[str, int]
    on_wait: Callable[[float, float], Any] | None = None  # prints "waiting for an agent ..."
    wall_s: float = 0.0  # MetaSchedule's loop in this run
    measured: int = 0  # trials measured in this run, failed ones included
    failed: int = 0  # of those, the candidates that failed to build or run, or that the timing check rejected
    failed_kinds: dict[str, int] = dataclasses.field(default_factory=dict)  # failed, by where (failure_breakdown)
    cache_hits: int = 0  # candidates the database answered: not built, measured, recorded or counted
    stopped: bool = False  # ended early by should_stop
    per_agent: dict[str, int] = dataclasses.field(default_factory=dict)  # agent id -> candidates measured
    failures: dict[str, int] = dataclasses.field(default_factory=dict)  # "timeout" / "error" -> count
    built_on_agents: dict[str, int] = dataclasses.field(default_factory=dict)
    build_failures: dict[str, int] = dataclasses.field(default_factory=dict)  # "timeout" / "error" -> count
    kept_builds: list[str] = dataclasses.field(default_factory=list)  # timed-out candidates kept (FarmBuilder)
    agents_lost: dict[str, int] = dataclasses.field(default_factory=dict)  # agent id -> measured before it went
    requeued: int = 0  # candidates measured again because their session died under them (agent lost, unplugged)
    unreachable: dict[str, str] = dataclasses.field(default_factory=dict)  # agent address -> why it cannot be reached
    verification: dict[str, Any] = dataclasses.field(default_factory=dict)  # TimingVerifier.summary()
    cost_model: dict[str, Any] = dataclasses.field(default_factory=dict)  # which model this run used, load time
    farm_model_update: dict[str, Any] = dataclasses.field(default_factory=dict)  # the farm model rebuilt after it
    time_split: dict[str, Any] = dataclasses.field(default_factory=dict)
    search_workers: dict[str, int] = dataclasses.field(default_factory=dict)  # search worker id -> records merged
    search_shares: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the spread search's shares
    search_shunned: list[str] = dataclasses.field(default_factory=list)  # search workers whose records were refused
    vendor_first: dict[str, Any] = dataclasses.field(default_factory=dict)  # placement/cede.py: timed, ceded tasks
    space_notes: list[str] = dataclasses.field(default_factory=list)  # tasks whose design space needed redraws

    @property
    def job(self) -> TuningJob:
        return self.plan.job

    @property
    def job_dir(self) -> Path:
        return self.plan.job_dir.path

    @property
    def model(self):
        return self.plan.model

    @property
    def target(self):
        return self.plan.target

    @property
    def mod(self):
        return self.plan.mod

    @property
    def resumed(self) -> bool:
        return self.plan.resumed

    @property
    def measured_before(self) -> int:
        """Trials of this job measured in earlier runs."""
        return self.plan.budget.measured_before

    @property
    def seeded(self) -> int:
        """Records the warm start copied in (this run's, or the first run's): not trials of this job."""
        return self.plan.seeded


def failure_breakdown(result: TuneResult) -> dict[str, int]:
    """``result.failed`` by where each candidate failed: ``build`` (the builder's failures), ``measure`` (the
    runner's: timeouts, errors, and the farm's own — not measured, session lost), ``rejected`` (measured, but the
    timing check committed it as failed: below the floor, from a flagged agent, a new best not measured a second
    time); ``other`` only if those do not add up to ``result.failed`` (then said, not hidden)."""
    ver = result.verification or {}
    out = {"build": sum(result.build_failures.values()), "measure": sum(result.failures.values()),
           "rejected": sum(int(ver.get(k, 0)) for k in ("below_floor", "from_flagged", "unverifiable"))}
    other = result.failed - sum(out.values())
    if other:
        out["other"] = other
    return out


def failed_text(result: TuneResult) -> str:
    """``12 failed: 3 to build, 8 to measure (5 error, 3 not measured), 1 rejected by the timing check``."""
    kinds = result.failed_kinds or failure_breakdown(result)
    parts = []
    if kinds.get("build"):
        parts.append(f"{kinds['build']} to build")
    if kinds.get("measure"):
        parts.append(f"{kinds['measure']} to measure ("
                     + ", ".join(f"{n} {k}" for k, n in sorted(result.failures.items()) if n) + ")")
    if kinds.get("rejected"):
        ver = result.verification or {}
        parts.append(f"{kinds['rejected']} rejected by the timing check ("
                     + ", ".join(f"{ver.get(k, 0)} {k.replace('_', ' ')}" for k in
                                 ("below_floor", "from_flagged", "unverifiable") if ver.get(k)) + ")")
    if kinds.get("other"):
        parts.append(f"{kinds['other']} not accounted for above")
    return f"{result.failed} failed" + (": " + ", ".join(parts) if parts else "")


def run_summary(result: TuneResult) -> list[str]:
    """What a run measured, seeded and answered from the database, and where: the console's last lines."""
    lines = [f"this run: {result.measured} trial(s) measured ({failed_text(result)}) in {result.wall_s:.0f} s; "
             f"{result.measured_before + result.measured} measured by this job in all; "
             f"{result.cache_hits} cache hit(s) (answered from the database: not built, measured, recorded or "
             f"counted); {result.seeded} record(s) seeded by the warm start (not counted)"]
    ver = result.verification
    if ver:
        lines.append(f"timings checked: {ver['verified']} new best(s) measured again and verified"
                     f" ({ver['disputed']} not reproduced: the slower time kept), {ver['below_floor']} below the "
                     f"physical floor, {ver['from_flagged']} from flagged agents, {ver.get('unverifiable', 0)} new "
                     "best(s) that could not be measured again (all committed as failed)")
        for agent, why in ver["flagged"].items():
            lines.append(f"FLAGGED agent {agent}: {why}")
    for addr in sorted(result.unreachable):
        lines.append(f"UNREACHABLE agent at {addr}: the tracker handed it out but this host cannot connect to it "
                     "(NAT, firewall or a wrong advertised address: start it with --custom-addr)")
    if result.requeued:
        lines.append(f"{result.requeued} candidate(s) measured again: their session died under them (an agent "
                     "killed, frozen or cut off)")
    for note in result.space_notes:
        lines.append(f"design space: {note}")
    if result.kept_builds:
        lines.append(f"{len(result.kept_builds)} candidate(s) whose build ran into the builder's timeout (each held "
                     f"its batch) kept in {os.path.dirname(result.kept_builds[0])}")
    for share in result.search_shares:
        lines.append(f"search share: {len(share['tasks'])} task(s), {share['received']}/{share['trials']} trials merged"
                     + (f" from {', '.join(share['workers'])}" if share["workers"] else " (no search worker took it)")
                     + (f"; {share['rejected']} record(s) refused" if share["rejected"] else "")
                     + (f"; tasks not begun taken over from share {share['stolen_from'] + 1}"
                        if share.get("stolen_from") is not None else "")
                     + (f"; {share['error']}" if share["error"] else ""))
    for worker in result.search_shunned:
        lines.append(f"SHUNNED search worker {worker}: it sent records this host refused (see above)")
    if result.per_agent:
        lines.append("measured on: " + ", ".join(f"{a} {n}" + (" (gone)" if a in result.agents_lost else "")
                                                 for a, n in sorted(result.per_agent.items()))
                     + "".join(f"; failed to {what}: {n}" for what, n in
                               (("measure", sum(result.failures.values())),
                                ("build", sum(result.build_failures.values()))) if n))
    return lines
