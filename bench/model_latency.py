"""End-to-end latency of tuned models against PyTorch and ONNX Runtime, on this CPU, in one run.

    python -m bench.model_latency [JOB_DIR ...] [--rounds 5] [--repeat 40] [--name NAME]

Each JOB_DIR is a tunefarm job directory (its job.yaml, job_state.json and MetaSchedule database:
what `tunefarm tune` or `tunefarm pull` leaves); default: logs/resnet18-cpu and logs/resnet50-cpu.
For each job the model is rebuilt exactly as it was tuned (same source, random weights of the same
seed, the graph pipeline its directory records), the job's records are applied to that module, compiled
for the job's target, checked against the reference on the same input, and timed here against PyTorch
(eager, no_grad; torch models only) and ONNX Runtime (CPUExecutionProvider, default graph optimisations)
with the same threads. ONNX jobs work too: their reference and peer is ONNX Runtime on the job's file.

Method: every backend gets a warm-up, then the rounds alternate backends (TVM, PyTorch, ORT, TVM, ...)
so that drift in the machine hits all of them; per round ``--repeat`` timed runs of one inference each;
the statistics pool every round's samples. Writes bench/results/model_latency-<name>.{json,md} and
prints the ratios (TVM tuned / peer) last. The job's target must run on this machine (an llvm target
for this CPU); the report states how many TIR functions carried a tuned schedule and how many trials
the job measured, since latency depends on both.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench import common  # sets TVM_NUM_THREADS before TVM's pool starts


def load_tuned(job_dir: Path):
    """The model of one job directory and its tuned build: a dict with model, vm, args, tuned_functions,
    trials, target, state, pipeline."""
    import tvm
    from tvm import relax

    from tunefarm.core.jobspec import load_job
    from tunefarm.host.models import load_model, to_relax
    from tunefarm.host.tuning.jobdir import SPEC, JobDir
    from tunefarm.host.tuning.pipeline import apply_records

    job_dir = JobDir(job_dir)
    job = load_job(job_dir.file(SPEC))
    state = job_dir.read_state()
    target = tvm.target.Target(state["target"])
    model = load_model(job.model)
    if state.get("model_fingerprint") not in (None, model.fingerprint):
        raise SystemExit(f"{job_dir.path}: the model rebuilt here differs from the one tuned (fingerprint)")
    pipeline = job_dir.pipeline()  # the pipeline it was tuned with
    mod = pipeline.fuse(to_relax(model), target)
    database = job_dir.open_database()
    applied, scheduled, unscheduled = apply_records(mod, target, database)
    vm = relax.VirtualMachine(tvm.compile(applied, target), tvm.cpu())
    args = [tvm.runtime.tensor(x, tvm.cpu()) for x in model.inputs]
    trials = sum(1 for r in database.get_all_tuning_records() if r.run_secs is not None)
    return {"model": model, "vm": vm, "args": args, "executable_mod": applied,
            "tuned_functions": f"{len(scheduled)}/{len(scheduled) + len(unscheduled)}", "trials": trials,
            "target": str(target), "state": state, "pipeline": pipeline}


def measure_jobs(job_dirs: list[Path], rounds: int = 5, repeat: int = 40, warmup: int = 10,
                 log=print) -> dict:
    """Each job's tuned build against its peers in this process, rounds alternating backends.
    Returns {job name: {model, target, tuned_functions, trials_in_database, pipeline, numerics, latency}}."""
    import onnxruntime as ort
    import torch

    from tunefarm.core.stats import compare_outputs, latency_stats
    from tunefarm.host.models import export_onnx

    cores = common.threads()  # TVM's threads; the peers get the same count
    torch.set_num_threads(cores)
    ort_options = ort.SessionOptions()
    ort_options.intra_op_num_threads = cores
    work = Path(tempfile.mkdtemp(prefix="model-latency-"))
    jobs = {}
    names = [Path(d).name for d in job_dirs]
    for job_dir in job_dirs:
        job_dir = Path(job_dir)
        # a job's label: its directory's name, with the parent's where two jobs share a name (bench/ttq/*/ttq)
        label = job_dir.name if names.count(job_dir.name) == 1 else f"{job_dir.parent.name}/{job_dir.name}"
        tuned = load_tuned(job_dir)
        model = tuned["model"]
        reference = model.reference_outputs()
        sess = ort.InferenceSession(export_onnx(model, work / f"{job_dir.name}.onnx"), sess_options=ort_options,
                                    providers=["CPUExecutionProvider"])
        feed = dict(zip([i.name for i in sess.get_inputs()], model.inputs))

        def run_tvm(vm=tuned["vm"], vm_args=tuned["args"]):
            return vm["main"](*vm_args)

        def run_ort(sess=sess, feed=feed):
            return sess.run(None, feed)

        fns = {"tvm-tuned": run_tvm}
        if model.kind == "torch":
            xs = [torch.from_numpy(x) for x in model.inputs]

            def run_torch(module=model.torch_module, xs=xs):
                with torch.no_grad():
                    return module(*xs)

            fns["pytorch"] = run_torch
        fns["onnxruntime"] = run_ort
        tvm_out = run_tvm()
        tvm_outs = [tvm_out.numpy()] if hasattr(tvm_out, "numpy") else [o.numpy() for o in tvm_out]
        numerics = {"tvm-tuned": compare_outputs(tvm_outs, reference, 1e-3, 1e-3)}
        if model.kind == "torch":
            numerics["onnxruntime"] = compare_outputs(run_ort(), reference, 1e-3, 1e-3)
        jobs[label] = {"job_dir": str(job_dir), "model": model.name, "kind": model.kind,
                              "target": tuned["target"], "tuned_functions": tuned["tuned_functions"],
                              "trials_in_database": tuned["trials"], "pipeline": tuned["pipeline"].to_json(),
                              "warm_start": tuned["state"].get("warm_start", {}).get("records", 0),
                              "reference": "pytorch" if model.kind == "torch" else "onnxruntime",
                              "fns": fns, "samples": {b: [] for b in fns}, "numerics": numerics}
        log(f"{label}: {tuned['tuned_functions']} functions tuned, {tuned['trials']} records; numerics "
            + ", ".join(f"{k} max abs err {v['max_abs_err']:.2e}" for k, v in numerics.items()))

    for m in jobs.values():
        for fn in m["fns"].values():
            for _ in range(warmup):
                fn()
    for rnd in range(rounds):
        for m in jobs.values():
            for backend, fn in m["fns"].items():
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    fn()
                    m["samples"][backend].append(time.perf_counter() - t0)
        log(f"round {rnd + 1}/{rounds} done")
    results = {}
    for name, m in jobs.items():
        results[name] = {k: v for k, v in m.items() if k not in ("fns", "samples")}
        results[name]["latency"] = {b: latency_stats(s, warmup=warmup) for b, s in m["samples"].items()}
    return results


def method_text(meta: dict) -> str:
    return (f"TVM, PyTorch {meta['torch']} and ONNX Runtime {meta['onnxruntime']} {meta['threads']} threads each. "
            f"Method: {meta['warmup']} warm-up runs per backend, then {meta['rounds']} rounds alternating backends, "
            f"{meta['repeat']} timed runs each (perf_counter around one inference); statistics over all rounds' "
            "samples. Batch 1, fp32 everywhere (precision class fp32; TVM llvm, PyTorch eager, ONNX Runtime "
            "CPUExecutionProvider), random weights (seed 0).")


def tvm_ort_cells(lat: dict) -> str:
    """``TVM median | ORT median | TVM / ORT`` table cells of one job's latency dict."""
    tvm_ms, ort_ms = lat["tvm-tuned"]["median_ms"], lat["onnxruntime"]["median_ms"]
    return f"{tvm_ms:.2f} | {ort_ms:.2f} | {tvm_ms / ort_ms:.2f}"


