"""Planning a tuning job (tunefarm.host.tuning.plan) against real job directories: what is left per task on
a resume, what a warm start seeds, and ``tunefarm tune --plan``. The builtin matmul model (one task) and a
target given in the job: no tracker, no agent, no tuning."""
from __future__ import annotations

import json

import pytest

from conftest import HOST, run_cli
from tunefarm.core.jobspec import job_from_dict
from tunefarm.core.procs import free_port

TARGET = {"kind": "llvm", "num-cores": 1}


def _job(name: str, **tuning):
    return job_from_dict({"name": name, "model": {"source": "builtin", "name": "matmul"},
                          "device": {"key": "cpu", "tracker": f"{HOST}:{free_port(HOST)}"}, "target": TARGET,
                          "tuning": {"max_trials_global": 20, "max_trials_per_task": 8, "num_trials_per_iter": 4,
                                     **tuning}})


def _measure(plan, secs: list[float]) -> None:
    """Records in the plan's database for its one task, as if measured (the task's unscheduled trace) and
    verified by the farm (verified.jsonl), then the run marked as ended."""
    import tvm
    from tvm.s_tir import Schedule
    from tvm.s_tir import meta_schedule as ms

    from tunefarm.host.tuning.jobdir import VERIFIED, append_event
    from tunefarm.host.tuning.verify import trace_hash

    database = plan.job_dir.database()
    mod = plan.extracted[0].dispatched[0]
    workload = database.commit_workload(mod)
    for sec in secs:
        trace = Schedule(mod).trace
        database.commit_tuning_record(ms.database.TuningRecord(trace, workload,
                                                               [tvm.tirx.FloatImm("float32", sec)], plan.target))
        append_event(plan.job_dir.file(VERIFIED), {"workload": plan.tasks[0].key, "trace": trace_hash(trace),
                                                   "status": "verified"})
    plan.job_dir.mark_run_ended("finished")


def test_a_resumed_job_plans_what_its_task_has_left(tmp_path):
    from tunefarm.host.tuning.plan import commit_plan, plan_job

    first = plan_job(_job("mm"), tmp_path)
    assert not first.resumed and not (tmp_path / "mm").exists()  # planning writes nothing
    (task,) = first.tasks
    assert (task.measured, task.seeded, task.best_s) == (0, 0, None)
    assert first.budget.remaining == 20 and first.budget.task_left == (8,) and first.budget.minimum_global == 4
    commit_plan(first)
    tasks_json = json.loads((tmp_path / "mm" / "tasks.json").read_text())
    assert tasks_json == [{"name": task.name, "weight": task.weight, "workload_hash": task.key, "seeded": 0}]
    _measure(first, [0.004, 0.002, 1e10, 0.003, 0.005])  # five trials, one of them failed

    again = plan_job(_job("mm"), tmp_path)
    assert again.resumed
    (task,) = again.tasks
    assert task.measured == 5 and task.best_s == pytest.approx(0.002)
    # The per-task cap counts what the task measured before: 3 of its 8 left, not 8 again.
    assert again.budget.task_left == (3,) and again.budget.remaining == 15 and again.budget.order == (0,)
    with pytest.raises(Exception, match="holds a run of a different target"):
        plan_job(job_from_dict({**_job("mm").to_dict(), "target": {"kind": "llvm", "num-cores": 2}}), tmp_path)


def test_a_new_job_plans_its_warm_start_and_a_resume_keeps_seeded_apart(tmp_path):
    from tunefarm.host.tuning.plan import commit_plan, plan_job

    earlier = plan_job(_job("earlier"), tmp_path)
    commit_plan(earlier)
    _measure(earlier, [0.004, 0.002])
    new = plan_job(_job("new", warm_start_top_k=1), tmp_path)
    assert new.warm.sources == ["earlier"] and new.warm.records == 1  # one trace, best first, top 1
    (task,) = new.tasks
    assert (task.measured, task.seeded) == (0, 1) and task.best_s == pytest.approx(0.002)
    assert new.budget.untouched == () and new.budget.task_left == (8,)  # seeded: not a trial of this job
    commit_plan(new)
    assert json.loads((tmp_path / "new" / "job_state.json").read_text())["warm_start"]["records"] == 1
    resumed = plan_job(_job("new", warm_start_top_k=1), tmp_path)
    assert resumed.resumed and resumed.warm is None
    assert (resumed.tasks[0].measured, resumed.tasks[0].seeded) == (0, 1)
    assert resumed.budget.remaining == 20


def test_tune_plan_prints_tasks_and_the_minimum_budget_and_writes_nothing(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({"name": "convnet", "model": {"source": "builtin", "name": "convnet"},
                               "device": {"key": "cpu", "tracker": f"{HOST}:{free_port(HOST)}"},  # nobody there
                               "target": TARGET, "tuning": {"max_trials_global": 8, "num_trials_per_iter": 4}}))
    code, out, _ = run_cli(["tune", job, "--plan", "--logs-dir", tmp_path / "logs"], tmp_path / "plan.log", 120)
    assert code == 0, out
    text = " ".join(out.split())  # rich wraps lines at the terminal's width
    assert "tasks of convnet" in out and "│ mean" in out and "weight" in out and "may measure" in out
    assert "4 tasks; budget 8 trials" in text
    assert "minimum budget (max_trials_global) for one round of every task without a record: 16 trials" in text
    assert "the budget is too small" in text
    assert not (tmp_path / "logs").exists()
    # from-agent needs the tracker: a one-line error, since there is none.
    job.write_text(json.dumps({**json.loads(job.read_text()), "target": "from-agent"}))
    code, out, _ = run_cli(["tune", job, "--plan"], tmp_path / "plan2.log", 60)
    assert code == 2 and "tunefarm: error:" in out and "tracker" in out and "Traceback" not in out
