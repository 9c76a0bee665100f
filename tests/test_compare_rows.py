"""The rows of one comparison, for real: a tracker and two agents on one key (issue 36, items 5 and 6).

* Every row of a comparison runs on the same agent of its key, although the tracker hands out whichever
  agent is free (it alternates between two); when that agent dies mid-comparison, the rows after it run on
  the other one and the report says why.
* The numerics check is relative to the reference's scale: a model whose outputs are all around 1e-9 gets
  a right build passed and a wrong build failed (an absolute ``atol=1e-3`` passed both).

The test that kills an agent is last: it leaves the module's farm with one agent.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import HOST, agent_id_of, listed_agents, run_cli, spawn_agent, start_tracker, wait_listed
from tunefarm.core.procs import free_port, kill_hard, stop_process, wait_until

KEY = "pair"
COMPARE_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    """One tracker and two agents on key 'pair' (started together, waited for together)."""
    base = tmp_path_factory.mktemp("pairfarm")
    port = free_port(HOST)
    tracker = start_tracker(port, base / "tracker.log")
    agents = [spawn_agent(HOST, port, KEY, base / f"agent{i}.log") for i in range(2)]
    try:
        for i, agent in enumerate(agents):
            wait_listed(agent, HOST, port, KEY, base / f"agent{i}.log")
        yield {"port": port, "base": base, "agents": agents}
    finally:
        for agent in agents:
            stop_process(agent)
        stop_process(tracker)


def _tiny_model(seed: int):
    """A dense layer whose outputs are all about 1e-9 (weights and bias scaled down), on a (2, 8, 64) input:
    a 3-D output, so no top-1 check applies and the verdict is the relative error's alone."""
    import torch

    from tunefarm.host.models import LoadedModel

    torch.manual_seed(seed)
    module = torch.nn.Linear(64, 32).eval()
    with torch.no_grad():
        module.weight.mul_(1e-9)
        module.bias.mul_(1e-9)
    inputs = [np.random.default_rng(0).standard_normal((2, 8, 64)).astype(np.float32)]  # the same for both
    return LoadedModel("tiny", "torch", inputs, torch_module=module, fingerprint=f"tiny-{seed}")


def _untuned_build(model, target, path: Path) -> str:
    import tvm

    from tunefarm.host.models import to_relax
    from tunefarm.host.tuning.job import fuse_for_tuning

    tvm.compile(fuse_for_tuning(to_relax(model), target), target).export_library(str(path))
    return str(path)


def _comparator(farm, console, wait_s: float = 60):
    from tunefarm.host.comparator import Comparator, FarmAgents, MeasureSettings

    agents = FarmAgents((HOST, farm["port"]), wait_s, console)
    return agents, Comparator(agents, MeasureSettings(warmup=1, repeat=5, budget_s=10), console)


def test_every_row_of_a_comparison_runs_on_one_of_two_agents(farm, tmp_path):
    """``tunefarm compare`` with four rows on a key that two free agents serve: the tracker alternates
    between them, but every row runs on the agent the first row got, and both reports say so."""
    ids = {a.agent_id for a in listed_agents(HOST, farm["port"], KEY)}
    assert ids == {agent_id_of(a) for a in farm["agents"]}, ids  # both agents up and on the key
    cfg = {"name": "pinned", "tracker": f"{HOST}:{farm['port']}", "device_wait_sec": 60,
           "evaluate": {"warmup": 1, "repeat": 5, "budget_s": 10},
           "models": [{"source": "builtin", "name": "matmul"}], "baseline": "torch@pair",
           "rows": [{"backend": "tvm-untuned", "key": KEY}, {"backend": "torch", "key": KEY},
                    {"backend": "onnxruntime", "key": KEY},
                    {"backend": "tvm-untuned", "key": KEY, "label": "tvm-untuned-again@pair"}]}
    (tmp_path / "pinned.yaml").write_text(yaml.safe_dump(cfg))
    out_dir = tmp_path / "out"
    code, out, _ = run_cli(["compare", tmp_path / "pinned.yaml", "-o", out_dir], tmp_path / "compare.log",
                           COMPARE_TIMEOUT_S)
    assert code == 0, out
    report = json.loads((out_dir / "report.json").read_text())
    (model,) = report["models"]
    rows = model["rows"]
    assert [r["status"] for r in rows] == ["ok"] * 4, rows
    # before: tvm-untuned and onnxruntime on one agent, torch and the second tvm-untuned on the other
    assert [r["where"] for r in rows] == [rows[0]["where"]] * 4, [(r["label"], r["where"]) for r in rows]
    first = rows[0]["agent"]
    assert first in ids and rows[0]["where"] == f"agent {first}"
    assert all(r["agent"] == first and "agent_note" not in r for r in rows), rows
    assert model["row_agents"] == {KEY: {"agents": [first], "rows": {first: [r["label"] for r in rows]},
                                         "same_agent": True, "why": []}}
    md = (out_dir / "report.md").read_text()
    assert f"- agents: every row on key 'pair' ran on agent {first}" in md, md
    assert f"every row on key 'pair' ran on agent {first}" in " ".join(out.split())  # and on the console
    # item 6 in the same report: the numerics column and the check each row was held to
    assert "numerics (relative L2 err; max abs err, reference max)" in md
    assert "relative L2 error <= rtol=0.001 per output" in md and all(r["numerics"]["ok"] for r in rows)


