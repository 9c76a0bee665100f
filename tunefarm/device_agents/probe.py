"""Describe this machine as a ``DeviceInfo``, and resolve the target an agent serves.

Everything here is read from the machine itself (``/proc/cpuinfo``, psutil, LLVM through TVM, the
TVM runtime's devices, ``clinfo``), and every probe degrades to "absent" rather than failing: an
agent on an odd machine should still start and say what it could not find.
"""
from __future__ import annotations

import ctypes
import importlib.util
import json
import platform
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from tunefarm.core.errors import TunefarmError, first_line
from tunefarm.core.targets import PRESET_DIR, is_preset, load_preset, preset_names
from tunefarm.core.wire import DeviceInfo

# ---------------------------------------------------------------- CPU

def cpu_model() -> str:
    """The CPU's marketing name ('model name' in /proc/cpuinfo), or what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            name, sep, value = line.partition(":")
            if sep and name.strip() in ("model name", "Model", "cpu model"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def physical_cores() -> int:
    """Physical cores this process may use (``core.threads.usable_cores``: the affinity mask, SMT
    siblings counted once)."""
    from tunefarm.core.threads import usable_cores  # pylint: disable=import-outside-toplevel

    return usable_cores()


def llvm_target(num_cores: int | None = None) -> dict[str, Any]:
    """``{"kind": "llvm", "mcpu": <this CPU as LLVM names it>, "num-cores": N}``.

    ``mcpu`` is left out when LLVM does not recognise the host CPU (it would then mean 'generic').
    """
    from tvm.target import codegen  # pylint: disable=import-outside-toplevel

    target: dict[str, Any] = {"kind": "llvm"}
    mcpu = str(codegen.llvm_get_system_cpu() or "")
    if mcpu and mcpu != "generic" and codegen.llvm_is_valid_cpu(mcpu, str(codegen.llvm_get_system_triple())):
        target["mcpu"] = mcpu
    target["num-cores"] = int(num_cores or physical_cores())
    return target


# ---------------------------------------------------------------- C compiler

def find_c_compiler() -> str | None:
    """The compiler the stock RPC server will link ``.tar`` candidates with (TVM's own choice)."""
    try:
        from tvm.support.cc import get_cc  # pylint: disable=import-outside-toplevel

        found = get_cc()
    except ImportError:
        found = None
    return found or shutil.which("cc") or shutil.which("gcc")


def check_c_compiler(compiler: str | None = None) -> tuple[bool, str]:
    """Compile, link and load a trivial shared object; ``(works, compiler or reason)``.

    Finding ``cc`` on PATH is not enough: a compiler without a linker or libc headers fails every
    MetaSchedule candidate on the agent, so prove the whole path once at start.
    """
    compiler = compiler or find_c_compiler()
    if not compiler:
        return False, "no C compiler found (looked for $CXX/$CC, g++, gcc, clang++, clang, c++, cc)"
    with tempfile.TemporaryDirectory(prefix="tunefarm-cc-") as tmp:
        src = Path(tmp) / "probe.c"
        lib = Path(tmp) / "probe.so"
        src.write_text('#ifdef __cplusplus\nextern "C"\n#endif\nint tunefarm_probe(void) { return 42; }\n')
        try:
            proc = subprocess.run([*compiler.split(), "-shared", "-fPIC", "-o", str(lib), str(src)],
                                  capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            return False, f"{compiler} failed to run: {err}"
        if proc.returncode != 0:
            first = (proc.stderr or proc.stdout).strip().splitlines()
            return False, f"{compiler} cannot build a shared object: {first[0] if first else proc.returncode}"
        try:
            if ctypes.CDLL(str(lib)).tunefarm_probe() != 42:
                return False, f"{compiler} built a shared object that returns the wrong value"
        except OSError as err:
            return False, f"a shared object built by {compiler} does not load: {err}"
    return True, compiler


# ---------------------------------------------------------------- CUDA

def _normalize_gpu_name(name: str) -> str:
    text = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return text[len("nvidia-"):] if text.startswith("nvidia-") else text


def _cuda_tag_for(name: str, compute_version: str) -> str | None:
    """The longest TVM tag whose GPU name starts the device's name and whose arch matches."""
    import tvm  # pylint: disable=import-outside-toplevel

    device = _normalize_gpu_name(name)
    sm = "sm_" + compute_version.replace(".", "")
    best = None
    for tag in tvm.target.list_tags():
        tag = str(tag)
        if not tag.startswith("nvidia/"):
            continue
        gpu = _normalize_gpu_name(tag.split("/", 1)[1])
        if not (device == gpu or device.startswith(gpu + "-")):
            continue
        try:
            arch = str(tvm.target.Target(tag).attrs.get("arch", ""))
        except Exception:  # pylint: disable=broad-except
            continue
        if arch.startswith(sm) and (best is None or len(tag) > len(best)):
            best = tag
    return best


def probe_cuda(max_devices: int = 16) -> list[dict[str, Any]]:
    """CUDA devices TVM's runtime can use, each with a target dict for MetaSchedule.

    The target comes from a TVM tag when one matches the device (it carries every attribute
    MetaSchedule needs); otherwise it is built from the device's own attributes.
    """
    import tvm  # pylint: disable=import-outside-toplevel

    devices = []
    for index in range(max_devices):
        try:
            dev = tvm.cuda(index)
            if not dev.exist:
                break
            name = str(dev.device_name or f"cuda:{index}")
            version = str(dev.compute_version or "")
            entry: dict[str, Any] = {
                "index": index,
                "name": name,
                "compute_capability": version,
                "max_threads_per_block": int(dev.max_threads_per_block or 0),
                "max_shared_memory_per_block": int(dev.max_shared_memory_per_block or 0),
                "thread_warp_size": int(dev.warp_size or 0),
                "multi_processor_count": int(dev.multi_processor_count or 0),
                "max_clock_khz": int(dev.max_clock_rate or 0),
            }
        except Exception:  # pylint: disable=broad-except  # no driver, broken driver: no CUDA here
            break
        tag = _cuda_tag_for(name, version) if version else None
        if tag:
            entry["tag"] = tag
            entry["target"] = {"tag": tag, "host": {"kind": "llvm"}}
        else:
            entry["target"] = {
                "kind": "cuda", "arch": "sm_" + version.replace(".", ""),
                "max_threads_per_block": entry["max_threads_per_block"],
                "max_shared_memory_per_block": entry["max_shared_memory_per_block"],
                "thread_warp_size": entry["thread_warp_size"],
                "host": {"kind": "llvm"},
            }
        devices.append(entry)
    return devices


# ---------------------------------------------------------------- OpenCL

def _clinfo_platforms() -> list[dict[str, Any]] | None:
    """Platforms and devices from ``clinfo -l``; None when clinfo is not installed."""
    clinfo = shutil.which("clinfo")
    if not clinfo:
        return None
    try:
        proc = subprocess.run([clinfo, "-l"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    platforms: list[dict[str, Any]] = []
    for line in proc.stdout.splitlines():
        match = re.search(r"Platform #\d+:\s*(.*)$", line)
        if match:
            platforms.append({"name": match.group(1).strip(), "devices": []})
            continue
        match = re.search(r"Device #\d+:\s*(.*)$", line)
        if match and platforms:
            platforms[-1]["devices"].append({"name": match.group(1).strip()})
    return platforms


def _pyopencl_platforms() -> list[dict[str, Any]] | None:
    """Platforms and devices through pyopencl, if it happens to be installed (no hard dependency)."""
    if importlib.util.find_spec("pyopencl") is None:
        return None
    try:
        import pyopencl  # pylint: disable=import-outside-toplevel,import-error

        return [{"name": p.name.strip(), "devices": [{"name": d.name.strip()} for d in p.get_devices()]}
                for p in pyopencl.get_platforms()]
    except Exception:  # pylint: disable=broad-except  # no ICD loader / no platform
        return []


def probe_opencl() -> dict[str, Any]:
    """``{"platforms": [...], "tvm_runtime_opencl": bool, "source": ..., "note": ...}``.

    Seeing an OpenCL device is not enough to serve OpenCL targets: TVM's runtime must be built with
    ``USE_OPENCL=ON`` (the PyPI wheel is not) and must see the device itself.
    """
    import tvm  # pylint: disable=import-outside-toplevel

    platforms = _clinfo_platforms()
    source = "clinfo"
    if platforms is None:
        platforms = _pyopencl_platforms()
        source = "pyopencl"
    if platforms is None:
        platforms, source = [], "none (neither clinfo nor pyopencl is installed)"
    built_with = str(tvm.support.libinfo().get("USE_OPENCL", "OFF")).upper() not in ("OFF", "", "0", "NOTFOUND")
    from tvm.base import _LOADED_LIBS  # pylint: disable=import-outside-toplevel

    backend = built_with or "tvm_runtime_opencl" in _LOADED_LIBS  # built in, or the wheel's loadable backend
    device: dict[str, Any] = {}
    try:
        sees_device = bool(backend and tvm.opencl(0).exist)
        if sees_device:
            dev = tvm.opencl(0)
            device = {"name": str(dev.device_name), "max_threads_per_block": int(dev.max_threads_per_block),
                      "max_shared_memory_per_block": int(dev.max_shared_memory_per_block),
                      "warp_size": int(dev.warp_size), "compute_version": str(dev.compute_version)}
    except Exception:  # pylint: disable=broad-except  # no ICD loader, no platform
        sees_device = False
    n_devices = sum(len(p["devices"]) for p in platforms)
    if sees_device:
        note = "TVM's runtime can run OpenCL kernels here"
    elif not backend and n_devices:
        note = ("OpenCL devices are present but this TVM runtime has no OpenCL backend (the PyPI wheel is built "
                "without it): start the agent with --opencl, which builds it (`tunefarm runtime opencl`)")
    elif not backend:
        note = "this TVM runtime has no OpenCL backend"
    else:
        note = "TVM's runtime has OpenCL but sees no OpenCL device"
    return {"platforms": platforms, "tvm_runtime_opencl": sees_device, "tvm_built_with_opencl": built_with,
            "tvm_opencl_backend": bool(backend), "device": device, "source": source, "note": note}


# ---------------------------------------------------------------- runners

def available_runners() -> list[str]:
    """Backends this machine can run models with: the runners of ``device_agents.runners`` (TVM among
    them) that it can serve (found, not imported: importing torch takes seconds)."""
    from tunefarm.device_agents.runners import available_runners as runner_backends  # pylint: disable=import-outside-toplevel

    return runner_backends()


# ---------------------------------------------------------------- vendor libraries

def probe_vendor(cuda: bool = False) -> dict[str, Any]:
    """Vendor libraries this agent's TVM can run offloaded parts with: oneDNN when its plugin is built (it is
    loaded here, and the RPC server's sessions load it from $TUNEFARM_ONEDNN_PLUGIN, which this sets); on a
    machine with a CUDA device (``cuda``), cuBLAS and cuDNN when their plugins are built (likewise, through
    $TUNEFARM_CUDA_LIBS). Without one they are reported unavailable and not loaded."""
    from tunefarm.core import cudalibs, onednn  # pylint: disable=import-outside-toplevel

    out = {"onednn": onednn.probe()}
    if cuda:
        out.update(cudalibs.probe())
    else:
        out.update({name: {"available": False, "reason": "no CUDA device on this machine"} for name in cudalibs.LIBS})
    return out


# ---------------------------------------------------------------- the whole machine

def probe(key: str = "", agent_id: str = "") -> DeviceInfo:
    """Everything an agent tells the farm; ``target`` is this CPU's llvm target."""
    import tvm  # pylint: disable=import-outside-toplevel

    cores = physical_cores()
    has_cc, _ = check_c_compiler()
    gpus = probe_cuda()
    return DeviceInfo(
        key=key,
        hostname=socket.gethostname(),
        agent_id=agent_id,
        cpu_model=cpu_model(),
        num_cores=cores,
        target=llvm_target(cores),
        has_cc=has_cc,
        cuda=gpus,
        opencl=probe_opencl(),
        runners=available_runners(),
        tvm_version=str(tvm.__version__),
        vendor=probe_vendor(cuda=bool(gpus)),
    )


# ---------------------------------------------------------------- peak throughput (the timing floor)

# Dense fp16 tensor-core FLOPs per SM per clock by compute capability major version (A100: 108 SMs x
# 1.41 GHz x 2048 = 312 TFLOP/s; H100 SXM: 132 x 1.83 GHz x 4096 = 989 TFLOP/s); older GPUs: fp32 FMA.
_TC_FLOPS_PER_SM_CLOCK = {7: 1024, 8: 2048, 9: 4096, 10: 8192, 12: 4096}
_FP32_FLOPS_PER_SM_CLOCK = 256


def cuda_peak_gflops(entry: dict[str, Any]) -> float:
    """A CUDA device's highest dense peak (GFLOP/s): the farm's floor must hold for fp16 tensor-core kernels."""
    try:
        major = int(str(entry.get("compute_capability", "0")).split(".")[0])
    except ValueError:
        major = 0
    per_clock = _TC_FLOPS_PER_SM_CLOCK.get(major, _FP32_FLOPS_PER_SM_CLOCK)
    return entry.get("multi_processor_count", 0) * entry.get("max_clock_khz", 0) * 1e3 * per_clock / 1e9


def cpu_peak_gflops(n: int = 1024, repeat: int = 5) -> float:
    """This CPU's fp32 throughput on an sgemm (NumPy's BLAS, best of ``repeat``): a measured peak."""
    import time  # pylint: disable=import-outside-toplevel

    import numpy as np  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # pylint: disable=pointless-statement
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ b  # pylint: disable=pointless-statement
        best = min(best, time.perf_counter() - t0)
    return round(2 * n ** 3 / best / 1e9, 1)


def peak_gflops(target: dict[str, Any], info: DeviceInfo) -> float:
    """The peak of the device ``target`` runs on (0.0 when unknown)."""
    kind = target.get("kind") or ""
    if "tag" in target and not kind:
        kind = "cuda" if str(target["tag"]).startswith("nvidia/") else ""
    if kind == "llvm":
        return cpu_peak_gflops()
    if kind == "cuda" and info.cuda:
        return round(cuda_peak_gflops(info.cuda[0]), 1)
    return 0.0


# ---------------------------------------------------------------- targets

def _target_error(err: Exception) -> str:
    # TVM puts the cause first and "Target creation from config dict failed: {...}" after it.
    return first_line(err).split(". Target creation from config dict failed")[0]


def validate_target(target: dict[str, Any]) -> dict[str, Any]:
    """Check a target dict with ``tvm.target.Target``; a one-line TunefarmError if TVM refuses it.

    Also rejects an ``mcpu`` that LLVM does not know: TVM accepts any string there and LLVM then
    silently compiles for a generic CPU.
    """
    import tvm  # pylint: disable=import-outside-toplevel
    from tvm.target import codegen  # pylint: disable=import-outside-toplevel

    text = json.dumps(target, sort_keys=True, default=str)
    if not isinstance(target, dict):
        raise TunefarmError(f"a target must be a JSON object (dict), got {text}")
    try:
        parsed = tvm.target.Target(target)
    except Exception as err:  # pylint: disable=broad-except  # TVM raises ValueError, TypeError, TVMError
        raise TunefarmError(f"invalid target {text}: {_target_error(err)}") from None
    for part in (parsed, parsed.host):
        if part is None or part.kind.name != "llvm" or "mcpu" not in part.attrs:
            continue
        mcpu = str(part.attrs["mcpu"])
        triple = str(part.attrs.get("mtriple", "") or codegen.llvm_get_system_triple())
        if not codegen.llvm_is_valid_cpu(mcpu, triple):
            raise TunefarmError(f"invalid target {text}: LLVM does not know the CPU {mcpu!r} for {triple}")
    return target


def resolve_target(spec: str | dict[str, Any] | None, info: DeviceInfo, threads: int | None = None) -> dict[str, Any]:
    """The target JSON dict an agent serves, from ``--target``.

    ``'auto'`` (or empty): the probed CPU target in ``info``. A preset name (``configs/targets/``):
    its ``target:`` mapping. A string starting with ``{``: a target JSON dict. An llvm target's
    ``num-cores`` is ``threads`` when given (``--threads``: the schedules are tuned for the threads
    that run them), else the target's own, else this machine's count (presets describe a CPU model,
    not a machine).
    """
    if isinstance(spec, dict):
        target = dict(spec)
    else:
        text = (spec or "auto").strip()
        if text == "auto":
            target = dict(info.target) if info.target else llvm_target(info.num_cores or None)
        elif text.startswith(("{", "[")):
            try:
                target = json.loads(text)
            except json.JSONDecodeError as err:
                raise TunefarmError(f"--target is not valid JSON ({err.msg} at column {err.colno}): {text}") from None
            if not isinstance(target, dict):
                raise TunefarmError(f"--target must be a JSON object, got {text}")
        elif is_preset(text):
            target = load_preset(text)
            if isinstance(target, str):  # a preset may name a TVM tag alone
                target = {"tag": target}
            target = dict(target)
        else:
            raise TunefarmError(f"unknown target {text!r}: not 'auto', not a preset "
                                f"({', '.join(preset_names()) or 'none'} in {PRESET_DIR}), not a JSON dict")
    if target.get("kind") == "llvm" and threads:
        target["num-cores"] = int(threads)
    elif target.get("kind") == "llvm" and "num-cores" not in target:
        target["num-cores"] = int(info.num_cores or physical_cores())
    return validate_target(target)


def target_warnings(target: dict[str, Any], info: DeviceInfo) -> list[str]:
    """What about ``target`` this machine cannot do, as lines to print at agent start."""
    import tvm  # pylint: disable=import-outside-toplevel

    kind = tvm.target.Target(target).kind.name
    warnings = []
    if kind == "cuda" and not info.cuda:
        warnings.append("the target is CUDA but TVM's runtime sees no CUDA device here: every measurement will fail")
    if kind == "opencl" and not info.opencl.get("tvm_runtime_opencl"):
        warnings.append(f"the target is OpenCL but {info.opencl.get('note', 'TVM cannot run OpenCL here')}: "
                        "every measurement will fail")
    if kind == "llvm" and "mcpu" in target and info.target.get("mcpu") and target["mcpu"] != info.target["mcpu"]:
        missing = _missing_isa_features(target, info.target)
        if missing:
            warnings.append(f"the target's CPU {target['mcpu']!r} has instructions this CPU ({info.target['mcpu']!r}) "
                            f"lacks ({', '.join(missing)}): code that uses them will crash here")
    return warnings


# LLVM feature names that are instruction sets (the rest are tuning hints such as 'slow-3ops-lea').
_ISA_PREFIXES = ("avx", "sse", "ssse", "fma", "f16c", "amx", "bmi", "gfni", "vaes", "vpclmulqdq", "sha",
                 "xop", "neon", "sve", "dotprod", "i8mm", "bf16", "fp16", "fullfp16")


def _missing_isa_features(target: dict[str, Any], host: dict[str, Any]) -> list[str]:
    import tvm  # pylint: disable=import-outside-toplevel
    from tvm.target import codegen  # pylint: disable=import-outside-toplevel

    try:
        wanted = set(codegen.llvm_get_cpu_features(tvm.target.Target(target)))
        have = set(codegen.llvm_get_cpu_features(tvm.target.Target(host)))
    except Exception:  # pylint: disable=broad-except
        return []
    return sorted(f for f in wanted - have if f.startswith(_ISA_PREFIXES))
