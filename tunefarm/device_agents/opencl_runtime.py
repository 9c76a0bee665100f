"""TVM's OpenCL backend for the installed PyPI wheel, built from TVM's source in one command.

The wheel is built with ``USE_OPENCL=OFF``, but its Python package loads a backend library
``libtvm_runtime_opencl.so`` when it finds one on ``LD_LIBRARY_PATH`` at ``import tvm``
(``tvm/backend/opencl/__init__.py``). That library is two C++ files of TVM's source
(``src/backend/opencl/runtime/opencl_module.cc`` and ``opencl_device_api.cc``) compiled against the
runtime headers the wheel ships (plus four support headers of the source tree) and the system's
OpenCL headers, linked against the wheel's own ``libtvm_runtime.so`` / ``libtvm_ffi.so`` and the OpenCL
ICD loader (``libOpenCL.so.1``). TVM's optional ``opencl_wrapper.cc`` (which dlopens ``libOpenCL.so``,
a name only the loader's -dev package installs) is left out: linking the loader directly needs no -dev
package and fails at load with the loader's own name when it is missing.

:func:`ensure_runtime` finds the library in the cache (``$XDG_CACHE_HOME/tunefarm/opencl/``, one
directory per TVM version and wheel runtime), or builds it from a source tree, then checks it in a
fresh process: it loads, TVM sees an OpenCL device, and a kernel compiled by the wheel gives exact
results on it. Each missing piece is a one-line :class:`~tunefarm.core.errors.TunefarmError`.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunefarm.core.errors import TunefarmError
from tunefarm.device_agents import cxx_build
from tunefarm.device_agents.cxx_build import compile_units, find_cxx, first_error

LIB_NAME = "libtvm_runtime_opencl.so"
SOURCE_ENV = "TUNEFARM_TVM_SOURCE"
RUNTIME_DIR = "src/backend/opencl/runtime"
COMPILE_UNITS = ("opencl_module.cc", "opencl_device_api.cc")
# The source tree's files the build takes: the backend's runtime directory (copied whole) and the four
# support headers the wheel does not ship (copied one by one).
RUNTIME_FILES = tuple(f"{RUNTIME_DIR}/{name}" for name in
                      (*COMPILE_UNITS, "opencl_common.h", "source_utils.h", "texture.h"))
SUPPORT_FILES = ("include/tvm/support/io.h", "include/tvm/support/serializer.h", "src/support/bytes_io.h",
                 "src/support/env.h")
REQUIRED_FILES = RUNTIME_FILES + SUPPORT_FILES
COMPILE_TIMEOUT_S = 600
CHECK_TIMEOUT_S = 180
DEFINES = ("-DNDEBUG=1", "-DTVM_FFI_CMAKE_LITTLE_ENDIAN=1", "-DTVM_INDEX_DEFAULT_I64=1", "-DTVM_KALLOC_ALIGNMENT=64",
           "-DTVM_THREADPOOL_USE_OPENMP=0")
DRIVERS_HINT = "intel-opencl-icd on an Intel iGPU, pocl-opencl-icd on any CPU"


@dataclass
class OpenCLRuntime:
    """A checked backend library: its directory (to put on ``LD_LIBRARY_PATH``) and what it saw."""

    lib_dir: Path
    device: dict[str, Any] = field(default_factory=dict)
    built: bool = False  # built by this call (else found in the cache)
    source: str = ""
    build_s: float = 0.0

    @property
    def lib_path(self) -> Path:
        return self.lib_dir / LIB_NAME


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tunefarm" / "opencl"


def tvm_release() -> str:
    """The installed TVM's version, e.g. ``0.27.0.post1``."""
    import tvm  # pylint: disable=import-outside-toplevel

    return str(tvm.__version__)


