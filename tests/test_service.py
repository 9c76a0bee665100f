"""The host service for real: ``tunefarm host serve`` (its own tracker), an agent started with ``--farm``,
and laptop commands (``tunefarm submit / follow / jobs / cancel / resume / pull``) as separate processes,
all on loopback. The dashboard is checked in Debian's headless Chromium, driven by Selenium.

The tests share one host and one agent (module fixture); the last one stops the agent.
"""
from __future__ import annotations

import concurrent.futures
import gzip
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import yaml

from conftest import (HOST, _tail, agent_id_of, apply_best_with_plain_tvm, listed_agents, run_cli, start_host,
                      tracker_answers)
from tunefarm.core.procs import free_port, kill_hard, start_tunefarm, stop_process, wait_until

JOB_DONE_S = 420  # two worker starts (TVM imports, task extraction) on a busy 2-core machine, plus evaluation
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHART_RGB = (0x1f, 0x77, 0xb4)  # the chart's line colour in static/farm.js


def cli(farm: dict, args: list, name: str, timeout: float = 120, env: dict | None = None) -> tuple[int, str]:
    """Run one laptop command against the farm (its URL and token from the environment)."""
    log = farm["base"] / f"cli-{name}-{time.monotonic_ns()}.log"
    proc = start_tunefarm(args, log_path=log, env={**farm["env"], **(env or {})})
    try:
        code = proc.wait(timeout)
    finally:
        stop_process(proc)
    return code, log.read_text(errors="replace")


def api(farm: dict, method: str, path: str, token: str | None = "ok", **kwargs) -> requests.Response:
    headers = {"Authorization": f"Bearer {farm['token'] if token == 'ok' else token}"} if token else {}
    return requests.request(method, farm["url"] + path, headers=headers, timeout=30, **kwargs)


def write_job(path: Path, name: str, model: dict, trials: int, key: str = "cpu", **extra) -> Path:
    job = {"name": name, "model": model, "device": {"key": key},
           "tuning": {"max_trials_global": trials, "num_trials_per_iter": 4, "population_size": 64},
           # one builder worker: each one imports TVM's tensor intrinsics first (~20 s of CPU)
           "builder": {"workers": 1, "timeout_sec": 60},
           "runner": {"timeout_sec": 30, "device_wait_sec": 60, "number": 2, "min_repeat_ms": 5},
           "evaluate": {"warmup": 3, "repeat": 15, "baselines": [], "require_speedup": False}}
    for section, values in extra.items():
        job[section].update(values)
    path.write_text(yaml.safe_dump(job))
    return path


