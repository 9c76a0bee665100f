"""The placement part of a tuning report: which build the job hands out, and the per-operator profile.

Agent-supplied text (agent ids, reasons built from what agents reported) goes through ``cell``; numbers are
written by the farm."""
from __future__ import annotations

from typing import Any

from tunefarm.host.reports.markdown import cell, number

_NAMES = {"tvm": "TVM", "onednn": "oneDNN", "cublas": "cuBLAS", "cudnn": "cuDNN"}


def _shape(group: dict[str, Any]) -> str:
    shapes = group.get("shapes") or {}
    parts = [f"{'x'.join(map(str, shapes[k]))}" for k in ("data", "weight", "out") if k in shapes]
    strides = (group.get("attrs") or {}).get("strides")
    extra = f" s{strides[0]}" if strides and strides[0] != 1 else ""
    groups = (group.get("attrs") or {}).get("groups")
    extra += f" g{groups}" if groups and groups != 1 else ""
    return " · ".join(parts) + extra


def profile_rows(placement: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per group with the time it takes in the chosen build (``count`` x its side's time) and its share
    of the chosen build's whole-model median; the rest of the model (operators no vendor can run, layout
    changes between them, and groups left with TVM for want of a record of their own) as a last row."""
    chosen = placement.get("chosen", "tvm-tuned")
    offload = {k for keys in (placement.get("offload") or {}).values() for k in keys}
    whole = (placement.get("whole_ms") or {}).get(chosen)
    rows, total = [], 0.0
    for group in placement.get("groups", []):
        on_vendor = group["key"] in offload
        ms = group["vendor_ms"] if on_vendor else group["tvm_ms"]
        other = group["tvm_ms"] if on_vendor else group["vendor_ms"]
        # A group TVM has no record for runs fused with its neighbours in the model, not as timed alone (ResNet-50's
        # Linear: 11.6 ms alone and untuned, 0.34 ms as the model's tuned fused kernel): its time is in the rest.
        in_model = on_vendor or group.get("tvm_record", True)
        spent = ms * group["count"] if ms is not None and in_model else None
        total += spent or 0.0
        gflops = group["flops"] / (ms * 1e6) if ms and in_model and group.get("flops") else None
        rows.append({"group": group, "backend": group["backend"] if on_vendor else "tvm", "ms": ms, "other_ms": other,
                     "spent_ms": spent, "share": (spent / whole) if spent is not None and whole else None,
                     "gflops": gflops})
    if whole:
        rows.append({"rest": True, "spent_ms": max(whole - total, 0.0), "share": max(whole - total, 0.0) / whole})
    return rows


def markdown(placement: dict[str, Any] | None, rows: dict[str, dict[str, Any]], peak_gflops: float = 0.0) -> list[str]:
    """The report's lines about placement (nothing for a job without one)."""
    if not placement:
        return []
    md = ["", "## Placement", ""]
    if not placement.get("backends"):
        why = "; ".join(placement.get("not_used") or []) or (
            "placement.backends is off" if placement.get("asked") in ("off", []) else
            "no vendor library runs on this target")
        return md + [f"No operator group was placed on a vendor library: {cell(why, 1000)}."]
    chosen = placement.get("chosen")
    if chosen is None:
        return md + ["Placement measured its groups but no whole build was chosen (the evaluation did not end)."]
    whole = placement.get("whole_ms") or {}
    md.append(f"The job's model is **{chosen}** ({number(whole.get(chosen))} ms median): the fastest of "
              + ", ".join(f"{n} {number(v)} ms" for n, v in sorted(whole.items(), key=lambda kv: kv[1]))
              + " with correct numerics, on one agent. `pull` exports `placement.json` beside the records; "
              "`tunefarm.host.placement.apply.compile_pulled` builds this model from a pulled directory.")
    for name, build in (placement.get("builds") or {}).items():
        if "same_as" in build:
            md.append(f"- {name} is the same build as {build['same_as']} (no row of its own)")
        probe = build.get("pool_spin") or {}
        if probe.get("probe_ms"):
            md.append(f"- {name}: idle spins probed on the agent before its row, "
                      + ", ".join(f"{cell(k, 20)} {number(v)} ms" for k, v in probe["probe_ms"].items())
                      + f": its row ran {cell(probe.get('chosen'), 20)} (mixed: TVM's pool spin 0 and "
                      "GOMP_SPINCOUNT=3000; stock: both libraries' own)")
    env = placement.get("environment") or {}
    if env:
        md.append("- the chosen build runs with " + " ".join(f"`{cell(k, 40)}={cell(v, 12)}`" for k, v in env.items())
                  + " (placement.json's `environment`, `tunefarm.host.placement.apply.environment`): set it where "
                  "the model runs, before the oneDNN plugin loads")
    for line in placement.get("not_used") or []:
        md.append(f"- not used: {cell(line, 500)}")
    groups = placement.get("groups") or []
    md += ["", f"Per operator group ({len(groups)} distinct, each timed alone on the agent as the TVM kernel with "
           "the job's records and on the vendor library; placed on the faster; times are medians). Share: of the "
           f"chosen build's median; peak: {number(peak_gflops, 1) if peak_gflops else 'unknown'} GFLOP/s "
           "(the agent's: a measured fp32 sgemm on a CPU, the fp16 tensor-core peak from a GPU's attributes).", "",
           "| # | group | data · weight · out | count | TVM ms | vendor ms | runs on | share | GFLOP/s | % of peak | note |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, row in enumerate(profile_rows(placement)):
        if row.get("rest"):
            md.append(f"| | everything else (operators no vendor runs, layout changes, groups TVM runs fused) | | | | | TVM | "
                      f"{_pct(row['share'])} | | | |")
            continue
        g = row["group"]
        pct = _pct(row["gflops"] / peak_gflops) if row["gflops"] and peak_gflops else "-"
        note = cell(g.get("reason") or "", 300)
        md.append(f"| {i} | {g['composite']} | {_shape(g)} | {g['count']} | {number(g['tvm_ms'])} | "
                  f"{number(g['vendor_ms'])} | {_NAMES.get(row['backend'], row['backend'])} | {_pct(row['share'])} | "
                  f"{number(row['gflops'], 1)} | {pct} | {note} |")
    return md


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
