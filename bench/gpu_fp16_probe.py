"""Probe (issue 13): can MetaSchedule's tensor-core space tune ResNet-18's heaviest conv in fp16, and how
much of the space builds? One conv task (3x3, 64->64, 56x56), the same trial budget per variant:

  fp32-cuda       the fp32 module, the "cuda" space (today's farm)
  fp16-tc         ToMixedPrecision(out_dtype=float32): fp16 inputs, fp32 accumulation; "cuda-tensorcore"
  fp16-tc-foldbn  as fp16-tc, BatchNorm folded into the conv first (a shorter epilogue)
  fp16acc-tc      ToMixedPrecision(out_dtype=float16): fp16 accumulation, no cast in the conv's epilogue

Plain TVM (no tunefarm code): LocalBuilder (180 s timeout) and LocalRunner on this machine's GPU.
Prints one JSON line per variant: valid/total candidates, best us, first build error. Needs a CUDA GPU.

    python bench/gpu_fp16_probe.py --trials 32 --out DIR
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def build_module(fold_bn: bool, precision: str, target):
    import torch
    import torchvision
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    ep = torch.export.export(model, (torch.randn(1, 3, 224, 224),))
    mod = from_exported_program(ep, keep_params_as_input=True, unwrap_unit_return_tuple=True)
    mod, params = relax.frontend.detach_params(mod)
    names = [p.name for p in mod["main"].params[1:]]
    mod = relax.transform.BindParams("main", dict(zip(names, params["main"])))(mod)
    with target:
        if fold_bn:  # the folded weights are computed at compile time (the weights are constants)
            mod = relax.transform.FoldBatchnormToConv2D()(mod)
            mod = relax.transform.FoldConstant()(mod)
        mod = relax.transform.DecomposeOpsForInference()(mod)
        if precision != "fp32":
            mod = relax.transform.ConvertToDataflow()(mod)
            mod = relax.transform.ToMixedPrecision(out_dtype="float16" if precision == "fp16acc" else "float32")(mod)
        mod = relax.pipeline.zero_pipeline()(mod)
    return mod


def heaviest_conv(mod, target):
    from tvm.s_tir import meta_schedule as ms

    tasks = ms.relax_integration.extract_tasks(mod, target)
    convs = [t for t in tasks if "conv2d" in t.task_name]

    def flops(task):
        from tvm.s_tir.analysis import estimate_tir_flops
        return float(estimate_tir_flops(task.dispatched[0]))

    # the first stage's 3x3 64->64 conv: the largest FLOPs x weight (the four 3x3 convs of a stage have
    # equal FLOPs; the first stage's come most often)
    best = max(convs, key=lambda t: flops(t) * t.weight)
    return best, [t.task_name for t in tasks], flops(best)


def tune(name, task, target, trials, work_dir, space):
    import tvm
    from tvm.s_tir import meta_schedule as ms

    t0 = time.time()
    db = ms.tune_tir(task.dispatched[0], target, str(work_dir), max_trials_global=trials, num_trials_per_iter=16,
                     builder=ms.builder.LocalBuilder(timeout_sec=180), runner=ms.runner.LocalRunner(timeout_sec=60),
                     space=space, seed=0)
    records = db.get_all_tuning_records()
    valid = [r for r in records if r.run_secs is not None and len(r.run_secs) and min(float(x) for x in r.run_secs) < 1e9]
    best = min((sum(float(x) for x in r.run_secs) / len(r.run_secs) for r in valid), default=None)
    logs = sorted(Path(work_dir, "logs").glob("*.log"))
    first_error = None
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            if "Error" in line or "error" in line:
                first_error = line.strip()[:300]
                break
        if first_error:
            break
    return {"variant": name, "task": task.task_name, "total": len(records), "valid": len(valid),
            "best_us": None if best is None else best * 1e6, "wall_s": round(time.time() - t0, 1),
            "first_error": first_error}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--out", default="/root/probe")
    parser.add_argument("--variants", default="fp32-cuda,fp16-tc,fp16-tc-foldbn,fp16acc-tc")
    args = parser.parse_args()

    import tvm
    import tvm.s_tir.tensor_intrin  # noqa: F401  registers wmma/mma intrinsics (else every candidate fails)
    from tvm.s_tir import meta_schedule as ms

    target = tvm.target.Target(tvm.target.Target("nvidia/nvidia-h100"), host=tvm.target.Target({"kind": "llvm"}))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = {"fp32-cuda": (False, "fp32", "cuda"), "fp16-tc": (False, "fp16", "cuda-tensorcore"),
             "fp16-tc-foldbn": (True, "fp16", "cuda-tensorcore"), "fp16acc-tc": (False, "fp16acc", "cuda-tensorcore")}
    for name in args.variants.split(","):
        fold_bn, precision, kind = specs[name]
        mod = build_module(fold_bn, precision, target)
        task, names, flops = heaviest_conv(mod, target)
        space = ms.space_generator.PostOrderApply(sch_rules=kind, postprocs=kind, mutator_probs=kind)
        try:
            res = tune(name, task, target, args.trials, out / name, space)
        except Exception as err:  # pylint: disable=broad-except
            res = {"variant": name, "task": task.task_name, "error": str(err).strip().splitlines()[-1][:300]}
        res["tasks"] = len(names)
        res["flops"] = flops
        if res.get("best_us"):
            res["gflops"] = flops / res["best_us"] / 1e3
        line = json.dumps(res)
        print(line, flush=True)
        with open(out / "results.jsonl", "a") as fh:
            fh.write(line + "\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