def write_markdown(stem: Path, lines: list[str], results: dict) -> str:
    """``lines`` plus every job's rows and ratios, written to ``stem``.md and printed."""
    lines = lines + ["", "All rows:", "", *latency_table(results), "", "Ratios (TVM tuned / peer, median):",
                     *ratios(results)]
    text = "\n".join(lines) + "\n"
    stem.with_suffix(".md").write_text(text)
    print(text)
    return text


def latency_table(results: dict) -> list[str]:
    lines = ["| job | model | backend | threads | precision | median ms | p90 ms | p99 ms | std ms | numerics |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    threads = common.threads()
    for name, r in results.items():
        for backend, lat in r["latency"].items():
            num = r["numerics"].get(backend)
            num_txt = ("reference" if num is None else
                       f"{'ok' if num['ok'] else 'MISMATCH'} (max abs {num['max_abs_err']:.1e})")
            lines.append(f"| {name} | {r['model']} | {backend} | {threads} | fp32 | {lat['median_ms']:.2f} | "
                         f"{lat['p90_ms']:.2f} | {lat['p99_ms']:.2f} | {lat['std_ms']:.2f} | {num_txt} |")
    return lines


def ratios(results: dict) -> list[str]:
    lines = []
    for name, r in results.items():
        lat = r["latency"]
        t = lat["tvm-tuned"]["median_ms"]
        peers = [f"/ ONNX Runtime {t / lat['onnxruntime']['median_ms']:.2f}"]
        if "pytorch" in lat:
            peers.append(f"/ PyTorch {t / lat['pytorch']['median_ms']:.2f}")
        lines.append(f"- {name}: " + ", ".join(peers))
    return lines


def main():
    import onnxruntime as ort
    import torch

    parser = argparse.ArgumentParser(prog="python -m bench.model_latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("jobs", nargs="*", default=[str(common.ROOT / "logs" / "resnet18-cpu"),
                                                    str(common.ROOT / "logs" / "resnet50-cpu")])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=40, help="timed runs per backend per round")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--name", default=common.default_name())
    parser.add_argument("--out", default=str(common.RESULTS))
    args = parser.parse_args()
    for job in args.jobs:
        if not (Path(job) / "job_state.json").is_file():
            parser.error(f"{job} is not a tunefarm job directory (no job_state.json)")

    machine = common.machine()
    results = measure_jobs([Path(j) for j in args.jobs], args.rounds, args.repeat, args.warmup,
                           log=lambda line: print(line, flush=True))
    meta = common.finish({**machine, "rounds": args.rounds, "repeat": args.repeat, "warmup": args.warmup,
                          "torch": torch.__version__, "onnxruntime": ort.__version__})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"model_latency-{args.name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    lines = [f"# Model latency on this CPU: tuned TVM vs PyTorch vs ONNX Runtime ({meta['date']})", "",
             f"{common.describe(meta)} {method_text(meta)}", "", *latency_table(results), ""]
    for name, r in results.items():
        lines.append(f"- {name}: {r['model']}, {r['trials_in_database']} records in its database "
                     f"({r['warm_start']} seeded by a warm start), {r['tuned_functions']} TIR functions tuned; "
                     f"pipeline {r['pipeline']}; target `{r['target']}`.")
    lines += ["", "Ratios (TVM tuned / peer, median; below 1 = TVM faster):", *ratios(results)]
    text = "\n".join(lines) + "\n"
    (out / f"model_latency-{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
