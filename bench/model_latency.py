"""End-to-end latency of tuned models against PyTorch and ONNX Runtime, on this CPU, in one run.

    python -m bench.model_latency [JOB_DIR ...] [--rounds 5] [--repeat 40] [--name NAME]

Each JOB_DIR is a tunefarm job directory (its job.yaml, job_state.json and MetaSchedule database:
what `tunefarm tune` or `tunefarm pull` leaves); default: logs/resnet18-cpu and logs/resnet50-cpu.
For each job the model is rebuilt exactly as it was tuned (same source, random weights of the same
seed, same fusion), the job's records are applied to that module, compiled for the job's target,
checked against PyTorch on the same input, and timed here against PyTorch (eager, no_grad) and ONNX
Runtime (CPUExecutionProvider, default graph optimisations) with the same threads as cores.

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
    """(model, compiled VM callable, tuned/total functions, trials) for one job directory."""
    import tvm
    from tvm import relax

    from tunefarm.core.jobspec import load_job
    from tunefarm.host.tuning.evaluate import apply_database
    from tunefarm.host.models import load_model, to_relax
    from tunefarm.host.tuning.plan import fuse_for_tuning
    from tunefarm.host.tuning.jobdir import SPEC, JobDir

    job_dir = JobDir(job_dir)
    job = load_job(job_dir.file(SPEC))
    state = job_dir.read_state()
    target = tvm.target.Target(state["target"])
    model = load_model(job.model)
    if state.get("model_fingerprint") not in (None, model.fingerprint):
        raise SystemExit(f"{job_dir}: the model rebuilt here differs from the one tuned (fingerprint)")
    mod = fuse_for_tuning(to_relax(model), target)
    database = job_dir.open_database()
    applied, scheduled, unscheduled = apply_database(mod, target, database)
    vm = relax.VirtualMachine(tvm.compile(applied, target), tvm.cpu())
    args = [tvm.runtime.tensor(x, tvm.cpu()) for x in model.inputs]
    trials = sum(1 for r in database.get_all_tuning_records() if r.run_secs is not None)
    return model, vm, args, f"{len(scheduled)}/{len(scheduled) + len(unscheduled)}", trials, str(target), state


def main():
    import onnxruntime as ort
    import torch

    from tunefarm.core.stats import compare_outputs, latency_stats
    from tunefarm.host.models import export_onnx

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

    machine = common.machine()
    cores = common.threads()  # TVM's threads; the peers get the same count
    torch.set_num_threads(cores)
    ort_options = ort.SessionOptions()
    ort_options.intra_op_num_threads = cores
    work = Path(tempfile.mkdtemp(prefix="model-latency-"))
    models = {}
    for job in args.jobs:
        job_dir = Path(job)
        model, vm, vm_args, tuned_fns, trials, target, state = load_tuned(job_dir)
        reference = model.reference_outputs()
        sess = ort.InferenceSession(export_onnx(model, work / f"{model.name}.onnx"), sess_options=ort_options,
                                    providers=["CPUExecutionProvider"])
        feed = dict(zip([i.name for i in sess.get_inputs()], model.inputs))
        xs = [torch.from_numpy(x) for x in model.inputs]

        def run_tvm(vm=vm, vm_args=vm_args):
            out = vm["main"](*vm_args)
            return out

        def run_torch(module=model.torch_module, xs=xs):
            with torch.no_grad():
                return module(*xs)

        def run_ort(sess=sess, feed=feed):
            return sess.run(None, feed)

        tvm_out = run_tvm()
        tvm_outs = [tvm_out.numpy()] if hasattr(tvm_out, "numpy") else [o.numpy() for o in tvm_out]
        numerics = {"tvm-tuned": compare_outputs(tvm_outs, reference, 1e-3, 1e-3),
                    "onnxruntime": compare_outputs(run_ort(), reference, 1e-3, 1e-3)}
        models[model.name] = {"job_dir": str(job_dir), "target": target, "tuned_functions": tuned_fns,
                              "trials_in_database": trials, "warm_start": state.get("warm_start", {}).get("records", 0),
                              "fns": {"tvm-tuned": run_tvm, "pytorch": run_torch, "onnxruntime": run_ort},
                              "samples": {"tvm-tuned": [], "pytorch": [], "onnxruntime": []}, "numerics": numerics}
        print(f"{model.name}: {tuned_fns} functions tuned, {trials} records; numerics "
              + ", ".join(f"{k} max abs err {v['max_abs_err']:.2e}" for k, v in numerics.items()), flush=True)

    for name, m in models.items():
        for fn in m["fns"].values():
            for _ in range(args.warmup):
                fn()
    for rnd in range(args.rounds):
        for name, m in models.items():
            for backend, fn in m["fns"].items():
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    fn()
                    m["samples"][backend].append(time.perf_counter() - t0)
        print(f"round {rnd + 1}/{args.rounds} done", flush=True)

    results = {}
    for name, m in models.items():
        results[name] = {k: v for k, v in m.items() if k not in ("fns", "samples")}
        results[name]["latency"] = {b: latency_stats(s, warmup=args.warmup) for b, s in m["samples"].items()}
    meta = common.finish({**machine, "rounds": args.rounds, "repeat": args.repeat, "warmup": args.warmup,
                          "torch": torch.__version__, "onnxruntime": ort.__version__})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"model_latency-{args.name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))

    lines = [f"# Model latency on this CPU: tuned TVM vs PyTorch vs ONNX Runtime ({meta['date']})", "",
             f"{common.describe(meta)} "
             f"TVM, PyTorch {meta['torch']} and ONNX Runtime {meta['onnxruntime']} {cores} threads each. Method: {args.warmup} "
             f"warm-up runs per backend, then {args.rounds} rounds alternating backends, {args.repeat} timed runs "
             "each; statistics over all rounds' samples. Batch 1, fp32, random weights (seed 0).", "",
             "| model | backend | median ms | p90 ms | p99 ms | std ms | numerics vs PyTorch |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        for backend, lat in r["latency"].items():
            num = r["numerics"].get(backend)
            num_txt = ("reference" if num is None else
                       f"{'ok' if num['ok'] else 'MISMATCH'} (max abs {num['max_abs_err']:.1e})")
            lines.append(f"| {name} | {backend} | {lat['median_ms']:.2f} | {lat['p90_ms']:.2f} | {lat['p99_ms']:.2f} | "
                         f"{lat['std_ms']:.2f} | {num_txt} |")
    lines += [""]
    for name, r in results.items():
        lines.append(f"- {name}: job `{Path(r['job_dir']).name}`, {r['trials_in_database']} records in its database "
                     f"({r['warm_start']} seeded by a warm start), {r['tuned_functions']} TIR functions tuned; "
                     f"target `{r['target']}`.")
    lines += ["", "Ratios (TVM tuned / peer, median; below 1 = TVM faster):"]
    for name, r in results.items():
        lat = r["latency"]
        t = lat["tvm-tuned"]["median_ms"]
        lines.append(f"- {name}: / ONNX Runtime {t / lat['onnxruntime']['median_ms']:.2f}, "
                     f"/ PyTorch {t / lat['pytorch']['median_ms']:.2f}")
    text = "\n".join(lines) + "\n"
    (out / f"model_latency-{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