def records(job_dir: Path) -> list[str]:
    path = job_dir / "database_tuning_record.json"
    return [l for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def progress_lines(job_dir: Path) -> list[dict]:
    path = job_dir / "progress.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def wait_state(farm: dict, job_id: str, states: tuple[str, ...], timeout: float) -> dict:
    def reached():
        job = api(farm, "GET", f"/api/jobs/{job_id}").json()
        return job if job["state"] in states else None

    try:
        return wait_until(reached, timeout, interval=1.0, what=f"job {job_id} to be {' or '.join(states)}")
    except TimeoutError as err:
        raise AssertionError(f"{err}\nhost log:\n{_tail(farm['base'] / 'host.log')}\nworker log:\n"
                             f"{_tail(farm['base'] / 'logs' / 'farm' / 'runs' / f'{job_id}.log')}") from None


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    base = tmp_path_factory.mktemp("farm")
    (base / "farm.yaml").write_text(yaml.safe_dump({"max_upload_mb": 1, "device_offline_after_s": 6}))
    http_port, tracker_port = free_port(HOST), free_port(HOST)
    state = {"base": base, "url": f"http://{HOST}:{http_port}", "ports": (http_port, tracker_port)}
    state["host"] = start_host(base, http_port, tracker_port, "--config", base / "farm.yaml")
    agent = None
    try:
        state["token"] = (base / "logs" / "farm" / "token").read_text().strip()
        # No client config file: the URL and token come from the environment, as on a laptop.
        state["env"] = {"TUNEFARM_FARM": state["url"], "TUNEFARM_TOKEN": state["token"],
                        "TUNEFARM_CLIENT_CONFIG": str(base / "no-client-config.yaml")}
        agent = start_tunefarm(["agent", "--key", "cpu", "--host", HOST, "--port", free_port(HOST)],
                               log_path=base / "agent.log", env=state["env"])
        state["agent"] = agent

        def online():
            assert agent.poll() is None, _tail(base / "agent.log")
            view = api(state, "GET", "/api/devices").json()
            return any(d["agent_id"] == agent_id_of(agent) and d["status"] == "online" and d["listed"]
                       for d in view["devices"])

        wait_until(online, 120, interval=0.5, what="the agent to report to the farm")
        yield state
    finally:
        if agent is not None:
            stop_process(agent)
        stop_process(state["host"])


NIGHT_TRIALS = 64


@pytest.fixture(scope="module")
def night_job(farm, tmp_path_factory) -> Path:
    """The overnight job, submitted by a laptop command: the dashboard test watches it run, the kill -9 test
    takes it to its end (one job for both keeps the suite within minutes on 2 cores)."""
    job_file = write_job(tmp_path_factory.mktemp("night") / "night.yaml", "night",
                         {"source": "builtin", "name": "matmul"}, NIGHT_TRIALS,
                         runner={"min_repeat_ms": 600})  # ~2.5 s per batch of 4: surely mid-way at the kill
    # (150 ms was enough while each candidate opened its own RPC session; with one session per batch the
    # 64 trials ran in 26 s and ended before the test could kill the host.)
    code, out = cli(farm, ["submit", job_file], "submit-night")
    assert code == 0 and "submitted night" in out, out
    return farm["base"] / "logs" / "night"


def test_a_corrupt_queue_file_is_a_one_line_error_at_start(tmp_path):
    """No host runs here: `host serve` refuses before it starts anything."""
    logs = tmp_path / "logs"
    (logs / "farm").mkdir(parents=True)
    (logs / "farm" / "farm.sqlite3").write_bytes(os.urandom(100))
    code, out, _ = run_cli(["host", "serve", "--logs-dir", logs, "--port", free_port(HOST), "--tracker-port",
                            free_port(HOST)], tmp_path / "serve.log", timeout=60)
    lines = out.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("tunefarm: error: "), out
    assert f"{logs.resolve() / 'farm' / 'farm.sqlite3'} is not a readable farm database" in lines[0], out
    assert not (logs / "farm" / "token").exists() and not (logs / "farm" / "tracker.json").exists()


def test_a_damaged_or_empty_queue_file_is_refused_at_start_and_kept_as_it_is(tmp_path):
    """Damaged pages gave a traceback; a zero-length file was taken for a new queue and the jobs were gone
    without a word (issue 32, item 5). `host serve` refuses with one line and changes nothing."""
    from tunefarm.core.jobspec import job_from_dict
    from tunefarm.host.service.store import JobStore

    logs = tmp_path / "logs"
    path = logs / "farm" / "farm.sqlite3"
    store = JobStore(path)
    for i in range(60):
        spec = job_from_dict({"name": f"j{i}", "model": {"source": "builtin", "name": "matmul"}, "device": {"key": "cpu"}})
        store.add_job(spec, "builtin:matmul " + "m" * 500, False)
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    data = bytearray(path.read_bytes())
    data[7 * 4096:7 * 4096 + 40] = b"\xab" * 40  # page 8's header: a leaf of the jobs table
    path.write_bytes(bytes(data))

    def serve(name: str) -> str:
        code, out, took = run_cli(["host", "serve", "--logs-dir", logs, "--port", free_port(HOST), "--tracker-port",
                                   free_port(HOST)], tmp_path / f"{name}.log", timeout=60)
        lines = out.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("tunefarm: error: "), out
        assert not (logs / "farm" / "token").exists() and not (logs / "farm" / "tracker.json").exists()
        return lines[0]

    line = serve("damaged")
    assert f"{path.resolve()} is not a readable farm database (" in line and line.endswith(
        "restore it from a backup, or move it aside to start with an empty queue (the job directories are kept)"), line
    assert path.read_bytes() == bytes(data)  # refused as it is: nothing rewritten
    path.write_bytes(b"")
    assert serve("empty") == (f"tunefarm: error: {path.resolve()} is empty (0 bytes): the farm's queue is not in it; "
                              "restore it from a backup, or delete it to start with an empty queue (the job "
                              "directories are kept)")
    assert path.stat().st_size == 0


def test_a_farm_that_accepts_and_never_answers_is_an_error_within_half_a_minute(tmp_path):
    """`tunefarm submit` to a listener on loopback that accepts connections and never answers."""
    job = write_job(tmp_path / "silent.yaml", "silent", {"source": "builtin", "name": "matmul"}, 8)
    held, stop = [], threading.Event()
    with socket.create_server((HOST, 0)) as listener:
        listener.settimeout(0.2)

        def accept():
            while not stop.is_set():
                try:
                    held.append(listener.accept()[0])
                except OSError:
                    continue

        acceptor = threading.Thread(target=accept, daemon=True)
        acceptor.start()
        url = f"http://{HOST}:{listener.getsockname()[1]}"
        env = {"TUNEFARM_FARM": url, "TUNEFARM_TOKEN": "t", "TUNEFARM_CLIENT_CONFIG": str(tmp_path / "none.yaml")}
        start = time.monotonic()
        proc = start_tunefarm(["submit", job], log_path=tmp_path / "submit.log", env=env)
        try:
            code = proc.wait(120)
        finally:
            stop_process(proc)
            stop.set()
            acceptor.join(5)
            for conn in held:
                conn.close()
    took = time.monotonic() - start
    lines = (tmp_path / "submit.log").read_text().strip().splitlines()
    assert held, "the client never connected"
    assert code == 2 and lines == [f"tunefarm: error: the farm at {url} did not answer within 20 s"], lines
    assert took < 40, took


def test_token_is_required_generated_private_and_never_logged(farm):
    token_file = farm["base"] / "logs" / "farm" / "token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert len(farm["token"]) >= 32
    for method, path in (("GET", "/api/info"), ("GET", "/api/jobs"), ("GET", "/api/devices"),
                         ("POST", "/api/jobs"), ("POST", "/api/devices/heartbeat"), ("GET", "/api/jobs/x/bundle"),
                         ("POST", "/api/jobs/x/cancel"), ("GET", "/api/jobs/x/progress")):
        for token in (None, "wrong-" + farm["token"], farm["token"][:-1]):
            resp = api(farm, method, path, token=token)
            assert resp.status_code == 401, (method, path, resp.text)
            assert "missing or wrong token" in resp.json()["error"]
    assert api(farm, "GET", "/api/info").status_code == 200
    # The dashboard sends a browser to sign in instead of showing anything.
    page = requests.get(farm["url"] + "/", allow_redirects=False, timeout=10)
    assert page.status_code == 302 and page.headers["Location"].startswith("/login")
    # A cookie does not authorize changes (no cross-site requests in a signed-in browser).
    session = requests.Session()
    assert session.post(farm["url"] + "/login", data={"token": farm["token"]}, timeout=10).status_code == 200
    assert session.get(farm["url"] + "/api/jobs", timeout=10).status_code == 200
    assert session.post(farm["url"] + "/api/jobs/x/cancel", timeout=10).status_code == 401
    assert requests.post(farm["url"] + "/login", data={"token": "nope"}, timeout=10).status_code == 401

    code, out = cli(farm, ["jobs"], "wrong-token", env={"TUNEFARM_TOKEN": "nope"})
    assert code == 2 and out.strip().splitlines() == [
        f"tunefarm: error: the farm at {farm['url']} refused the token (set TUNEFARM_TOKEN to the token in "
        "logs/farm/token on the host)"], out
    # Printed once, when it was generated; the refusals above are logged without it.
    log = (farm["base"] / "host.log").read_text()
    assert log.count(farm["token"]) == 1 and "generated an API token" in log
    assert "401 GET /api/jobs from 127.0.0.1" in log


def test_farm_and_token_from_the_client_config_file(farm, tmp_path):
    config = tmp_path / "client.yaml"
    config.write_text(yaml.safe_dump({"farm": farm["url"], "token": farm["token"]}))
    config.chmod(0o600)
    env = {"TUNEFARM_FARM": "", "TUNEFARM_TOKEN": "", "TUNEFARM_CLIENT_CONFIG": str(config)}
    code, out = cli(farm, ["jobs"], "config-file", env=env)
    assert code == 0 and (f"jobs on {farm['url']}" in out or f"no jobs on {farm['url']}" in out), out
    config.chmod(0o644)
    code, out = cli(farm, ["jobs"], "config-file-open", env=env)
    assert code == 2 and f"{config} holds a token but others can read it" in out, out


def test_devices_show_the_agent_with_its_target(farm):
    code, out = cli(farm, ["devices"], "devices")
    assert code == 0, out
    assert agent_id_of(farm["agent"]) in out and "online" in out and "llvm" in out
    view = api(farm, "GET", "/api/devices").json()
    mine = [d for d in view["devices"] if d["agent_id"] == agent_id_of(farm["agent"])]
    assert mine and mine[0]["key"] == "cpu" and mine[0]["target"]["kind"] == "llvm"
    assert mine[0]["last_seen_s"] < 6 and mine[0]["source"] == "heartbeat"
    assert [(k["key"], k["total"]) for k in view["keys"]] == [("cpu", 1)]


def heartbeat(farm: dict, body: dict | str, **kwargs) -> requests.Response:
    data = body if isinstance(body, str) else json.dumps(body)  # json.dumps writes inf as Infinity
    return api(farm, "POST", "/api/devices/heartbeat", data=data, **kwargs)


def device_row(farm: dict, agent_id: str) -> dict | None:
    rows = [d for d in api(farm, "GET", "/api/devices").json()["devices"] if d["agent_id"] == agent_id]
    return rows[0] if rows else None


def test_heartbeats_are_checked_bounded_and_a_spoofed_goodbye_keeps_the_agent_online(farm):
    info = {"key": "cpu", "agent_id": "hb-probe:1", "hostname": "hb-probe"}
    for interval in (float("inf"), float("nan"), 1e9, 0.01, "2", True):
        resp = heartbeat(farm, {"info": info, "interval_s": interval})
        assert resp.status_code == 400 and "interval_s must be a number of seconds from 0.5 to 60" in \
            resp.json()["error"], (interval, resp.text)
    resp = heartbeat(farm, {"info": {**info, "num_cores": "many"}})
    assert resp.status_code == 400 and "wrong type: num_cores" in resp.json()["error"], resp.text
    nested = '{"info": ' + "[" * 20000 + "]" * 20000 + "}"  # under the body limit, too deep for json
    resp = heartbeat(farm, nested)
    assert resp.status_code == 400 and "nested too deeply" in resp.json()["error"], resp.text
    huge = {"info": {**info, "agent_id": "huge:1", "cpu_model": "x" * (50 << 20)}}
    resp = heartbeat(farm, huge)
    assert resp.status_code == 413 and "over this endpoint's limit of 65536 bytes" in resp.json()["error"], resp.text
    assert device_row(farm, "hb-probe:1") is None and device_row(farm, "huge:1") is None  # nothing stored

    # Someone with the token says goodbye in the name of the real agent, which the tracker still lists.
    agent_id = agent_id_of(farm["agent"])
    resp = heartbeat(farm, {"info": {"key": "cpu", "agent_id": agent_id}, "interval_s": 2, "stopping": True})
    assert resp.status_code == 409 and "is still registered with the tracker" in resp.json()["error"], resp.text
    real = device_row(farm, agent_id)  # at once: the agent's own next heartbeat would hide a goodbye taken
    assert real["status"] == "online" and real["target"]["kind"] == "llvm", real
    # The goodbye of an agent the tracker does not list is taken: offline at once.
    assert heartbeat(farm, {"info": info, "interval_s": 2}).status_code == 200
    assert device_row(farm, "hb-probe:1")["status"] == "online"
    assert heartbeat(farm, {"info": info, "interval_s": 2, "stopping": True}).status_code == 200
    assert device_row(farm, "hb-probe:1")["status"] == "offline"


def test_bad_input_is_a_4xx_json_error_and_a_one_line_cli_error(farm, tmp_path):
    def post_job(text: str, model: tuple | None = None) -> requests.Response:
        files = {"job": (None, text)}
        if model:
            files["model"] = model
        return api(farm, "POST", "/api/jobs", files=files)

    cases = [
        (post_job("name: x\nmodel: {source: builtin, name: matmul\n"), 400, "malformed job YAML at line"),
        (post_job("name: x\nmodel: {source: builtin, name: matmul}\ndevice: {key: cpu}\nspeed: 11\n"), 400,
         "unknown field(s) speed"),
        (post_job("name: x\nmodel: {source: builtin, name: nope}\ndevice: {key: cpu}\n"), 400,
         "unknown builtin model 'nope'"),
        (post_job("name: x\nmodel: {source: builtin, name: matmul}\ndevice: {key: gpu-nobody}\n"), 409,
         "no agent serves device key 'gpu-nobody'"),
        (post_job("name: x\nmodel: {source: onnx, path: m.onnx}\ndevice: {key: cpu}\n",
                  ("m.onnx", b"not an onnx file", "application/octet-stream")), 400, "not a readable ONNX file"),
        (post_job("name: x\nmodel: {source: onnx, path: m.onnx}\ndevice: {key: cpu}\n",
                  ("m.onnx", os.urandom(3 << 20), "application/octet-stream")), 413, "over this farm's limit of 1 MiB"),
        (api(farm, "GET", "/api/jobs/no-such-job"), 404, "no job 'no-such-job'"),
        (api(farm, "POST", "/api/jobs/no-such-job/cancel"), 404, "no job 'no-such-job'"),
        (api(farm, "GET", "/api/nothing-here"), 404, "no such page or API endpoint"),
        (api(farm, "POST", "/api/devices/heartbeat", data=b"{not json"), 400, "not JSON"),
        (api(farm, "POST", "/api/devices/heartbeat", json={"info": {"key": "k", "agent_id": "a", "cuda": "x"}}), 400,
         "wrong type: cuda"),
    ]
    for resp, status, message in cases:
        assert resp.status_code == status and message in resp.json()["error"], (status, message, resp.text)
    assert api(farm, "GET", "/api/jobs").json()["jobs"] == []  # nothing half-accepted

    # The same mistakes from the command line: one line each, non-zero exit.
    (tmp_path / "broken.yaml").write_text("name: x\nmodel: [\n")
    big = write_job(tmp_path / "big.yaml", "big", {"source": "onnx", "path": "big.onnx"}, 8)
    (tmp_path / "big.onnx").write_bytes(os.urandom(2 << 20))
    nokey = write_job(tmp_path / "nokey.yaml", "nokey", {"source": "builtin", "name": "matmul"}, 8, key="gpu-nobody")
    unreachable = f"http://{HOST}:{free_port(HOST)}"
    for args, message in (
            (["submit", tmp_path / "broken.yaml"], "malformed YAML at line"),
            (["submit", big], "big.onnx is 2.0 MiB; the farm takes uploads up to 1 MiB"),
            (["submit", nokey], "no agent serves device key 'gpu-nobody'"),
            (["follow", "no-such-job"], "no job 'no-such-job' on this farm"),
            (["pull", "no-such-job", "-o", tmp_path / "out"], "no job 'no-such-job' on this farm"),
            (["jobs", "--farm", unreachable], f"cannot reach the farm at {unreachable}: connection refused")):
        code, out = cli(farm, args, "bad")
        lines = out.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0] and lines[0].startswith("tunefarm: error:"), out
    assert not (tmp_path / "out").exists()
    # A second host on the same logs dir would run the queue twice.
    code, out = cli(farm, ["host", "serve", "--logs-dir", farm["base"] / "logs", "--port", free_port(HOST),
                           "--tracker-port", free_port(HOST)], "second-host")
    assert code == 2 and f"(pid {farm['host'].pid}) already uses" in out, out
    assert farm["host"].poll() is None and api(farm, "GET", "/api/info").status_code == 200