def release_tag(version: str) -> str:
    """The git tag of a TVM release: ``0.27.0.post1`` -> ``v0.27.0``."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    return f"v{match.group(1)}.{match.group(2)}.{match.group(3)}" if match else f"v{version}"


def clone_command(version: str | None = None) -> str:
    tag = release_tag(version or tvm_release())
    return f"git clone --depth 1 --branch {tag} https://github.com/apache/tvm tvm-src"


def _major_minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"v?(\d+)\.(\d+)", version.strip())
    return (int(match.group(1)), int(match.group(2))) if match else None


# ---------------------------------------------------------------- what the wheel and the system give

def wheel_parts() -> dict[str, Path]:
    """The wheel's runtime headers and libraries the backend compiles and links against."""
    import tvm  # pylint: disable=import-outside-toplevel
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    tvm_dir, ffi_dir = Path(tvm.__file__).parent, Path(tvm_ffi.__file__).parent
    parts = {"include": tvm_dir / "include" / "tvm" / "runtime", "src_runtime": tvm_dir / "src" / "runtime",
             "ffi_include": ffi_dir / "include", "runtime_lib": tvm_dir / "lib" / "libtvm_runtime.so",
             "ffi_lib": ffi_dir / "lib" / "libtvm_ffi.so"}
    missing = [str(p) for p in parts.values() if not p.exists()]
    if missing:
        raise TunefarmError(f"this TVM install ({tvm_dir}) lacks the runtime headers or libraries the OpenCL "
                            f"backend builds against ({', '.join(missing)}): it is not the PyPI wheel; build "
                            "TVM from source with USE_OPENCL=ON instead")
    return parts


def check_headers(cxx: str) -> None:
    """The OpenCL headers (``CL/cl.h``) are where the compiler looks."""
    try:
        proc = subprocess.run([cxx, "-fsyntax-only", "-x", "c++", "-"], input="#include <CL/cl.h>\nint main(){}\n",
                              capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise TunefarmError(f"cannot run the C++ compiler {cxx}: {err}") from None
    if proc.returncode != 0:
        raise TunefarmError(f"no OpenCL headers: {cxx} cannot find CL/cl.h (apt install opencl-headers, "
                            "or add their directory to CPATH)")


def find_icd_loader() -> Path:
    """The OpenCL ICD loader, ``libOpenCL.so.1`` (``$TUNEFARM_OPENCL_LIB`` to name another)."""
    named = os.environ.get("TUNEFARM_OPENCL_LIB", "").strip()
    if named:
        if not Path(named).is_file():
            raise TunefarmError(f"TUNEFARM_OPENCL_LIB={named!r} is not a file")
        return Path(named)
    candidates: list[Path] = []
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    arch = {"x86_64": "x86-64", "aarch64": "AArch64"}.get(platform.machine(), "")
    listed = [(m.group(1), Path(m.group(2)))
              for m in re.finditer(r"^\s*libOpenCL\.so\.1 \(([^)]*)\) => (\S+)", out, re.M)]
    candidates += [p for flags, p in listed if arch and arch in flags] + [p for _, p in listed]
    for lib_dir in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                    "/usr/local/lib", "/lib/x86_64-linux-gnu"):
        candidates.append(Path(lib_dir) / "libOpenCL.so.1")
    for cand in candidates:
        if cand.is_file():
            return cand
    raise TunefarmError("no OpenCL ICD loader (libOpenCL.so.1): apt install ocl-icd-libopencl1, plus your "
                        f"device's OpenCL driver ({DRIVERS_HINT})")


# ---------------------------------------------------------------- the source tree

def source_version(tree: Path) -> str | None:
    """The TVM version a source tree states (version.py, python/tvm/libinfo.py, pyproject.toml), or None."""
    probes = ((tree / "version.py", r"__version__\s*=\s*[\"']([^\"']+)[\"']"),
              (tree / "python" / "tvm" / "libinfo.py", r"__version__\s*=\s*[\"']([^\"']+)[\"']"),
              (tree / "pyproject.toml", r"(?m)^version\s*=\s*[\"']([^\"']+)[\"']"))
    for path, pattern in probes:
        try:
            match = re.search(pattern, path.read_text(errors="replace")[:200_000])
        except OSError:
            continue
        if match:
            return match.group(1)
    return None


