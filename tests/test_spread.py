"""The search spread over search workers (issue 16, item 3), for real: a tracker, a device agent and
``tunefarm search-worker`` processes on loopback, a tiny model tuned by ``tunefarm tune`` with ``search.workers``.

The merged database is the job's one database (budget, resume and report as for a job searched on the host);
a rogue worker holding the farm key is refused record by record and shunned, and its share goes to an honest one.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import HOST, agent_id_of, run_cli, spawn_agent, start_tracker, wait_listed
from test_tuning import records, write_job
from tunefarm.core.procs import free_port, start_tunefarm, stop_process, wait_until

TUNE_TIMEOUT_S = 900


def _search_worker(port: int, log: Path, cpus=None) -> subprocess.Popen:
    return start_tunefarm(["search-worker", "--tracker", f"{HOST}:{port}", "--host", HOST, "--port", free_port(HOST)],
                          log, cpus=cpus)


def _slow_search_worker(port: int, log: Path, agent_id: str) -> subprocess.Popen:
    """tests/slow_search_worker.py: a search worker whose share's search waits until the host takes tasks from it."""
    first = free_port(HOST)
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("slow_search_worker.py")), "--tracker", f"{HOST}:{port}",
             "--key", "search", "--host", HOST, "--port", str(first), "--port-end", str(first + 50),
             "--info-json", json.dumps({"agent_id": agent_id, "key": "search"})],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def _flat(out: str) -> str:
    """The console's text with its line wrapping undone."""
    return " ".join(out.split())


def _shares(out: str) -> list[tuple[int, int, str]]:
    """(merged, share trials, its search workers) of each 'search share:' line of the run's summary."""
    return [(int(m), int(t), who) for m, t, who in
            re.findall(r"search share: \d+ task\(s\), (\d+)/(\d+) trials merged from ([^;]*?)(?=; | search share| measured on|$)",
                       _flat(out))]


def _stolen(out: str) -> list[tuple[int, int, str, int]]:
    """(tasks, merged, its search workers, the share it came from) of each share taken over from another."""
    lines = _flat(out).split(" measured on:")[0].split("search share: ")[1:]
    return [(int(n), int(m), who, int(src)) for line in lines for n, m, who, src in
            re.findall(r"^(\d+) task\(s\), (\d+)/\d+ trials merged from ([^;]*?); "
                       r"tasks not begun taken over from share (\d+)", line)]