def _onnx_matmul(path: Path, seed: int = 0) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(seed).standard_normal((32, 32)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 32])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_queue_per_key_onnx_upload_cancel_and_resume(farm, tmp_path):
    """Jobs on one key run one at a time; an ONNX file travels with its job; cancel and resume work."""
    _onnx_matmul(tmp_path / "mm.onnx")
    first = write_job(tmp_path / "first.yaml", "q-first", {"source": "builtin", "name": "matmul"}, 400)
    second = write_job(tmp_path / "second.yaml", "q-onnx", {"source": "onnx", "path": "mm.onnx"}, 8)
    code, out = cli(farm, ["submit", first, "--skip-eval"], "submit-first")
    assert code == 0 and "submitted q-first" in out, out
    code, out = cli(farm, ["submit", second], "submit-second")
    assert code == 0 and "submitted q-onnx" in out and "position 1 on key 'cpu'" in out, out
    job = api(farm, "GET", "/api/jobs/q-onnx").json()
    assert job["state"] == "queued" and job["queue_position"] == 1
    uploaded = Path(job["spec"]["model"]["path"])
    assert uploaded.read_bytes() == (tmp_path / "mm.onnx").read_bytes()
    running = wait_state(farm, "q-first", ("running",), 30)
    assert running["attempts"] == 1
    worker = psutil.Process(running["pid"])
    assert "q-first.yaml" in " ".join(worker.cmdline())

    code, out = cli(farm, ["cancel", "q-onnx"], "cancel-queued")
    assert code == 0 and "cancelled" in out, out
    code, out = cli(farm, ["cancel", "q-first"], "cancel-running")
    assert code == 0 and "cancelling" in out, out
    assert wait_state(farm, "q-first", ("cancelled",), 40)["state"] == "cancelled"
    worker.wait(20)  # the worker and its process group are gone
    code, out = cli(farm, ["jobs"], "jobs")
    assert code == 0 and "q-first" in out and "q-onnx" in out and out.count("cancelled") == 2, out

    code, out = cli(farm, ["resume", "q-onnx"], "resume")
    assert code == 0 and "q-onnx:" in out, out
    assert api(farm, "GET", "/api/jobs/q-onnx").json()["state"] in ("queued", "running")
    code, out = cli(farm, ["resume", "q-onnx"], "resume-again")
    assert code == 2 and "is already" in out, out
    code, out = cli(farm, ["cancel", "q-onnx"], "cancel-again")
    assert code == 0, out
    wait_state(farm, "q-onnx", ("cancelled",), 40)
    history = [note for _, note in api(farm, "GET", "/api/jobs/q-onnx").json()["history"]]
    assert history[:2] == ["submitted", "cancelled while queued"] and history[2].startswith("resumed")


