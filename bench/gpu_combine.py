"""One table from gpu_study runs of one model at several precisions, made on the same machine in the same run
(``bench/device/gpu_studies_h200.sh``: tuned side by side, timed one at a time).

    python -m bench.gpu_combine bench/results/gpu-nvidia-h200-resnet18-fp16.json \\
        bench/results/gpu-nvidia-h200-resnet18-fp32.json --out bench/results/gpu-nvidia-h200-resnet18

The peers come from the study that timed them; each study's TVM rows are renamed with its precision
(``tvm-tuned-fp16``, ``tvm-tuned-fp16-cudagraph``, ...). The summary compares every tuned TVM precision with
the fastest PyTorch row of the same or a lower precision class (issue 13's yardstick). Writes <out>.json/.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.gpu_study import ORDER, summary_lines, table_lines

TVM = ("tvm-untuned", "tvm-tuned", "tvm-tuned-cudagraph")


def combine(studies: list[dict[str, Any]]) -> dict[str, Any]:
    models = {s["meta"].get("model") for s in studies}
    gpus = {s["meta"].get("gpu_name") for s in studies}
    if len(models) != 1 or len(gpus) != 1:
        raise ValueError(f"the studies are of different models or GPUs: {sorted(map(str, models))}, "
                         f"{sorted(map(str, gpus))}")
    rows: dict[str, Any] = {}
    tvm_names: dict[str, list[str]] = {}
    for study in studies:
        prec = variant_of(study)
        for name, row in study["rows"].items():
            if name in TVM:
                new = name.replace("tvm-untuned", f"tvm-untuned-{prec}").replace("tvm-tuned", f"tvm-tuned-{prec}", 1)
                rows[new] = row
                if name != "tvm-untuned":
                    tvm_names.setdefault(prec, []).append(new)
            elif name in rows:
                raise ValueError(f"two studies timed the peer {name}: keep one (--peers none on the others)")
            else:
                rows[name] = row
    return {"studies": studies, "rows": rows, "tvm_names": tvm_names}


def precision_of(study: dict[str, Any]) -> str:
    argv = study["meta"].get("argv") or []
    return argv[argv.index("--precision") + 1] if "--precision" in argv else "fp32"


def variant_of(study: dict[str, Any]) -> str:
    """The name a study's TVM rows take: its precision, and its layout where the study named one (fp16-nhwc)."""
    argv = study["meta"].get("argv") or []
    layout = argv[argv.index("--layout") + 1].lower() if "--layout" in argv else ""
    return precision_of(study) + (f"-{layout}" if layout else "")


def render(data: dict[str, Any]) -> str:
    from tunefarm.core.stats import method_text

    studies, rows = data["studies"], data["rows"]
    meta = studies[0]["meta"]
    peers = [n for n in ORDER if n in rows and n not in TVM]
    order = peers + sorted(n for n in rows if n not in peers)
    lines = [f"# {meta.get('model')} on {meta.get('gpu_name')}: tuned TVM at "
             f"{' and '.join(sorted(data['tvm_names']))} against PyTorch, one machine, one run", "",
             f"- Device: {meta.get('device_name')} ({meta.get('device_detail', '')}); driver {meta.get('driver', '-')}; "
             f"host CPU {meta.get('cpu')} ({meta.get('logical_cpus')} logical CPUs given to each study); "
             f"TVM {meta.get('tvm')}, PyTorch {meta.get('torch')}, Triton {meta.get('triton', '-')}.",
             "- How: the studies were tuned side by side, each pinned to its own half of the host's cores "
             "(`taskset`; builds and search on those cores, measurements on the one GPU, so candidates of the two "
             "jobs shared the GPU while tuning); every row was timed after both had stopped tuning, one study at a "
             "time (`--barrier`), on the otherwise idle GPU.", ""]
    for study in studies:
        m, tn = study["meta"], study.get("tuning", {})
        lines.append(f"- {variant_of(study)} study: pipeline {m.get('pipeline')}; started {m.get('started')}, "
                     f"{'finished ' + m['finished'] if m.get('finished') else 'NOT FINISHED'}; "
                     f"tuning {tn.get('outcome', 'not run')}, {tn.get('wall_s_total') or 0:.0f} s, "
                     f"{tn.get('trials_measured')} trials measured ({tn.get('trial_errors')} failed candidates), "
                     f"{tn.get('records_in_database')} records, tasks with a valid record "
                     f"{tn.get('tasks_with_valid_records')}/{tn.get('tasks')}; "
                     f"tuned functions {(study.get('scheduled') or {}).get('count')}/"
                     f"{(study.get('scheduled') or {}).get('total')}.")
    lines += ["", "## Latency and numerics", ""] + table_lines(rows, order) + [""]
    for prec, names in sorted(data["tvm_names"].items()):
        lines += summary_lines(rows, tuple(names), heading=f"## Summary, TVM {prec}")
    for study in studies:
        per_task = [t for t in (study.get("tuning") or {}).get("per_task") or [] if t.get("records")]
        if per_task:
            lines.append(f"- {variant_of(study)}: valid candidates {sum(t['valid_records'] for t in per_task)}/"
                         f"{sum(t['records'] for t in per_task)} records; conv tasks: " + ", ".join(
                             f"{t['task']} {t['valid_records']}/{t['records']}"
                             + (f" best {t['best_us']:.1f} us" if t.get("best_us") else "")
                             for t in per_task if "conv2d" in t["task"]) + ".")
    lines.append("")
    args = meta.get("args", {})
    lines += ["Method: " + method_text(args.get("warmup", 0), args.get("samples", 0), args.get("budget_s", 0.0)), ""]
    problems = [p for s in studies for p in s.get("problems", [])]
    if problems:
        lines += ["## Problems", ""] + [f"- {p}" for p in problems] + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_combine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", help="gpu_study JSON reports")
    parser.add_argument("--out", required=True, help="output path without suffix")
    args = parser.parse_args(argv)
    try:
        data = combine([json.loads(Path(p).read_text()) for p in args.reports])
    except (OSError, ValueError, KeyError) as err:
        print(f"gpu_combine: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({k: v for k, v in data.items() if k != "studies"}
                                                   | {"from": args.reports}, indent=2, default=str))
    out.with_suffix(".md").write_text(render(data))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
