"""Time to quality: how close a long farm tuning run gets to ONNX Runtime on this CPU, and where the rest goes.

    python -m bench.time_to_quality --model resnet18 --minutes 90 [--checkpoint-minutes 15] [--dir DIR]
    python -m bench.time_to_quality --dir DIR --report-only      # redraw / profile from what DIR holds
    python -m bench.time_to_quality --dir DIR --report-only --retime   # and time every checkpoint again, in one run

One job (the farm's default pipeline, cold: no warm start, seed 0) is tuned through a LocalFarm (tracker +
one agent on this machine, TVM with the agent's threads) in segments of ``--checkpoint-minutes`` of tuning.
After each segment the job's current best records are compiled and timed against ONNX Runtime and PyTorch
in one process with the same threads (bench/model_latency.py's method: rounds alternating backends), and a
checkpoint line is appended to DIR/checkpoints.jsonl. **Resumable**: DIR holds the job directory and the
checkpoints; run the same command again (next session) and it continues until the tuning wall time in all
segments reaches ``--minutes``. Commit DIR if the run must outlive a session.

At the end (or with ``--report-only``): where the remaining time goes — TVM's per-function profile (Relax VM
profiler) against ONNX Runtime's per-node profile (its JSON trace), and each conv task's achieved GFLOP/s
(MetaSchedule's FLOP estimate / the best measured record) against this CPU's measured fp32 peak (an sgemm
at the same threads, PyTorch's ``mm`` on 2048x2048: the practical peak of these cores). Writes
bench/results/time_to_quality-<model>-<name>.{json,md,png}: the PNG plots TVM / ONNX Runtime against tuning
wall time and against trials.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench import common  # sets TVM_NUM_THREADS before TVM's pool starts

JOB = "ttq"


def job_for(model: str, tracker: str, per_iter: int, population: int):
    import tvm

    from bench.workloads import bench_job
    from tunefarm.device_agents.probe import llvm_target

    # A budget the wall-time segments end long before; no per-task cap: the task scheduler spends it.
    return bench_job(JOB, model, tracker, "bench", tvm.target.Target(llvm_target()), 1_000_000, 1_000_000,
                     per_iter, population)


def read_checkpoints(run_dir: Path) -> list[dict]:
    path = run_dir / "checkpoints.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tune_segment(run_dir: Path, model: str, seconds: float, per_iter: int, population: int) -> dict:
    """Tune (or resume) the job for ``seconds`` of tuning wall time; returns what the segment did."""
    from tunefarm.host.tuning.job import tune_job
    from tunefarm.testing.localfarm import LocalFarm

    with LocalFarm(run_dir / "farm") as farm:
        farm.add_agent("bench")
        job = job_for(model, farm.addr, per_iter, population)
        t0 = time.time()
        tuned = tune_job(job, logs_dir=str(run_dir), should_stop=lambda _p: time.time() - t0 >= seconds)
    return {"tuning_wall_s": round(tuned.wall_s, 1), "measured": tuned.measured, "failed": tuned.failed,
            "tasks": len(tuned.plan.tasks), "pipeline": tuned.plan.pipeline.to_json()}


def checkpoint(run_dir: Path, segment: dict, rounds: int, repeat: int) -> dict:
    from bench.model_latency import measure_jobs
    from tunefarm.host.tuning.jobdir import JobDir, workload_counts

    before = read_checkpoints(run_dir)
    res = measure_jobs([run_dir / JOB], rounds, repeat, 10, log=lambda line: print(line, flush=True))[JOB]
    lat = res["latency"]
    counts = workload_counts(JobDir(run_dir / JOB).open_database())
    point = {"checkpoint": len(before) + 1, "date": time.strftime("%Y-%m-%d %H:%M"), "host": common.machine()["host"],
             "cpu": common.cpu_model(), "threads": common.threads(), "load_avg": common.load_avg(),
             "segment": segment,
             "tuning_wall_s": round(sum(c["segment"]["tuning_wall_s"] for c in before) + segment["tuning_wall_s"], 1),
             "trials": sum(c["records"] for c in counts.values()),
             "tuned_functions": res["tuned_functions"], "numerics": res["numerics"]["tvm-tuned"],
             "tvm_ms": lat["tvm-tuned"]["median_ms"], "tvm_p90_ms": lat["tvm-tuned"]["p90_ms"],
             "onnxruntime_ms": lat["onnxruntime"]["median_ms"], "onnxruntime_p90_ms": lat["onnxruntime"]["p90_ms"],
             "pytorch_ms": lat.get("pytorch", {}).get("median_ms"),
             "latency": lat}
    point["ratio_ort"] = round(point["tvm_ms"] / point["onnxruntime_ms"], 3)
    with open(run_dir / "checkpoints.jsonl", "a") as fh:
        fh.write(json.dumps(point) + "\n")
    return point


def measured_peak_gflops(threads: int, n: int = 2048, repeat: int = 10) -> dict:
    """fp32 sgemm throughput at ``threads`` (PyTorch mm): the practical peak these cores reach."""
    import statistics

    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        torch.mm(a, b)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    best, med = min(times), statistics.median(times)
    return {"method": f"torch.mm {n}x{n} fp32, {threads} threads, best of {repeat}", "n": n,
            "gflops_best": round(2 * n ** 3 / best / 1e9, 1), "gflops_median": round(2 * n ** 3 / med / 1e9, 1)}


def task_gflops(run_dir: Path) -> list[dict]:
    """Each task's FLOPs (MetaSchedule's estimate), best measured time, GFLOP/s and weight."""
    import tvm
    import tvm.s_tir.analysis  # noqa: F401

    from tunefarm.host.tuning.jobdir import JobDir, workload_counts

    job_dir = JobDir(run_dir / JOB)
    counts = workload_counts(job_dir.open_database())
    database = job_dir.open_database()
    flops = {}
    import tvm_ffi

    for rec in database.get_all_tuning_records():
        key = str(tvm_ffi.structural_hash(rec.workload.mod))
        if key not in flops:
            flops[key] = float(tvm.s_tir.analysis.estimate_tir_flops(rec.workload.mod))
    rows = []
    for task in job_dir.read_tasks():
        key = task["workload_hash"]
        best = counts.get(key, {}).get("best_s")
        fl = flops.get(key)
        rows.append({"task": task["name"], "weight": task["weight"], "flop": fl, "best_us": best * 1e6 if best else None,
                     "gflops": round(fl / best / 1e9, 1) if best and fl else None,
                     "weighted_ms": round(best * task["weight"] * 1e3, 3) if best else None})
    return rows


def tvm_profile(run_dir: Path, runs: int = 20, top: int = 12) -> list[dict]:
    """The tuned build's per-function times, averaged over ``runs``, largest first: the Relax VM's call
    instrument (``set_instrument``) with perf_counter before and after each call (kernels run synchronously
    on the CPU; the instrument's own cost, a Python call per kernel, is in the figures)."""
    import tvm

    from bench.model_latency import load_tuned

    tuned = load_tuned(run_dir / JOB)
    vm = tuned["vm"]
    rows: dict[str, dict] = {}
    started: dict[str, float] = {}
    timing = [False]

    def instrument(_func, symbol, before_run, _ret, *_args):
        if timing[0]:
            if before_run:
                started[symbol] = time.perf_counter()
            else:
                entry = rows.setdefault(symbol, {"function": symbol, "calls": 0, "total_us": 0.0})
                entry["calls"] += 1
                entry["total_us"] += (time.perf_counter() - started.pop(symbol, time.perf_counter())) * 1e6
        return 0  # VMInstrumentReturnKind.NO_OP

    vm.set_instrument(tvm.runtime.convert(instrument) if hasattr(tvm.runtime, "convert") else instrument)
    for _ in range(3):
        vm["main"](*tuned["args"])
    timing[0] = True
    for _ in range(runs):
        vm["main"](*tuned["args"])
    ordered = sorted(rows.values(), key=lambda r: -r["total_us"])
    for r in ordered:
        r["calls"] = r["calls"] // runs
        r["total_us"] = round(r["total_us"] / runs, 1)
    rest = ordered[top:]
    return ordered[:top] + ([{"function": f"({len(rest)} more)", "calls": sum(r["calls"] for r in rest),
                              "total_us": round(sum(r["total_us"] for r in rest), 1)}] if rest else [])


def ort_profile(run_dir: Path, runs: int = 20, top: int = 12) -> list[dict]:
    """ONNX Runtime's per-node times (its profiler's JSON trace), averaged over ``runs``, largest first."""
    import tempfile

    import onnxruntime as ort

    from tunefarm.core.jobspec import load_job
    from tunefarm.host.models import export_onnx, load_model
    from tunefarm.host.tuning.jobdir import SPEC, JobDir

    model = load_model(load_job(JobDir(run_dir / JOB).file(SPEC)).model)
    work = Path(tempfile.mkdtemp(prefix="ttq-ort-"))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = common.threads()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(work / "ort")
    sess = ort.InferenceSession(export_onnx(model, work / "m.onnx"), sess_options=opts,
                                providers=["CPUExecutionProvider"])
    feed = dict(zip([i.name for i in sess.get_inputs()], model.inputs))
    for _ in range(runs):
        sess.run(None, feed)
    trace = json.loads(Path(sess.end_profiling()).read_text())
    rows = {}
    for ev in trace:
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
            continue
        name = ev["name"][: -len("_kernel_time")]
        op = ev.get("args", {}).get("op_name", "")
        entry = rows.setdefault(name, {"node": name, "op": op, "total_us": 0.0, "calls": 0})
        entry["total_us"] += ev["dur"]
        entry["calls"] += 1
    ordered = sorted(rows.values(), key=lambda r: -r["total_us"])
    for r in ordered:
        r["per_run_us"] = round(r["total_us"] / runs, 1)
        del r["total_us"]
    by_op: dict[str, float] = {}
    for r in ordered:
        by_op[r["op"]] = by_op.get(r["op"], 0.0) + r["per_run_us"]
    return {"top_nodes": ordered[:top], "per_op_us": {k: round(v, 1) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])}}