def test_hostile_requests_are_4xx_answers_and_change_nothing(farm):
    """Each of these was a 500; q-first is the cancelled job from above."""
    before = api(farm, "GET", "/api/jobs/q-first").json()
    job = "name: x\nmodel: {source: builtin, name: matmul}\ndevice: {key: cpu}\n"
    cases = [
        (api(farm, "POST", "/api/jobs/q-first/resume", json={"trials": 10 ** 23}), 400,
         "tuning.max_trials_global: 100000000000000000000000 is out of range"),
        (api(farm, "GET", "/api/jobs/q-first/progress", params={"from": -5}), 400, "'from' must be a line number"),
        (api(farm, "POST", "/api/jobs/q-first/resume", data="{\"trials\": " + "[" * 20000 + "]" * 20000 + "}"), 400,
         "nested too deeply"),
        (requests.post(farm["url"] + "/api/jobs", data=b"--b\r\nnot a part", timeout=30, headers={
            "Authorization": f"Bearer {farm['token']}", "Content-Type": "multipart/form-data; boundary=b"}), 400,
         "the request body is not a valid form"),
        (api(farm, "POST", "/api/jobs", files={"job": (None, job + "target: garbage-target\n")}), 400,
         "job target: unknown target 'garbage-target': not a preset"),
        (api(farm, "POST", "/api/jobs", files={"job": (None, job + "target: {kind: no-such-kind}\n")}), 400,
         'job target: bad target {"kind": "no-such-kind"}: '),
    ]
    for resp, status, message in cases:
        assert resp.status_code == status and message in resp.json()["error"], (status, message, resp.text)
    after = api(farm, "GET", "/api/jobs/q-first").json()
    assert (after["state"], after["budget"], after["history"]) == (before["state"], before["budget"], before["history"])
    assert [j["id"] for j in api(farm, "GET", "/api/jobs").json()["jobs"]] == ["q-first", "q-onnx"]


def test_after_sign_in_only_a_plain_local_path_is_followed(farm):
    """/\\evil.example is another host to a browser (it reads the backslash as a slash)."""
    for target, where in (("/\\evil.example", "/"), ("//evil.example", "/"), ("/\t/evil.example", "/"),
                          ("/jobs/q-first", "/jobs/q-first")):
        resp = requests.post(farm["url"] + "/login", data={"token": farm["token"], "next": target},
                             allow_redirects=False, timeout=10)
        assert resp.status_code == 302 and resp.headers["Location"] == where, (target, resp.headers)