def check_source(tree: str | Path) -> tuple[Path, str | None]:
    """A TVM source tree the backend can be built from, and the version it states (None: it states none).

    Refused with one line: not a directory; an older TVM's layout (``src/runtime/opencl/``); a stated
    version whose major.minor is not the installed TVM's; missing files.
    """
    path = Path(tree).expanduser()
    installed = tvm_release()
    if not path.is_dir():
        raise TunefarmError(f"TVM source tree {str(path)!r} is not a directory (get one: {clone_command(installed)})")
    path = path.resolve()
    stated = source_version(path)
    if stated is not None and _major_minor(stated) != _major_minor(installed):
        raise TunefarmError(f"TVM source tree {path} is TVM {stated}, the installed TVM is {installed}: use a "
                            f"checkout of {release_tag(installed)} ({clone_command(installed)})")
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        older = (path / "src" / "runtime" / "opencl" / "opencl_module.cc").is_file()
        what = (f"it has the OpenCL runtime of an older TVM (src/runtime/opencl/{', TVM ' + stated if stated else ''})"
                if older else f"it lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        raise TunefarmError(f"TVM source tree {path} cannot build the OpenCL backend of TVM {installed}: {what}; "
                            f"use a checkout of {release_tag(installed)} ({clone_command(installed)})")
    return path, stated