def prefix_dir(run_dir: Path, trials: int, work: Path) -> Path:
    """A copy of the job directory holding its database as it stood at ``trials`` records (MetaSchedule's
    JSON database appends one line per record in commit order: the first ``trials`` lines)."""
    import shutil

    src = run_dir / JOB
    dst = work / f"{JOB}-at-{trials}"
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for item in src.iterdir():
        if item.is_file() and item.name != "database_tuning_record.json":
            shutil.copy2(item, dst / item.name)
    with open(src / "database_tuning_record.json") as fh, open(dst / "database_tuning_record.json", "w") as out:
        for i, line in enumerate(fh):
            if i >= trials:
                break
            out.write(line)
    return dst


def retime(run_dir: Path, rounds: int, repeat: int) -> list[dict]:
    """Every checkpoint's best records (the database as it stood then) timed again, all in this one process
    side by side with ONNX Runtime and PyTorch, rounds alternating: one machine state for the whole curve."""
    import tempfile

    from bench.model_latency import measure_jobs

    points = read_checkpoints(run_dir)
    work = Path(tempfile.mkdtemp(prefix="ttq-retime-"))
    dirs = [prefix_dir(run_dir, p["trials"], work) for p in points]
    load_start = common.load_avg()
    res = measure_jobs(dirs, rounds, repeat, 10, log=lambda line: print(line, flush=True))
    out = []
    for p, d in zip(points, dirs):
        r = res[d.name]
        lat = r["latency"]
        out.append({"checkpoint": p["checkpoint"], "trials": p["trials"], "tuning_wall_s": p["tuning_wall_s"],
                    "tuned_functions": r["tuned_functions"], "numerics_ok": r["numerics"]["tvm-tuned"]["ok"],
                    "tvm_ms": lat["tvm-tuned"]["median_ms"], "tvm_p90_ms": lat["tvm-tuned"]["p90_ms"],
                    "onnxruntime_ms": lat["onnxruntime"]["median_ms"],
                    "pytorch_ms": lat.get("pytorch", {}).get("median_ms"),
                    "ratio_ort": round(lat["tvm-tuned"]["median_ms"] / lat["onnxruntime"]["median_ms"], 3)})
    return {"load_avg_start": load_start, "load_avg_end": common.load_avg(), "rounds": rounds, "repeat": repeat,
            "points": out}


