"""The GPU-box path end to end: a tracker and one CUDA agent, ResNet-18 tuned through the farm, then
PyTorch eager, torch.compile, TensorRT, untuned TVM and tuned TVM run, timed and checked on the agent's GPU.

    python -m bench.gpu_study [--trials-per-task 16] [--tune-wall-s 780] [--out bench/results]
    python -m bench.gpu_study --cpu --model builtin:convnet ...   # dry run without a GPU

Steps, in this order, each written to the report as soon as it is done (a run cut short still leaves
a report with every step it finished):
  1. start ``tunefarm tracker`` and ``tunefarm agent --key gpu --target T`` on loopback ports (T: the
     ``nvidia-h100`` preset on an H100, else the target the agent's own CUDA probe gives);
  2. tuning through the farm with ``tunefarm.host.tuning.job.tune_job`` (FarmBuilder, FarmRunner, xgb),
     ended by its ``should_stop`` hook at a wall budget or a wall-clock time (records kept; a rerun with the
     same --work-dir resumes);
  3. the TVM builds compiled: untuned (``tvm.compile``; unscheduled kernels get TVM's default GPU
     schedules), tuned (the job's database applied to exactly the tuned module) and tuned with Relax's
     CUDA-graph rewriting;
  4. timing, on the GPU alone (``--barrier``: studies run side by side wait until all have stopped
     tuning, and time one at a time): the peers, through the farm's one Comparator (``tunefarm.host.comparator``) —
     PyTorch eager (TF32 convolutions, PyTorch's default), strict fp32 and fp16, ``torch.compile`` default and
     ``mode="reduce-overhead"`` (CUDA graphs) at fp32, TF32 and fp16, TensorRT fp32 and fp16 ("not
     available" where it is not installed), each run by the agent's runner — then the TVM builds, run by the
     agent's TVM runner (Relax VM, ``time_evaluator``).
Every row is compared (``core.stats.compare_outputs``) with PyTorch on the CPU in fp32 (the farm's
reference), and also with PyTorch on the CPU in fp64 (relative L2 error) and with PyTorch eager on the GPU.
Timing and the method text are ``core.stats``'s, as in ``tunefarm tune`` and ``tunefarm compare``.
Writes <out>/gpu-<gpu-name>.json and .md (``--cpu``: cpu-<cpu-name>.*).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench import common

KEY = "gpu"
RTOL = ATOL = 1e-3
PEERS = ("pytorch-eager", "pytorch-eager-strict-fp32", "pytorch-eager-fp16", "torch-compile",
         "torch-compile-ro-fp32", "torch-compile-ro-tf32", "torch-compile-ro-fp16", "tensorrt", "tensorrt-fp16")
ORDER = (*PEERS, "tvm-untuned", "tvm-tuned", "tvm-tuned-cudagraph", "tvm-vendor", "tvm-placed")


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

    def rows(self, results, refs: dict[str, Any]) -> None:
        """Comparator results (already compared with the CPU fp32 reference), with the study's other references."""
        from tunefarm.core.stats import compare_outputs
        from tunefarm.host.reports.markdown import number

        for res in results:
            row = res.to_dict()
            if res.ok:
                prec = res.precision or "fp32"
                row["numerics_vs_torch_cpu_fp64"] = compare_outputs(res.outputs, refs["cpu_fp64"], RTOL, ATOL, prec)
                if refs.get("gpu_eager") is not None:
                    row["numerics_vs_torch_gpu_eager"] = compare_outputs(res.outputs, refs["gpu_eager"], RTOL, ATOL,
                                                                         prec)
                log(f"{res.label}: {res.latency['median_ms']:.3f} ms, {res.precision}, "
                    f"max abs err {number(res.numerics['max_abs_err'])}")
            else:
                log(f"{res.label}: {res.status}: {res.reason}")
            self.data["rows"][res.label] = row
        self.save()

    def save(self) -> None:
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        self.stem.with_suffix(".json").write_text(json.dumps(self.data, indent=2, default=str))
        self.stem.with_suffix(".md").write_text(render_markdown(self.data))


# ----------------------------------------------------------------------------- rows