def _replay_all(job_dir: Path) -> int:
    """Every record of the job's database replays on its workload's module (the host's own modules)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    database = ms.database.JSONDatabase(str(job_dir / "database_workload.json"),
                                        str(job_dir / "database_tuning_record.json"), allow_missing=False)
    recs = database.get_all_tuning_records()
    for rec in recs:
        rec.trace.apply_to_schedule(tvm.s_tir.Schedule(rec.workload.mod), remove_postproc=False)
    return len(recs)


def test_two_search_workers_share_one_job_budget_database_and_resume(tmp_path):
    """One worker is slow (each share it takes waits until the host takes tasks from it): the other's share
    ends first, and its worker is handed the slow share's tasks not begun (work stealing)."""
    port = free_port(HOST)
    tracker = start_tracker(port, tmp_path / "tracker.log")
    procs = []
    try:
        agent = spawn_agent(HOST, port, "cpu", tmp_path / "agent.log")
        procs.append(agent)
        fast = _search_worker(port, tmp_path / "search0.log", cpus=[0])
        slow = _slow_search_worker(port, tmp_path / "search1.log", "slow:1")
        procs += [fast, slow]
        wait_listed(agent, HOST, port, "cpu", tmp_path / "agent.log")
        wait_listed(fast, HOST, port, "search", tmp_path / "search0.log")
        from tunefarm.tracker.client import TrackerClient

        with TrackerClient(HOST, port) as client:
            wait_until(lambda: client.servers_for_key("search") == 2, 60, what="the slow worker to register")
        logs = tmp_path / "logs"
        job = write_job(tmp_path / "job.yaml", "spread", port, "cpu", {"source": "builtin", "name": "convnet"},
                        trials=24, per_iter=4, search={"workers": 2})
        code, out, _ = run_cli(["tune", job, "--logs-dir", logs], tmp_path / "tune1.log", TUNE_TIMEOUT_S)
        assert code == 0, out
        out = _flat(out)
        assert "search spread over 2 search worker(s) on key 'search'" in out, out
        assert "this run: 24 trial(s) measured" in out, out
        shares = _shares(out)
        assert len(shares) == 3 and sum(m for m, _, _ in shares) == sum(t for _, t, _ in shares) == 24, out
        # each share searched by one worker, and both worked: the slow one's tasks not begun went to the fast one
        assert {agent_id_of(fast), "slow:1"} == {who for _, _, who in shares}, out
        stolen = _stolen(out)
        assert len(stolen) == 1 and stolen[0][0] >= 1 and stolen[0][1] > 0, out
        assert stolen[0][2] == agent_id_of(fast) and shares[stolen[0][3] - 1][2] == "slow:1", out
        job_dir = logs / "spread"
        first = records(job_dir)
        assert len(first) == 24 and _replay_all(job_dir) == 24
        report = json.loads((job_dir / "report.json").read_text())
        assert report["ok"], report["problems"]
        # the merged records are the job's schedules: every task tuned, the tuned build checked and faster
        assert report["schedules"]["tasks_without_record"] == []
        assert report["schedules"]["tuned"] == report["schedules"]["tir_functions"] > 0
        res = report["results"]
        assert res["tvm-tuned"]["numerics"]["ok"]
        assert res["tvm-tuned"]["latency"]["median_ms"] < res["tvm-untuned"]["latency"]["median_ms"]
        assert report["tuning"]["search"]["workers"] == 2
        per_worker = report["tuning"]["search"]["per_worker"]
        assert sum(per_worker.values()) == 24 and per_worker[agent_id_of(fast)] > per_worker["slow:1"] > 0, per_worker
        # each share's worker said where its time went: its start-up and its tuning loop's profile
        for share in report["tuning"]["search"]["shares"]:
            split = share["time_split"]
            assert share["setup_s"] > 0 and split["search_s"] > 0 and split["build_s"] > 0, share
            assert split["wall_s"] >= split["search_s"] + split["build_s"] + split["model_update_s"], share
        taken = [s for s in report["tuning"]["search"]["shares"] if s["stolen_from"] is not None]
        assert len(taken) == 1 and set(taken[0]["tasks"]).isdisjoint(report["tuning"]["search"]["shares"][
            taken[0]["stolen_from"]]["tasks"]), report["tuning"]["search"]["shares"]
        # measured on the job's device agent (the workers' FarmRunners), the valid ones counted
        assert set(report["tuning"]["per_agent"]) == {agent_id_of(agent)}
        assert 0 < report["tuning"]["per_agent"][agent_id_of(agent)] <= 24
        assert len((job_dir / "progress.jsonl").read_text().splitlines()) >= 2

        # A larger budget resumes from the merged database: earlier records kept, only the new trials measured.
        write_job(tmp_path / "job.yaml", "spread", port, "cpu", {"source": "builtin", "name": "convnet"},
                  trials=32, per_iter=4, search={"workers": 2})
        code, out, _ = run_cli(["tune", job, "--logs-dir", logs, "--skip-eval"], tmp_path / "tune2.log", TUNE_TIMEOUT_S)
        assert code == 0, out
        out = _flat(out)
        assert "this run: 8 trial(s) measured" in out and "32 measured by this job in all" in out, out
        now = records(job_dir)
        assert now[:24] == first and len(now) == 32 and _replay_all(job_dir) == 32
    finally:
        for proc in procs:
            stop_process(proc)
        stop_process(tracker)