MARKUP = "[/x]"  # rich markup that closes a tag never opened: printed as markup, rich raises MarkupError


def test_markup_in_agent_and_job_text_is_printed_as_text(farm, tmp_path):
    info = {"key": MARKUP, "agent_id": f"{MARKUP}agent", "hostname": MARKUP, "cpu_model": f"{MARKUP}cpu",
            "target": {"kind": f"{MARKUP}llvm", "mcpu": MARKUP}}
    assert heartbeat(farm, {"info": info, "interval_s": 2}).status_code == 200
    code, out = cli(farm, ["devices"], "devices-markup")
    assert code == 0 and f"{MARKUP}agent" in out and f"{MARKUP}cpu" in out and f"{MARKUP}llvm" in out, out
    # A job on that key: its worker finds no agent on the tracker, and its error names the key.
    job_file = write_job(tmp_path / "markup.yaml", "markup", {"source": "builtin", "name": "matmul"}, 8, key=MARKUP,
                         runner={"device_wait_sec": 0})
    code, out = cli(farm, ["submit", job_file], "submit-markup")
    assert code == 0 and "submitted markup" in out, out
    failed = wait_state(farm, "markup", ("failed",), 180)
    assert f"no agent serves key '{MARKUP}'" in failed["error"], failed
    code, out = cli(farm, ["jobs"], "jobs-markup")
    assert code == 0 and "markup" in out and f"'{MARKUP}'" in out and "Traceback" not in out, out
    code, out = cli(farm, ["delete", "markup"], "delete-markup")
    assert code == 0 and "deleted markup" in out, out


def test_concurrent_submissions_of_one_name_give_one_job_with_its_own_upload_then_delete(farm, tmp_path):
    """12 submissions of one name at once, each with its own ONNX file: one 201, eleven 409, and the job keeps
    the file its own request sent. Then `tunefarm delete` refuses it while it is live, and removes it after."""
    job_file = write_job(tmp_path / "race.yaml", "race", {"source": "onnx", "path": "m.onnx"}, 8)
    text = job_file.read_text()
    bodies = []
    for seed in range(12):
        _onnx_matmul(tmp_path / f"m{seed}.onnx", seed=seed)
        bodies.append((tmp_path / f"m{seed}.onnx").read_bytes())
    gate = threading.Barrier(len(bodies))

    def one(body):
        gate.wait()
        return api(farm, "POST", "/api/jobs", files={"job": (None, text), "model": ("m.onnx", body)})

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(one, bodies))
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [201] + [409] * (len(bodies) - 1), [(r.status_code, r.text[:200]) for r in answers]
    refused = [r.json()["error"] for r in answers if r.status_code == 409]
    assert all("a job named 'race' is already on this farm" in message for message in refused), refused
    winner = [b for b, r in zip(bodies, answers) if r.status_code == 201][0]
    job = api(farm, "GET", "/api/jobs/race").json()
    upload = Path(job["spec"]["model"]["path"])
    assert upload.read_bytes() == winner and sorted(p.name for p in upload.parent.iterdir()) == ["m.onnx"]
    farm_dir = farm["base"] / "logs" / "farm"
    assert not list((farm_dir / "tmp").glob("upload-*"))  # each refused request removed its own file

    code, out = cli(farm, ["delete", "race"], "delete-live")
    assert code == 2 and "cancel it first (tunefarm cancel race)" in out, out
    assert api(farm, "GET", "/api/jobs/race").status_code == 200
    code, out = cli(farm, ["cancel", "race"], "cancel-race")
    assert code == 0, out
    wait_state(farm, "race", ("cancelled",), 60)
    code, out = cli(farm, ["delete", "race"], "delete-race")
    assert code == 0 and "deleted race" in out, out
    assert api(farm, "GET", "/api/jobs/race").status_code == 404
    for path in (upload.parent, farm_dir / "specs" / "race.yaml", farm_dir / "runs" / "race.log",
                 farm["base"] / "logs" / "race"):
        assert not path.exists(), path
    code, out = cli(farm, ["delete", "race"], "delete-gone")
    assert code == 2 and "no job 'race' on this farm" in out, out
    # A dashboard session may read, never delete: that needs the token.
    session = requests.Session()
    assert session.post(farm["url"] + "/login", data={"token": farm["token"]}, timeout=10).status_code == 200
    assert session.get(farm["url"] + "/api/jobs/q-onnx", timeout=10).status_code == 200
    assert session.delete(farm["url"] + "/api/jobs/q-onnx", timeout=10).status_code == 401
    assert api(farm, "GET", "/api/jobs/q-onnx").json()["state"] == "cancelled"


# -- hostile input, round two (issue 32): each refused in one line, and the farm keeps serving ------------
def one_line_error(out: str) -> str:
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tunefarm: error: "), out
    return lines[0]


def still_serving(farm: dict) -> None:
    assert api(farm, "GET", "/api/info").status_code == 200
    assert farm["host"].poll() is None


def test_a_target_preset_is_a_name_never_a_path_on_the_host(farm, tmp_path):
    """`target: /some/dir/evil` read /some/dir/evil.yaml and echoed its target (issue 32, item 2)."""
    (tmp_path / "evil.yaml").write_text("target: {kind: llvm-EVIL-ECHO}\n")
    (tmp_path / "latin1.yaml").write_bytes(b"target: {kind: llvm, mcpu: \xe9\xff}\n")
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))
    (tmp_path / "bomb.yaml").write_text(bomb + "target: *i\n")
    job = "name: evil\nmodel: {source: builtin, name: matmul}\ndevice: {key: cpu}\n"
    presets = "intel-igpu-opencl, nvidia-h100, x86-avx512"
    for name in ("evil", "latin1", "bomb"):
        target = str(tmp_path / name)
        start = time.monotonic()
        resp = api(farm, "POST", "/api/jobs", files={"job": (None, job + f"target: '{target}'\n")})
        assert time.monotonic() - start < 10, name
        error = resp.json()["error"]
        assert resp.status_code == 400 and error == (
            f"job target: unknown target {target!r}: not a preset ({presets}), not a TVM tag, not a JSON dict"), \
            resp.text[:300]
        assert "EVIL-ECHO" not in resp.text and len(resp.content) < 1000
    resp = api(farm, "POST", "/api/jobs", files={"job": (None, job + "target: ../targets/x86-avx512\n")})
    assert resp.status_code == 400 and "unknown target '../targets/x86-avx512'" in resp.json()["error"], resp.text
    assert api(farm, "GET", "/api/jobs/evil").status_code == 404
    still_serving(farm)


