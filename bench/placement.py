"""Placement by measurement on this CPU: one model tuned through the farm per conv layout, each job's evaluation
placing operator groups on oneDNN or TVM and timing the whole-model builds beside ONNX Runtime and PyTorch.

    python -m bench.placement [--model resnet18] [--layouts NCHW,NCHWc] [--trials 192] [--per-iter 8] [--name NAME]

Each layout is one ``tunefarm`` job (run_job, the path ``tunefarm tune`` takes) through a LocalFarm: a tracker and
one agent on this machine with the oneDNN plugin (built first if it is not cached: ``tunefarm runtime onednn``),
same budget, seed 0, cold cost model. The job's evaluation runs every row on that agent with its threads (TVM's
pool and oneDNN's OpenMP pool both at the agent's count; PyTorch and ONNX Runtime at the same count): all-TVM
(``tvm-tuned``), every group on oneDNN (``tvm-vendor``), as placed (``tvm-placed``), untuned, ONNX Runtime, PyTorch;
numerics of each checked against PyTorch. Writes bench/results/placement-<model>-<name>.{json,md} with the rows,
the time each job took, and each job's per-operator table (report.md's "Placement" section).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common  # sets TVM_NUM_THREADS before TVM's pool starts

ROWS = ("tvm-tuned", "tvm-vendor", "tvm-placed", "tvm-untuned", "onnxruntime", "torch")


def run_layout(model: str, layout: str, args, work: Path) -> dict:
    import tvm

    from bench.workloads import bench_job
    from tunefarm.device_agents.probe import llvm_target
    from tunefarm.host.tuning.job import run_job
    from tunefarm.testing.localfarm import LocalFarm

    name = f"{model}-{layout.lower()}"
    with LocalFarm(work / f"farm-{name}") as farm:
        farm.add_agent("bench")
        job = bench_job(name, model, farm.addr, "bench", tvm.target.Target(llvm_target()), args.trials,
                        args.per_task or args.trials, args.per_iter, args.population)
        job.tuning.layout = layout
        job.evaluate.baselines = ["onnxruntime", "torch"]
        job.evaluate.require_speedup = False
        t0 = time.time()
        report = run_job(job, logs_dir=str(work))
        wall = time.time() - t0
    job_dir = work / name
    markdown = (job_dir / "report.md").read_text()
    section = markdown.split("## Placement", 1)[1].split("\n## ", 1)[0] if "## Placement" in markdown else ""
    return {"job": name, "layout": layout, "wall_s": round(wall, 1), "tuning_wall_s": report["tuning"]["wall_s_this_run"],
            "trials": report["tuning"]["trials_this_run"], "failed": report["tuning"]["failed_this_run"],
            "results": report["results"], "chosen": report["model_handed_out"], "placement": report["placement"],
            "placement_markdown": section.strip(), "problems": report["problems"]}


def _ms(row: dict | None) -> str:
    lat = (row or {}).get("latency")
    return f"{lat['median_ms']:.2f}" if lat else "-"


def spins_sentence(rows: dict) -> str:
    """How idle TVM and OpenMP threads waited in the rows with oneDNN parts (the runner's ``pool_spin``), or ''."""
    seen = {tuple(sorted(spin.items())) for row in rows.values() for res in row["results"].values()
            if (spin := (res.get("details") or {}).get("pool_spin"))}
    if not seen:
        return ""
    text = "; ".join(", ".join(f"{k}={v}" for k, v in spin) for spin in sorted(seen))
    return (f" Rows with oneDNN parts ran with {text} (core.threads.MIXED_POOLS: neither pool's idle threads spin "
            "on the cores the other needs next); the others with each library's default.")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.placement", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--layouts", default="NCHW,NCHWc")
    parser.add_argument("--trials", type=int, default=192)
    parser.add_argument("--per-task", type=int, default=0, help="trials per task at most (0: no cap)")
    parser.add_argument("--per-iter", type=int, default=8)
    parser.add_argument("--population", type=int, default=128)
    parser.add_argument("--name", default=common.default_name())
    parser.add_argument("--work", default=None, help="where the job directories go (default: a temporary one)")
    args = parser.parse_args()

    built = subprocess.run([sys.executable, "-m", "tunefarm", "runtime", "onednn"], capture_output=True, text=True,
                           check=False)
    if built.returncode != 0:
        raise SystemExit(f"the oneDNN plugin cannot be built here: {built.stdout.strip().splitlines()[-1:]}")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-placement-"))
    meta = common.machine(model=args.model, trials=args.trials, per_iter=args.per_iter, work=str(work))
    rows = {layout: run_layout(args.model, layout, args, work) for layout in args.layouts.split(",")}
    common.finish(meta)

    lines = [f"# Placement by measurement: {args.model}, fp32, batch 1", "", common.describe(meta), "",
             f"Each layout: one farm job of {args.trials} trials ({args.per_iter} per round, seed 0, cold cost model), "
             "then its evaluation on the same agent: every row with the agent's threads (TVM's pool and oneDNN's "
             "OpenMP pool; PyTorch and ONNX Runtime the same count), warm-up then timed samples, medians; numerics "
             "of every row against PyTorch. `tvm-vendor`: every group oneDNN can run on oneDNN; `tvm-placed`: each "
             "group on whichever measured faster alone; the job hands out the fastest correct build."
             + spins_sentence(rows), "",
             "| layout | tvm-tuned ms | tvm-vendor ms | tvm-placed ms | untuned ms | ONNX Runtime ms | PyTorch ms | "
             "handed out | vs ONNX Runtime | tuning s | job s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for layout, row in rows.items():
        res = row["results"]
        chosen = res.get(row["chosen"], {}).get("latency", {}).get("median_ms")
        ort = (res.get("onnxruntime") or {}).get("latency", {}).get("median_ms")
        ratio = f"{chosen / ort:.2f}x" if chosen and ort else "-"
        placed = _ms(res.get("tvm-placed")) if "tvm-placed" in res else (
            "= " + row["placement"].get("builds", {}).get("tvm-placed", {}).get("same_as", "-"))
        lines.append(f"| {layout} | {_ms(res.get('tvm-tuned'))} | {_ms(res.get('tvm-vendor'))} | {placed} | "
                     f"{_ms(res.get('tvm-untuned'))} | {_ms(res.get('onnxruntime'))} | {_ms(res.get('torch'))} | "
                     f"{row['chosen']} | {ratio} | {row['tuning_wall_s']} | {row['wall_s']} |")
    for layout, row in rows.items():
        bad = [n for n, r in row["results"].items() if r.get("numerics") and not r["numerics"]["ok"]]
        lines += ["", f"## {layout}: per operator group", "",
                  f"Numerics: {'every row ok' if not bad else 'FAILED: ' + ', '.join(bad)}. Problems: "
                  f"{'; '.join(row['problems']) or 'none'}.", "", row["placement_markdown"]]
    name = f"placement-{args.model}-{args.name}"
    print(common.write_rows(common.RESULTS, name, meta, rows, lines))
    print(json.dumps({k: r["chosen"] for k, r in rows.items()}))


if __name__ == "__main__":
    main()
