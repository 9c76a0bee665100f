"""The job directory's owner (tunefarm.host.tuning.jobdir): progress lines, the valid-record predicate,
the cleanup of a failed job's directory, the directories other jobs may read, and damaged database lines
(those with TVM's own JSONDatabase)."""
from __future__ import annotations

import json
import os

from tunefarm.host.tuning.jobdir import (DB_RECORDS, PROGRESS, STATE, JobDir, append_event, has_records, is_valid_run,
                                         job_dirs, mean_run_s, read_events, remove_unmeasured)


def test_a_torn_line_is_skipped_never_glued_to_the_next(tmp_path):
    path = tmp_path / PROGRESS
    path.write_bytes(b'{"trials": 4}\n{"trials": 8, "tor')  # the writer was killed mid-line
    assert [e["trials"] for e in read_events(path)] == [4]  # the last piece has no newline: still being written
    append_event(path, {"trials": 12})  # ends the torn line first: this event stays a line of its own
    events = read_events(path)
    assert [(e["n"], e["trials"]) for e in events] == [(0, 4), (2, 12)]  # the torn line 1 is skipped
    assert [e["trials"] for e in read_events(path, start=2)] == [12]
    path.write_bytes(b'{"trials": 4}\n[1, 2]\nnot json\n{"trials": 5}\n')  # only JSON objects are events
    assert [e["n"] for e in read_events(path)] == [0, 3]
    assert read_events(tmp_path / "missing.jsonl") == []


def test_a_run_is_valid_only_if_it_was_really_measured():
    assert is_valid_run([0.001, 0.002]) and mean_run_s([0.001, 0.003]) == 0.002
    assert not is_valid_run(None) and not is_valid_run([])
    assert not is_valid_run([1e10]) and mean_run_s([1e10]) is None  # MetaSchedule's failure marker
    assert is_valid_run([0.5, 1e10])  # the minimum decides, as MetaSchedule's own best-record choice


def test_a_job_dir_without_any_record_is_removed_one_with_records_kept(tmp_path):
    failed = JobDir(tmp_path / "failed")
    failed.write_state({"target": {"kind": "llvm"}})
    failed.file(DB_RECORDS).write_text("")  # an empty database: nothing was measured
    assert not has_records(failed) and remove_unmeasured(failed) and not failed.path.exists()
    kept = JobDir(tmp_path / "kept")
    kept.write_state({})
    kept.file(DB_RECORDS).write_text('[0, [["trace"], [0.001]]]\n')
    assert has_records(kept) and not remove_unmeasured(kept) and kept.path.is_dir()
    assert not remove_unmeasured(JobDir(tmp_path / "never-created"))


def test_job_dirs_are_the_directories_with_a_job_state(tmp_path):
    for name in ("b", "a"):
        JobDir(tmp_path / name).write_state({"target": {}})
    (tmp_path / "not-a-job").mkdir()
    (tmp_path / "not-a-job" / "report.md").write_text("# hello")
    assert [d.name for d in job_dirs(tmp_path)] == ["a", "b"]
    assert json.loads((tmp_path / "a" / STATE).read_text()) == {"target": {}}


def test_job_dirs_leave_out_links_so_warm_start_and_the_cost_model_never_read_through_one(tmp_path):
    """Warm start and the farm's cost model read the job directories job_dirs lists (issue 32, item 9)."""
    logs = tmp_path / "logs"
    for name in ("real", "sym-db", "hard-db", "sym-state"):
        JobDir(logs / name).write_state({"target": {"kind": "llvm"}})
        JobDir(logs / name).file(DB_RECORDS).write_text("")
    elsewhere = tmp_path / "elsewhere"
    JobDir(elsewhere).write_state({"target": {"kind": "llvm"}})
    (logs / "linked-dir").symlink_to(elsewhere)
    secret = tmp_path / "secret.json"
    secret.write_text("[0, [[], [0.001]]]\n")
    (logs / "sym-db" / DB_RECORDS).unlink()
    (logs / "sym-db" / DB_RECORDS).symlink_to(secret)
    (logs / "hard-db" / DB_RECORDS).unlink()
    os.link(secret, logs / "hard-db" / DB_RECORDS)
    (logs / "sym-state" / STATE).rename(tmp_path / "state.json")
    (logs / "sym-state" / STATE).symlink_to(tmp_path / "state.json")
    assert [d.name for d in job_dirs(logs)] == ["real"]