def test_delete_removes_only_the_directory_the_farm_created_for_the_job(farm, tmp_path):
    """A directory under logs/ that the farm did not create is never deleted (issue 32, item 3)."""
    logs = farm["base"] / "logs"
    local = logs / "localjob"
    local.mkdir()
    (local / "results.txt").write_text("a local run's results\n")
    job_file = write_job(tmp_path / "localjob.yaml", "localjob", {"source": "builtin", "name": "matmul"}, 8)
    code, out = cli(farm, ["submit", job_file], "submit-localjob")
    assert code == 2 and one_line_error(out) == (
        f"tunefarm: error: {local} already exists on the host and is not a job of this farm; give the job "
        "another name (or move that directory away)"), out
    code, out = cli(farm, ["delete", "localjob"], "delete-localjob")
    assert code == 2 and "no job 'localjob' on this farm" in one_line_error(out), out
    assert (local / "results.txt").read_text() == "a local run's results\n"

    # A job of the farm whose directory was swapped for another: the delete is refused, nothing removed.
    assert api(farm, "GET", "/api/jobs/q-first").json()["state"] == "cancelled"
    (logs / "q-first").rename(tmp_path / "q-first-moved")
    (logs / "q-first").mkdir()
    (logs / "q-first" / "keep.txt").write_text("not the farm's\n")
    code, out = cli(farm, ["delete", "q-first"], "delete-swapped")
    assert code == 2 and one_line_error(out) == (
        f"tunefarm: error: {logs / 'q-first'} was not created by this farm for job q-first; nothing was deleted "
        "(move that directory away, then delete the job)"), out
    assert (logs / "q-first" / "keep.txt").is_file() and api(farm, "GET", "/api/jobs/q-first").status_code == 200
    assert (farm["base"] / "logs" / "farm" / "specs" / "q-first.yaml").is_file()
    # Moved back, the farm's own directory is deleted with its job.
    shutil.rmtree(logs / "q-first")
    (tmp_path / "q-first-moved").rename(logs / "q-first")
    code, out = cli(farm, ["delete", "q-first"], "delete-own")
    assert code == 0 and "deleted q-first" in out, out
    assert not (logs / "q-first").exists() and (local / "results.txt").is_file()
    still_serving(farm)


def test_a_torn_database_line_is_left_out_said_once_and_kept_aside(farm, tmp_path):
    """One torn line made `logs show`, the task table and the bundle fail (issue 32, item 4)."""
    from conftest import tear_line, tiny_database

    job_dir = farm["base"] / "logs" / "q-onnx"
    assert api(farm, "GET", "/api/jobs/q-onnx").json()["state"] == "cancelled"
    for name in ("database_tuning_record.json", "database_workload.json", "job_state.json", "verified.jsonl"):
        (job_dir / name).unlink(missing_ok=True)
    tiny_database(job_dir)
    records = job_dir / "database_tuning_record.json"
    torn = tear_line(records, 1)
    for _ in range(2):
        resp = api(farm, "GET", "/api/jobs/q-onnx/tasks")
        assert resp.status_code == 200, resp.text
        assert [(r["task"], r["trials"]) for r in resp.json()["tasks"]] == [("matmul8", 2), ("matmul16", 3)]
    assert records.read_bytes() == torn  # the service reads around the damage; it never rewrites a job's file
    assert (job_dir / "database_tuning_record.json.damaged").read_bytes() == torn
    warned = [l for l in (farm["base"] / "host.log").read_text().splitlines() if "damaged line" in l]
    assert warned == [f"tunefarm: warning: {records}: 1 damaged line(s) left out (line 2); the damaged file is "
                      "kept as database_tuning_record.json.damaged"], warned
    resp = api(farm, "GET", "/api/jobs/q-onnx/bundle")
    assert resp.status_code == 200 and resp.headers["Content-Type"] == "application/gzip", resp.text[:300]

    code, out, _ = run_cli(["logs", "show", job_dir], tmp_path / "show.log", timeout=180)
    assert code == 0 and "Traceback" not in out, out
    assert [l for l in out.splitlines() if "damaged line" in l] == [warned[0]], out
    assert "matmul16" in out
    still_serving(farm)


