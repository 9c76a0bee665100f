"""Do MetaSchedule's fp16 tensor-core candidates of ResNet-18's 3x3 64->64 conv build, per layout and epilogue?

    python -m bench.gpu_tc_build [--candidates 16] [--out bench/results]

No GPU needed: the module goes through the farm's pipeline (``Pipeline(precision="fp16", layout=...)``: ToMixedPrecision
with fp16 accumulation, ConvertLayout for NHWC), the conv task ``fused_conv2d1_*`` (BatchNorm kept: its
subtract/divide/multiply/add epilogue fused; folded: bias add + residual + ReLU fused) is taken from the tasks,
and ``--candidates`` candidates are sampled from its ``cuda-tensorcore`` design space (ReplayTrace, seed 0, the
postprocessors applied) and compiled with ``tvm.compile`` for sm_90 (CUDA C through NVRTC). One variant keeps fp32
accumulation (``ToMixedPrecision(out_dtype="float32")``: the cast to fp16 in the epilogue), the setting in which
bench/results/gpu_fp16_probe-nvidia-h200.md saw 28-32 of 32 candidates fail to build. Builds only: whether the
kernels run and how fast is the GPU study's question.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench import common

TARGET = {"kind": "cuda", "arch": "sm_90", "max_threads_per_block": 1024, "max_shared_memory_per_block": 49152,
          "thread_warp_size": 32, "host": {"kind": "llvm"}}


def fused_module(model, pipeline, target, fp32_acc: bool):
    from tvm import relax

    from tunefarm.host.models import to_relax
    if not fp32_acc:
        return pipeline.fuse(to_relax(model), target)
    from tunefarm.host.tuning.pipeline import CONV_LAYOUTS
    mod = to_relax(model)
    with target:  # the pipeline's steps, with fp32 accumulation
        if pipeline.fold_batchnorm:
            mod = relax.transform.FoldConstant()(relax.transform.FoldBatchnormToConv2D()(mod))
        mod = relax.transform.DecomposeOpsForInference()(mod)
        mod = relax.transform.ToMixedPrecision(out_dtype="float32")(mod)
        if pipeline.layout == "NHWC":
            mod = relax.transform.FoldConstant()(relax.transform.ConvertLayout(CONV_LAYOUTS["NHWC"])(mod))
        return relax.pipeline.zero_pipeline()(mod)


def check(model, layout: str, fold: bool, fp32_acc: bool, n: int) -> dict:
    import tvm
    import tvm.s_tir.tensor_intrin  # noqa: F401  (the wmma/mma intrinsics)
    from tvm.s_tir import meta_schedule as ms

    from tunefarm.host.tuning.pipeline import Pipeline

    target = tvm.target.Target(TARGET)
    pipeline = Pipeline(fold_batchnorm=fold, precision="fp16", layout=layout)
    mod = fused_module(model, pipeline, target, fp32_acc)
    task = next(t for t in ms.relax_integration.extract_tasks(mod, target) if t.task_name.startswith("fused_conv2d1_"))
    ctx = ms.TuneContext(mod=task.dispatched[0], target=target, space_generator=pipeline.space(target),
                         search_strategy=ms.search_strategy.ReplayTrace(), task_name=task.task_name, rand_state=0,
                         num_threads=2)
    ctx.pre_tuning(max_trials=n, num_trials_per_iter=n, design_spaces=ctx.generate_design_space())
    cands = ctx.generate_measure_candidates() or []
    built, tensor_core, errors = 0, 0, {}
    t0 = time.perf_counter()
    for cand in cands:
        text = cand.sch.mod.script()
        tensor_core += ("wmma" in text) or ("mma_sync" in text) or ("ptx_mma" in text)
        try:
            tvm.compile(cand.sch.mod, target)
            built += 1
        except Exception as err:  # pylint: disable=broad-except
            msg = [line for line in str(err).strip().splitlines() if line.strip()][-1][:200]
            errors[msg] = errors.get(msg, 0) + 1
    return {"layout": layout, "batchnorm": "folded" if fold else "kept", "accumulation": "fp32" if fp32_acc else "fp16",
            "task": task.task_name, "candidates": len(cands), "built": built, "tensor_core": tensor_core,
            "errors": errors, "compile_s": time.perf_counter() - t0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_tc_build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--out", default=str(common.RESULTS))
    args = parser.parse_args(argv)
    from tunefarm.core.jobspec import ModelSpec
    from tunefarm.host.models import load_model

    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), **common.machine()}
    model = load_model(ModelSpec("torchvision", "resnet18", None, [1, 3, 224, 224]))
    rows = []
    for layout, fold, fp32_acc in (("NCHW", False, False), ("NHWC", False, False), ("NCHW", True, False),
                                   ("NHWC", True, False), ("NCHW", False, True), ("NHWC", False, True)):
        rows.append(check(model, layout, fold, fp32_acc, args.candidates))
        print(json.dumps(rows[-1]), flush=True)
    stem = Path(args.out) / "gpu_tc_build-resnet18"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    md = ["# fp16 tensor-core candidates of ResNet-18's 3x3 64->64 conv: do they build, per layout and epilogue?", "",
          f"Run {meta['started']} by `python -m bench.gpu_tc_build --candidates {args.candidates}` on {meta.get('cpu')} "
          "(no GPU: builds for sm_90 only). " + __doc__.split("\n\n", 2)[2].replace("\n", " ").strip(), "",
          "| layout | BatchNorm | accumulation | task | built / candidates | with tensor-core intrinsics | build errors |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        errs = "; ".join(f"{k} (x{v})" for k, v in r["errors"].items()) or "-"
        md.append(f"| {r['layout']} | {r['batchnorm']} | {r['accumulation']} | {r['task']} | {r['built']} / "
                  f"{r['candidates']} | {r['tensor_core']} | {errs} |")
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
