"""The host service's pure logic, without processes: submission rules, resume's budget, the devices view,
the progress summary, the token and the sign-in redirect.

Each test builds the service's parts on a SQLite store and a logs dir in tmp_path; agents are heartbeats in
that store, and the tracker's list is a SUMMARY as the tracker answers it, grouped by the tracker client's
own code. (tests/test_service.py runs the same service for real.)
"""
from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from types import SimpleNamespace

import numpy as np
import pytest

from tunefarm.core.errors import TunefarmError
from tunefarm.core.wire import VERIFIED_FIELD, DeviceInfo
from tunefarm.host.service.auth import cookie_secret, load_token, safe_next, token_ok
from tunefarm.host.service.config import FarmConfig
from tunefarm.host.service.errors import ApiError
from tunefarm.host.service.farmdir import FarmDir
from tunefarm.host.service.jobs import JobQueue, Upload, parse_submission
from tunefarm.host.service.store import CANCELLED, DONE, QUEUED, RUNNING, JobStore
from tunefarm.host.service.tracker_proc import HostTracker
from tunefarm.host.service.views import FarmViews
from tunefarm.tracker.client import INFO_FIELD, devices_from_summary

TRACKER = "127.0.0.1:9190"


@pytest.fixture
def farm(tmp_path):
    config = FarmConfig(logs_dir=str(tmp_path / "logs"), max_upload_mb=1)
    logs_dir = tmp_path / "logs"
    farm_dir = FarmDir(logs_dir / "farm")
    farm_dir.create()
    store = JobStore(farm_dir.database)
    tracker = HostTracker(config, farm_dir)
    tracker.addr = TRACKER  # what start() sets; these tests start no tracker
    views = FarmViews(store, logs_dir, farm_dir, tracker, config.device_offline_after_s)
    queue = JobQueue(config, logs_dir, farm_dir, store, tracker)
    yield SimpleNamespace(config=config, logs_dir=logs_dir, dir=farm_dir, store=store, views=views, queue=queue)
    store.close()


def heartbeat(store: JobStore, agent_id: str, key: str, busy: bool = False, stopped: bool = False,
              interval_s: float = 2.0) -> None:
    info = DeviceInfo(key=key, agent_id=agent_id, hostname=agent_id.split(":")[0], num_cores=2, threads=2,
                      target={"kind": "llvm"})
    store.heartbeat(agent_id, key, info.to_json(), TRACKER, listed=True, busy=busy, interval_s=interval_s,
                    stopped=stopped)


JOB = "name: {name}\nmodel: {model}\ndevice: {{key: {key}}}\ntuning: {{max_trials_global: {trials}}}\n"


def job_text(name: str = "j", model: str = "{source: builtin, name: matmul}", key: str = "cpu",
             trials: int = 16) -> str:
    return JOB.format(name=name, model=model, key=key, trials=trials)


def submit(farm, text: str, upload: Upload | None = None, skip_eval: bool = False) -> dict:
    async def devices():
        return farm.views.devices_view([], None)["devices"]

    return asyncio.run(farm.queue.submit(parse_submission(text), upload, skip_eval, devices))


def refused(farm, text: str, upload: Upload | None = None) -> tuple[int, str]:
    with pytest.raises(ApiError) as info:
        submit(farm, text, upload)
    return info.value.status_code, info.value.message