def test_a_refused_token_keeps_the_connection_alive(farm):
    """A 401 closed a keep-alive connection: the next request on it was reset (issue 32, item 8)."""
    import http.client

    host, port = farm["url"].rsplit("/", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    good = {"Authorization": f"Bearer {farm['token']}"}
    try:
        for method, path, body, headers in (
                ("GET", "/api/jobs", None, {}), ("GET", "/api/info", None, {"Authorization": "Bearer wrong"}),
                ("DELETE", "/api/jobs/q-onnx", None, {}),
                ("POST", "/api/devices/heartbeat", b'{"info": {}}', {"Content-Type": "application/json"})):
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            assert resp.status == 401 and b"missing or wrong token" in resp.read(), (method, path)
            conn.request("GET", "/api/info", headers=good)  # the same connection
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["service"] == "tunefarm", (method, path)
    finally:
        conn.close()
    assert api(farm, "GET", "/api/jobs/q-onnx").status_code == 200  # the refused DELETE changed nothing


def test_progress_and_files_never_follow_a_link_nor_serve_a_hard_link(farm, tmp_path):
    """/progress followed a symbolic link; a hard link to the token was served (issue 32, item 9)."""
    job_dir = farm["base"] / "logs" / "q-onnx"
    job_dir.mkdir(exist_ok=True)
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text(json.dumps({"trials": 4, "estimated_ms": 1.0, "secret": "LINKED-SECRET"}) + "\n")
    (job_dir / "progress.jsonl").unlink(missing_ok=True)
    (job_dir / "progress.jsonl").symlink_to(outside)
    resp = api(farm, "GET", "/api/jobs/q-onnx/progress")
    assert resp.status_code == 200 and "LINKED-SECRET" not in resp.text, resp.text
    token_file = farm["base"] / "logs" / "farm" / "token"
    (job_dir / "report.md").unlink(missing_ok=True)
    os.link(token_file, job_dir / "report.md")
    resp = api(farm, "GET", "/api/jobs/q-onnx/files/report.md")
    assert resp.status_code == 404 and farm["token"] not in resp.text, resp.text
    detail = api(farm, "GET", "/api/jobs/q-onnx").json()
    assert "report.md" not in detail["files"] and "progress.jsonl" not in detail["files"], detail["files"]
    resp = api(farm, "GET", "/api/jobs/q-onnx/bundle")
    assert resp.status_code == 200 and farm["token"].encode() not in gzip.decompress(resp.content)
    (job_dir / "report.md").unlink()
    (job_dir / "progress.jsonl").unlink()
    still_serving(farm)


def test_booleans_are_not_numbers_nor_strings_true(farm):
    """A heartbeat's busy/listed/stopping went through bool() ("false" was true); max_trials_per_task: true
    was taken as 1 (issue 32, item 10)."""
    info = {"key": "cpu", "agent_id": "bool-probe:1", "hostname": "bool-probe"}
    for field in ("busy", "listed", "stopping"):
        for value in ("false", 0, 1, None, [], {}):
            resp = heartbeat(farm, {"info": info, "interval_s": 2, field: value})
            assert resp.status_code == 400 and resp.json()["error"] == (
                f"heartbeat: {field} must be true or false (got {json.dumps(value)})"), (field, value, resp.text)
    assert device_row(farm, "bool-probe:1") is None  # nothing stored
    assert heartbeat(farm, {"info": info, "interval_s": 2, "busy": False, "listed": True}).status_code == 200
    assert heartbeat(farm, {"info": info, "interval_s": 2, "stopping": True}).status_code == 200
    assert device_row(farm, "bool-probe:1")["status"] == "offline"
    job = "name: booljob\nmodel: {source: builtin, name: matmul}\ndevice: {key: cpu}\n"
    for field, value in (("max_trials_per_task", "true"), ("max_trials_global", "true"), ("seed", "false"),
                         ("num_trials_per_iter", "true")):
        resp = api(farm, "POST", "/api/jobs", files={"job": (None, job + f"tuning: {{{field}: {value}}}\n")})
        assert resp.status_code == 400 and f"tuning.{field}: expected " in resp.json()["error"], (field, resp.text)
    assert api(farm, "GET", "/api/jobs/booljob").status_code == 404
    still_serving(farm)


def test_the_host_restarts_its_tracker_when_it_dies(farm, request):
    """kill -9 of the tracker the host started: the host notices, starts it again on its port, the agent
    registers again by itself, and a job runs through the new tracker (the overnight job, which the next
    tests take on)."""
    tracker_port = farm["ports"][1]
    state_path = farm["base"] / "logs" / "farm" / "tracker.json"
    old = json.loads(state_path.read_text())
    group = [p.pid for p in psutil.process_iter() if _pgid(p.pid) == old["pid"]]
    assert len(group) >= 2, group  # `tunefarm tracker` and the TVM tracker process it runs
    agent_id = agent_id_of(farm["agent"])
    os.kill(old["pid"], signal.SIGKILL)  # the process the host started, only: its TVM tracker lives on
    killed = time.monotonic()
    host_log = farm["base"] / "host.log"
    wait_until(lambda: f"tracker (pid {old['pid']}) died" in host_log.read_text(), 15, interval=0.2,
               what="the host to notice its tracker died")
    assert time.monotonic() - killed < 10

    def restarted():
        try:
            state = json.loads(state_path.read_text())
        except (OSError, ValueError):
            return False
        return state["pid"] != old["pid"] and tracker_answers(HOST, tracker_port)

    wait_until(restarted, 90, interval=0.5, what="the tracker to answer again")
    assert not [pid for pid in group if psutil.pid_exists(pid) and _pgid(pid) == old["pid"]]  # nothing left over
    assert "starting it again on port" in host_log.read_text()
    wait_until(lambda: any(a.agent_id == agent_id for a in listed_agents(HOST, tracker_port, "cpu")), 120,
               interval=1.0, what="the agent to register with the new tracker")
    assert device_row(farm, agent_id)["status"] == "online"
    night = request.getfixturevalue("night_job")
    wait_until(lambda: progress_lines(night), 300, interval=1.0, what="the overnight job's first measured batch")


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _browser(tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1300",
                f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-', dir=tmp_path)}"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def _chart_pixels(png: Path) -> int:
    """Pixels of the chart's line colour (the line and points drawn from data; axes and grid are grey)."""
    from PIL import Image

    image = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int((np.abs(image - np.array(CHART_RGB)).sum(axis=2) < 40).sum())


@pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them) for a real browser")
def test_dashboard_shows_devices_and_a_running_jobs_live_chart(farm, night_job, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait_until(lambda: len(progress_lines(night_job)) >= 2, 300, interval=0.5, what="two measured batches")
    browser = _browser(tmp_path)
    try:
        browser.get(farm["url"] + "/jobs/night")  # not signed in: the sign-in page, then back to the job
        browser.find_element(By.ID, "token").send_keys(farm["token"])
        browser.find_element(By.ID, "signin").click()
        chart = browser.find_element(By.ID, "chart-trials")
        WebDriverWait(browser, 30).until(lambda b: int(chart.get_attribute("data-points") or 0) >= 2)
        WebDriverWait(browser, 30).until(lambda b: "fused_matmul_add" in b.find_element(By.ID, "tasks").text)
        summary = browser.find_element(By.ID, "job-summary")
        assert summary.get_attribute("data-state") == "running", summary.text
        links = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "#downloads a")]
        assert "progress.jsonl" in links and "database_tuning_record.json" in links, links
        browser.save_screenshot(str(tmp_path / "job-page.png"))
        chart.screenshot(str(tmp_path / "chart.png"))
        assert _chart_pixels(tmp_path / "chart.png") > 150, "the chart shows no data line"

        browser.get(farm["url"] + "/")
        WebDriverWait(browser, 20).until(lambda b: agent_id_of(farm["agent"]) in b.find_element(By.ID, "devices").text)
        WebDriverWait(browser, 20).until(lambda b: b.find_elements(By.CSS_SELECTOR, 'tr.job-row[data-state="running"]'))
        devices = browser.find_element(By.ID, "devices").text
        assert "online" in devices and "llvm" in devices and "night" in devices, devices
        browser.save_screenshot(str(tmp_path / "index.png"))
    finally:
        browser.quit()
        shots = os.environ.get("TUNEFARM_TEST_SCREENSHOTS")
        if shots:  # for a person to look at
            for name in ("job-page.png", "chart.png", "index.png"):
                if (tmp_path / name).exists():
                    shutil.copy(tmp_path / name, Path(shots) / name)


