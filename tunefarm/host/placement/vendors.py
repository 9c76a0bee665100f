"""The vendor libraries placement can offload to, each described once, and which of them a job can use.

A vendor is a codegen module under ``host/byoc/`` that provides ``candidate_groups(mod)`` (the groups it could
run: :class:`tunefarm.host.byoc.dnnl.Group`, with ``key()``), ``partition(mod, select)`` and ``offload(mod,
select)`` (partition, then run the codegen), ``register()`` (the host's side: load what the codegen needs, a
one-line TunefarmError when it cannot), plus the target kinds it runs on and the name under which agents report
it in ``DeviceInfo.vendor`` (``{"available": bool, "reason": ...}``) and the precisions its codegen takes. oneDNN
(CPU agents, fp32) and cuBLAS/cuDNN (CUDA agents, fp16 and fp32: :mod:`tunefarm.host.byoc.cuda_libs`) are the
entries now.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from tunefarm.core.backends import VENDOR_BACKENDS
from tunefarm.core.errors import TunefarmError

AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class Vendor:
    name: str  # placement.json's and DeviceInfo.vendor's name: "onednn"
    module: str  # the codegen module (host/byoc/...)
    target_kinds: tuple[str, ...]  # the TVM target kinds whose agents can run it
    label: str  # for people: "oneDNN 2.x (DNNL JSON runtime)"
    precisions: tuple[str, ...] = ("fp32",)  # the pipeline precisions (tuning.precision) its codegen takes

    def codegen(self):
        return importlib.import_module(self.module)

    def host_problem(self) -> str | None:
        """Why this host cannot compile for the vendor (its plugin cannot be loaded...), or None."""
        try:
            self.codegen().register()
        except TunefarmError as err:
            return str(err)
        return None

    def agent_problem(self, info) -> str | None:
        """Why the agent described by ``info`` (DeviceInfo) cannot run the vendor's parts, or None."""
        from tunefarm.core.safe_text import printable  # pylint: disable=import-outside-toplevel

        # The agent's own words (DeviceInfo came over the network): printable, one bounded line.
        agent = printable(getattr(info, "agent_id", "?"), 100)
        vendor = getattr(info, "vendor", None)
        entry = vendor.get(self.name) if isinstance(vendor, dict) else None
        if not isinstance(entry, dict):
            return f"agent {agent} does not report {self.name}"
        if entry.get("available") is not True:
            reason = entry.get("reason")
            return f"agent {agent}: {self.name} " + (printable(reason, 300) if isinstance(reason, str) and reason
                                                     else "not available")
        return None


VENDORS: dict[str, Vendor] = {v.name: v for v in (
    Vendor("onednn", "tunefarm.host.byoc.dnnl", ("llvm",), "oneDNN (DNNL JSON runtime)"),
    Vendor("cublas", "tunefarm.host.byoc.cublas", ("cuda",), "cuBLAS (cuBLASLt JSON runtime)", ("fp32", "fp16")),
    Vendor("cudnn", "tunefarm.host.byoc.cudnn", ("cuda",), "cuDNN (cuDNN JSON runtime)", ("fp32", "fp16")),
)}
assert tuple(VENDORS) == VENDOR_BACKENDS, "core/backends.py VENDOR_BACKENDS lists the vendors a job file may name"


def usable(asked: Any, target, agents: list) -> tuple[list[Vendor], list[str]]:
    """The vendors a job places over (``asked``: ``auto``, ``off``, or names), and why each other one is not
    used: the target's kind, the host cannot compile for it, or an agent of the key cannot run it (every agent
    of the key must: the evaluation and a pulled model may run on any of them). ``auto`` leaves out silently the
    vendors whose target kind does not match."""
    if asked == "off" or asked == []:
        return [], []
    names = list(VENDORS) if asked == AUTO else list(asked)
    out, why = [], []
    for name in names:
        vendor = VENDORS[name]
        if target.kind.name not in vendor.target_kinds:
            if asked != AUTO:
                why.append(f"{name}: runs on {'/'.join(vendor.target_kinds)} targets, not {target.kind.name}")
            continue
        problem = vendor.host_problem() or next(filter(None, (vendor.agent_problem(a) for a in agents)), None)
        if problem is None and not agents:
            problem = "no agent on the key to run it"
        if problem:
            why.append(f"{name}: {problem}")
        else:
            out.append(vendor)
    return out, why


def will_place(asked: Any, target, agents: list | None) -> bool:
    """Whether a job will place groups on some vendor (it picks the default layout before tuning), as
    :func:`usable` says for the key's agents. ``agents`` None (``tune --plan`` without asking the tracker): False,
    the layout without placement; the run itself decides on the agents it finds (a host that can compile for a
    vendor is not enough: every agent of the key must run it)."""
    if agents is None:
        return False
    return bool(usable(asked, target, agents)[0])
