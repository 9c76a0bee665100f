"""The GPU-box path end to end: a tracker and one CUDA agent, ResNet-18 tuned through the farm, then
PyTorch eager, torch.compile, untuned TVM and tuned TVM timed and checked on the same GPU.

    PYTHONPATH=. python bench/gpu_study.py [--trials-per-task 16] [--tune-wall-s 780] [--out bench/results]
    PYTHONPATH=. python bench/gpu_study.py --cpu --model builtin:convnet ...   # dry run without a GPU

Steps, in this order, each written to the report as soon as it is done (a run cut short still leaves
a report with every step it finished):
  1. start ``tunefarm tracker`` and ``tunefarm agent --key gpu --target T`` on loopback ports (T: the
     ``nvidia-h100`` preset on an H100, else the target the agent's own CUDA probe gives);
  2. PyTorch on the GPU: eager (cuDNN defaults, TF32 convolutions allowed), eager in strict fp32, and
     ``torch.compile`` (default mode); CUDA events around each call, synchronised per sample;
  3. untuned TVM: the fused module compiled with ``tvm.compile`` (unscheduled kernels get TVM's default
     GPU schedules), run on the agent (``tunefarm.host.evaluate.run_on_device``, time_evaluator);
  4. tuning through the farm with ``tunefarm.host.tuning.tune_job`` (FarmBuilder, FarmRunner, xgb), stopped
     at a wall budget if it has not finished (records kept; a rerun with the same --work-dir resumes);
  5. tuned TVM: the job's database applied to exactly the tuned module, ``tvm.compile``, run on the agent.
Every row is compared with PyTorch on the CPU in fp32 (``compare_outputs``) and in fp64 (relative L2
error), and with PyTorch eager on the GPU. TensorRT is reported as not available where it is not installed.
Writes <out>/gpu-<gpu-name>.json and .md (``--cpu``: cpu-<cpu-name>.*).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEY = "gpu"
RTOL = ATOL = 1e-3


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def log(msg: str) -> None:
    print(f"{now()} gpu_study: {msg}", flush=True)


class Study:
    """The report being built; saved (JSON + Markdown) after every step."""

    def __init__(self, path_stem: Path, meta: dict[str, Any]):
        self.stem = path_stem
        self.data: dict[str, Any] = {"meta": meta, "rows": {}, "tuning": {}, "steps": [], "problems": []}

    def step(self, name: str, **info) -> None:
        self.data["steps"].append({"step": name, "time": now(), **info})
        self.save()

    def row(self, name: str, row: dict[str, Any]) -> None:
        self.data["rows"][name] = row
        self.save()

    def save(self) -> None:
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        self.stem.with_suffix(".json").write_text(json.dumps(self.data, indent=2, default=str))
        self.stem.with_suffix(".md").write_text(render_markdown(self.data))


# ----------------------------------------------------------------------------- numerics

def rel_l2(got, want) -> float:
    import numpy as np

    got = np.concatenate([np.asarray(g, dtype=np.float64).ravel() for g in got])
    want = np.concatenate([np.asarray(w, dtype=np.float64).ravel() for w in want])
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300))


def numerics(outs, refs: dict[str, list]) -> dict[str, Any]:
    from tunefarm.core.stats import compare_outputs

    res = {"vs_torch_cpu_fp32": compare_outputs(outs, refs["cpu_fp32"], RTOL, ATOL),
           "rel_l2_vs_torch_cpu_fp64": rel_l2(outs, refs["cpu_fp64"])}
    if refs.get("gpu_eager") is not None:
        res["vs_torch_gpu_eager"] = compare_outputs(outs, refs["gpu_eager"], RTOL, ATOL)
    return res


# ----------------------------------------------------------------------------- PyTorch rows

def time_torch(fn, device: str, warmup: int, samples: int) -> dict[str, Any]:
    """Per-call latency: CUDA events around each call, synchronised per sample (CPU: perf_counter)."""
    import torch

    from tunefarm.core.stats import latency_stats

    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        secs, wall = [], []
        for _ in range(samples):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            fn()
            end.record()
            end.synchronize()
            wall.append(time.perf_counter() - t0)
            secs.append(start.elapsed_time(end) / 1e3)
        stats = latency_stats(secs, warmup=warmup)
        stats["method"] = ("CUDA events recorded around each call on the current stream, synchronised per "
                           "sample; " + stats["method"])
        stats["host_wall_median_ms"] = latency_stats(wall, warmup=warmup)["median_ms"]
        return stats
    secs = []
    for _ in range(samples):
        t0 = time.perf_counter()
        fn()
        secs.append(time.perf_counter() - t0)
    stats = latency_stats(secs, warmup=warmup)
    stats["method"] = "perf_counter around each call; " + stats["method"]
    return stats


def torch_rows(study: Study, model, device: str, refs: dict, args) -> None:
    import torch

    dev_model = copy.deepcopy(model.torch_module).to(device).eval()  # .to()/.cuda() move in place: a copy
    x = torch.from_numpy(model.inputs[0]).to(device)
    flags = {}
    if device == "cuda":
        flags = {"cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                 "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                 "float32_matmul_precision": torch.get_float32_matmul_precision(),
                 "cudnn.benchmark": torch.backends.cudnn.benchmark}

    def run(m):
        with torch.no_grad():
            out = m(x)
        return out

    def outputs(m):
        out = run(m)
        outs = out if isinstance(out, (tuple, list)) else [out]
        return [o.detach().float().cpu().numpy() for o in outs]

    where = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"
    # Eager with the library defaults (on CUDA: TF32 convolutions allowed), the GPU reference.
    outs = outputs(dev_model)
    refs["gpu_eager"] = outs if device == "cuda" else None
    lat = time_torch(lambda: run(dev_model), device, args.warmup, args.samples)
    study.row("pytorch-eager", {"backend": f"PyTorch {torch.__version__} eager", "device": device, "where": where,
                                "latency": lat, "numerics": numerics(outs, refs), "settings": flags})
    log(f"pytorch eager: {lat['median_ms']:.3f} ms")

    if device == "cuda":
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            outs = outputs(dev_model)
            lat = time_torch(lambda: run(dev_model), device, args.warmup, args.samples)
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
        study.row("pytorch-eager-strict-fp32", {
            "backend": f"PyTorch {torch.__version__} eager, cudnn.allow_tf32=False", "device": device,
            "where": where, "latency": lat, "numerics": numerics(outs, refs),
            "settings": {**flags, "cudnn.allow_tf32": False}})
        log(f"pytorch eager strict fp32: {lat['median_ms']:.3f} ms")

    if args.skip_torch_compile:
        study.row("torch-compile", {"backend": "torch.compile", "not_run": "skipped (--skip-torch-compile)"})
        return
    try:
        compiled = torch.compile(copy.deepcopy(dev_model))
        t0 = time.perf_counter()
        outs = outputs(compiled)  # the first call compiles
        compile_s = time.perf_counter() - t0
        lat = time_torch(lambda: run(compiled), device, args.warmup, args.samples)
    except Exception as err:  # pylint: disable=broad-except
        study.row("torch-compile", {"backend": "torch.compile",
                                    "not_run": f"failed: {str(err).strip().splitlines()[-1][:300]}"})
        log(f"torch.compile failed: {err}")
        return
    study.row("torch-compile", {"backend": f"PyTorch {torch.__version__} torch.compile (default mode, inductor)",
                                "device": device, "where": where, "latency": lat, "compile_s": compile_s,
                                "numerics": numerics(outs, refs), "settings": flags})
    log(f"torch.compile: {lat['median_ms']:.3f} ms (compiled in {compile_s:.0f} s)")


def tensorrt_row(study: Study) -> None:
    found = [name for name in ("tensorrt", "torch_tensorrt") if importlib.util.find_spec(name) is not None]
    if found:
        note = f"installed ({', '.join(found)}) but not run by this script"
    else:
        note = "not available on this device (neither tensorrt nor torch_tensorrt is installed)"
    study.row("tensorrt", {"backend": "TensorRT", "not_run": note})


# ----------------------------------------------------------------------------- TVM rows

def scheduled_kept_by_pipeline(applied, target, scheduled: list[str]) -> dict[str, Any]:
    """What tvm.compile's default pipeline does to the tuned kernels (IR only, no build).

    The pipeline fuses again (FuseOps/FuseTIR): a tuned function can be merged with its neighbour
    into a new function that concatenates both bodies and carries no ``tirx.is_scheduled``. On CUDA
    the default GPU schedules (dlight, the pipeline's last legalize pass) then run on such functions;
    this counts the ones they change, i.e. tuned code that would not run as tuned.
    """
    import tvm
    import tvm_ffi
    from tvm import relax

    def prims(mod):
        return {g.name_hint: f for g, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}

    def same(a, b):
        return tvm_ffi.structural_hash(a.body) == tvm_ffi.structural_hash(b.body)

    if target.kind.name == "cuda":
        from tvm.relax.backend.cuda import pipeline as cuda_pipeline

        passes = cuda_pipeline.library_dispatch_passes(target) + cuda_pipeline.legalize_passes(target)
        assert passes[-1].info.name == "ApplyDefaultSchedule", passes[-1].info.name
        with target:
            refused = tvm.transform.Sequential(passes[:-1])(applied)
            final = passes[-1](refused)
    else:
        refused = final = relax.get_default_pipeline(target)(applied)
    before, mid, after = prims(applied), prims(refused), prims(final)
    kept = [n for n in scheduled if n in after and same(after[n], before[n])]
    merged = sorted(n for n in scheduled if n not in mid)
    new = sorted(n for n in mid if n not in before)
    changed_new = sorted(n for n in new if n not in after or not same(after[n], mid[n]))
    return {"functions_before": len(before), "functions_after": len(after), "of": len(scheduled),
            "kept": len(kept), "merged_by_refusion": merged, "new_functions": new,
            "new_functions_changed_by_default_schedules": changed_new if target.kind.name == "cuda" else None,
            "changed_or_gone": sorted(set(scheduled) - set(kept))}


def tvm_row(study: Study, name: str, module, target, tracker, build_dir: Path, model, refs, args,
            extra: dict[str, Any]) -> None:
    import tvm

    from tunefarm.host import evaluate

    device_type = evaluate.device_type_of(target)
    t0 = time.perf_counter()
    ex = tvm.compile(module, target)
    lib = build_dir / f"{name}.so"
    ex.export_library(str(lib))
    compile_s = time.perf_counter() - t0
    res = evaluate.run_on_device(tracker, KEY, str(lib), model.inputs, args.warmup, args.samples,
                                 budget_s=120.0, device_type=device_type)
    row = {"backend": f"TVM {tvm.__version__} {extra.pop('label')}", "device": device_type,
           "where": f"agent {res['agent']} (key '{KEY}')", "latency": res["latency"], "compile_s": compile_s,
           "numerics": numerics(res["outputs"], refs), **extra}
    study.row(name, row)
    log(f"{name}: {res['latency']['median_ms']:.3f} ms (compiled in {compile_s:.0f} s)")


# ----------------------------------------------------------------------------- farm

def start_farm(work_dir: Path, agent_target: str):
    """Tracker + one agent on key KEY serving ``agent_target`` (a LocalFarm; the caller closes it)."""
    from tunefarm.testing.localfarm import LocalFarm

    farm = LocalFarm(work_dir).__enter__()
    try:
        farm.add_agent(KEY, "--target", agent_target, name="agent")
    except Exception:
        farm.close()
        raise
    return farm


def agent_target_for(device: str) -> tuple[str, str]:
    """--target for the agent, and why: the nvidia-h100 preset on an H100, else the probed CUDA target."""
    if device != "cuda":
        return "auto", "probed CPU target (--cpu)"
    from tunefarm.device_agents.probe import probe_cuda

    gpus = probe_cuda(max_devices=1)
    if not gpus:
        raise RuntimeError("TVM's runtime sees no CUDA device (tvm.cuda(0).exist is false)")
    if gpus[0].get("tag") == "nvidia/nvidia-h100":
        return "nvidia-h100", "preset configs/targets/nvidia-h100.yaml (the probed GPU matches its tag)"
    return json.dumps(gpus[0]["target"]), f"target JSON from the agent's CUDA probe of {gpus[0]['name']}"


def tuning_summary(job_dir: Path, task_keys: list[str], task_names: list[str]) -> dict[str, Any]:
    from tvm.s_tir import meta_schedule as ms

    from tunefarm.host.tuning.jobdir import records_per_workload

    db = ms.database.JSONDatabase(work_dir=str(job_dir))
    per = records_per_workload(db)
    events = []
    progress = job_dir / "progress.jsonl"
    if progress.exists():
        events = [json.loads(line) for line in progress.read_text().splitlines() if line.strip()]
    # records_per_workload lists the valid measurements of each workload (failed candidates: none)
    tasks = [{"task": n, "valid_records": len(per.get(k, [])),
              "best_us": min(per[k]) * 1e6 if per.get(k) else None} for n, k in zip(task_names, task_keys)]
    return {"records_in_database": len(db), "tasks_with_records": sum(1 for k in task_keys if k in per),
            "tasks_with_valid_records": sum(1 for t in tasks if t["valid_records"]),
            "rounds_measured": sum(1 for e in events if e.get("batch")),
            "trials_measured": sum(e.get("batch", 0) for e in events),
            "trial_errors": sum(e.get("errors", 0) for e in events),
            "last_estimated_ms": next((e["estimated_ms"] for e in reversed(events) if e.get("estimated_ms")), None),
            "per_task": tasks}, db


def tune(study: Study, job, work_dir: Path, args, task_keys, task_names) -> Any:
    """tune_job with a wall budget: the progress callback stops tuning (records kept) once it is spent."""
    from tunefarm.core.errors import TunefarmError
    from tunefarm.host import tuning

    class WallBudgetSpent(Exception):
        pass

    stop_at = time.time() + args.tune_wall_s
    original = tuning.JobProgress.on_batch

    def on_batch(self, task_id, costs, errors):
        original(self, task_id, costs, errors)
        if time.time() > stop_at:
            raise WallBudgetSpent(f"tuning wall budget of {args.tune_wall_s:.0f} s spent")

    tuning.JobProgress.on_batch = on_batch
    t0 = time.time()
    outcome = "finished"
    try:
        tuning.tune_job(job, logs_dir=work_dir / "logs")
    except TunefarmError as err:
        outcome = (f"stopped at the wall budget ({args.tune_wall_s:.0f} s); records kept"
                   if time.time() > stop_at else f"stopped: {err}")
        log(f"tuning {outcome}")
    finally:
        tuning.JobProgress.on_batch = original
    wall = time.time() - t0
    summary, db = tuning_summary(work_dir / "logs" / job.name, task_keys, task_names)
    study.data["tuning"].update({"outcome": outcome, "wall_s_this_run": wall, **summary})
    study.data["tuning"]["wall_s_total"] = study.data["tuning"].get("wall_s_earlier_runs", 0.0) + wall
    study.step("tuned", wall_s=wall, outcome=outcome)
    log(f"tuning: {outcome}; {summary['records_in_database']} records, {wall:.0f} s")
    return db


# ----------------------------------------------------------------------------- report

def _fmt(value, digits=3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-2 else f"{value:.{digits}f}"
    return str(value)


def pipeline_line(pc: dict[str, Any]) -> str:
    if not pc:
        return "- `tvm.compile` pipeline check: not run."
    text = (f"- What `tvm.compile` does with the tuned module (IR check, {pc.get('source', 'this run')}): its default "
            f"pipeline fuses again, {pc.get('functions_before')} TIR functions -> {pc.get('functions_after')}; "
            f"{pc.get('kept')} of {pc.get('of')} tuned functions stay as they are")
    merged = pc.get("merged_by_refusion") or []
    if merged:
        changed = pc.get("new_functions_changed_by_default_schedules")
        text += (f", {len(merged)} are merged with a neighbour into {len(pc.get('new_functions') or [])} new functions "
                 "(a tuned conv+BatchNorm kernel followed by its tuned ReLU or add+ReLU kernel)")
        if changed is not None:
            text += (f"; the default GPU schedules change {len(changed)} of those"
                     + (" (" + ", ".join(changed) + ")" if changed else ", so the tuned loop nests are what runs"))
    return text + "."


def summary_lines(rows: dict[str, Any]) -> list[str]:
    med = {n: r["latency"]["median_ms"] for n, r in rows.items() if "latency" in r}
    if "tvm-tuned" not in med:
        return []
    out = ["## Summary", ""]
    for name in ("tvm-untuned", "pytorch-eager", "pytorch-eager-strict-fp32", "torch-compile"):
        if name in med:
            ratio = (f"{med[name] / med['tvm-tuned']:.2f}x faster" if med["tvm-tuned"] < med[name]
                     else f"{med['tvm-tuned'] / med[name]:.2f}x slower")
            out.append(f"- tuned TVM vs {name}: {med['tvm-tuned']:.3f} ms vs {med[name]:.3f} ms ({ratio}).")
    return out + [""]


def render_markdown(data: dict[str, Any]) -> str:
    meta, rows, tn = data["meta"], data["rows"], data.get("tuning", {})
    lines = [f"# {meta.get('model')} on {meta.get('gpu_name') or meta.get('device_name')}: the GPU-box path end to end", "",
             f"Run {meta.get('started')} by `bench/gpu_study.py` ({'finished ' + meta['finished'] if meta.get('finished') else 'NOT FINISHED: partial report'}).", "",
             f"- Device: {meta.get('device_name')} ({meta.get('device_detail', '')}); driver {meta.get('driver', '-')}; "
             f"host CPU {meta.get('cpu')} ({meta.get('cpus')} logical cores).",
             f"- Software: TVM {meta.get('tvm')}, tvm-ffi {meta.get('tvm_ffi')}, PyTorch {meta.get('torch')}, "
             f"torchvision {meta.get('torchvision')}, Triton {meta.get('triton', '-')}, xgboost {meta.get('xgboost', '-')}, "
             f"Python {meta.get('python')}.",
             f"- Model: {meta.get('model')}, random weights (weights=None), input {meta.get('input_shape')}, fp32.",
             f"- Farm: `tunefarm tracker` + one `tunefarm agent --key {KEY} --target {meta.get('agent_target_arg', '?')}` "
             f"on loopback ({meta.get('agent_target_why', '')}); target `{meta.get('target', '?')}`.", ""]
    lines += ["## Latency and numerics", "",
              "| backend | where | median ms | p90 | p99 | mean | std | min | samples | max abs err vs PyTorch CPU fp32 (allclose 1e-3) | rel. L2 err vs CPU fp64 | max abs err vs PyTorch GPU eager |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    order = ["pytorch-eager", "pytorch-eager-strict-fp32", "torch-compile", "tensorrt", "tvm-untuned", "tvm-tuned"]
    for name in order + [n for n in rows if n not in order]:
        row = rows.get(name)
        if row is None:
            continue
        if "not_run" in row:
            lines.append(f"| {row['backend']} | - | {row['not_run']} | | | | | | | | | |")
            continue
        lat, num = row["latency"], row["numerics"]
        cpu = num["vs_torch_cpu_fp32"]
        gpu = num.get("vs_torch_gpu_eager")
        lines.append(
            f"| {row['backend']} | {row['where']} | **{lat['median_ms']:.3f}** | {lat['p90_ms']:.3f} | "
            f"{lat['p99_ms']:.3f} | {lat['mean_ms']:.3f} | {lat['std_ms']:.3f} | {lat['min_ms']:.3f} | "
            f"{lat['samples']} | {_fmt(cpu['max_abs_err'])} ({'ok' if cpu['ok'] else 'NOT within'}) | "
            f"{_fmt(num['rel_l2_vs_torch_cpu_fp64'])} | {_fmt(gpu['max_abs_err']) if gpu else '-'} |")
    lines.append("")
    lines += summary_lines(rows)
    methods = {row["latency"]["method"] for row in rows.values() if "latency" in row}
    lines += ["Method: " + " / ".join(sorted(methods)) + ". TVM rows: `time_evaluator` on the agent (device timer, "
              "one model run per sample) after warm-up, inputs already on the GPU; PyTorch rows: inputs already on "
              "the GPU, no host copies in the figure.", ""]
    for name in ("torch-compile", "tvm-untuned", "tvm-tuned"):
        if name in rows and "compile_s" in rows[name]:
            lines.append(f"- {name}: compile time {rows[name]['compile_s']:.1f} s.")
    eager = rows.get("pytorch-eager", {}).get("settings")
    if eager:
        lines.append(f"- PyTorch settings: {json.dumps(eager)} (TF32 convolutions are cuDNN's default; the strict row "
                     "turns them off).")
    lines.append("")
    if tn:
        lines += ["## Tuning", "",
                  f"- Budget: {tn.get('max_trials_global')} trials = {tn.get('tasks')} tasks x {tn.get('max_trials_per_task')} "
                  f"per task, {tn.get('num_trials_per_iter')} per round; cost model {tn.get('cost_model')}; "
                  f"population {tn.get('population_size')}; builder FarmBuilder ({tn.get('builder_workers')} workers, "
                  f"timeout {tn.get('builder_timeout_sec')} s); runner FarmRunner through the tracker; "
                  f"wall budget {tn.get('wall_budget_s')} s.",
                  f"- Outcome: {tn.get('outcome', 'not run')}; tuning wall time {tn.get('wall_s_total') or 0:.0f} s "
                  f"(this run {tn.get('wall_s_this_run') or 0:.0f} s).",
                  f"- Records in the database: {tn.get('records_in_database')} over {tn.get('rounds_measured')} measured "
                  f"rounds ({tn.get('trial_errors')} failed candidates); tasks with records "
                  f"{tn.get('tasks_with_records')}/{tn.get('tasks')}, with a valid measurement "
                  f"{tn.get('tasks_with_valid_records')}/{tn.get('tasks')}; MetaSchedule's last estimate "
                  f"{_fmt(tn.get('last_estimated_ms'))} ms.", ""]
    sched = data.get("scheduled")
    if sched:
        lines += [f"- Tuned build: **{sched['count']} of {sched['total']} TIR functions carry a tuned schedule** "
                  "(`tirx.is_scheduled` after `MetaScheduleApplyDatabase` on exactly the tuned module)"
                  + ("; the rest get TVM's default GPU schedules (dlight) inside `tvm.compile`."
                     if meta.get("gpu_name") and sched["unscheduled"] else ".")
                  + (f" Without a tuned schedule: {', '.join(sched['unscheduled'])}." if sched["unscheduled"] else ""),
                  pipeline_line(sched.get("pipeline_check") or {}), ""]
    if data.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in data["notes"]] + [""]
    if data.get("problems"):
        lines += ["## Problems", ""] + [f"- {p}" for p in data["problems"]] + [""]
    lines += ["## Steps", ""] + [f"- {s['time']} {s['step']}" + (f" ({', '.join(f'{k}={_fmt(v)}' for k, v in s.items() if k not in ('step', 'time'))})"
                                 if len(s) > 2 else "") for s in data["steps"]] + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def environment(device: str) -> dict[str, Any]:
    import numpy
    import torch
    import torchvision
    import tvm
    import tvm_ffi

    from tunefarm.device_agents.probe import cpu_model

    meta: dict[str, Any] = {"started": now(), "python": platform.python_version(), "tvm": tvm.__version__,
                            "tvm_ffi": getattr(tvm_ffi, "__version__", "?"), "torch": torch.__version__,
                            "torchvision": torchvision.__version__, "numpy": numpy.__version__,
                            "cpu": cpu_model(), "cpus": os.cpu_count(), "hostname": platform.node()}
    for name in ("triton", "xgboost"):
        try:
            meta[name] = __import__(name).__version__
        except Exception:  # pylint: disable=broad-except
            meta[name] = "not installed"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        meta["gpu_name"] = meta["device_name"] = torch.cuda.get_device_name(0)
        meta["device_detail"] = (f"sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                                 f"{props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}")
        try:
            meta["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30, check=False).stdout.strip()
        except OSError:
            meta["driver"] = "unknown"
    else:
        meta["device_name"] = f"CPU {meta['cpu']} (dry run, --cpu)"
    return meta


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="torchvision name, or builtin:NAME")
    parser.add_argument("--input-shape", default="1,3,224,224")
    parser.add_argument("--trials-per-task", type=int, default=16)
    parser.add_argument("--per-iter", type=int, default=16, help="trials per round")
    parser.add_argument("--population", type=int, default=256)
    parser.add_argument("--tune-wall-s", type=float, default=780.0, help="stop tuning (records kept) after this")
    parser.add_argument("--builder-timeout-s", type=float, default=180.0)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--skip-torch-compile", action="store_true")
    parser.add_argument("--skip-tuning", action="store_true", help="evaluate what the job's database holds")
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU (no GPU needed)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--work-dir", default=str(ROOT / "logs" / "gpu-study"))
    args = parser.parse_args()

    import torch

    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to PyTorch; use --cpu for a dry run", file=sys.stderr)
        return 2
    import tvm

    from tunefarm.core.jobspec import ModelSpec, job_from_dict
    from tunefarm.host.tuning.evaluate import apply_database
    from tunefarm.host.models import load_model, to_relax
    from tunefarm.core.targets import target_to_json
    from tunefarm.host.tuning.job import fuse_for_tuning, resolve_job_target

    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    meta = environment(device)
    name_slug = slug(meta["gpu_name"]) if device == "cuda" else "cpu-" + slug(meta["cpu"])
    stem = Path(args.out) / (f"gpu-{name_slug}" if device == "cuda" else name_slug)
    shape = [int(d) for d in args.input_shape.split(",")]
    source, _, mname = args.model.rpartition(":")
    spec = ModelSpec(source or "torchvision", mname, None, shape)
    meta.update({"model": args.model, "input_shape": shape, "argv": sys.argv[1:]})
    study = Study(stem, meta)
    previous = stem.with_suffix(".json")
    earlier_wall = 0.0
    if previous.exists():  # a resumed run: keep the tuning time already spent in the report's total
        try:
            earlier = json.loads(previous.read_text()).get("tuning", {})
            earlier_wall = float(earlier.get("wall_s_total") or 0.0)
        except (ValueError, OSError):
            pass
    study.data["tuning"].update({"wall_s_earlier_runs": earlier_wall, "wall_s_total": earlier_wall})
    study.step("started", device=device)
    log(f"report: {stem}.json/.md")

    agent_arg, agent_why = agent_target_for(device)
    meta.update({"agent_target_arg": agent_arg, "agent_target_why": agent_why})
    farm = None
    try:
        farm = start_farm(work_dir, agent_arg)
        port, client = farm.port, farm.client
        tracker_addr = farm.tracker_addr
        study.step("farm up", tracker_port=port)
        log(f"tracker 127.0.0.1:{port}, agent on key '{KEY}' ({agent_why})")

        model = load_model(spec)
        n_tasks_guess = None
        job = job_from_dict({
            "name": f"{slug(mname)}-{device}", "model": {"source": spec.source, "name": mname, "input_shape": shape},
            "device": {"key": KEY, "tracker": f"127.0.0.1:{port}"}, "target": "from-agent",
            "tuning": {"max_trials_global": 1, "max_trials_per_task": args.trials_per_task,
                       "num_trials_per_iter": args.per_iter, "cost_model": "xgb",
                       "population_size": args.population, "seed": 0},
            "builder": {"workers": 0, "timeout_sec": args.builder_timeout_s},
            "runner": {"timeout_sec": 60.0, "number": 3, "repeat": 1, "min_repeat_ms": 50, "device_wait_sec": 120.0},
            "evaluate": {"warmup": args.warmup, "repeat": args.samples, "baselines": []}})
        target = resolve_job_target(job, client)
        meta["target"] = json.dumps(target_to_json(target))
        t0 = time.perf_counter()
        mod = fuse_for_tuning(to_relax(model), target)
        from tvm.s_tir import meta_schedule as ms
        import tvm_ffi

        extracted = ms.relax_integration.extract_tasks(mod, target)
        task_names = [t.task_name for t in extracted]
        task_keys = [str(tvm_ffi.structural_hash(t.dispatched[0])) for t in extracted]
        n_tasks_guess = len(extracted)
        job.tuning.max_trials_global = n_tasks_guess * args.trials_per_task
        study.data["tuning"].update({
            "tasks": n_tasks_guess, "max_trials_global": job.tuning.max_trials_global,
            "max_trials_per_task": args.trials_per_task, "num_trials_per_iter": args.per_iter,
            "cost_model": "xgb", "population_size": args.population, "builder_workers": os.cpu_count(),
            "builder_timeout_sec": args.builder_timeout_s, "wall_budget_s": args.tune_wall_s})
        study.step("imported and fused", seconds=time.perf_counter() - t0, tasks=n_tasks_guess)

        # References: PyTorch on the CPU, fp32 (the farm's reference) and fp64.
        refs: dict[str, Any] = {"cpu_fp32": model.reference_outputs()}
        ref64 = copy.deepcopy(model.torch_module).double().eval()
        with torch.no_grad():
            out = ref64(torch.from_numpy(model.inputs[0]).double())
        refs["cpu_fp64"] = [o.numpy() for o in (out if isinstance(out, (tuple, list)) else [out])]
        del ref64

        torch_rows(study, model, device, refs, args)
        tensorrt_row(study)
        study.step("pytorch rows done")

        build_dir = work_dir / "builds"
        build_dir.mkdir(exist_ok=True)
        try:
            tvm_row(study, "tvm-untuned", mod, target, tracker_addr, build_dir, model, refs, args,
                    {"label": "untuned (tvm.compile: default GPU schedules)" if device == "cuda"
                     else "untuned (tvm.compile)"})
        except Exception as err:  # pylint: disable=broad-except
            study.data["problems"].append(f"untuned TVM build failed: {str(err).strip().splitlines()[-1][:300]}")
            study.row("tvm-untuned", {"backend": "TVM untuned", "not_run": "failed (see problems)"})
            traceback.print_exc()

        if args.skip_tuning:
            database = tuning_summary(work_dir / "logs" / job.name, task_keys, task_names)[1]
        else:
            log(f"tuning: {job.tuning.max_trials_global} trials ({n_tasks_guess} tasks x {args.trials_per_task}), "
                f"wall budget {args.tune_wall_s:.0f} s")
            database = tune(study, job, work_dir, args, task_keys, task_names)

        applied, scheduled, unscheduled = apply_database(mod, target, database)
        study.data["scheduled"] = {"count": len(scheduled), "total": len(scheduled) + len(unscheduled),
                                   "unscheduled": unscheduled,
                                   "pipeline_check": scheduled_kept_by_pipeline(applied, target, scheduled)}
        study.save()
        log(f"tuned schedules: {len(scheduled)}/{len(scheduled) + len(unscheduled)} TIR functions")
        try:
            tvm_row(study, "tvm-tuned", applied, target, tracker_addr, build_dir, model, refs, args,
                    {"label": f"tuned ({len(scheduled)}/{len(scheduled) + len(unscheduled)} functions scheduled)"})
        except Exception as err:  # pylint: disable=broad-except
            study.data["problems"].append(f"tuned TVM build failed: {str(err).strip().splitlines()[-1][:300]}")
            study.row("tvm-tuned", {"backend": "TVM tuned", "not_run": "failed (see problems)"})
            traceback.print_exc()

        rows = study.data["rows"]
        if "latency" in rows.get("tvm-tuned", {}) and "latency" in rows.get("tvm-untuned", {}):
            tuned_ms = rows["tvm-tuned"]["latency"]["median_ms"]
            untuned_ms = rows["tvm-untuned"]["latency"]["median_ms"]
            if tuned_ms >= untuned_ms:
                study.data["problems"].append(f"the tuned build is not faster than the untuned one "
                                              f"({tuned_ms:.3f} ms vs {untuned_ms:.3f} ms)")
        for name, row in rows.items():
            if "numerics" in row and not row["numerics"]["vs_torch_cpu_fp32"]["ok"]:
                err = row["numerics"]["vs_torch_cpu_fp32"]["max_abs_err"]
                study.data["problems"].append(f"{name}: output not within rtol=atol={RTOL} of PyTorch CPU fp32 "
                                              f"(max abs err {_fmt(err)})")
        meta["finished"] = now()
        study.step("finished")
    except Exception as err:  # pylint: disable=broad-except
        study.data["problems"].append(f"study stopped: {type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}")
        study.step("stopped by an error")
        traceback.print_exc()
        return 1
    finally:
        if farm is not None:
            farm.close()
    print(render_markdown(study.data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
