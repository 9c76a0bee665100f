"""The Comparator's logic without processes: what an agent's answer makes of a row, and the compare step."""
from __future__ import annotations

import re

import numpy as np
import pytest

from tunefarm.core.wire import MODEL_FORMAT, runner_name
from tunefarm.host.comparator import (FAILED, NOT_AVAILABLE, NOT_RUN, OK, Comparator, MeasureSettings, Row, RowResult,
                                      compare_results, not_an_agent_reason, result, result_from_answer)

LATENCY = {"median_ms": 2.0, "p90_ms": 2.5, "p99_ms": 3.0, "mean_ms": 2.1, "std_ms": 0.2, "min_ms": 1.9,
           "samples": 20, "warmup": 4, "number": 1, "timer": "wall_clock", "method": "...", "first_run_ms": 9.0}


def _answer(**extra):
    return {"backend": "onnxruntime", "available": True, "outputs_file": "outputs-onnxruntime.npz",
            "setup_s": 0.2, "latency": LATENCY, "throughput_per_s": 476.2, "version": "1.20.1",
            "provider": "CPUExecutionProvider", "precision": "fp32", "threads": 2, **extra}


def test_tvm_builds_run_on_the_tvm_runner_and_every_runner_has_a_model_format():
    assert runner_name("tvm-tuned") == runner_name("tvm-untuned") == "tvm"
    assert runner_name("torch-compile") == "torch-compile"
    assert {runner_name(b) for b in ("tvm-tuned", "tvm-untuned", "torch", "torch-compile", "onnxruntime",
                                     "tensorrt")} <= set(MODEL_FORMAT)
    assert Row("torch", "cpu").label == "torch@cpu" and Row("torch", "cpu", label="mine").label == "mine"


def test_an_answer_that_ran_is_ok_with_its_measurement_and_details():
    row = Row("onnxruntime", "cpu", details={"compile_s": 1.5})
    res = result_from_answer(row, _answer(), "box:42", [np.zeros(3)])
    assert res.status == OK and res.ok and res.reason == "" and res.where == "agent box:42"
    assert (res.threads, res.precision, res.version) == (2, "fp32", "onnxruntime 1.20.1")
    assert res.latency == LATENCY and res.throughput_per_s == 476.2 and res.numerics is None
    assert res.details == {"compile_s": 1.5, "setup_s": 0.2, "provider": "CPUExecutionProvider"}
    data = res.to_dict()
    assert data["status"] == "ok" and data["latency"] == LATENCY and data["threads"] == 2
    assert "outputs" not in data and "rtol" not in data


def test_an_agents_pool_spin_is_kept_only_as_known_variables_with_short_decimal_values():
    """The TVM runner says how idle TVM and OpenMP threads spun in a row mixing oneDNN and TVM kernels; the report
    prints it in the row's threads cell. From a hostile agent, anything but the two known variables with short
    decimal values is dropped before it reaches the report."""
    from tunefarm.host.reports.markdown import threads_text

    row = Row("tvm-vendor", "cpu")
    good = result_from_answer(row, _answer(pool_spin={"TVM_THREAD_POOL_SPIN_COUNT": "0", "GOMP_SPINCOUNT": "3000"}),
                              "box:42", [np.zeros(3)])
    assert good.details["pool_spin"] == {"TVM_THREAD_POOL_SPIN_COUNT": "0", "GOMP_SPINCOUNT": "3000"}
    assert threads_text(good.to_dict()) == "2 (idle spin: TVM 0, OpenMP 3000)"
    hostile = {"TVM_THREAD_POOL_SPIN_COUNT": "0|<img src=x>", "GOMP_SPINCOUNT": "9" * 13, "LD_PRELOAD": "1",
               "OMP_WAIT_POLICY": "0"}
    for spin in (hostile, ["0"], "0", {"GOMP_SPINCOUNT": 3000}, {"GOMP_SPINCOUNT": "\u0663"}):
        res = result_from_answer(row, _answer(pool_spin=spin), "box:42", [np.zeros(3)])
        assert "pool_spin" not in res.details and threads_text(res.to_dict()) == "2", spin
    part = result_from_answer(row, _answer(pool_spin={**hostile, "GOMP_SPINCOUNT": "30"}), "box:42", [np.zeros(3)])
    assert part.details["pool_spin"] == {"GOMP_SPINCOUNT": "30"}
    assert threads_text(part.to_dict()) == "2 (idle spin: TVM default, OpenMP 30)"