def onnx_model_bytes(value: float = 1.0) -> bytes:
    """A readable ONNX model; its bytes differ with ``value`` (its weight)."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.full((8, 8), value, np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


# -- submission rules ------------------------------------------------------------------------------------
def test_a_job_for_a_served_key_is_stored_queued_with_its_budget_and_the_farms_tracker(farm):
    heartbeat(farm.store, "nuc:1", "cpu")
    job = submit(farm, job_text(trials=24), skip_eval=True)
    assert (job["id"], job["key"], job["state"], job["budget"], job["skip_eval"]) == ("j", "cpu", QUEUED, 24, True)
    assert job["model"] == "builtin:matmul" and [note for _, note in job["history"]] == ["submitted"]
    spec = farm.store.spec(job)
    assert spec.tuning.max_trials_global == 24 and spec.device.tracker == TRACKER


def test_submission_rules_refuse_with_the_status_and_the_reason_and_store_nothing(farm):
    heartbeat(farm.store, "nuc:1", "cpu")
    heartbeat(farm.store, "gone:2", "gpu", stopped=True)  # stopped cleanly: offline at once
    onnx = "{source: onnx, path: m.onnx}"
    cases = [
        (job_text(model="{source: builtin, name: nope}"), None, 400, "unknown builtin model 'nope'; known: "),
        (job_text(key="gpu"), None, 409, "no agent serves device key 'gpu' on this farm (keys with agents: cpu (1)); "
                                         "start one: tunefarm agent --farm URL --key gpu"),
        (job_text(model=onnx), None, 400, "model.source is onnx but no model file came with the job"),
        (job_text(model=onnx), Upload("m.onnx", b""), 400, "model.source is onnx but no model file came with the job"),
        (job_text(model=onnx), Upload("m.onnx", os.urandom(2 << 20)), 413,
         "upload of 2.0 MiB is over this farm's limit of 1 MiB (max_upload_mb in the farm config)"),
        (job_text(), Upload("m.onnx", onnx_model_bytes()), 400,
         "a model file was uploaded but model.source is builtin, not onnx"),
        (job_text(model=onnx), Upload("m.onnx", b"not an onnx file"), 400,
         "the uploaded model is not a readable ONNX file: "),
    ]
    for text, upload, status, message in cases:
        got_status, got = refused(farm, text, upload)
        assert got_status == status and got.startswith(message), (message, got_status, got)
    assert farm.store.jobs() == []
    assert not farm.dir.uploads("j").exists()  # the unreadable upload was removed again


def test_a_taken_name_is_refused_with_its_state(farm):
    heartbeat(farm.store, "nuc:1", "cpu")
    submit(farm, job_text())
    farm.store.update_job("j", state=CANCELLED)
    assert refused(farm, job_text(trials=99)) == (
        409, "a job named 'j' is already on this farm (cancelled); resume it (tunefarm resume j) or give the job "
             "a new name")
    assert [j["budget"] for j in farm.store.jobs()] == [16]


def test_an_onnx_upload_is_kept_under_the_jobs_upload_dir_with_a_safe_name(farm):
    heartbeat(farm.store, "nuc:1", "cpu")
    body = onnx_model_bytes()
    job = submit(farm, job_text(name="o1", model="{source: onnx, path: m.onnx}"), Upload("resnet-8.onnx", body))
    path = farm.dir.uploads("o1") / "resnet-8.onnx"
    assert farm.store.spec(job).model.path == str(path) and path.read_bytes() == body
    assert job["model"] == "onnx:resnet-8.onnx"
    # A name with a path or odd characters is not used as a file name.
    job = submit(farm, job_text(name="o2", model="{source: onnx, path: m.onnx}"), Upload("../../x y.onnx", body))
    assert farm.store.spec(job).model.path == str(farm.dir.uploads("o2") / "model.onnx")


def test_parse_submission_gives_one_line_400s(farm):
    for text, message in (("name: x\nmodel: {source: builtin\n", "malformed job YAML at line 3, column 1: "),
                          (job_text() + "speed: 11\n", "job: unknown field(s) speed; known: "),
                          ("- a list\n", "job: a job file must be a YAML mapping")):
        with pytest.raises(ApiError) as info:
            parse_submission(text)
        assert info.value.status_code == 400 and info.value.message.startswith(message), info.value.message
    # An ONNX job's path is decided by its upload; the text may leave it out.
    assert parse_submission(job_text(model="{source: onnx}")).model.source == "onnx"


# -- resume -------------------------------------------------------------------------------------------------
def test_resume_with_more_trials_changes_the_typed_spec_and_the_budget_together(farm):
    heartbeat(farm.store, "nuc:1", "cpu")
    submit(farm, job_text(trials=16))
    farm.store.update_job("j", state=DONE, finished=time.time())
    before = farm.store.spec(farm.store.job("j"))
    job = farm.queue.resume("j", 40)
    after = farm.store.spec(job)
    assert job["state"] == QUEUED and job["budget"] == 40 == after.tuning.max_trials_global
    before.tuning.max_trials_global = 40
    assert after.to_dict() == before.to_dict()  # nothing else in the spec changed
    assert job["history"][-1][1] == "resumed; continues from its database; budget raised to 40 trials"
    assert farm.views.public_job(job, detail=True)["spec"]["tuning"]["max_trials_global"] == 40


def test_resume_refusals_and_a_plain_resume_keeps_the_budget(farm):
    heartbeat(farm.store, "nuc:1", "cpu")
    submit(farm, job_text(trials=16))
    with pytest.raises(ApiError) as info:
        farm.queue.resume("j", None)
    assert (info.value.status_code, info.value.message) == (409, "job j is already queued")
    farm.store.update_job("j", state=DONE)
    with pytest.raises(ApiError) as info:
        farm.queue.resume("j", 16)
    assert (info.value.status_code, info.value.message) == (400, "--trials 16 is not above the job's budget of 16")
    with pytest.raises(ApiError) as info:
        farm.queue.resume("j", None)
    assert info.value.status_code == 409 and "is done and its budget is spent" in info.value.message
    farm.store.update_job("j", state=CANCELLED, cancel_requested=True, error="x")
    job = farm.queue.resume("j", None)
    assert (job["state"], job["budget"], job["cancel_requested"], job["error"]) == (QUEUED, 16, False, None)


def test_the_budget_column_is_never_set_apart_from_the_spec(farm):
    heartbeat(farm.store, "nuc:1", "cpu")
    submit(farm, job_text(trials=16))
    with pytest.raises(ValueError, match="budget is its spec's tuning.max_trials_global"):
        farm.store.update_job("j", budget=99)
    assert farm.store.job("j")["budget"] == 16 == farm.store.spec(farm.store.job("j")).tuning.max_trials_global


# -- devices view ----------------------------------------------------------------------------------------
def test_devices_are_online_within_their_window_and_offline_after_it_or_when_stopped(farm):
    heartbeat(farm.store, "nuc:1", "cpu", busy=True)
    heartbeat(farm.store, "pi:2", "arm", interval_s=30.0)  # a slow reporter: its window is 3 intervals
    heartbeat(farm.store, "old:3", "cpu", stopped=True)

    def status(now=None):
        view = farm.views.devices_view([], None, now=now)
        return {d["agent_id"]: (d["status"], d["busy"], d["source"]) for d in view["devices"]}

    now = time.time()
    window = farm.config.device_offline_after_s
    assert status(now) == {"nuc:1": ("online", True, "heartbeat"), "pi:2": ("online", False, "heartbeat"),
                           "old:3": ("offline", False, "heartbeat")}
    later = status(now + window + 1)  # past the config's window, within 3 x 30 s
    assert later["nuc:1"] == ("offline", False, "heartbeat") and later["pi:2"][0] == "online"
    assert status(now + 91)["pi:2"][0] == "offline"


def test_the_devices_view_adds_tracker_agents_without_heartbeats_and_names_the_running_job(farm):
    heartbeat(farm.store, "nuc:1", "cpu")
    submit(farm, job_text(name="busy-job"))
    farm.store.update_job("busy-job", state=RUNNING)
    nuc = DeviceInfo(key="cpu", agent_id="nuc:1", hostname="nuc")
    quiet = DeviceInfo(key="cpu", agent_id="quiet:7", hostname="quiet", num_cores=4)
    # As the farm's tracker reports them: agents that proved the farm key are marked verified.
    summary = {"server_info": [{"key": "server:cpu", "addr": ["10.0.0.1", 9091], INFO_FIELD: nuc.to_json(),
                                VERIFIED_FIELD: True},
                               {"key": "server:cpu", "addr": ["10.0.0.2", 9091], INFO_FIELD: quiet.to_json(),
                                VERIFIED_FIELD: True},
                               {"key": "server:gpu", "addr": ["10.0.0.3", 9091]}],  # a stock tvm.rpc server
               "queue_info": {"cpu": {"free": 1, "pending": 0}, "gpu": {"free": 1, "pending": 2}}}
    view = farm.views.devices_view(devices_from_summary(summary), None)
    rows = {d["agent_id"]: (d["key"], d["status"], d["source"].split(" ")[0], d["job"]) for d in view["devices"]}
    assert rows == {"nuc:1": ("cpu", "online", "heartbeat", "busy-job"),  # listed and reporting: once
                    "quiet:7": ("cpu", "online", "tracker", "busy-job"),
                    "10.0.0.3:9091": ("gpu", "online", "tracker", None)}
    assert view["keys"] == [{"key": "cpu", "total": 2, "free": 1, "busy": 1, "pending": 0},
                            {"key": "gpu", "total": 1, "free": 1, "busy": 0, "pending": 2}]
    assert view["tracker"] == TRACKER and view["tracker_error"] is None


# -- progress summary ------------------------------------------------------------------------------------
def test_progress_summary_skips_a_torn_line_and_the_line_still_being_written(farm):
    job_dir = farm.views.job_dir("p")
    job_dir.path.mkdir(parents=True)
    assert farm.views.progress_summary("p") == {"trials": 0, "batches": 0, "estimated_ms": None, "best_ms": None}
    lines = [json.dumps({"time": 1.0, "trials": 4, "batch": 4, "estimated_ms": 9.0}),
             '{"time": 2.0, "trials": 8, "batch": 4, "estim',  # a worker killed mid-line
             json.dumps({"time": 3.0, "trials": 12, "batch": 4, "estimated_ms": 7.5}),
             json.dumps({"time": 4.0, "trials": 16, "batch": 4, "estimated_ms": float("nan")}),
             json.dumps({"time": 5.0, "trials": 20, "batch": 4, "estimated_ms": 8.0})]
    progress = job_dir.file("progress.jsonl")
    # The last line has no newline yet (its writer is still at it): not counted, even though it parses.
    unfinished = json.dumps({"time": 6.0, "trials": 24, "batch": 4, "estimated_ms": 5.0})
    progress.write_text("\n".join(lines) + "\n" + unfinished)
    assert farm.views.progress_summary("p") == {"trials": 20, "batches": 4, "estimated_ms": 8.0, "best_ms": 7.5,
                                                "last_batch_time": 5.0}
    events = farm.views.events("p")
    assert [e["n"] for e in events] == [0, 2, 3, 4] and events[2]["estimated_ms"] is None  # NaN: JSON null
    job_dir.append_event({"time": 7.0, "trials": 28, "batch": 4, "estimated_ms": 6.0})  # ends that line first
    summary = farm.views.progress_summary("p")
    assert (summary["trials"], summary["batches"], summary["estimated_ms"], summary["best_ms"]) == (28, 6, 6.0, 5.0)


# -- auth ---------------------------------------------------------------------------------------------------
def test_safe_next_keeps_only_paths_on_this_site():
    assert safe_next("/jobs/night") == "/jobs/night"
    assert safe_next("/") == "/"
    for value in ("//evil.example/x", "https://evil.example/", "jobs/night", ""):
        assert safe_next(value) == "/", value


def test_token_check_and_cookie_secret():
    token = "s3cret-token-0123456789"
    assert token_ok(token, token)
    for supplied in (None, "", token[:-1], token + "x", "S3CRET-TOKEN-0123456789"):
        assert not token_ok(token, supplied), supplied
    assert cookie_secret(token) == cookie_secret(token) != cookie_secret(token + "x")
    assert token not in cookie_secret(token)


def test_load_token_generates_a_private_file_once_then_reads_it(tmp_path, capsys):
    path = tmp_path / "farm" / "token"
    token = load_token(FarmConfig(), path)
    assert len(token) >= 32 and path.read_text() == token + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert capsys.readouterr().out.count(token) == 1  # shown once, when generated
    assert load_token(FarmConfig(), path) == token
    assert token not in capsys.readouterr().out
    assert load_token(FarmConfig(token="from-config"), path) == "from-config"
    path.chmod(0o640)
    with pytest.raises(TunefarmError, match="is readable by others; run: chmod 600"):
        load_token(FarmConfig(), path)
    path.chmod(0o600)
    path.write_text("\n")
    with pytest.raises(TunefarmError, match="is empty; delete it to generate a new token"):
        load_token(FarmConfig(), path)


# -- hostile input ------------------------------------------------------------------------------------------
def test_concurrent_submissions_of_one_name_store_one_job_with_its_own_upload(farm):
    heartbeat(farm.store, "nuc:1", "cpu")
    bodies = [onnx_model_bytes(float(i)) for i in range(12)]
    text = job_text(name="race", model="{source: onnx, path: m.onnx}")

    async def devices():
        await asyncio.sleep(0.01)  # the tracker's answer: every submission waits here, interleaved
        return farm.views.devices_view([], None)["devices"]

    async def one(body):
        try:
            return await farm.queue.submit(parse_submission(text), Upload("m.onnx", body), False, devices)
        except ApiError as err:
            return err

    async def all_of_them():
        return await asyncio.gather(*(one(b) for b in bodies))

    results = asyncio.run(all_of_them())
    accepted = [i for i, r in enumerate(results) if isinstance(r, dict)]
    refused = [r for r in results if isinstance(r, ApiError)]
    assert len(accepted) == 1 and len(refused) == len(bodies) - 1, results
    assert all(r.status_code == 409 and "a job named 'race' is already on this farm" in r.message for r in refused)
    stored = farm.store.spec(farm.store.job("race"))
    assert open(stored.model.path, "rb").read() == bodies[accepted[0]]
    assert sorted(os.listdir(farm.dir.uploads("race"))) == ["m.onnx"]
    assert list(farm.dir.tmp.iterdir()) == []  # every refused request removed its own staged file
    assert [j["id"] for j in farm.store.jobs()] == ["race"]


def test_the_store_refuses_a_second_job_of_one_name_in_its_insert(farm):
    from tunefarm.host.service.store import JobExists

    spec = parse_submission(job_text(name="twice"))
    farm.store.add_job(spec, "builtin:matmul", False)
    with pytest.raises(JobExists, match="queued"):
        farm.store.add_job(spec, "builtin:matmul", False)
    assert len(farm.store.jobs()) == 1


def test_a_garbage_target_is_refused_at_submission_with_tvms_reason(farm):
    heartbeat(farm.store, "nuc:1", "cpu")
    for target, message in (("garbage-target", "job target: unknown target 'garbage-target'"),
                            ("{kind: no-such-kind}", "job target: bad target {\"kind\": \"no-such-kind\"}: ")):
        status, got = refused(farm, job_text(name="t") + f"target: {target}\n")
        assert status == 400 and got.startswith(message) and "\n" not in got, got
    assert farm.store.jobs() == []
    heartbeat(farm.store, "nuc:1", "cpu")  # again: TVM's first import can outlast the 10 s window on a busy host
    job = submit(farm, job_text(name="t") + "target: {kind: llvm}\n")
    assert farm.store.spec(job).target == {"kind": "llvm"}


def test_an_alias_bomb_is_refused_before_it_is_expanded():
    # 10**7 leaves in a 500-byte target: parsed as shared lists, then expanded by anything that copies it
    levels = ["  a: &a [x, x, x, x, x, x, x, x, x, x]\n"]
    for i in range(6):
        prev = chr(97 + i)
        levels.append(f"  {chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{prev}'] * 10)}]\n")
    start = time.monotonic()
    with pytest.raises(ApiError) as info:
        parse_submission(job_text() + "target:\n" + "".join(levels))
    assert info.value.status_code == 400 and "once its aliases are expanded" in info.value.message
    assert time.monotonic() - start < 5


def test_resume_with_an_out_of_range_budget_is_a_400_and_changes_nothing(farm):
    heartbeat(farm.store, "nuc:1", "cpu")
    submit(farm, job_text(trials=16))
    farm.store.update_job("j", state=DONE)
    with pytest.raises(ApiError) as info:
        farm.queue.resume("j", 10 ** 23)
    assert info.value.status_code == 400 and "out of range" in info.value.message, info.value.message
    job = farm.store.job("j")
    assert (job["state"], job["budget"]) == (DONE, 16)


def test_a_corrupt_queue_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "farm.sqlite3"
    path.write_bytes(os.urandom(100))
    with pytest.raises(TunefarmError) as info:
        JobStore(path)
    assert "is not a readable farm database" in str(info.value) and "\n" not in str(info.value)


def test_files_are_served_only_from_inside_the_job_directory_never_through_a_link(farm):
    job_dir = farm.views.job_dir("p")
    job_dir.path.mkdir(parents=True)
    (job_dir.path / "report.md").write_text("# report\n")
    secret = farm.dir.token
    secret.write_text("s3cret\n")
    (job_dir.path / "leak.png").symlink_to(secret)
    (job_dir.path / "progress.jsonl").symlink_to(secret)
    farm.dir.run_log("p").symlink_to(secret)
    assert farm.views.job_files("p") == ["report.md"]
    assert farm.views.read_file("p", "report.md") == b"# report\n"
    for name in ("leak.png", "progress.jsonl", "tune.log"):
        assert farm.views.read_file("p", name) is None and farm.views.file_path("p", name) is None
    # A job directory that is itself a link out of the logs dir serves nothing.
    outside = farm.logs_dir.parent / "elsewhere"
    outside.mkdir()
    (outside / "report.md").write_text("# not this farm's\n")
    (farm.logs_dir / "q").symlink_to(outside)
    assert farm.views.job_files("q") == [] and farm.views.read_file("q", "report.md") is None
    # The bundle refuses a database that is a link (TVM would read what it points to).
    (job_dir.path / "database_tuning_record.json").symlink_to(secret)
    with pytest.raises(TunefarmError, match="is not a plain file in its job directory"):
        farm.views.build_bundle("p")


def test_delete_removes_a_finished_job_and_everything_of_it_and_refuses_a_live_one(farm):
    heartbeat(farm.store, "nuc:1", "cpu")
    submit(farm, job_text(name="d1", model="{source: onnx, path: m.onnx}"), Upload("m.onnx", onnx_model_bytes()))
    submit(farm, job_text(name="d2"))
    with pytest.raises(ApiError) as info:
        farm.queue.delete("d1")
    assert info.value.status_code == 409 and info.value.message == (
        "job d1 is queued; cancel it first (tunefarm cancel d1), then delete it")
    farm.store.update_job("d1", state=CANCELLED)
    farm.dir.spec("d1").write_text("spec")
    farm.dir.run_log("d1").write_text("log")
    job_dir = farm.views.job_dir("d1").path  # the farm created it at submission, with its mark
    (job_dir / "database_tuning_record.json").write_text("{}\n")
    removed = farm.queue.delete("d1")
    assert len(removed) == 4
    assert farm.store.job("d1") is None and [j["id"] for j in farm.store.jobs()] == ["d2"]
    for path in (farm.dir.spec("d1"), farm.dir.run_log("d1"), farm.dir.uploads("d1"), job_dir):
        assert not os.path.lexists(path), path


def test_safe_next_refuses_backslashes_control_characters_and_other_hosts():
    for value in ("/\\evil.example", "/\\\\evil.example", "/x\\y", "/\t/evil.example", "/\n/evil.example",
                  "http:/evil.example", "//evil.example"):
        assert safe_next(value) == "/", value
    assert safe_next("/jobs/night?tab=tasks") == "/jobs/night?tab=tasks"
