"""Control characters a peer sends never reach an operator's terminal or a log raw (issue 32, item 6).

A refused registration (no credential at all) with a key holding ``ESC[2J`` reached ``tunefarm devices``, the
tracker's log and, through the host service, ``devices --farm`` and ``jobs``: rich escapes markup, not control
characters. Real tracker, real host service, the ``tunefarm`` commands as a user runs them.
"""
from __future__ import annotations

import json
import socket
import struct
import time

import requests
import yaml

from conftest import HOST, run_cli, start_host
from tunefarm.core.procs import free_port, stop_process, wait_until
from tunefarm.core.safe_text import printable
from tunefarm.tracker.client import TrackerClient

TRACKER_MAGIC = 0x2F271
UPDATE_INFO, PUT = 5, 3
EVIL = "\x1b[2J\x1b]0;owned\x07\u202eevil\r"  # clear screen, set the title, right-to-left override, carriage return


def test_printable_escapes_what_a_terminal_would_obey():
    assert printable("plain key-1 [x] é 日本") == "plain key-1 [x] é 日本"
    assert printable(EVIL) == "\\x1b[2J\\x1b]0;owned\\x07\\u202eevil\\x0d"
    assert printable("a\nb\tc\x7f\x9b") == "a\\x0ab\\x09c\\x7f\\x9b"
    assert printable("x" * 50, limit=10) == "xxxxxxx..."


def _register_without_the_key(host: str, port: int, key: str) -> None:
    """What a stock server does: UPDATE_INFO then PUT; the farm's tracker refuses it and closes."""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(struct.pack("<i", TRACKER_MAGIC))
        assert struct.unpack("<i", sock.recv(4))[0] == TRACKER_MAGIC
        body = json.dumps([UPDATE_INFO, {"key": f"server:{key}", "addr": [None, 9091]}]).encode()
        sock.sendall(struct.pack("<i", len(body)) + body)
        assert sock.recv(4096) == b""  # refused: closed without an answer


def _raw_free(text: str) -> bool:
    return not any(c in text for c in "\x1b\x07\u202e\r")


def test_a_refused_key_with_escapes_is_printed_escaped_by_devices_and_the_tracker_log(tracker, tmp_path):
    host, port = tracker
    _register_without_the_key(host, port, EVIL)
    with TrackerClient(host, port) as client:
        wait_until(lambda: any(r["key"] == EVIL for d in client.devices() for r in d["refused"]), 30,
                   what="the refused registration in the summary")
    code, table, _ = run_cli(["devices", "--tracker", f"{host}:{port}"], tmp_path / "devices.txt")
    assert code == 0, table
    assert "REFUSED" in table and "evil" in table and _raw_free(table), repr(table)
    # JSON keeps the key as sent (JSON escapes it), for scripts.
    code, output, _ = run_cli(["devices", "--tracker", f"{host}:{port}", "--json"], tmp_path / "devices.json")
    assert code == 0 and json.loads(output)[0]["refused"][0]["key"] == EVIL
    wait_until(lambda: "\\x1b[2J" in (tmp_path / "tracker.log").read_text(errors="replace"), 10,
               what="the refusal line in the tracker's log")
    log = (tmp_path / "tracker.log").read_text(errors="replace")
    assert "cannot register a server on key '\\x1b[2J\\x1b]0;owned\\x07\\u202eevil\\x0d'" in log, log
    assert _raw_free(log), repr(log)


def test_escapes_from_the_network_are_printed_escaped_by_devices_farm_and_jobs(tmp_path):
    http_port, tracker_port = free_port(HOST), free_port(HOST)
    host = start_host(tmp_path, http_port, tracker_port)
    try:
        url = f"http://{HOST}:{http_port}"
        token = (tmp_path / "logs" / "farm" / "token").read_text().strip()
        env = {"TUNEFARM_FARM": url, "TUNEFARM_TOKEN": token,
               "TUNEFARM_CLIENT_CONFIG": str(tmp_path / "no-client-config.yaml")}
        headers = {"Authorization": f"Bearer {token}"}
        # No credential: a registration at the farm's tracker.
        _register_without_the_key(HOST, tracker_port, EVIL)
        # An agent's heartbeat and a job (the token's holder) carry the same text.
        info = {"key": EVIL, "agent_id": f"{EVIL}agent", "hostname": EVIL, "cpu_model": f"{EVIL}cpu",
                "target": {"kind": "llvm", "mcpu": EVIL}}
        answer = requests.post(f"{url}/api/devices/heartbeat", headers=headers, timeout=30,
                               data=json.dumps({"info": info, "interval_s": 30}))
        assert answer.status_code == 200, answer.text
        job = {"name": "escapes", "model": {"source": "builtin", "name": "matmul"}, "device": {"key": EVIL},
               "tuning": {"max_trials_global": 8}, "runner": {"device_wait_sec": 600},
               "evaluate": {"baselines": [], "require_speedup": False}}
        (tmp_path / "escapes.yaml").write_text(yaml.safe_dump(job))
        code, out, _ = run_cli(["submit", tmp_path / "escapes.yaml"], tmp_path / "submit.txt", env=env, timeout=120)
        assert code == 0 and "submitted escapes" in out and _raw_free(out), repr(out)
        code, out, _ = run_cli(["devices"], tmp_path / "devices-farm.txt", env=env, timeout=120)
        assert code == 0 and "\\x1b[2J\\x1b]0;owned" in out and "escapes" in out and _raw_free(out), repr(out)
        code, out, _ = run_cli(["jobs"], tmp_path / "jobs.txt", env=env, timeout=120)
        assert code == 0 and "escapes" in out and "\\x1b[2J" in out and _raw_free(out), repr(out)
        code, out, _ = run_cli(["cancel", "escapes"], tmp_path / "cancel.txt", env=env, timeout=120)
        assert code == 0, out
        time.sleep(1)
        log = (tmp_path / "host.log").read_text(errors="replace")
        assert "job escapes: submitted" in log and "\\x1b[2J" in log and _raw_free(log), repr(log)
        assert host.poll() is None
    finally:
        stop_process(host)