def test_rows_that_did_not_run_carry_a_reason_and_no_number():
    row = Row("tensorrt", "cpu", options={"precision": "fp16"})
    res = result_from_answer(row, {"backend": "tensorrt", "available": False, "reason": "TensorRT is not installed"},
                             "box:42", None)
    assert res.status == NOT_AVAILABLE and res.reason == "TensorRT is not installed" and res.where == "agent box:42"
    failed = result_from_answer(row, {"available": True, "error": "RuntimeError: boom", "traceback": "tb"},
                                "box:42", None)
    assert failed.status == FAILED and failed.reason == "RuntimeError: boom" and failed.details["traceback"] == "tb"
    empty = result_from_answer(row, _answer(), "box:42", None)
    assert empty.status == FAILED and "no outputs" in empty.reason
    for res in (res, failed, empty, result(row, NOT_RUN, "no tuning logs at x")):
        data = res.to_dict()
        assert not res.ok and data["reason"] and "latency" not in data and "numerics" not in data
        assert "threads" not in data and "throughput_per_s" not in data
    stock = result(Row("tvm-tuned", "stock"), NOT_AVAILABLE, not_an_agent_reason("stock"))
    assert "not a tunefarm agent" in stock.reason and "'stock'" in stock.reason
    with pytest.raises(ValueError, match="unknown status"):
        result(row, "maybe")


def test_precision_is_the_runners_else_the_rows_else_fp32():
    fp16 = Row("tensorrt", "gpu", options={"precision": "fp16"})
    no_precision = _answer()
    del no_precision["precision"]
    assert result_from_answer(fp16, no_precision, "a:1", [np.zeros(1)]).precision == "fp16"
    assert result_from_answer(Row("torch", "cpu"), no_precision, "a:1", [np.zeros(1)]).precision == "fp32"
    assert result_from_answer(fp16, _answer(precision="tf32"), "a:1", [np.zeros(1)]).precision == "tf32"


def test_compare_checks_every_row_that_ran_against_the_reference_with_its_own_tolerances():
    reference = [np.array([1.0, 2.0, 3.0], dtype=np.float32)]
    close = result_from_answer(Row("torch", "cpu"), _answer(), "a:1", [reference[0] + 5e-4])
    loose = result_from_answer(Row("tensorrt", "gpu", rtol=0.05, atol=0.05), _answer(), "a:1", [reference[0] + 0.01])
    strict = result_from_answer(Row("tvm-tuned", "cpu"), _answer(), "a:1", [reference[0] + 0.01])
    shape = result_from_answer(Row("tvm-untuned", "cpu"), _answer(), "a:1", [np.zeros((3, 1))])
    skipped = result(Row("torch", "gpu"), NOT_AVAILABLE, "no CUDA GPU on this device")
    compare_results([close, loose, strict, shape, skipped], reference)
    assert close.numerics["ok"] and close.numerics["max_abs_err"] == pytest.approx(5e-4, rel=1e-3)
    assert loose.numerics["ok"] and loose.numerics["rtol"] == 0.05
    assert not strict.numerics["ok"] and strict.numerics["max_abs_err"] == pytest.approx(0.01, rel=1e-3)
    assert not shape.numerics["ok"] and "shape mismatch" in shape.numerics["detail"]
    assert skipped.numerics is None and "numerics" not in skipped.to_dict()


def test_rows_the_caller_could_not_prepare_keep_their_place():
    comparator = Comparator(agents=None, settings=MeasureSettings(), console=None)
    kept = [result(Row("tvm-tuned", "cpu"), NOT_RUN, "no tuning logs"),
            result(Row("tvm-untuned", "cpu"), FAILED, "compile failed")]
    assert comparator.run(artifacts=None, rows=kept) == kept
    assert all(isinstance(r, RowResult) for r in kept)