def test_a_model_with_tiny_outputs_gets_a_relative_numerics_check(farm, tmp_path):
    """Outputs of about 1e-9: the right TVM build and ONNX Runtime pass, a build of another model of the same
    scale fails (its error is a few 1e-9, far inside atol=1e-3, but as large as the outputs themselves)."""
    import tvm
    from rich.console import Console

    from tunefarm.core.jobspec import ModelSpec
    from tunefarm.host.comparator import OK, ModelArtifacts, Row

    model, other = _tiny_model(seed=0), _tiny_model(seed=1)
    (info, *_) = listed_agents(HOST, farm["port"], KEY)
    target = tvm.target.Target(info.target)
    right = _untuned_build(model, target, tmp_path / "right.so")
    wrong = _untuned_build(other, target, tmp_path / "wrong.so")
    console = Console(file=io.StringIO())
    art = ModelArtifacts(model, ModelSpec(source="builtin", name="tiny"), tmp_path, console)
    assert float(np.max(np.abs(art.reference[0]))) < 1e-8  # the scale of mobilenet_v3_small's outputs in the issue
    rows = [Row("tvm-untuned", KEY, label="right", options={"device": "cpu"}, model_file=right),
            Row("tvm-untuned", KEY, label="wrong", options={"device": "cpu"}, model_file=wrong),
            Row("onnxruntime", KEY, label="onnxruntime")]
    agents, comparator = _comparator(farm, console)
    try:
        good, bad, ort = comparator.run_and_compare(art, rows)
    finally:
        agents.close()
    assert [r.status for r in (good, bad, ort)] == [OK] * 3, (good, bad, ort)
    num = bad.numerics
    assert not num["ok"] and num["rel_l2_err"] > 0.5, num  # as wrong as an output can be
    assert num["max_abs_err"] < 1e-3, num  # what the absolute check let through
    assert num["check"].startswith("fp32: relative L2 error <= rtol=0.001 per output")
    for res in (good, ort):
        num = res.numerics
        assert num["ok"] and num["rel_l2_err"] < 1e-5, (res.label, num)
        assert num["ref_max_abs"] < 1e-8 and num["top1_agreement"] is None


def test_a_row_whose_agent_died_runs_on_the_other_and_the_report_says_why(farm, tmp_path):
    """The comparison's agent is killed (kill -9) between its rows: the next row runs on the other agent with
    the reason, the row after it stays there, and report.json / report.md name both agents and why."""
    import tvm
    from rich.console import Console

    from tunefarm.core.comparespec import compare_from_dict
    from tunefarm.core.jobspec import ModelSpec
    from tunefarm.host.comparator import OK, ModelArtifacts, Row, agents_of_rows
    from tunefarm.host.reports.compare import write_compare_report

    model = _tiny_model(seed=0)
    (info, *_) = listed_agents(HOST, farm["port"], KEY)
    lib = _untuned_build(model, tvm.target.Target(info.target), tmp_path / "model.so")
    console = Console(file=io.StringIO())
    art = ModelArtifacts(model, ModelSpec(source="builtin", name="tiny"), tmp_path, console)
    rows = [Row("tvm-untuned", KEY, label=f"row{i}", options={"device": "cpu"}, model_file=lib) for i in range(3)]
    agents, comparator = _comparator(farm, console, wait_s=30)
    try:
        (first,) = comparator.run_and_compare(art, rows[:1])
        pinned = comparator.pins[KEY]
        assert first.status == OK and first.agent == pinned, first
        dead = next(a for a in farm["agents"] if agent_id_of(a) == pinned)
        survivor = next(agent_id_of(a) for a in farm["agents"] if a is not dead)
        kill_hard(dead)
        wait_until(lambda: pinned not in {a.agent_id for a in listed_agents(HOST, farm["port"], KEY)}, 30,
                   what="the tracker to drop the killed agent")
        moved, stayed = comparator.run_and_compare(art, rows[1:])
    finally:
        agents.close()
    assert moved.status == OK and moved.agent == survivor and moved.where == f"agent {survivor}", moved
    assert moved.agent_note == (f"agent {pinned}, where this comparison's rows on key 'pair' ran, "
                                "is no longer on the tracker"), moved.agent_note
    assert stayed.status == OK and stayed.agent == survivor and stayed.agent_note == "", stayed
    assert comparator.pins[KEY] == survivor

    results = [first, moved, stayed]
    summary = agents_of_rows(results)
    assert summary == {KEY: {"agents": [pinned, survivor], "rows": {pinned: ["row0"], survivor: ["row1", "row2"]},
                             "same_agent": False, "why": [f"row1: {moved.agent_note}"]}}
    cfg = compare_from_dict({"name": "moved", "models": [{"source": "builtin", "name": "matmul"}],
                             "rows": [{"backend": "tvm-untuned", "key": KEY}]})
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    models = [{"name": "tiny", "source": "builtin", "input_shapes": [[2, 8, 64]], "fingerprint": "tiny-0",
               "reference": "PyTorch", "rows": [r.to_dict() for r in results], "row_agents": summary}]
    write_compare_report(cfg, models, out_dir, wall_s=1.0)
    saved = json.loads((out_dir / "report.json").read_text())["models"][0]
    assert saved["rows"][1]["agent_note"] == moved.agent_note and saved["row_agents"][KEY]["same_agent"] is False
    md = (out_dir / "report.md").read_text()
    assert (f"- agents: rows on key 'pair' ran on 2 agents (row0 on agent {pinned}; row1, row2 on agent {survivor}) "
            f"because row1: agent {pinned}, where this comparison's rows on key 'pair' ran, is no longer on the "
            "tracker") in md, md
    assert f"| row1 | agent {survivor} (moved, see below) |" in md, md
    assert f"- row1 ran on agent {survivor}: agent {pinned}, where" in md, md
