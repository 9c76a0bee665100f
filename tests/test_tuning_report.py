"""The tuning report's accounting (tunefarm.host.reports.tuning): measured trials, seeded records and cache
hits apart in report.json, report.md and the console, and the agents of the run.

A real job directory planned for the builtin matmul (no tracker, no tuning): its database holds records of
an earlier job copied in by the warm start and records this job measured; the evaluation's rows are
latency summaries of given samples."""
from __future__ import annotations

import json

from conftest import HOST
from tunefarm.core.jobspec import job_from_dict
from tunefarm.core.stats import latency_stats


def _plan(logs, name: str, **tuning):
    from tunefarm.host.tuning.plan import plan_job

    job = job_from_dict({"name": name, "model": {"source": "builtin", "name": "matmul"},
                         "device": {"key": "cpu", "tracker": f"{HOST}:1"}, "target": {"kind": "llvm", "num-cores": 1},
                         "tuning": {"max_trials_global": 12, "max_trials_per_task": 4, "num_trials_per_iter": 4,
                                    **tuning}})
    return plan_job(job, logs)


def _record(plan, database, secs: float, split: int) -> None:
    import tvm
    from tvm.s_tir import Schedule
    from tvm.s_tir import meta_schedule as ms

    mod = plan.extracted[0].dispatched[0]
    sch = Schedule(mod)
    loops = sch.get_loops(sch.get_sblock("matmul"))
    sch.split(loops[0], factors=[None, split])  # a trace of its own per record
    database.commit_tuning_record(ms.database.TuningRecord(sch.trace, database.commit_workload(mod),
                                                           [tvm.tirx.FloatImm("float32", secs)], plan.target))
    from tunefarm.host.tuning.jobdir import VERIFIED, append_event  # as the farm's timing verifier logs it
    from tunefarm.host.tuning.verify import trace_hash

    append_event(plan.job_dir.file(VERIFIED), {"workload": plan.tasks[0].key, "trace": trace_hash(sch.trace),
                                               "status": "verified"})


def _row(ms: float) -> dict:
    return {"where": "agent vm:1", "threads": 1, "latency": latency_stats([ms / 1e3] * 5, warmup=1),
            "numerics": {"ok": True, "max_abs_err": 0.0}}


def test_measured_seeded_and_cache_hits_are_reported_apart(tmp_path):
    from tunefarm.host.reports.tuning import write_report
    from tunefarm.host.tuning.job import TuneResult, run_summary
    from tunefarm.host.tuning.plan import commit_plan

    earlier = _plan(tmp_path, "earlier")
    database = commit_plan(earlier)
    for i, secs in enumerate([0.004, 0.003, 0.002]):
        _record(earlier, database, secs, 2 ** (i + 1))
    earlier.job_dir.mark_run_ended("finished")
    plan = _plan(tmp_path, "warm", warm_start_top_k=3)
    database = commit_plan(plan)  # seeds the three records of the earlier job
    for i, secs in enumerate([0.005, 0.001, 0.006, 1e10]):  # this job's trials: its whole cap of 4, one failed
        _record(plan, database, secs, 2 ** (i + 1))
    tuned = TuneResult(plan=plan, database=database, tracker=(HOST, 1), wall_s=12.0, measured=4, failed=1,
                       cache_hits=5, per_agent={"vm:1": 2, "vm:2": 1}, agents_lost={"vm:2": 1}, failures={"error": 1},
                       built_on_agents={})
    report = write_report(tuned, {"tvm-tuned": _row(1.0), "tvm-untuned": _row(10.0)}, ["f"], [], None, [])

    saved = json.loads((tmp_path / "warm" / "report.json").read_text())
    tuning = saved["tuning"]
    assert (tuning["trials_measured_total"], tuning["trials_this_run"]) == (4, 4)  # not 7: seeded are no trials
    assert (tuning["seeded_records"], tuning["cache_hits"]) == (3, 5)
    assert tuning["per_agent"] == {"vm:1": 2, "vm:2": 1} and tuning["agents_lost"] == {"vm:2": 1}
    # One count of failures everywhere: the summary, its breakdown, the task table, the agents' table.
    assert tuning["failed_this_run"] == 1 and tuning["failed_this_run_by_kind"] == {"build": 0, "measure": 1,
                                                                                     "rejected": 0}
    (task,) = saved["tasks"]
    assert (task["trials"], task["seeded"], task["failed"]) == (4, 3, 1)
    assert task["trials"] <= plan.job.tuning.max_trials_per_task  # the table never shows more than the cap
    assert abs(task["best_us"] - 1000.0) < 1e-3
    md = (tmp_path / "warm" / "report.md").read_text()
    assert md == report["markdown"]
    assert "4 trials measured by this job" in md and "this run 4 in 12.0 s, 1 failed: 1 to measure (1 error)" in md
    assert "3 record(s) seeded from earlier jobs (warm start); 5 cache hit(s) this run" in md
    assert "| vm:1 | 2 | - | - |" in md and "| vm:2 | 1 | - | lost during the run |" in md
    assert ("This run's 4 trial(s): 3 measured on the agents above, 1 failed to measure (1 error), 0 failed to "
            "build.") in md
    assert f"| 0 | {task['task']} | 1 | 4 | 1 | 3 |" in md
    console = " ".join(run_summary(tuned))
    assert "this run: 4 trial(s) measured (1 failed: 1 to measure (1 error))" in console
    assert "4 measured by this job in all" in console
    assert "5 cache hit(s)" in console and "3 record(s) seeded by the warm start (not counted)" in console
    assert "measured on: vm:1 2, vm:2 1 (gone); failed to measure: 1" in console