def test_a_rogue_search_worker_is_refused_and_shunned_and_its_share_goes_on(tmp_path):
    port = free_port(HOST)
    tracker = start_tracker(port, tmp_path / "tracker.log")
    procs = []
    try:
        agent = spawn_agent(HOST, port, "cpu", tmp_path / "agent.log")
        honest = _search_worker(port, tmp_path / "honest.log")
        procs += [agent, honest]
        first = free_port(HOST)
        with open(tmp_path / "rogue.log", "ab") as log:
            rogue = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("rogue_search_worker.py")), "--tracker",
                 f"{HOST}:{port}", "--key", "search", "--host", HOST, "--port", str(first), "--port-end",
                 str(first + 50), "--info-json", json.dumps({"agent_id": "rogue:1", "key": "search"})],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        procs.append(rogue)
        wait_listed(agent, HOST, port, "cpu", tmp_path / "agent.log")
        wait_listed(honest, HOST, port, "search", tmp_path / "honest.log")
        from tunefarm.tracker.client import TrackerClient

        with TrackerClient(HOST, port) as client:
            wait_until(lambda: client.servers_for_key("search") == 2, 60, what="the rogue to register")
        logs = tmp_path / "logs"
        # A short wait for a free worker: the rogue's share, shunned, waits past it for the honest worker to finish
        # the other share (the run's workers are all busy, not gone).
        job = write_job(tmp_path / "job.yaml", "victim", port, "cpu", {"source": "builtin", "name": "convnet"},
                        trials=16, per_iter=4, search={"workers": 2}, runner={"device_wait_sec": 5})
        code, raw, _ = run_cli(["tune", job, "--logs-dir", logs, "--skip-eval"], tmp_path / "tune.log", TUNE_TIMEOUT_S)
        assert code == 0, raw
        out = _flat(raw)
        assert "search worker rogue:1 shunned" in out and "SHUNNED search worker rogue:1" in out, out
        assert "search worker record refused" in out, out
        # Its text is printed as text: the markup shows literally, the control character does not reach the terminal.
        assert "[bold red]pwned[/]" in out and "\x1b" not in raw, out
        # Both shares were measured in full by the honest worker; nothing the rogue sent entered the database.
        assert "this run: 16 trial(s) measured" in out, out
        shares = _shares(out)
        assert sum(m for m, _, _ in shares) == 16 and all(agent_id_of(honest) in rest for _, _, rest in shares), out
        job_dir = logs / "victim"
        assert len(records(job_dir)) == 16 and _replay_all(job_dir) == 16
        measured_on = out.rsplit("measured on:", 1)[1]
        assert "fake-agent" not in measured_on and agent_id_of(agent) in measured_on, measured_on
        assert rogue.poll() is None and honest.poll() is None  # nobody crashed
    finally:
        for proc in procs:
            stop_process(proc)
        stop_process(tracker)


def test_shares_deal_costly_tasks_apart_and_split_the_budget_exactly():
    from tunefarm.host.search_workers.dealing import deal, split_trials

    shares = deal({0: 100.0, 1: 90.0, 2: 10.0, 3: 5.0, 4: 1.0}, 2)
    assert shares == [[0, 3], [1, 2, 4]]  # 105 against 101
    # One huge task and nine small ones: the counts stay even (a share's wall time is its trials, not its
    # FLOPs); each share starts with its costliest task (its search covers the build pool's start), the rest
    # in the run's order (the dict's, not the indices').
    shares = deal({9: 1.0, 0: 1000.0, **{i: 1.0 for i in range(1, 9)}}, 2)
    assert [len(s) for s in shares] == [5, 5] and shares == [[0, 9, 3, 5, 7], [1, 2, 4, 6, 8]], shares
    assert sorted(len(s) for s in deal({i: float(i * i) for i in range(19)}, 4)) == [4, 5, 5, 5]
    assert deal({0: 1.0, 1: 1.0}, 4) == [[0], [1]]  # never more shares than tasks
    # A light task (fewer candidates than a round) is not counted: dealt after the others, where fewest are.
    assert deal({0: 5.0, 1: 4.0, 2: 3.0, 3: 2.0, 4: 1.0}, 2, {4}) == [[0, 3, 4], [1, 2]]
    assert deal({0: 5.0, 1: 4.0, 2: 3.0, 3: 2.0, 4: 1.0}, 2, {0}) == [[1, 0, 4], [2, 3]]  # a light one never first


def test_the_budget_evens_out_the_shares_rounds_after_each_tasks_first():
    from tunefarm.host.search_workers.dealing import split_trials

    # ResNet-18 on 4 workers (the lent machine's run): 18 conv-like tasks and reshape (one candidate), 16 a
    # round, 64 a task: even shares, so the 4-task shares run as many rounds as the 5-task ones.
    assert split_trials(320, [80, 80, 65, 64], [320, 320, 257, 256]) == [80, 80, 80, 80]
    assert split_trials(300, [80, 80, 80, 48]) == [80, 80, 80, 60]  # nobody below its first round
    assert split_trials(7, [1, 1, 1]) == [3, 2, 2]
    # Too few for a round each: in proportion to the needs, summing to the budget exactly.
    assert split_trials(60, [80, 40]) == [40, 20] and split_trials(5, [2, 1]) == [3, 2]
    # Never beyond what a share's tasks may measure (the budget is then not all spent).
    assert split_trials(1000, [16, 16], [64, 500]) == [64, 500]
    assert split_trials(400, [16, 16], [64, 500]) == [64, 336]
    assert split_trials(0, [16, 16]) == [0, 0] and split_trials(10, [0, 0], [0, 0]) == [0, 0]


