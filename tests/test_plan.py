"""Planning a tuning job (tunefarm.host.tuning.plan) against real job directories: what is left per task on
a resume, what a warm start seeds, ``tunefarm tune --plan`` (its exit code on a budget too small) and the task
table of it, of ``tunefarm logs show`` and of the report that ends a run, in an 80-column terminal. The builtin
matmul and convnet models and a target given in the job: no tracker, no agent, no tuning."""
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


def _convnet_job(path, trials: int) -> None:
    path.write_text(json.dumps({"name": "convnet", "model": {"source": "builtin", "name": "convnet"},
                                "device": {"key": "cpu", "tracker": f"{HOST}:{free_port(HOST)}"},  # nobody there
                                "target": TARGET, "tuning": {"max_trials_global": trials, "num_trials_per_iter": 4}}))


def _task_names(job_file) -> list[str]:
    from tunefarm.core.jobspec import load_job
    from tunefarm.host.tuning.plan import plan_job

    return [t.name for t in plan_job(load_job(str(job_file)), job_file.parent / "unused-logs").tasks]


def _fits(out: str, width: int) -> None:
    wide = [line for line in out.splitlines() if len(line) > width]
    assert not wide, f"lines wider than {width} columns: {wide}"


def test_tune_plan_on_a_budget_too_small_prints_the_plan_then_fails_in_one_line(tmp_path):
    job = tmp_path / "job.yaml"
    _convnet_job(job, 8)  # 4 tasks x 4 trials a round: 16 needed
    names = _task_names(job)
    assert len(names) == 4 and max(map(len, names)) > 16  # a name the old 80-column table cut to fused_…
    code, out, _ = run_cli(["tune", job, "--plan", "--logs-dir", tmp_path / "logs"], tmp_path / "plan.log", 120,
                           env={"COLUMNS": "80"})
    errors = [line for line in out.splitlines() if line.startswith("tunefarm: error:")]
    assert code == 2 and errors == ["tunefarm: error: the budget is too small: max_trials_global 8, and one round "
                                    "of every task without a record needs 16 (4 task(s) x 4); a run would leave "
                                    "tasks with no tuned schedule"], out
    assert "Traceback" not in out and out.rstrip().endswith(errors[0]), out  # the plan first, the error last
    text = " ".join(out.split())  # rich wraps lines at the terminal's width
    assert "tasks of convnet" in out and "4 tasks; budget 8 trials" in text
    assert "minimum budget (max_trials_global) for one round of every task without a record: 16 trials" in text
    # 80 columns: each task's index and whole name on a line of their own, its figures on the next one.
    _fits(out.rstrip()[:-len(errors[0])], 80)  # the plan (the error is one line, as every error of the CLI)
    lines = out.splitlines()
    assert lines[lines.index("#  task") + 1].split() == ["weight", "measured", "seeded", "best", "(us)", "may",
                                                        "measure"], out
    for i, name in enumerate(names):
        at = lines.index(f"{i}  {name}")
        assert lines[at + 1].split() == ["1", "0", "0", "-", "8"], out
    assert not (tmp_path / "logs").exists()


def test_tune_plan_on_a_sensible_budget_exits_0(tmp_path):
    job = tmp_path / "job.yaml"
    _convnet_job(job, 16)
    names = _task_names(job)
    code, out, _ = run_cli(["tune", job, "--plan", "--logs-dir", tmp_path / "logs"], tmp_path / "plan.log", 120,
                           env={"COLUMNS": "120"})
    assert code == 0 and "error" not in out and "too small" not in out, out
    text = " ".join(out.split())
    assert "4 tasks; budget 16 trials" in text and "for one round of every task without a record: 16 trials" in text
    # Room for the table: Rich's, one row per task, names whole.
    _fits(out, 120)
    assert "┃ weight ┃ measured ┃ seeded ┃ best (us) ┃ may measure ┃" in out, out
    for i, name in enumerate(names):
        assert f"│ {i} │ {name} " in out, out
    assert not (tmp_path / "logs").exists()
    # from-agent needs the tracker: a one-line error, since there is none.
    job.write_text(json.dumps({**json.loads(job.read_text()), "target": "from-agent"}))
    code, out, _ = run_cli(["tune", job, "--plan"], tmp_path / "plan2.log", 60)
    assert code == 2 and "tunefarm: error:" in out and "tracker" in out and "Traceback" not in out


def test_logs_show_keeps_task_names_whole_in_80_columns(tmp_path):
    """`tunefarm logs show` prints the same kind of table, with more columns: in 80 columns each name whole."""
    from tunefarm.core.jobspec import load_job
    from tunefarm.host.tuning.plan import commit_plan, plan_job

    job = tmp_path / "job.yaml"
    _convnet_job(job, 16)
    plan = plan_job(load_job(str(job)), tmp_path / "logs")
    commit_plan(plan)
    code, out, _ = run_cli(["logs", "show", tmp_path / "logs" / "convnet"], tmp_path / "show.log", 120,
                           env={"COLUMNS": "80"})
    assert code == 0 and "4 task(s) have no tuned schedule" in out, out
    _fits(out, 80)
    lines = out.splitlines()
    for task in plan.tasks:
        at = lines.index(f"{task.index}  {task.name}")
        assert lines[at + 1].split() == ["1", "0", "0", "0", "-", "-", "NO"], out