def test_overnight_job_survives_kill_9_of_the_host_and_is_pulled(farm, night_job, tmp_path):
    """submitted (night_job) -> follow (live) -> kill -9 the host mid-job -> start it again -> the job finishes
    with every earlier record kept -> pull -> apply the best records with plain TVM."""
    job_dir = night_job
    follow_log = tmp_path / "follow.log"
    follower = start_tunefarm(["follow", "night"], log_path=follow_log, env=farm["env"])
    try:
        wait_until(lambda: len(progress_lines(job_dir)) >= 2 or follower.poll() is not None, 300, interval=0.2,
                   what="two measured batches")
        wait_until(lambda: "batch of 4 on fused_matmul_add" in follow_log.read_text(), 60, interval=0.2,
                   what="follow to print a batch")
        # Ctrl-C stops following, not the job.
        watcher = start_tunefarm(["follow", "night"], log_path=tmp_path / "follow2.log", env=farm["env"])
        wait_until(lambda: "batch of 4" in (tmp_path / "follow2.log").read_text(), 60, interval=0.2,
                   what="a second follower to print a batch")
        os.kill(watcher.pid, signal.SIGINT)
        try:
            assert watcher.wait(30) == 0
        finally:
            stop_process(watcher)  # never leave it retrying after a failure
        assert "stopped following; night goes on at the farm" in (tmp_path / "follow2.log").read_text()
        before = records(job_dir)
        assert api(farm, "GET", "/api/jobs/night").json()["state"] == "running"
        assert 8 <= len(before) < NIGHT_TRIALS, len(before)

        kill_hard(farm["host"])  # the host only: its workers and tracker live in their own process groups
        with pytest.raises(requests.ConnectionError):
            api(farm, "GET", "/api/info")
        farm["host"] = start_host(farm["base"], *farm["ports"], "--config", farm["base"] / "farm.yaml")

        done = wait_state(farm, "night", ("done", "failed"), JOB_DONE_S)
        assert done["state"] == "done", done
        assert follower.wait(60) == 0, follow_log.read_text()
    finally:
        if follower.poll() is None:
            stop_process(follower)
    after = records(job_dir)
    assert after[:len(before)] == before  # every record from before the kill is kept
    job = api(farm, "GET", "/api/jobs/night").json()
    notes = [note for _, note in job["history"]]
    assert job["attempts"] == 2 and any("the host stopped while this job ran" in n for n in notes), notes
    # The second attempt counted what the first measured and measured only the rest of the budget.
    run_log = (farm["base"] / "logs" / "farm" / "runs" / "night.log").read_text()
    second = run_log.split("attempt 2 ===", 1)[1]
    measured_before = int(second.split("resuming: ", 1)[1].split(" already measured", 1)[0])
    assert measured_before >= 8  # the two batches seen before the kill
    events = progress_lines(job_dir)
    trials = [e["trials"] for e in events]
    assert trials == sorted(trials) and trials[-1] == NIGHT_TRIALS
    assert sum(e["batch"] for e in events if e["trials"] > measured_before) == NIGHT_TRIALS - measured_before
    followed = follow_log.read_text()
    assert "retrying" in followed and "job night: running (attempt 2)" in followed, followed
    assert "job night done" in followed
    host_log = (farm["base"] / "host.log").read_text()
    assert "still running from before" in host_log  # the tracker survived and was taken over

    out_dir = tmp_path / "pulled"
    code, out = cli(farm, ["pull", "night", "-o", out_dir], "pull", timeout=300)
    assert code == 0 and "pulled night" in out, out
    report = json.loads((out_dir / "report.json").read_text())
    assert report["ok"] and report["tuning"]["trials_measured_total"] == len(after), report["problems"]
    assert (out_dir / "database" / "database_tuning_record.json").read_text().splitlines() == after
    assert len((out_dir / "best" / "database_tuning_record.json").read_text().splitlines()) == 1
    assert (out_dir / "report.md").is_file() and (out_dir / "progress.jsonl").is_file()
    apply_best_with_plain_tvm(out_dir / "best", json.loads((out_dir / "database" / "job_state.json").read_text()))


def test_files_and_the_pull_bundle_never_follow_a_link_out_of_the_job_dir(farm, night_job, tmp_path):
    token_file = farm["base"] / "logs" / "farm" / "token"
    (night_job / "leak.png").symlink_to(token_file)
    (night_job / "leak.svg").symlink_to(token_file.parent)
    resp = api(farm, "GET", "/api/jobs/night/files/leak.png")
    assert resp.status_code == 404 and farm["token"] not in resp.text, resp.text
    files = api(farm, "GET", "/api/jobs/night").json()["files"]
    assert "leak.png" not in files and "leak.svg" not in files and "report.md" in files, files
    assert api(farm, "GET", "/api/jobs/night/files/report.md").status_code == 200
    out_dir = tmp_path / "pulled"
    code, out = cli(farm, ["pull", "night", "-o", out_dir], "pull-links", timeout=300)
    assert code == 0 and "pulled night" in out, out
    pulled = [p for p in out_dir.rglob("*") if p.is_file()]
    assert (out_dir / "report.md") in pulled and not (out_dir / "leak.png").exists()
    assert not any(farm["token"].encode() in p.read_bytes() for p in pulled)


def test_device_goes_offline_when_its_heartbeats_stop(farm):
    """Last in this module: it stops the shared agent (kill -9, so no goodbye reaches the farm)."""
    agent_id = agent_id_of(farm["agent"])
    kill_hard(farm["agent"])
    start = time.monotonic()

    def offline():
        view = api(farm, "GET", "/api/devices").json()
        return [d for d in view["devices"] if d["agent_id"] == agent_id and d["status"] == "offline"]

    wait_until(offline, 30, interval=0.5, what="the killed agent to show offline")
    assert time.monotonic() - start < 20
    code, out = cli(farm, ["devices"], "devices-offline")
    assert code == 0 and agent_id in out and "offline" in out, out