def test_where_a_comparisons_rows_ran_is_summed_up_per_key():
    from tunefarm.host.comparator import NO_AGENT, agents_of_rows, agents_text

    same = [result_from_answer(Row("torch", "cpu", label=f"r{i}"), _answer(), "box:1", [np.zeros(1)]) for i in range(2)]
    gpu = result_from_answer(Row("torch", "gpu"), _answer(), "gpubox:7", [np.zeros(1)])
    moved = result_from_answer(Row("onnxruntime", "gpu"), _answer(), "gpubox:8", [np.zeros(1)],
                               agent_note="agent gpubox:7, where this comparison's rows on key 'gpu' ran, is no "
                                          "longer on the tracker")
    nowhere = result(Row("tensorrt", "gpu"), NO_AGENT, "no agent on key 'gpu'")
    assert moved.to_dict()["agent"] == "gpubox:8" and moved.to_dict()["agent_note"] == moved.agent_note
    assert same[0].to_dict()["agent"] == "box:1" and "agent_note" not in same[0].to_dict()
    assert "agent" not in nowhere.to_dict()
    summary = agents_of_rows(same + [gpu, moved, nowhere])
    assert summary == {
        "cpu": {"agents": ["box:1"], "rows": {"box:1": ["r0", "r1"]}, "same_agent": True, "why": []},
        "gpu": {"agents": ["gpubox:7", "gpubox:8"], "rows": {"gpubox:7": ["torch@gpu"], "gpubox:8": ["onnxruntime@gpu"]},
                "same_agent": False, "why": [f"onnxruntime@gpu: {moved.agent_note}"]}}
    assert agents_text(summary) == [
        "every row on key 'cpu' ran on agent box:1",
        "rows on key 'gpu' ran on 2 agents (torch@gpu on agent gpubox:7; onnxruntime@gpu on agent gpubox:8) because "
        f"onnxruntime@gpu: {moved.agent_note}"]


def test_what_agents_say_is_escaped_in_the_compare_report():
    """An agent's id and its error text are its own: in report.md they cannot end a table cell, open code,
    a link, an image or HTML, nor start a new line."""
    from tunefarm.host.comparator import agents_of_rows
    from tunefarm.host.reports.compare import _markdown
    from tunefarm.host.reports.markdown import cell

    evil = "evil|box`<img src=x>`![p](http://t.example/p.png)\n| injected | row |"
    ran = result_from_answer(Row("onnxruntime", "cpu"), _answer(), evil, [np.zeros(3)], agent_note=f"because {evil}")
    broke = result_from_answer(Row("torch", "cpu"), {"available": True, "error": evil}, evil, None)
    compare_results([ran, broke], [np.zeros(3)])
    agent = {"agent_id": evil, "hostname": evil, "cpu": evil, "cores": 2, "threads": 2, "cuda": [evil],
             "runners": [evil], "tvm": evil}
    report = {"name": "x", "host": {"hostname": "h", "tvm": "0.27", "created": "now"}, "tracker": "t:1",
              "wall_s": 1.0, "baseline": "onnxruntime@cpu", "method": "m", "agents": {"cpu": [agent]}, "plots": {},
              "models": [{"name": "m", "input_shapes": [[1]], "reference": "PyTorch", "fingerprint": "f",
                          "rows": [ran.to_dict(), broke.to_dict()], "row_agents": agents_of_rows([ran, broke])}]}
    md = _markdown(report, None)
    assert "<img" not in md and "\n| injected" not in md, md
    # the report's own markup (the key from the compare file, as a code span) set aside
    hostile = [line.replace("- key `cpu`:", "- key cpu:") for line in md.splitlines() if "evil" in line]
    assert len(hostile) == 5, hostile  # the agents line, two table rows, the agents summary, the moved note
    assert not any(re.search(r"(?<!\\)(\]\(|`|\[)", line) for line in hostile), hostile
    table = [line for line in md.splitlines() if line.startswith("| onnxruntime@cpu") or line.startswith("| torch@cpu")]
    assert len(table) == 2 and all(line.replace("\\|", "").count("|") == 15 for line in table), table
    assert cell(evil) == ("evil\\|box\\`&lt;img src=x&gt;\\`!\\[p\\](http://t.example/p.png) \\| injected \\| row \\|")