# mobilenet_v3_small's longest task names (TVM 0.27, torchvision): longer than any column an 80-column table has.
MOBILENET_NAMES = ["reshape", "fused_conv2d39_add47_add48_tir_clip30_tir_clip31_divide15_multiply15",
                   "fused_matmul1_add52", "fused_conv2d37_add45_add46_tir_clip28_tir_clip29_multiply14_divide14"]


def _render(width: int, names: list[str]) -> str:
    import io

    from rich.console import Console
    from rich.text import Text

    from tunefarm.host.console import print_task_table

    console = Console(file=io.StringIO(), width=width, highlight=False)
    rows = [[str(i), Text(name), "2", "0", "1", "123.45" if i else "-", "[red]NO[/]"] for i, name in enumerate(names)]
    print_task_table(console, "tasks of mnv3", ("#", "task", "weight", "measured", "seeded", "best (us)", "tuned"),
                     rows)
    return console.file.getvalue()


def test_the_task_table_puts_long_names_on_lines_of_their_own_when_it_does_not_fit():
    out = _render(80, MOBILENET_NAMES)
    _fits(out, 80)
    lines = out.splitlines()
    assert lines[:4] == ["tasks of mnv3", "#  task", "   weight  measured  seeded  best (us)  tuned",
                         "   " + "─" * 42], out
    for i, name in enumerate(MOBILENET_NAMES):
        at = lines.index(f"{i}  {name}")
        best = "123.45" if i else "     -"
        assert lines[at + 1] == f"        2         0       1     {best}     NO", out
    # Where the whole table fits, it is Rich's table, one row a task.
    out = _render(130, MOBILENET_NAMES)  # 126 columns wide
    _fits(out, 130)
    assert "│ 1 │ fused_conv2d39_add47_add48_tir_clip30_tir_clip31_divide15_multiply15 │      2 │" in out, out
    assert "fused_conv2d37_add45_add46_tir_clip28_tir_clip29_multiply14_divide14 │" in out, out


def test_the_report_on_the_console_keeps_task_and_backend_names_whole_in_80_columns(tmp_path, monkeypatch, capsys):
    """The report that ends `tunefarm tune` (report.md, rendered by the CLI's ConsoleEvents): in 80 columns Rich's
    Markdown tables cut the task name to ``fused_conv2d9_add7_add8_re…`` and the backends to ``tvm-…``."""
    from test_tuning_report import _plan, _record, _row
    from tunefarm.host.console import ConsoleEvents
    from tunefarm.host.reports.tuning import write_report
    from tunefarm.host.tuning.job import TuneResult
    from tunefarm.host.tuning.plan import commit_plan

    long_name = "fused_conv2d9_add7_add8_relu3_with_a_long_tail"
    plan = _plan(tmp_path, "long")
    database = commit_plan(plan)
    for i, secs in enumerate([0.005, 0.001]):
        _record(plan, database, secs, 2 ** (i + 1))
    tasks = plan.job_dir.read_tasks()  # the matmul's one task, named as a longer model's are
    tasks[0]["name"] = long_name
    tasks.append({"name": "reshape", "weight": 2.0, "workload_hash": "1", "seeded": 0})
    plan.job_dir.write_tasks(tasks)
    tuned = TuneResult(plan=plan, database=database, tracker=(HOST, 1), wall_s=12.0, measured=2, failed=0,
                       per_agent={"vm:1": 2}, built_on_agents={})
    report = write_report(tuned, {"tvm-tuned": _row(1.0), "tvm-untuned": _row(10.0)}, ["f"], [], None, [])
    assert f"| 0 | {long_name} | 1 | 2 | 0 | 0 | 1000.00 | yes |" in report["markdown"]

    def console(columns: int) -> str:
        monkeypatch.setenv("COLUMNS", str(columns))
        ConsoleEvents().markdown(report["markdown"])  # as the evaluation's `markdown` event is shown
        return capsys.readouterr().out

    out = console(80)
    _fits(out, 80)
    assert "…" not in out, out
    lines = [line.rstrip() for line in out.splitlines()]
    # The tasks: each index and whole name on a line, its figures under the headers on the next (as tune --plan).
    assert lines[lines.index(f"0  {long_name}") + 1].split() == ["1", "2", "0", "0", "1000.00", "yes"], out
    assert lines[lines.index("1  reshape") + 1].split() == ["2", "0", "0", "0", "-", "no"], out
    # The backends' table (11 columns): row by row, each cell after its column's header.
    at = lines.index("tvm-untuned")
    text = " ".join(" ".join(lines[at:]).split())
    assert text.startswith("tvm-untuned where: agent vm:1 threads: 1 precision: - median ms: 10.000"), out
    assert "speed-up vs untuned: 1.00x numerics (relative L2 err; max abs err, reference max): ok" in text, out
    assert "tvm-tuned" in lines, out
    # Where the tasks' table fits, it is Rich's table, one row a task.
    out = console(120)
    _fits(out, 120)
    assert any(long_name in line and "1000.00" in line for line in out.splitlines()), out