def _digest(paths: list[Path]) -> str:
    sha = hashlib.sha256()
    for path in paths:
        sha.update(str(path.name).encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                sha.update(chunk)
    return sha.hexdigest()


def cache_dir() -> Path:
    """The cache directory of the installed TVM version and wheel runtime."""
    parts = wheel_parts()
    return cache_root() / f"tvm-{tvm_release()}-{_digest([parts['runtime_lib'], parts['ffi_lib']])[:12]}"


# ---------------------------------------------------------------- building

def build(tree: str | Path, out_dir: Path | None = None, log: Callable[[str], None] | None = None) -> tuple[Path, float]:
    """Compile and link the backend from the source ``tree`` into ``out_dir`` (default: the cache).

    The library appears there complete or not at all (built in a temporary directory, then renamed);
    the compiler's output is kept as ``build.log`` next to it, and on failure in the error's directory.
    Returns (the library's directory, build seconds).
    """
    log = log or (lambda _msg: None)
    cxx = find_cxx()
    check_headers(cxx)
    loader = find_icd_loader()
    parts = wheel_parts()
    path, stated = check_source(tree)
    out_dir = Path(out_dir) if out_dir is not None else cache_dir()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=out_dir.parent))
    t0 = time.monotonic()
    # The build tree: the source's OpenCL runtime and support headers beside the wheel's own runtime
    # headers and sources (the backend must match the runtime it is loaded into, not the checkout's).
    tree_dir = work / "tree"
    shutil.copytree(path / RUNTIME_DIR, tree_dir / RUNTIME_DIR)
    for name in SUPPORT_FILES:
        (tree_dir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path / name, tree_dir / name)
    (tree_dir / "include" / "tvm" / "runtime").symlink_to(parts["include"], target_is_directory=True)
    (tree_dir / "src" / "runtime").symlink_to(parts["src_runtime"], target_is_directory=True)
    flags = [*DEFINES, f"-I{tree_dir / 'include'}", f"-I{parts['ffi_include']}", "-O2", "-fPIC",
             "-fvisibility=hidden", "-std=gnu++20"]
    log(f"building {LIB_NAME} for TVM {tvm_release()} from {path}"
        + (f" (TVM {stated})" if stated else " (the tree states no version)") + f" with {cxx}")
    build_log = work / "build.log"
    objects = compile_units(cxx, flags, tree_dir / RUNTIME_DIR, COMPILE_UNITS, work, build_log, COMPILE_TIMEOUT_S)
    lib = work / LIB_NAME
    cmd = [cxx, "-shared", "-o", str(lib), f"-Wl,-soname,{LIB_NAME}", "-Wl,--no-undefined",
           *map(str, objects), str(parts["runtime_lib"]), str(parts["ffi_lib"]), str(loader)]
    with open(build_log, "a") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=COMPILE_TIMEOUT_S, check=False).returncode
    if code != 0:
        raise TunefarmError(f"linking {LIB_NAME} failed ({first_error(build_log.read_text())}); full log: {build_log}")
    seconds = time.monotonic() - t0
    meta = {"tvm": tvm_release(), "source": str(path), "source_version": stated,
            "source_digest": _source_digest(path), "cxx": cxx, "icd_loader": str(loader),
            "build_s": round(seconds, 1), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    final = work / "final"
    final.mkdir()
    shutil.move(str(lib), final / LIB_NAME)
    cxx_build.publish(work, final, out_dir, meta, build_log)
    log(f"built {out_dir / LIB_NAME} in {seconds:.1f} s")
    return out_dir, seconds


# ---------------------------------------------------------------- checking

_CHECK_SCRIPT = r"""
import json, sys
import numpy as np
import tvm
from tvm.base import _LOADED_LIBS
out = {"loaded": "tvm_runtime_opencl" in _LOADED_LIBS}
if not out["loaded"]:
    print(json.dumps(out)); sys.exit(0)
dev = tvm.opencl(0)
try:
    out["exist"] = bool(dev.exist)
except Exception as err:
    out["exist"], out["error"] = False, str(err).strip().splitlines()[-1][:300]
if out["exist"]:
    out.update(name=str(dev.device_name), max_threads_per_block=int(dev.max_threads_per_block),
               max_shared_memory_per_block=int(dev.max_shared_memory_per_block), warp_size=int(dev.warp_size),
               compute_version=str(dev.compute_version), multi_processor_count=int(dev.multi_processor_count),
               max_clock_rate_khz=int(dev.max_clock_rate))
    from tvm.script import tirx as T
    @T.prim_func
    def add(a: T.Buffer((64,), "float32"), b: T.Buffer((64,), "float32")):
        for i in T.thread_binding(64, thread="threadIdx.x"):
            b[i] = a[i] * T.float32(2) + T.float32(1)
    lib = tvm.compile(add, target=tvm.target.Target({"kind": "opencl", "host": {"kind": "llvm"}}))
    x = np.arange(64, dtype="float32")
    a, b = tvm.runtime.tensor(x, dev), tvm.runtime.tensor(np.zeros(64, "float32"), dev)
    lib["add"](a, b)
    out["kernel_ok"] = bool(np.array_equal(b.numpy(), x * 2 + 1))
print(json.dumps(out))
"""


def runtime_env(lib_dir: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with ``lib_dir`` first on ``LD_LIBRARY_PATH``."""
    env = dict(os.environ if env is None else env)
    rest = [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p and p != str(lib_dir)]
    env["LD_LIBRARY_PATH"] = ":".join([str(lib_dir), *rest])
    return env


def check(lib_dir: Path) -> dict[str, Any]:
    """In a fresh process with ``lib_dir`` on ``LD_LIBRARY_PATH``: the backend loads, TVM sees an OpenCL
    device, and a wheel-compiled kernel gives exact results. Returns the device's attributes."""
    try:
        # A file, not -c: TVMScript reads the source of the function it parses.
        with tempfile.TemporaryDirectory(prefix="tunefarm-opencl-check-") as tmp:
            script = Path(tmp) / "check_opencl.py"
            script.write_text(_CHECK_SCRIPT)
            proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp,
                                  timeout=CHECK_TIMEOUT_S, env=runtime_env(lib_dir), stdin=subprocess.DEVNULL,
                                  check=False)
    except subprocess.TimeoutExpired:
        raise TunefarmError(f"checking the OpenCL backend {lib_dir / LIB_NAME} took over {CHECK_TIMEOUT_S} s") from None
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise TunefarmError(f"the OpenCL backend {lib_dir / LIB_NAME} does not work with this TVM "
                            f"(exit code {proc.returncode}: {first_error(proc.stderr or proc.stdout)})")
    result = json.loads(lines[-1])
    if not result.get("loaded"):
        raise TunefarmError(f"TVM did not load {lib_dir / LIB_NAME} (is it the library of this TVM version?)")
    if not result.get("exist"):
        why = f" ({result['error']})" if result.get("error") else ""
        raise TunefarmError(f"the OpenCL backend loads but sees no OpenCL device{why}: no OpenCL platform is "
                            f"installed (clinfo -l lists none); install your device's driver ({DRIVERS_HINT})")
    if not result.get("kernel_ok"):
        raise TunefarmError(f"a test kernel gave wrong results on OpenCL device {result.get('name')!r}")
    return {k: v for k, v in result.items() if k not in ("loaded", "exist", "kernel_ok")}


# ---------------------------------------------------------------- the one call

def ensure_runtime(source: str | Path | None = None, rebuild: bool = False,
                   log: Callable[[str], None] | None = None) -> OpenCLRuntime:
    """A checked OpenCL backend for the installed TVM: the cached one (unless ``rebuild``, or ``source``
    is another tree than the one it was built from), else built from ``source`` (default:
    ``$TUNEFARM_TVM_SOURCE``)."""
    log = log or (lambda _msg: None)
    target_dir = cache_dir()
    source = source or os.environ.get(SOURCE_ENV) or None
    meta_path = target_dir / "build.json"
    if not rebuild and (target_dir / LIB_NAME).is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = {}
        same_source = source is None or (
            Path(source).expanduser().is_dir()
            and meta.get("source_digest") == _source_digest(Path(source).expanduser().resolve()))
        if same_source:
            log(f"using {target_dir / LIB_NAME} (built {meta.get('built_at', '?')} from {meta.get('source', '?')})")
            return OpenCLRuntime(target_dir, check(target_dir), built=False, source=str(meta.get("source", "")))
    if source is None:
        raise TunefarmError(f"no OpenCL backend for TVM {tvm_release()} in {cache_root()} and no TVM source tree "
                            f"to build it from: pass --tvm-source PATH (or set {SOURCE_ENV}); get one with: "
                            f"{clone_command()}")
    lib_dir, seconds = build(source, target_dir, log)
    device = check(lib_dir)
    return OpenCLRuntime(lib_dir, device, built=True, source=str(source), build_s=seconds)


def _source_digest(tree: Path) -> str | None:
    """The digest of the files the build takes from ``tree`` (None: some are missing or unreadable)."""
    try:
        return _digest([tree / n for n in REQUIRED_FILES])
    except OSError:
        return None


def load_in_process(lib_dir: Path) -> None:
    """Register the backend in this (already TVM-importing) process, as ``import tvm`` would have done
    with ``lib_dir`` on ``LD_LIBRARY_PATH``; and put it there for child processes."""
    import ctypes  # pylint: disable=import-outside-toplevel

    from tvm.base import _LOADED_LIBS  # pylint: disable=import-outside-toplevel

    os.environ.update(runtime_env(lib_dir))
    if "tvm_runtime_opencl" not in _LOADED_LIBS:
        _LOADED_LIBS["tvm_runtime_opencl"] = ctypes.CDLL(str(lib_dir / LIB_NAME), ctypes.RTLD_LOCAL)


def opencl_target(device: dict[str, Any], host: dict[str, Any]) -> dict[str, Any]:
    """The OpenCL target of the device TVM's runtime sees (``check``'s attributes): its own limits.

    ``thread_warp_size`` is what TVM's runtime reports: 1 unless ``TVM_OPENCL_WARP_SIZE`` says otherwise
    (OpenCL has no portable sub-group size query; 1 means no sub-group shuffles in generated code)."""
    threads = int(device.get("max_threads_per_block") or 256)
    return {"kind": "opencl", "max_threads_per_block": threads, "max_num_threads": threads,
            "max_shared_memory_per_block": int(device.get("max_shared_memory_per_block") or 16384),
            "thread_warp_size": max(1, int(device.get("warp_size") or 1)), "host": dict(host)}


def target_problems(target: dict[str, Any], device: dict[str, Any]) -> list[str]:
    """Where an OpenCL target (a preset, a user's JSON) asks for more than the device reports."""
    problems = []
    name = device.get("name", "the device")
    for attr, dev_attr, what in (("max_threads_per_block", "max_threads_per_block", "work-items per work-group"),
                                 ("max_num_threads", "max_threads_per_block", "work-items per work-group"),
                                 ("max_shared_memory_per_block", "max_shared_memory_per_block",
                                  "bytes of local memory per work-group")):
        want, have = target.get(attr), device.get(dev_attr)
        if isinstance(want, int) and isinstance(have, int) and have > 0 and want > have:
            problems.append(f"the target's {attr} {want} exceeds the {have} {what} that {name} reports: "
                            "kernels that use them fail to launch")
    warp, have_warp = target.get("thread_warp_size"), device.get("warp_size")
    if isinstance(warp, int) and warp > 1 and isinstance(have_warp, int) and warp != have_warp:
        problems.append(f"the target's thread_warp_size {warp} is not the {have_warp} that TVM's runtime reports for "
                        f"{name} (set TVM_OPENCL_WARP_SIZE={warp} on the agent if the device's sub-groups have that size)")
    return problems