def test_a_task_without_choices_has_as_many_candidates_as_design_spaces():
    import tvm
    from tvm import te

    from tunefarm.host.tuning.intrinsics import load_for
    from tunefarm.host.search_workers.dealing import task_capacity

    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    load_for(target)
    a = te.placeholder((4, 6), name="a")
    flat = te.compute((24,), lambda i: a[i // 6, i % 6], name="flat")  # a reshape: nothing to decide
    b = te.placeholder((6, 8), name="b")
    k = te.reduce_axis((0, 6), name="k")
    mm = te.compute((4, 8), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="mm")
    assert task_capacity(tvm.IRModule({"main": te.create_prim_func([a, flat])}), target) == 1
    assert task_capacity(tvm.IRModule({"main": te.create_prim_func([a, b, mm])}), target) is None  # tiles


def test_a_poll_answer_that_does_not_add_up_is_refused():
    import pytest

    from tunefarm.host.search_workers.protocol import WorkerLied, check_reply

    good = {"records": [{"task": 0}], "next": 5, "done": False, "per_agent": {"a": 1},
            "failures": {"timeout": 2, "error": 1}, "build_failures": {"timeout": 1}}
    checked = check_reply(json.dumps(good), 4)
    assert checked["next"] == 5 and checked["failures"] == {"timeout": 2, "error": 1}
    assert checked["build_failures"] == {"timeout": 1}
    assert check_reply(json.dumps({"records": [], "next": 4}), 4)["failures"] == {}  # counts are optional
    for bad in ("not json", json.dumps([1]), json.dumps({**good, "next": 9}), json.dumps({**good, "next": True}),
                json.dumps({**good, "records": [{}] * 300, "next": 304}),
                json.dumps({**good, "per_agent": {"a": -1}}), json.dumps({**good, "per_agent": {"a": "x"}}),
                json.dumps({**good, "failures": {"[red]made up[/]": 1}}), json.dumps({**good, "failures": [1]}),
                json.dumps({**good, "build_failures": {"timeout": 10 ** 12}})):
        with pytest.raises(WorkerLied):
            check_reply(bad, 4)
    with pytest.raises(WorkerLied):
        check_reply("x" * ((64 << 20) + 1), 0)
    assert check_reply(json.dumps({**good, "unstarted": 3}), 4)["unstarted"] == 3
    assert checked["unstarted"] == 0  # optional
    for bad in (-1, True, "2", 10 ** 6):
        with pytest.raises(WorkerLied):
            check_reply(json.dumps({**good, "unstarted": bad}), 4)
    # where the share's time went (the report's breakdown): seconds, finite, not negative, few printable scopes
    timed = check_reply(json.dumps({**good, "setup_s": 1.5, "profile": {"SendToBuilder": 3.25, "Total": 9}}), 4)
    assert timed["setup_s"] == 1.5 and timed["profile"] == {"SendToBuilder": 3.25, "Total": 9.0}
    assert checked["setup_s"] is None and checked["profile"] == {}  # optional
    for bad in ({"setup_s": -1}, {"setup_s": float("nan")}, {"setup_s": "1"}, {"setup_s": True},
                {"setup_s": 1e9}, {"profile": [1]}, {"profile": {"Total": float("inf")}},
                {"profile": {"Total": -0.5}}, {"profile": {"": 1}}, {"profile": {"a\x1b[2J": 1}},
                {"profile": {f"s{i}": 1 for i in range(65)}}, {"profile": {"x" * 101: 1}}):
        with pytest.raises(WorkerLied):
            check_reply(json.dumps({**good, **bad}), 4)


def test_a_release_answer_gives_back_only_tasks_and_trials_the_share_still_had():
    import pytest

    from tunefarm.host.search_workers.protocol import WorkerLied, check_release

    # 5 tasks sent, position 1 released earlier, asked for 2, 40 trials left in the share
    assert check_release(json.dumps({"released": [3, 4], "trials": 32}), 5, {1}, 2, 40) == ([3, 4], 32)
    assert check_release(json.dumps({"released": [], "trials": 0}), 5, {1}, 2, 40) == ([], 0)
    for bad in ("not json", json.dumps([3]), json.dumps({"released": [3, 4, 2], "trials": 8}),  # more than asked
                json.dumps({"released": [1], "trials": 8}),  # released before
                json.dumps({"released": [5], "trials": 8}), json.dumps({"released": [-1], "trials": 8}),
                json.dumps({"released": [3, 3], "trials": 8}), json.dumps({"released": [True], "trials": 8}),
                json.dumps({"released": [3], "trials": 41}), json.dumps({"released": [3], "trials": -1}),
                json.dumps({"released": [], "trials": 5}), json.dumps({"released": [3], "trials": 2.5}),
                json.dumps({"released": "3", "trials": 8}), "x" * ((1 << 20) + 1)):
        with pytest.raises(WorkerLied):
            check_release(bad, 5, {1}, 2, 40)


def _share(**changes):
    """A well-formed share (what the host sends), with ``changes`` applied; a value of None deletes a field."""
    share = {"tasks": [{"name": "t0", "mod": "{}", "weight": 2.0, "left": 4, "records": []}], "trials": 4,
             "target": {"kind": "llvm"}, "pipeline": None,
             "tuning": {"population_size": 16, "num_trials_per_iter": 4}, "seed": 0, "cost_model": "xgb",
             "builder": {"workers": 1, "timeout_sec": 30.0, "key": "", "straggler_factor": 4.0},
             "runner": {"timeout_sec": 30.0, "number": 1, "repeat": 1, "min_repeat_ms": 0,
                        "enable_cpu_cache_flush": False, "device_wait_sec": 5.0},
             "tracker": "127.0.0.1:9190", "device_key": "cpu"}
    for name, value in changes.items():
        if value is None:
            share.pop(name)
        else:
            share[name] = value
    return share


MALFORMED_SHARES = {
    "not an object": [1, 2],
    "a field missing": _share(runner=None),
    "an unknown field": {**_share(), "exec": "rm -rf /"},
    "no tasks": _share(tasks=[]),
    "a task of the wrong shape": _share(tasks=[{"name": "t0", "mod": "{}"}]),
    "a negative budget": _share(trials=-1),
    "a boolean weight": _share(tasks=[{"name": "t0", "mod": "{}", "weight": True, "left": 4, "records": []}]),
    "too many seed records": _share(tasks=[{"name": "t0", "mod": "{}", "weight": 1, "left": 4,
                                             "records": [[]] * 33}]),
    "a million builder processes": _share(builder={"workers": 1_000_000}),
    "an unknown builder field": _share(builder={"workers": 1, "command": "sh"}),
    "a string where a number goes": _share(runner={"number": "3"}),
    "a population of 10**9": _share(tuning={"population_size": 10 ** 9, "num_trials_per_iter": 4}),
    "a cost model to unpickle": _share(cost_model="/tmp/model.tar"),
    "a tracker that is no address": _share(tracker="no port:x"),
    "a control character in the key": _share(device_key="cpu\x1b[2J"),
}


def test_a_malformed_share_is_refused_by_the_worker_which_goes_on_serving(tmp_path):
    """Whoever gets a session on the search key may call the worker's functions: every malformed share is
    refused with a one-line error before anything runs, and the worker stays up and answers the next call."""
    import pytest
    import tvm

    from tunefarm.core.share import SearchShare
    from tunefarm.host.search_workers.protocol import POLL_FUNC, START_FUNC
    from tunefarm.tracker.client import request_session

    assert SearchShare.from_json(_share()).to_json() == _share()  # the host's shape passes, and is the wire form
    assert SearchShare.from_json(_share(runner={})).runner.number == 3  # what is left out: the job file's defaults
    port = free_port(HOST)
    tracker = start_tracker(port, tmp_path / "tracker.log")
    worker = None
    try:
        worker = _search_worker(port, tmp_path / "search.log")
        wait_listed(worker, HOST, port, "search", tmp_path / "search.log")
        session = request_session((HOST, port), "search", 30, 0)
        start = session.get_function(START_FUNC)
        for what, share in MALFORMED_SHARES.items():
            with pytest.raises(ValueError, match="share"):
                SearchShare.from_json(share)
            with pytest.raises(tvm.error.RPCError, match="share") as err:
                start(json.dumps(share))
            assert "Traceback" not in str(err.value).splitlines()[-1], what
        with pytest.raises(tvm.error.RPCError, match="not JSON"):
            start("{")
        with pytest.raises(tvm.error.RPCError, match="no share started"):  # none was taken
            session.get_function(POLL_FUNC)(0)
        assert worker.poll() is None
    finally:
        if worker is not None:
            stop_process(worker)
        stop_process(tracker)