def plot(points: list[dict], title: str, path: Path, retimed: list[dict] | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    mins = [p["tuning_wall_s"] / 60 for p in points]
    trials = [p["trials"] for p in points]
    ratio = [p["ratio_ort"] for p in points]
    for ax, xs, label in ((ax1, mins, "tuning wall time (min)"), (ax2, trials, "trials measured")):
        if retimed:
            ax.plot(xs, [r["ratio_ort"] for r in retimed], marker="o",
                    label="TVM tuned / ONNX Runtime (all checkpoints re-timed in one run)")
            ax.plot(xs, ratio, marker="x", linestyle=":", alpha=0.5, label="as timed at each checkpoint")
        else:
            ax.plot(xs, ratio, marker="o", label="TVM tuned / ONNX Runtime")
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="ONNX Runtime")
        ax.axhline(0.9, color="green", linestyle=":", linewidth=1, label="goal 0.9x")
        ax.set_xlabel(label)
        ax.set_ylabel("latency ratio (median)")
        ax.grid(alpha=0.3)
    ax1.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_results(run_dir: Path, model: str, name: str, out: Path, final: dict | None) -> Path:
    points = read_checkpoints(run_dir)
    if not points:
        raise SystemExit(f"{run_dir}: no checkpoints yet")
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"time_to_quality-{model}-{name}"
    meta = common.finish(common.machine(model=model, run_dir=str(run_dir)))
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "checkpoints": points, "final": final}, indent=2))
    last = points[-1]
    retimed = (final or {}).get("retimed")
    plot(points, f"{model} on {last['cpu']} ({last['threads']} threads): tuned TVM / ONNX Runtime",
         stem.with_suffix(".png"), retimed["points"] if retimed else None)
    lines = [f"# Time to quality: {model}, farm tuning on this CPU ({meta['date']})", "",
             f"{common.describe(meta)} One job, the farm's default pipeline ({last['segment']['pipeline']}), cold "
             "(no warm start), seed 0, tuned through a LocalFarm (one agent) in segments; after each segment the "
             "best records are compiled and timed against ONNX Runtime and PyTorch in one process, same threads, "
             "rounds alternating backends (bench/model_latency.py's method). Each checkpoint line records its own "
             "machine and load: compare only checkpoints of one CPU model.", "",
             "| # | date | cpu | load (1 min) | tuning wall min | trials | tuned fns | TVM median ms (p90) | "
             "ONNX Runtime ms (p90) | PyTorch ms | TVM / ORT | numerics |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in points:
        lines.append(f"| {p['checkpoint']} | {p['date']} | {p['cpu']} | {p['load_avg'][0] if p['load_avg'] else '-'} | "
                     f"{p['tuning_wall_s'] / 60:.1f} | {p['trials']} | {p['tuned_functions']} | "
                     f"{p['tvm_ms']:.2f} ({p['tvm_p90_ms']:.2f}) | {p['onnxruntime_ms']:.2f} "
                     f"({p['onnxruntime_p90_ms']:.2f}) | {p['pytorch_ms']:.2f} | **{p['ratio_ort']:.2f}** | "
                     f"{'ok' if p['numerics']['ok'] else 'MISMATCH'} ({p['numerics']['max_abs_err']:.1e}) |")
    if retimed:
        lines += ["", "## The curve re-timed in one run", "",
                  "Every checkpoint's records (the database's first *trials* records: what it held then) compiled and "
                  "timed again side by side in this one process, rounds alternating builds and peers "
                  f"({retimed['rounds']} rounds of {retimed['repeat']} samples; load average "
                  f"{retimed['load_avg_start'][0] if retimed['load_avg_start'] else '-'} at the start, "
                  f"{retimed['load_avg_end'][0] if retimed['load_avg_end'] else '-'} at the end). The timings taken "
                  "at each checkpoint above are kept as they were.", "",
                  "| # | tuning wall min | trials | tuned fns | TVM median ms (p90) | ONNX Runtime ms | PyTorch ms | "
                  "TVM / ORT | numerics |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in retimed["points"]:
            lines.append(f"| {r['checkpoint']} | {r['tuning_wall_s'] / 60:.1f} | {r['trials']} | {r['tuned_functions']} | "
                         f"{r['tvm_ms']:.2f} ({r['tvm_p90_ms']:.2f}) | {r['onnxruntime_ms']:.2f} | "
                         f"{r['pytorch_ms'] or 0:.2f} | **{r['ratio_ort']:.2f}** | "
                         f"{'ok' if r['numerics_ok'] else 'MISMATCH'} |")
    if final:
        peak = final["peak"]
        lines += ["", f"## Where the time goes (after checkpoint {last['checkpoint']})", "",
                  f"Measured peak: **{peak['gflops_best']} GFLOP/s** ({peak['method']}; median {peak['gflops_median']}).",
                  "", "Per task (MetaSchedule's FLOP estimate / best measured record; weight = calls per inference):", "",
                  "| task | weight | MFLOP | best us | GFLOP/s | of peak | weighted ms |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for t in sorted(final["tasks"], key=lambda t: -(t["weighted_ms"] or 0)):
            frac = f"{t['gflops'] / peak['gflops_best']:.0%}" if t["gflops"] else "-"
            lines.append(f"| {t['task']} | {t['weight']:g} | {(t['flop'] or 0) / 1e6:.1f} | "
                         f"{t['best_us'] or 0:.1f} | {t['gflops'] or '-'} | {frac} | {t['weighted_ms'] or '-'} |")
        lines += ["", "TVM per function (the VM's call instrument, per run):", "", "| function | calls | us per run |",
                  "| --- | --- | --- |"]
        lines += [f"| {r['function']} | {r['calls']} | {r['total_us']} |" for r in final["tvm_profile"]]
        lines += ["", "ONNX Runtime per operator type (its profiler, per run):", "", "| op | us per run |", "| --- | --- |"]
        lines += [f"| {op} | {us} |" for op, us in final["ort_profile"]["per_op_us"].items()]
    text = "\n".join(lines) + "\n"
    stem.with_suffix(".md").write_text(text)
    print(text)
    return stem


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.time_to_quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--minutes", type=float, default=90.0, help="total tuning wall time over all segments")
    parser.add_argument("--checkpoint-minutes", type=float, default=15.0)
    parser.add_argument("--session-minutes", type=float, default=0.0,
                        help="stop after this many minutes of tuning in this invocation (0: run to --minutes)")
    parser.add_argument("--per-iter", type=int, default=16)
    parser.add_argument("--population", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--dir", default="", help="the run's directory (default: bench/ttq/<model>-<name>)")
    parser.add_argument("--name", default=common.default_name())
    parser.add_argument("--out", default=str(common.RESULTS))
    parser.add_argument("--report-only", action="store_true", help="tune nothing: profile and write the results")
    parser.add_argument("--retime", action="store_true",
                        help="with the final report: time every checkpoint's records again, all in one process")
    args = parser.parse_args()
    if args.minutes <= 0 or args.checkpoint_minutes <= 0:
        parser.error("--minutes and --checkpoint-minutes must be positive")
    run_dir = Path(args.dir or common.ROOT / "bench" / "ttq" / f"{args.model}-{args.name}")
    run_dir.mkdir(parents=True, exist_ok=True)
    meta_path = run_dir / "run.json"
    if meta_path.is_file():
        saved = json.loads(meta_path.read_text())
        if saved["model"] != args.model:
            parser.error(f"{run_dir} is a run of {saved['model']}, not {args.model}")
    else:
        meta_path.write_text(json.dumps({"model": args.model, "per_iter": args.per_iter,
                                         "population": args.population, "started": time.strftime("%Y-%m-%d %H:%M")}))
    saved = json.loads(meta_path.read_text())
    done_s = sum(c["segment"]["tuning_wall_s"] for c in read_checkpoints(run_dir))
    this_session = 0.0
    while not args.report_only and done_s < args.minutes * 60 - 30:
        if args.session_minutes and this_session >= args.session_minutes * 60 - 30:
            print(f"session limit reached: {done_s / 60:.1f} of {args.minutes} minutes tuned; run again to continue",
                  flush=True)
            break
        seconds = min(args.checkpoint_minutes * 60, args.minutes * 60 - done_s)
        print(f"segment: tuning {seconds / 60:.1f} min ({done_s / 60:.1f} of {args.minutes} done) ...", flush=True)
        segment = tune_segment(run_dir, args.model, seconds, saved["per_iter"], saved["population"])
        point = checkpoint(run_dir, segment, args.rounds, args.repeat)
        done_s = point["tuning_wall_s"]
        this_session += segment["tuning_wall_s"]
        print(f"checkpoint {point['checkpoint']}: {point['tuning_wall_s'] / 60:.1f} min, {point['trials']} trials, "
              f"TVM {point['tvm_ms']:.2f} ms, ONNX Runtime {point['onnxruntime_ms']:.2f} ms, "
              f"ratio {point['ratio_ort']:.2f}", flush=True)
    final = None
    if args.report_only or done_s >= args.minutes * 60 - 30:
        final = {"peak": measured_peak_gflops(common.threads()), "tasks": task_gflops(run_dir),
                 "tvm_profile": tvm_profile(run_dir), "ort_profile": ort_profile(run_dir)}
        if args.retime:
            final["retimed"] = retime(run_dir, args.rounds, args.repeat)
    write_results(run_dir, args.model, args.name, Path(args.out), final)


if __name__ == "__main__":
    main()