def test_a_torn_database_line_is_repaired_once_with_the_damaged_file_kept(tmp_path, capfd):
    """Issue 32, item 4, the writer's side (resume opens JobDir.database()): TVM's own reader failed on one
    torn line; the whole lines are kept, the damage said once and the damaged file copied aside."""
    from conftest import tear_line, tiny_database

    from tunefarm.host.tuning.logs import task_rows

    job = JobDir(tmp_path / "job")
    tiny_database(job.path)
    torn = tear_line(job.file(DB_RECORDS), 4)  # workload 1's second record
    capfd.readouterr()
    assert len(job.database().get_all_tuning_records()) == 5
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [f"tunefarm: warning: {job.file(DB_RECORDS)}: 1 damaged line(s) left out (line 5); the damaged "
                   "file is kept as database_tuning_record.json.damaged"], err
    assert job.file(DB_RECORDS + ".damaged").read_bytes() == torn
    assert len(job.file(DB_RECORDS).read_bytes().splitlines()) == 5  # repaired in place
    rows = task_rows(job.open_database(), job.read_tasks())
    assert [r["trials"] for r in rows] == [3, 2] and capfd.readouterr().err == ""  # said once

    # A torn workload line: its records go with it, the others are renumbered to the workloads kept.
    other = JobDir(tmp_path / "other")
    tiny_database(other.path)
    tear_line(other.file("database_workload.json"), 0)
    capfd.readouterr()
    rows = task_rows(other.database(), other.read_tasks())
    assert [(r["task"], r["trials"]) for r in rows] == [("matmul8", 0), ("matmul16", 3)]
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "database_workload.json: 1 damaged line(s) left out (line 1)" in err[0] and \
        err[0].endswith("; 3 record(s) of a damaged workload left out"), err
    assert other.file("database_workload.json.damaged").is_file()


def test_a_stopped_tuning_loop_keeps_tvms_whole_error_and_names_its_error_line(tmp_path):
    """TVM's errors are many lines and end with an explanation (the H100 run of 2026-12-07 printed only a ScheduleError's
    last bullet): the one-line message names the error's own line and the job directory keeps the whole text."""
    import tvm
    from tvm import te
    from tvm.s_tir import Schedule

    from tunefarm.host.tuning.job import ERROR_FILE, _tuning_stopped

    a = te.placeholder((16,), name="A")
    b = te.compute((16,), lambda i: a[i] * 2, name="B")
    c = te.compute((16,), lambda i: b[i] + 1, name="C")
    sch = Schedule(tvm.IRModule({"main": te.create_prim_func([a, c])}))
    try:
        sch.compute_at(sch.get_sblock("C"), sch.get_loops(sch.get_sblock("B"))[0])  # an output block: refused
        raise AssertionError("TVM accepted an illegal compute_at")
    except Exception as caught:  # pylint: disable=broad-except
        err = caught
    assert len(str(err).splitlines()) > 5
    # nothing measured: the run removes the directory it created, so the error is kept beside it
    job = JobDir(tmp_path / "job")
    job.path.mkdir()
    out = _tuning_stopped(err, [], job)
    message = str(out)
    assert message.startswith("tuning stopped: Error message: The block") and "is an output block" in message
    beside = tmp_path / f"job.{ERROR_FILE}"
    assert "nothing was measured" in message and str(beside) in message
    assert remove_unmeasured(job) and beside.is_file()
    kept = beside.read_text()
    assert str(err) in kept and "ScheduleError" in kept
    assert out.exit_code == 4 and "\n" not in message
    # records kept: inside the job directory, which stays
    assert str(job.path / ERROR_FILE) in str(_tuning_stopped(err, [object()], job))
    assert str(err) in (job.path / ERROR_FILE).read_text()
