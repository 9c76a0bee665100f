"""Job files: YAML validated into typed objects, with one-line errors through the real CLI."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tunefarm.core.errors import TunefarmError
from tunefarm.core.jobspec import load_job, parse_yaml

GOOD = """
name: ok-job
model: {source: torchvision, name: resnet18, input_shape: [1, 3, 224, 224]}
device: {key: nuc, tracker: 10.0.0.5:9190}
tuning: {max_trials_global: 100, num_trials_per_iter: 8}
"""


def test_good_job_parses_with_defaults(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(GOOD)
    job = load_job(path)
    assert job.name == "ok-job" and job.device.key == "nuc" and job.target == "from-agent"
    # cost_model unset: the farm's model of the target where one exists, else a cold xgb (resolved at plan time)
    assert job.tuning.cost_model == "" and job.tuning.max_trials_global == 100
    assert job.evaluate.baselines == ["torch", "onnxruntime"]


def test_onnx_path_is_relative_to_the_job_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: o\nmodel: {source: onnx, path: m.onnx}\ndevice: {key: k}\n")
    assert load_job(path).model.path == str(tmp_path / "m.onnx")


@pytest.mark.parametrize("text, message", [
    ("name: x\nmodel: [unclosed\n", "malformed YAML at line"),
    ("- a list\n", "must be a YAML mapping"),
    (GOOD + "colour: blue\n", "unknown field(s) colour"),
    (GOOD.replace("key: nuc", "key: ''"), "device.key is required"),
    (GOOD.replace("name: ok-job", "name: 'bad name!'"), "'name' must be"),
    (GOOD.replace("max_trials_global: 100", "max_trials_global: lots"), "tuning.max_trials_global: expected int"),
    (GOOD + "target: 42\n", "target must be"),
    (GOOD.replace("source: torchvision", "source: keras"), "model.source must be"),
    (GOOD.replace("num_trials_per_iter: 8", "num_trials_per_iter: 8, cost_model: magic"), "cost_model must be xgb"),
    # Bounded input (issue 12): every number range-checked, names matched whole, reserved names refused.
    (GOOD.replace("max_trials_global: 100", "max_trials_global: 1000000000000000000000000000000"),
     "tuning.max_trials_global: 1000000000000000000000000000000 is out of range [1, 10000000]"),
    (GOOD.replace("max_trials_global: 100", "max_trials_global: 0"), "tuning.max_trials_global: 0 is out of range"),
    (GOOD + "runner: {timeout_sec: -5}\n", "runner.timeout_sec: -5 is out of range"),
    (GOOD + "evaluate: {rtol: .nan}\n", "evaluate.rtol: nan is out of range"),
    (GOOD.replace("num_trials_per_iter: 8", "num_trials_per_iter: 8, max_trials_per_task: abc"),
     "tuning.max_trials_per_task: expected"),
    (GOOD.replace("[1, 3, 224, 224]", "[100000, 100000, 100000]"), "has over 134217728 elements"),
    (GOOD.replace("[1, 3, 224, 224]", "[1, true]"), "model.input_shape must be a list of 1 to 8 positive"),
    (GOOD.replace("name: ok-job", 'name: "ok-job\\n"'), "'name' must be"),
    (GOOD.replace("name: ok-job", "name: farm"), "the name 'farm' is reserved"),
    (GOOD + "target: " + "x" * 2000 + "\n", "target is longer than 1024 characters"),
    (GOOD.replace("num_trials_per_iter: 8", "num_trials_per_iter: 8, weight_prepack: 'yes'"),
     "tuning.weight_prepack must be true or false"),
    (GOOD.replace("num_trials_per_iter: 8", "num_trials_per_iter: 8, fold_batchnorm: 1"),
     "tuning.fold_batchnorm must be true or false"),
    # bool is an int in Python: a boolean where a number belongs is refused, not taken as 1 (issue 32, item 10)
    (GOOD.replace("num_trials_per_iter: 8", "num_trials_per_iter: 8, max_trials_per_task: true"),
     "tuning.max_trials_per_task: expected a number, got True"),
    # placement (issue 31): auto, off or a list of known vendor libraries
    (GOOD + "placement: {backends: [onednn, tensorrt]}\n", "placement.backends names unknown backend(s) 'tensorrt'"),
    (GOOD + "placement: {backends: yes-please}\n", "placement.backends must be auto, off or a list of onednn"),
    (GOOD + "placement: {backends: [1]}\n", "placement.backends must be auto, off or a list"),
    (GOOD + "placement: {vendors: [onednn]}\n", "placement: unknown field(s) vendors; known: backends"),
    (GOOD + "placement: [onednn]\n", "placement: expected a mapping"),
])
def test_bad_job_files_are_rejected(tmp_path, text, message):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(TunefarmError) as err:
        load_job(path)
    assert message in str(err.value)


def test_cli_reports_bad_yaml_in_one_line(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: x\nmodel: {source: torchvision\n")
    proc = subprocess.run([sys.executable, "-m", "tunefarm", "tune", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("tunefarm: error:") and "malformed YAML" in lines[0]


def test_cli_missing_job_file(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tunefarm", "tune", str(tmp_path / "nope.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "job file not found" in proc.stderr


def test_alias_bombs_are_refused_before_they_expand(tmp_path):
    """407 bytes that stand for 10**6 values: refused at once with one line, nothing built."""
    import time

    levels = ['a: &a ["x","x","x","x","x","x","x","x","x","x"]']
    for prev, name in zip("abcde", "bcdef"):
        levels.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 10) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text(GOOD + "target:\n" + "\n".join("  " + line for line in levels) + "\n")
    start = time.monotonic()
    with pytest.raises(TunefarmError, match="over 100000 values once its aliases are expanded"):
        load_job(path)
    assert time.monotonic() - start < 5
    # A small alias is still fine, and a file over the size limit is refused.
    assert parse_yaml("a: &x [1, 2]\nb: *x\n", "job") == {"a": [1, 2], "b": [1, 2]}
    path.write_text(GOOD + "#" + "x" * (1 << 20) + "\n")
    with pytest.raises(TunefarmError, match="over 1024 KiB of YAML"):
        load_job(path)


def test_every_example_job_parses_and_the_job_file_reference_names_every_field():
    import dataclasses
    from pathlib import Path

    from tunefarm.core import jobspec

    root = Path(__file__).resolve().parents[1]
    jobs = {p.name: load_job(p) for p in sorted((root / "configs" / "jobs").glob("*.yaml"))}
    onnx = [job for job in jobs.values() if job.model.source == "onnx"]
    assert onnx and all(Path(job.model.path).is_absolute() for job in onnx)  # relative to the job file
    reference = (root / "docs" / "job-file.md").read_text()  # generated: tests/test_docs.py keeps it current
    for section, cls in (("model", jobspec.ModelSpec), ("device", jobspec.DeviceSpec), ("tuning", jobspec.TuningSpec),
                         ("search", jobspec.SearchSpec), ("builder", jobspec.BuilderSpec),
                         ("runner", jobspec.RunnerSpec), ("evaluate", jobspec.EvaluateSpec),
                         ("placement", jobspec.PlacementSpec)):
        for field in dataclasses.fields(cls):
            assert f"`{section}.{field.name}`" in reference, f"docs/job-file.md does not name {section}.{field.name}"
    assert "`name`" in reference and "`target`" in reference


def test_pipeline_defaults_by_target_and_prepack_refused_off_cpu():
    import tvm

    from tunefarm.host.tuning.pipeline import DEFAULT_CPU, DEFAULT_OTHER, LEGACY, Pipeline, resolve_pipeline

    cpu = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    cuda = tvm.target.Target("nvidia/nvidia-h100")
    assert resolve_pipeline(cpu) == DEFAULT_CPU and resolve_pipeline(cuda) == DEFAULT_OTHER
    assert resolve_pipeline(cpu, fold_batchnorm=False) == Pipeline(False, DEFAULT_CPU.weight_prepack)
    assert resolve_pipeline(cuda, weight_prepack=False) == DEFAULT_OTHER
    with pytest.raises(TunefarmError) as err:
        resolve_pipeline(cuda, weight_prepack=True)
    assert "tuning.weight_prepack is a CPU option" in str(err.value) and "'cuda'" in str(err.value)
    # A job directory from before the options (no "pipeline" in its state) was tuned with both off.
    assert Pipeline.from_json(None) == LEGACY and Pipeline.from_json({"fold_batchnorm": True}) == Pipeline(True, False)


def test_a_preset_is_a_name_from_configs_targets_read_with_the_bounds_of_a_job_file(tmp_path, monkeypatch):
    """Issue 32, item 2: a path is no preset, and a preset file is parsed as a job file is (size, aliases,
    UTF-8), each refusal one line."""
    import time

    from tunefarm.core import targets

    assert targets.load_preset("x86-avx512")  # the shipped presets still load
    (tmp_path / "evil.yaml").write_text("target: {kind: llvm}\n")
    for name in (str(tmp_path / "evil"), "../targets/x86-avx512", "x86-avx512/../x86-avx512", ""):
        assert not targets.is_preset(name)
        with pytest.raises(TunefarmError, match="unknown target preset"):
            targets.load_preset(name)
    presets = tmp_path / "presets"
    presets.mkdir()
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(8))
    (presets / "bomb.yaml").write_text(bomb + "target: *i\n")
    (presets / "latin1.yaml").write_bytes(b"target: {kind: llvm, mcpu: \xe9\xff}\n")
    (presets / "huge.yaml").write_text("target: {kind: llvm}\n" + "# x\n" * 400_000)
    monkeypatch.setattr(targets, "PRESET_DIR", presets)
    for name, message in (("bomb", "once its aliases are expanded"), ("latin1", "is not UTF-8 text"),
                          ("huge", "over 1024 KiB of YAML")):
        start = time.monotonic()
        with pytest.raises(TunefarmError) as err:
            targets.load_preset(name)
        assert message in str(err.value) and "\n" not in str(err.value), err.value
        assert time.monotonic() - start < 5, name