def peer_rows(device: str, skip_torch_compile: bool):
    """The peers, on the agent's runners: PyTorch eager as it comes (TF32 convs), in strict fp32 and in fp16;
    torch.compile default; torch.compile ``mode="reduce-overhead"`` (CUDA graphs) with cudnn.benchmark at
    strict fp32, TF32 and fp16 (the strongest PyTorch a TensorRT user would run); TensorRT fp32 and fp16."""
    from tunefarm.host.comparator import NOT_RUN, Row, result

    eager = Row("torch", KEY, label="pytorch-eager", options={"device": device}, rtol=RTOL, atol=ATOL)
    rows = [eager]
    if device == "cuda":
        rows.append(Row("torch", KEY, label="pytorch-eager-strict-fp32", options={"device": device, "allow_tf32": False},
                        rtol=RTOL, atol=ATOL))
        rows.append(Row("torch", KEY, label="pytorch-eager-fp16", options={"device": device, "precision": "fp16",
                                                                           "cudnn_benchmark": True},
                        rtol=RTOL, atol=ATOL))
    compiled = [Row("torch-compile", KEY, label="torch-compile", options={"device": device}, rtol=RTOL, atol=ATOL)]
    if device == "cuda":
        for label, extra in (("torch-compile-ro-fp32", {"allow_tf32": False}), ("torch-compile-ro-tf32", {"allow_tf32": True}),
                             ("torch-compile-ro-fp16", {"precision": "fp16"})):
            compiled.append(Row("torch-compile", KEY, label=label,
                                options={"device": device, "mode": "reduce-overhead", "cudnn_benchmark": True, **extra},
                                rtol=RTOL, atol=ATOL))
    rows += [result(r, NOT_RUN, "skipped (--skip-torch-compile)") if skip_torch_compile else r for r in compiled]
    rows.append(Row("tensorrt", KEY, label="tensorrt", options={"precision": "fp32"}, rtol=RTOL, atol=ATOL))
    rows.append(Row("tensorrt", KEY, label="tensorrt-fp16", options={"precision": "fp16"}, rtol=RTOL, atol=ATOL))
    return rows


def tvm_build_row(name: str, module, target, build_dir: Path, label: str, precision: str = "fp32",
                  cuda_graph: bool = False):
    """``module`` compiled here for ``target`` (``cuda_graph``: Relax's CUDA-graph rewriting) and exported: a
    row for the agent's TVM runner, of the precision class the pipeline compiled it in."""
    from tunefarm.host.comparator import Row
    from tunefarm.host.tuning.evaluate import device_type_of
    from tunefarm.host.tuning.pipeline import compile_module

    t0 = time.perf_counter()
    lib = build_dir / f"{name}.so"
    compile_module(module, target, cuda_graph=cuda_graph).export_library(str(lib))
    backend = "tvm-tuned" if name.startswith("tvm-tuned") else "tvm-untuned"  # the agent's TVM runner either way
    return Row(backend, KEY, label=name, options={"device": device_type_of(target), "precision": precision},
               rtol=RTOL, atol=ATOL, model_file=str(lib),
               details={"compile_s": round(time.perf_counter() - t0, 1), "build": label, "cuda_graph": cuda_graph})


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


def place(study: Study, job, target, pipeline, model, database, comparator, art, refs, build_dir: Path, device: str,
          console, job_dir: Path, task_keys: list[str] | None = None) -> None:
    """The farm's placement after tuning, as a job's evaluation runs it (host/placement/evaluation.py): every group
    a vendor of ``job.placement.backends`` can run timed alone on the agent as the vendor's and as the tuned TVM
    kernel, placed on the faster; ``tvm-vendor`` and ``tvm-placed`` built and timed beside ``tvm-tuned``; the
    fastest correct of the three chosen (placement.json in the job directory). On the GPU alone (called inside
    :func:`timing_alone`)."""
    from types import SimpleNamespace

    from tunefarm.host.comparator import Row
    from tunefarm.host.placement import evaluation as placement

    # The job's tasks (their keys) tell a group whose task was not tuned in time from one TVM fuses otherwise.
    tasks = [SimpleNamespace(key=k) for k in task_keys or []]
    tuned = SimpleNamespace(job=job, target=target, plan=SimpleNamespace(pipeline=pipeline, tasks=tasks), model=model,
                            database=database)
    libs: dict[str, str] = {}
    t0 = time.perf_counter()
    info = placement.prepare(tuned, comparator, libs, build_dir, device, console)
    study.data["placement_prepare_s"] = round(time.perf_counter() - t0, 1)
    rows = [Row(name, KEY, label=name, options={"device": device, "precision": pipeline.precision}, rtol=RTOL,
                atol=ATOL, model_file=lib) for name, lib in libs.items()]
    if rows:
        study.rows(comparator.run_and_compare(art, rows), refs)
    job_dir.mkdir(parents=True, exist_ok=True)
    study.data["placement"] = placement.choose(info, study.data["rows"], job_dir)
    study.save()
    log(f"placement: {study.data['placement'].get('chosen')}; not used: {info.get('not_used')}")


def mark_tuned(barrier: str, name: str, note: str = "") -> None:
    """Say (``<barrier>/<name>.tuned``) that this study's tuning is over, or that it will not tune."""
    if barrier:
        Path(barrier).mkdir(parents=True, exist_ok=True)
        (Path(barrier) / f"{name}.tuned").write_text(f"{now()} {note}".strip())


@contextlib.contextmanager
def timing_alone(barrier: str, group: int, study: Study, wait_s: float = 1800.0):
    """Time rows only once every study of the group has stopped tuning, and one study at a time.

    Studies run side by side on one GPU (to fit a lent machine's half hour) tune together; a row timed while
    another study tunes or times would share the GPU with it. Each study marks ``<barrier>/<name>.tuned``
    when its tuning is over (:func:`mark_tuned`, also on an error); this waits for ``group`` marks (at most
    ``wait_s``; the report says if it stopped waiting) and then holds an exclusive lock on
    ``<barrier>/timing.lock`` while the rows are timed. Compiling needs no GPU and is not serialised. Without
    ``barrier`` this is a no-op."""
    if not barrier:
        yield
        return
    import fcntl

    root = Path(barrier)
    deadline = time.time() + wait_s
    while len(list(root.glob("*.tuned"))) < group and time.time() < deadline:
        time.sleep(2.0)
    ready = len(list(root.glob("*.tuned")))
    if ready < group:
        study.data["problems"].append(f"timed while {group - ready} of {group} side-by-side studies may still "
                                      f"have been tuning (waited {wait_s:.0f} s)")
    with open(root / "timing.lock", "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        study.step("timing (the GPU to this study alone)", studies_done_tuning=ready, group=group)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    from tunefarm.host.tuning.jobdir import records_per_workload

    job_dir.mkdir(parents=True, exist_ok=True)  # --skip-tuning before any tuning: an empty database
    db = ms.database.JSONDatabase(work_dir=str(job_dir))
    per = records_per_workload(db)
    total: dict[str, int] = {}  # every record of a workload, failed candidates included
    for rec in db.get_all_tuning_records():
        key = str(tvm_ffi.structural_hash(rec.workload.mod))
        total[key] = total.get(key, 0) + 1
    events = []
    progress = job_dir / "progress.jsonl"
    if progress.exists():
        events = [json.loads(line) for line in progress.read_text().splitlines() if line.strip()]
    # records_per_workload lists the valid measurements of each workload (failed candidates: none)
    tasks = [{"task": n, "valid_records": len(per.get(k, [])), "records": total.get(k, 0),
              "best_us": min(per[k]) * 1e6 if per.get(k) else None} for n, k in zip(task_names, task_keys)]
    return {"records_in_database": len(db), "tasks_with_records": sum(1 for k in task_keys if k in per),
            "tasks_with_valid_records": sum(1 for t in tasks if t["valid_records"]),
            "rounds_measured": sum(1 for e in events if e.get("batch")),
            "trials_measured": sum(e.get("batch", 0) for e in events),
            "trial_errors": sum(e.get("errors", 0) for e in events),
            "last_estimated_ms": next((e["estimated_ms"] for e in reversed(events) if e.get("estimated_ms")), None),
            "per_task": tasks}, db


def tune(study: Study, job, work_dir: Path, args, task_keys, task_names) -> Any:
    """tune_job, ended cleanly at the wall budget or --tune-until (its stop_at: no new candidates from then
    on, even inside MetaSchedule's first round over every task; the batches in flight finish; records kept)."""
    from tunefarm.core.errors import TunefarmError
    from tunefarm.host.tuning.job import tune_job

    stop_at = args.tune_until or time.time() + args.tune_wall_s
    t0 = time.time()
    outcome = "finished"
    space_notes: list[str] = []
    try:
        tuned = tune_job(job, work_dir / "logs", stop_at=stop_at)
        space_notes = list(tuned.space_notes)
        if tuned.stopped:
            outcome = f"stopped at the wall budget ({time.time() - t0:.0f} s wall); records kept"
    except TunefarmError as err:
        outcome = f"stopped: {err}"
    log(f"tuning {outcome}")
    wall = time.time() - t0
    summary, db = tuning_summary(work_dir / "logs" / job.name, task_keys, task_names)
    study.data["tuning"].update({"outcome": outcome, "wall_s_this_run": wall, "design_space_notes": space_notes,
                                 **summary})
    study.data["tuning"]["wall_s_total"] = study.data["tuning"].get("wall_s_earlier_runs", 0.0) + wall
    study.step("tuned", wall_s=wall, outcome=outcome)
    log(f"tuning: {outcome}; {summary['records_in_database']} records, {wall:.0f} s")
    return db


# ----------------------------------------------------------------------------- report

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


PRECISION_RANK = {"fp32": 3, "tf32": 2, "fp16": 1, "bf16": 1}


def summary_lines(rows: dict[str, Any], tvm_names=("tvm-tuned", "tvm-tuned-cudagraph", "tvm-vendor", "tvm-placed"),
                  heading: str = "## Summary") -> list[str]:
    ok = {n: r for n, r in rows.items() if r.get("status") == "ok"}
    med = {n: r["latency"]["median_ms"] for n, r in ok.items()}
    tvm_rows = [n for n in tvm_names if n in med]
    if not tvm_rows:
        return []
    best = min(tvm_rows, key=lambda n: med[n])
    prec = ok[best].get("precision") or "fp32"
    out = [heading, "", f"Fastest tuned TVM row: {best} ({prec}), {med[best]:.3f} ms.", ""]
    for name in [n for n in ORDER if n in med and n not in tvm_names and not n.startswith("tvm-tuned")]:
        ratio = (f"{med[name] / med[best]:.2f}x faster" if med[best] < med[name]
                 else f"{med[best] / med[name]:.2f}x slower")
        out.append(f"- {best} vs {name} ({ok[name].get('precision')}): {med[best]:.3f} ms vs {med[name]:.3f} ms "
                   f"({ratio}).")
    # The goal's yardstick: the fastest PyTorch row of the same or a lower precision class than TVM's.
    peers = [n for n in med if n.startswith(("pytorch", "torch-compile"))
             and PRECISION_RANK.get(ok[n].get("precision") or "fp32", 3) <= PRECISION_RANK.get(prec, 3)]
    if peers:
        fastest = min(peers, key=lambda n: med[n])
        out.append(f"- against the fastest PyTorch row of the same or lower precision ({fastest}, "
                   f"{ok[fastest].get('precision')}, {med[fastest]:.3f} ms): **{med[best] / med[fastest]:.2f}x** "
                   "(goal: at or below 0.9x).")
    return out + [""]


def table_lines(rows: dict[str, Any], order: list[str]) -> list[str]:
    """The latency and numerics table of ``rows`` in ``order``."""
    from tunefarm.host.comparator import STATUS_TEXT
    from tunefarm.host.reports.markdown import number

    lines = [
        "| row | where | threads | precision | median ms | p90 | p99 | mean | std | min | samples | max abs err vs PyTorch CPU fp32 (allclose 1e-3) | rel. L2 err vs CPU fp64 | max abs err vs PyTorch GPU eager |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in order:
        row = rows[name]
        if row["status"] != "ok":
            lines.append(f"| {name} | {STATUS_TEXT.get(row['status'], row['status'])}: {row['reason']} | | | | | | | | | | | | |")
            continue
        lat, num = row["latency"], row["numerics"]
        fp64 = row.get("numerics_vs_torch_cpu_fp64") or {}
        gpu = row.get("numerics_vs_torch_gpu_eager")
        lines.append(
            f"| {name} | {row['where']} | {row.get('threads') or '-'} | {row.get('precision')} | **{lat['median_ms']:.3f}** | "
            f"{lat['p90_ms']:.3f} | {lat['p99_ms']:.3f} | {lat['mean_ms']:.3f} | {lat['std_ms']:.3f} | {lat['min_ms']:.3f} | "
            f"{lat['samples']} | {number(num['max_abs_err'])} ({'ok' if num['ok'] else 'NOT within'}) | "
            f"{number(fp64.get('rel_l2_err'))} | {number(gpu['max_abs_err']) if gpu else '-'} |")
    return lines


def render_markdown(data: dict[str, Any]) -> str:
    from tunefarm.core.stats import method_text
    from tunefarm.host.reports.markdown import number

    meta, rows, tn = data["meta"], data["rows"], data.get("tuning", {})
    lines = [f"# {meta.get('model')} on {meta.get('gpu_name') or meta.get('device_name')}: the GPU-box path end to end", "",
             f"Run {meta.get('started')} by `python -m bench.gpu_study` ({'finished ' + meta['finished'] if meta.get('finished') else 'NOT FINISHED: partial report'}).", "",
             f"- Device: {meta.get('device_name')} ({meta.get('device_detail', '')}); driver {meta.get('driver', '-')}; "
             f"host {meta.get('host')}, CPU {meta.get('cpu')} ({meta.get('logical_cpus')} logical CPUs, {meta.get('cores')} "
             f"cores, TVM threads {meta.get('threads')}); load average {meta.get('load_avg_start')} at the start, "
             f"{meta.get('load_avg_end', '-')} at the end.",
             f"- Software: TVM {meta.get('tvm')}, tvm-ffi {meta.get('tvm_ffi')}, PyTorch {meta.get('torch')}, "
             f"torchvision {meta.get('torchvision')}, Triton {meta.get('triton', '-')}, xgboost {meta.get('xgboost', '-')}, "
             f"Python {meta.get('python')}.",
             f"- Model: {meta.get('model')}, random weights (weights=None), input {meta.get('input_shape')}; TVM "
             f"pipeline: {meta.get('pipeline', 'fp32')}. Numerics: fp32 rows allclose 1e-3 against PyTorch CPU fp32; "
             "TF32 and fp16 rows relative L2 <= 1e-2 and top-1 agreement.",
             f"- Farm: `tunefarm tracker` + one `tunefarm agent --key {KEY} --target {meta.get('agent_target_arg', '?')}` "
             f"on loopback ({meta.get('agent_target_why', '')}); target `{meta.get('target', '?')}`.", ""]
    lines += ["## Latency and numerics", ""] + table_lines(rows, [n for n in ORDER if n in rows]
                                                       + [n for n in rows if n not in ORDER]) + [""]
    lines += summary_lines(rows)
    args = meta.get("args", {})
    lines += ["Method: " + method_text(args.get("warmup", 0), args.get("samples", 0), args.get("budget_s", 0.0)), ""]
    for name, row in rows.items():
        det = row.get("details") or {}
        if row["status"] == "ok" and det.get("compile_s") is not None:
            where = "on the host" if name.startswith("tvm") else "on the agent (first calls)"
            lines.append(f"- {name}: compile time {det['compile_s']} s {where}.")
        if row["status"] == "ok" and (det.get("cuda_graphs") or det.get("cuda_graph")):
            lines.append(f"- {name}: CUDA graphs on.")
        if det.get("tf32_allowed"):
            lines.append(f"- {name}: TF32 allowed {json.dumps(det['tf32_allowed'])} (TF32 convolutions are cuDNN's "
                         "default; the strict row turns TF32 off).")
    lines.append("")
    if tn:
        lines += ["## Tuning", "",
                  f"- Budget: {tn.get('max_trials_global')} trials = {tn.get('tasks')} tasks x {tn.get('max_trials_per_task')} "
                  f"per task, {tn.get('num_trials_per_iter')} per round; cost model {tn.get('cost_model')}; "
                  f"population {tn.get('population_size')}; builder FarmBuilder ({tn.get('builder_workers')} workers, "
                  f"timeout {tn.get('builder_timeout_sec')} s); runner FarmRunner through the tracker; "
                  f"wall budget {tn.get('wall_budget_s')} s (tune_job's should_stop).",
                  f"- Outcome: {tn.get('outcome', 'not run')}; tuning wall time {tn.get('wall_s_total') or 0:.0f} s "
                  f"(this run {tn.get('wall_s_this_run') or 0:.0f} s).",
                  f"- Records in the database: {tn.get('records_in_database')} over {tn.get('rounds_measured')} measured "
                  f"rounds ({tn.get('trial_errors')} failed candidates); tasks with records "
                  f"{tn.get('tasks_with_records')}/{tn.get('tasks')}, with a valid measurement "
                  f"{tn.get('tasks_with_valid_records')}/{tn.get('tasks')}; MetaSchedule's last estimate "
                  f"{number(tn.get('last_estimated_ms'))} ms."]
        lines += [f"- Design space: {note}" for note in tn.get("design_space_notes") or []]
        per_task = [t for t in tn.get("per_task") or [] if t.get("records")]
        if per_task:
            valid, total = sum(t["valid_records"] for t in per_task), sum(t["records"] for t in per_task)
            lines.append(f"- Valid candidates per task (valid / records; a failed build or run is a record without "
                         f"a time): {valid}/{total} in all; " + ", ".join(
                             f"{t['task']} {t['valid_records']}/{t['records']}" for t in per_task) + ".")
        lines.append("")
    if data.get("placement"):
        from tunefarm.host.reports.placement import markdown as placement_markdown

        lines += placement_markdown(data["placement"], rows, data["placement"].get("peak_gflops") or 0.0) + [""]
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
    lines += ["## Steps", ""] + [f"- {s['time']} {s['step']}" + (f" ({', '.join(f'{k}={number(v)}' for k, v in s.items() if k not in ('step', 'time'))})"
                                 if len(s) > 2 else "") for s in data["steps"]] + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def environment(device: str) -> dict[str, Any]:
    import subprocess

    import numpy
    import torch
    import torchvision
    import tvm_ffi

    meta: dict[str, Any] = {"started": now(), **common.machine(), "tvm_ffi": getattr(tvm_ffi, "__version__", "?"),
                            "torch": torch.__version__, "torchvision": torchvision.__version__,
                            "numpy": numpy.__version__}
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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="torchvision name, or builtin:NAME")
    parser.add_argument("--input-shape", default="1,3,224,224")
    parser.add_argument("--trials-per-task", type=int, default=16)
    parser.add_argument("--per-iter", type=int, default=16, help="trials per round")
    parser.add_argument("--population", type=int, default=256)
    parser.add_argument("--tune-wall-s", type=float, default=780.0, help="stop tuning (records kept) after this")
    parser.add_argument("--tune-until", type=float, default=0.0,
                        help="stop tuning at this Unix time instead (studies run side by side end together)")
    parser.add_argument("--barrier", default="",
                        help="a directory shared by --group studies run side by side: each times its rows only "
                             "once all of them have stopped tuning, and one study at a time")
    parser.add_argument("--group", type=int, default=1, help="how many studies share --barrier")
    parser.add_argument("--builder-timeout-s", type=float, default=180.0)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--budget-s", type=float, default=120.0,
                        help="per row: a slower row gets fewer samples (never under 5)")
    parser.add_argument("--skip-torch-compile", action="store_true")
    parser.add_argument("--peers", default="", help="comma-separated peer rows to run (default: all of "
                        + ", ".join(PEERS) + ")")
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                        help="the job's tuning.precision (fp16: ToMixedPrecision, the tensor-core space on CUDA)")
    parser.add_argument("--fold-batchnorm", choices=("on", "off"), default="on",
                        help="the job's tuning.fold_batchnorm (the fp16 tensor-core probe measured it off)")
    parser.add_argument("--layout", choices=("NCHW", "NHWC"), default=None,
                        help="the job's tuning.layout (NHWC: convs converted to NHWC/OHWI before legalization); "
                             "default: the pipeline's default for the target")
    parser.add_argument("--placement", default="off",
                        help="vendor libraries to place operator groups on after tuning, by measurement on the "
                             "agent (the farm's placement: host/placement), e.g. cudnn,cublas or auto; the rows "
                             "tvm-vendor (every group they can run) and tvm-placed, and the per-group table. The "
                             "plugins are built first if they are not cached (tunefarm runtime cuda-libs)")
    parser.add_argument("--no-cuda-graph", action="store_true",
                        help="do not also time the tuned build compiled with Relax's CUDA-graph rewriting")
    parser.add_argument("--no-untuned", action="store_true", help="do not compile and time the untuned build")
    parser.add_argument("--skip-tuning", action="store_true", help="evaluate what the job's database holds")
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU (no GPU needed)")
    parser.add_argument("--out", default=str(common.RESULTS))
    parser.add_argument("--work-dir", default=str(common.ROOT / "logs" / "gpu-study"))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to PyTorch; use --cpu for a dry run", file=sys.stderr)
        return 2
    from rich.console import Console

    from tunefarm.core.jobspec import ModelSpec, job_from_dict
    from tunefarm.core.targets import target_to_json
    from tunefarm.host.comparator import FAILED, Comparator, FarmAgents, MeasureSettings, ModelArtifacts, Row, result
    from tunefarm.host.models import load_model, to_relax
    from tunefarm.host.reports.markdown import number
    from tunefarm.host.tuning.evaluate import apply_database
    from tunefarm.host.tuning.job import fuse_for_tuning, resolve_job_target

    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    meta = environment(device)
    name_slug = slug(meta["gpu_name"]) if device == "cuda" else "cpu-" + slug(meta["cpu"])
    stem = Path(args.out) / (f"{'gpu-' if device == 'cuda' else ''}{name_slug}-{slug(args.model)}-{args.precision}"
                             + (f"-{args.layout.lower()}" if args.layout else ""))  # named: its own report
    shape = [int(d) for d in args.input_shape.split(",")]
    source, _, mname = args.model.rpartition(":")
    spec = ModelSpec(source or "torchvision", mname, None, shape)
    meta.update({"model": args.model, "input_shape": shape, "argv": sys.argv[1:],
                 "args": {"warmup": args.warmup, "samples": args.samples, "budget_s": args.budget_s}})
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
    console = Console(highlight=False)
    farm = agents = None
    try:
        if args.placement != "off" and device == "cuda":  # before the agent starts: it loads what is cached
            from tunefarm.device_agents.cuda_libs_runtime import ensure_plugins

            plugins = ensure_plugins(log=log)
            study.step("cuBLAS/cuDNN plugins", built=plugins.built, build_s=round(plugins.build_s, 1),
                       check=json.dumps(plugins.info.get("max_rel_err")))
        farm = start_farm(work_dir, agent_arg)
        study.step("farm up", tracker_port=farm.port)
        log(f"tracker {farm.addr}, agent on key '{KEY}' ({agent_why})")

        model = load_model(spec)
        job = job_from_dict({
            "name": f"{slug(mname)}-{device}" + ("" if args.precision == "fp32" else f"-{args.precision}")
                    + (f"-{args.layout.lower()}" if args.layout else ""), "model": {"source": spec.source, "name": mname, "input_shape": shape},
            "device": {"key": KEY, "tracker": farm.addr}, "target": "from-agent",
            "tuning": {"max_trials_global": 1, "max_trials_per_task": args.trials_per_task,
                       "num_trials_per_iter": args.per_iter, "cost_model": "xgb",
                       "population_size": args.population, "seed": 0, "precision": args.precision,
                       "fold_batchnorm": args.fold_batchnorm == "on", "layout": args.layout},
            "builder": {"workers": 0, "timeout_sec": args.builder_timeout_s},
            "runner": {"timeout_sec": 60.0, "number": 3, "repeat": 1, "min_repeat_ms": 50, "device_wait_sec": 120.0},
            "evaluate": {"warmup": args.warmup, "repeat": args.samples, "baselines": []},
            "placement": {"backends": "off" if args.placement == "off" else "auto" if args.placement == "auto"
                          else [v.strip() for v in args.placement.split(",") if v.strip()]}})
        target = resolve_job_target(job, farm.client)
        meta["target"] = json.dumps(target_to_json(target))
        t0 = time.perf_counter()
        from tunefarm.host.tuning.pipeline import resolve_pipeline

        # what the job's plan resolves too
        pipeline = resolve_pipeline(target, fold_batchnorm=args.fold_batchnorm == "on", precision=args.precision,
                                    layout=args.layout)
        meta["pipeline"] = pipeline.describe()
        mod = fuse_for_tuning(to_relax(model), target, pipeline)
        import tvm_ffi
        from tvm.s_tir import meta_schedule as ms

        extracted = ms.relax_integration.extract_tasks(mod, target)
        task_names = [t.task_name for t in extracted]
        task_keys = [str(tvm_ffi.structural_hash(t.dispatched[0])) for t in extracted]
        job.tuning.max_trials_global = len(extracted) * args.trials_per_task
        study.data["tuning"].update({
            "tasks": len(extracted), "max_trials_global": job.tuning.max_trials_global,
            "max_trials_per_task": args.trials_per_task, "num_trials_per_iter": args.per_iter,
            "cost_model": "xgb", "population_size": args.population, "builder_workers": meta["logical_cpus"],
            "builder_timeout_sec": args.builder_timeout_s, "wall_budget_s": args.tune_wall_s})
        study.step("imported and fused", seconds=time.perf_counter() - t0, tasks=len(extracted))

        # References: PyTorch on the CPU, fp32 (the farm's reference, the Comparator's) and fp64.
        art = ModelArtifacts(model, spec, work_dir / "files", console)
        art.work_dir.mkdir(parents=True, exist_ok=True)
        refs: dict[str, Any] = {"cpu_fp32": art.reference}
        ref64 = copy.deepcopy(model.torch_module).double().eval()
        with torch.no_grad():
            out = ref64(torch.from_numpy(model.inputs[0]).double())
        refs["cpu_fp64"] = [o.numpy() for o in (out if isinstance(out, (tuple, list)) else [out])]
        del ref64

        agents = FarmAgents(farm.tracker_addr, 120.0, console)
        comparator = Comparator(agents, MeasureSettings(args.warmup, args.samples, args.budget_s), console)
        build_dir = work_dir / "builds"
        build_dir.mkdir(exist_ok=True)

        def tvm_row(name: str, module, label: str, cuda_graph: bool = False):
            try:
                return tvm_build_row(name, module, target, build_dir, label, pipeline.precision, cuda_graph)
            except Exception as err:  # pylint: disable=broad-except
                traceback.print_exc()
                return result(Row(name, KEY, label=name), FAILED, f"the TVM build failed: {str(err).strip()[-300:]}")

        if args.skip_tuning:
            database = tuning_summary(work_dir / "logs" / job.name, task_keys, task_names)[1]
        else:
            log(f"tuning: {job.tuning.max_trials_global} trials ({len(extracted)} tasks x {args.trials_per_task}), "
                f"wall budget {args.tune_wall_s:.0f} s")
            database = tune(study, job, work_dir, args, task_keys, task_names)
        mark_tuned(args.barrier, stem.name)

        # Builds are compiled before anything is timed; studies run side by side (--barrier) time their rows
        # one study at a time, after every study's tuning has ended.
        untuned = [] if args.no_untuned else [
            tvm_row("tvm-untuned", mod, "untuned (tvm.compile: default GPU schedules)" if device == "cuda"
                    else "untuned (tvm.compile)")]
        applied, scheduled, unscheduled = apply_database(mod, target, database)
        study.data["scheduled"] = {"count": len(scheduled), "total": len(scheduled) + len(unscheduled),
                                   "unscheduled": unscheduled,
                                   "pipeline_check": scheduled_kept_by_pipeline(applied, target, scheduled)}
        study.save()
        log(f"tuned schedules: {len(scheduled)}/{len(scheduled) + len(unscheduled)} TIR functions")
        label = f"tuned ({len(scheduled)}/{len(scheduled) + len(unscheduled)} functions scheduled)"
        tuned_rows = [tvm_row("tvm-tuned", applied, label)]
        if device == "cuda" and not args.no_cuda_graph:
            tuned_rows.append(tvm_row("tvm-tuned-cudagraph", applied, label + ", CUDA graphs", cuda_graph=True))
        study.step("builds compiled")
        peers = peer_rows(device, args.skip_torch_compile)
        if args.peers:
            wanted = {p.strip() for p in args.peers.split(",") if p.strip()}
            peers = [r for r in peers if r.label in wanted]
        with timing_alone(args.barrier, args.group, study):
            first = comparator.run_and_compare(art, peers)
            eager = next((r for r in first if r.label == "pytorch-eager"), None)
            refs["gpu_eager"] = eager.outputs if device == "cuda" and eager is not None and eager.ok else None
            study.rows(first, refs)
            study.rows(comparator.run_and_compare(art, [*untuned, *tuned_rows]), refs)
            if args.placement != "off":
                try:  # the rows above are kept whatever the placement does
                    place(study, job, target, pipeline, model, database, comparator, art, refs, build_dir, device,
                          console, work_dir / "logs" / job.name, task_keys)
                except Exception as err:  # pylint: disable=broad-except
                    traceback.print_exc()
                    study.data["problems"].append(f"placement failed: {type(err).__name__}: {err}")
                    study.save()
        study.step("rows timed")

        rows = study.data["rows"]
        ran = {name: row for name, row in rows.items() if row["status"] == "ok"}
        if "tvm-tuned" in ran and "tvm-untuned" in ran:
            tuned_ms, untuned_ms = ran["tvm-tuned"]["latency"]["median_ms"], ran["tvm-untuned"]["latency"]["median_ms"]
            if tuned_ms >= untuned_ms:
                study.data["problems"].append(f"the tuned build is not faster than the untuned one "
                                              f"({tuned_ms:.3f} ms vs {untuned_ms:.3f} ms)")
        for name, row in rows.items():
            if row["status"] == "failed" or (row["status"] == "ok" and not row["numerics"]["ok"]):
                study.data["problems"].append(
                    f"{name}: {row['reason']}" if row["status"] == "failed" else
                    f"{name}: output not within rtol=atol={RTOL} of PyTorch CPU fp32 "
                    f"(max abs err {number(row['numerics']['max_abs_err'])})")
        meta["finished"] = now()
        common.finish(meta)
        study.step("finished")
    except Exception as err:  # pylint: disable=broad-except
        study.data["problems"].append(f"study stopped: {type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}")
        study.step("stopped by an error")
        traceback.print_exc()
        mark_tuned(args.barrier, stem.name, "stopped by an error")  # the others need not wait for it
        return 1
    finally:
        if agents is not None:
            agents.close()
        if farm is not None:
            farm.close()
    print(render_markdown(study.data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
