"""TVM's cuBLAS and cuDNN JSON runtimes for the installed PyPI wheel, built from the wheel's own sources against
the NVIDIA libraries of this environment.

The wheel is built with ``USE_CUBLAS=OFF`` and ``USE_CUDNN=OFF`` but ships the runtimes' C++ sources
(``tvm/src/runtime/extra/contrib/{cublas,cudnn,json,cblas}``); the few support headers they include that the
wheel lacks are in this package (``contrib_support/``). Every source is host C++ that calls the vendor libraries:
no nvcc is needed, only a C++ compiler and the libraries' headers and shared objects, which the ``nvidia-*`` pip
packages PyTorch brings carry (``site-packages/nvidia/cu13``, ``nvidia/cudnn``), as does a CUDA toolkit
(:func:`tunefarm.core.cudalibs.find_nvidia` looks for them, and names the first missing one in one line).

:func:`ensure_plugins` finds ``libtvm_cublas_plugin.so`` and ``libtvm_cudnn_plugin.so`` in the cache
(:func:`tunefarm.core.cudalibs.cache_dir`) or builds both (eight files, about a minute on 4 cores) in a temporary
directory beside the cache entry and renames it into place; then checks them in a fresh process: they load and
register their runtimes, and where a CUDA device is present a matmul through cuBLAS and a convolution through
cuDNN match numpy. The cuDNN frontend (attention) is not built: convolutions need only cuDNN's own API.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunefarm.core import cudalibs
from tunefarm.core.errors import TunefarmError
from tunefarm.device_agents import cxx_build
from tunefarm.device_agents.cxx_build import compile_units, find_cxx, first_error

SUPPORT_DIR = Path(__file__).resolve().parent / "contrib_support"
SUPPORT_FILES = ("include/tvm/support/io.h", "include/tvm/support/serializer.h", "src/support/bytes_io.h",
                 "3rdparty/compiler-rt/builtin_fp16.h")
CONTRIB = "src/runtime/extra/contrib"
UNITS = {"cublas": ("cublas/cublas.cc", "cublas/cublas_utils.cc", "cublas/cublas_json_runtime.cc"),
         "cudnn": ("cudnn/conv_forward.cc", "cudnn/conv_backward.cc", "cudnn/softmax.cc", "cudnn/cudnn_utils.cc",
                   "cudnn/cudnn_json_runtime.cc")}
LINK = {"cublas": ("cublas", "cublasLt", "cudart"), "cudnn": ("cudnn", "cudart")}
WHEEL_DIRS = ("cublas", "cudnn", "json", "cblas")
DEFINES = ("-DNDEBUG=1", "-DTVM_FFI_CMAKE_LITTLE_ENDIAN=1", "-DTVM_INDEX_DEFAULT_I64=1", "-DTVM_KALLOC_ALIGNMENT=64",
           "-DTVM_THREADPOOL_USE_OPENMP=0", "-DUSE_JSON_RUNTIME=1")
COMPILE_TIMEOUT_S = 900
CHECK_TIMEOUT_S = 300


@dataclass
class CudaPlugins:
    """Checked plugins: their directory and what the check saw."""

    directory: Path
    info: dict[str, Any] = field(default_factory=dict)
    built: bool = False
    build_s: float = 0.0


def wheel_parts() -> dict[str, Path]:
    """The wheel's cuBLAS/cuDNN sources, runtime headers and libraries; one line if this TVM does not ship them."""
    return cxx_build.wheel_parts([f"{CONTRIB}/{u}" for units in UNITS.values() for u in units],
                                 "the cuBLAS/cuDNN runtimes' sources or the runtime they link against",
                                 "USE_CUBLAS/USE_CUDNN=ON")


def check_headers(cxx: str, include_dirs: list[Path]) -> None:
    """The headers the sources include compile together (a header they pull in, such as ``cuda_fp16.h``, may be in
    a package that is not installed): one line naming the first one missing."""
    probe = "#include <cuda_runtime.h>\n#include <cublas_v2.h>\n#include <cublasLt.h>\n#include <cudnn.h>\nint main(){}\n"
    cmd = [cxx, "-std=gnu++17", "-E", "-x", "c++", *(f"-I{d}" for d in include_dirs), "-"]
    try:
        proc = subprocess.run(cmd, input=probe, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise TunefarmError(f"cannot run the C++ compiler {cxx}: {err}") from None
    if proc.returncode != 0:
        raise TunefarmError(f"the NVIDIA headers found do not compile together ({first_error(proc.stderr)}); "
                            "install the matching CUDA runtime headers (pip nvidia-cuda-runtime) or set CUDA_HOME")


def build(out_dir: Path | None = None, log: Callable[[str], None] | None = None,
          roots: list[Path] | None = None) -> tuple[Path, float]:
    """Compile and link both plugins from the wheel's sources into ``out_dir`` (default: the cache directory).

    The directory appears complete or not at all; the compiler's output is kept as ``build.log`` in it (and named
    in the error on failure). Returns (the directory, build seconds)."""
    log = log or (lambda _msg: None)
    cxx = find_cxx()
    parts = wheel_parts()
    found = cudalibs.find_nvidia(roots=roots)
    include_dirs = list(dict.fromkeys(found[h].parents[h.count("/")] for h in cudalibs.HEADERS))
    check_headers(cxx, include_dirs)
    out_dir = Path(out_dir) if out_dir is not None else cudalibs.cache_dir()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=out_dir.parent))
    t0 = time.monotonic()
    tree = work / "tree"
    for sub in WHEEL_DIRS:
        shutil.copytree(parts["tvm_dir"] / CONTRIB / sub, tree / CONTRIB / sub)
    for name in SUPPORT_FILES:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(SUPPORT_DIR / name, tree / name)
    flags = [*DEFINES, f"-I{tree / 'include'}", f"-I{parts['include']}", f"-I{parts['ffi_include']}",
             *(f"-I{d}" for d in include_dirs), "-O2", "-fPIC", "-fvisibility=hidden", "-std=gnu++20"]
    import tvm  # pylint: disable=import-outside-toplevel

    libs = {k[4:]: v for k, v in found.items() if k.startswith("lib:")}
    log(f"building the cuBLAS and cuDNN plugins for TVM {tvm.__version__} from the wheel's sources with {cxx}, "
        f"against {', '.join(f'{k} {v}' for k, v in libs.items())}")
    build_log = work / "build.log"
    for sub in UNITS:
        (work / sub).mkdir()
    units = [u for group in UNITS.values() for u in group]
    objects = dict(zip(units, compile_units(cxx, flags, tree / CONTRIB, units, work, build_log, COMPILE_TIMEOUT_S)))
    final = work / "final"
    final.mkdir()
    rpath = ":".join(dict.fromkeys(str(p.parent) for p in [*libs.values(), parts["runtime_lib"], parts["ffi_lib"]]))
    for name, lib in cudalibs.LIBS.items():
        cmd = [cxx, "-shared", "-o", str(final / lib.file), f"-Wl,-soname,{lib.file}", "-Wl,--no-undefined",
               *(str(objects[u]) for u in UNITS[name]), str(parts["runtime_lib"]), str(parts["ffi_lib"]),
               *(str(libs[stem]) for stem in LINK[name]), f"-Wl,-rpath,{rpath}"]
        with open(build_log, "a") as out:
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=COMPILE_TIMEOUT_S,
                                  check=False).returncode
        if code != 0:
            raise TunefarmError(f"linking {lib.file} failed ({first_error(build_log.read_text())}); "
                                f"full log: {build_log}")
    seconds = time.monotonic() - t0
    meta = {"tvm": str(tvm.__version__), "cxx": cxx, "build_s": round(seconds, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sources": str(parts["tvm_dir"] / CONTRIB),
            "nvidia": {k: str(v) for k, v in found.items()}}
    cxx_build.publish(work, final, out_dir, meta, build_log)
    log(f"built {out_dir}/{{{','.join(lib.file for lib in cudalibs.LIBS.values())}}} in {seconds:.1f} s")
    return out_dir, seconds


# A fresh process: load both plugins; on a CUDA device, one fp16 and one fp32 matmul through cuBLAS (its packed
# matmul) and a 3x3 convolution through cuDNN (its packed conv2d forward, NHWC and NCHW), against numpy.
_CHECK_SCRIPT = r"""
import json, sys
import numpy as np
import tvm, tvm_ffi
from tunefarm.core import cudalibs
out = {"plugins": {n: str(cudalibs.load_plugin(n, sys.argv[1])) for n in cudalibs.LIBS}}
out["versions"] = cudalibs.versions()
dev = tvm.cuda(0)
out["device"] = bool(dev.exist)
if dev.exist:
    rng = np.random.default_rng(0)
    errs = {}
    for dt in ("float16", "float32"):
        a = rng.standard_normal((64, 96)).astype(dt); b = (rng.standard_normal((96, 32)) / 8).astype(dt)
        c = tvm.runtime.tensor(np.zeros((64, 32), dt), dev)
        tvm_ffi.get_global_func("tvm.contrib.cublas.matmul")(tvm.runtime.tensor(a, dev), tvm.runtime.tensor(b, dev),
                                                             c, False, False)
        ref = a.astype("float64") @ b.astype("float64")
        errs[f"cublas_matmul_{dt}"] = float(np.abs(c.numpy() - ref).max() / np.abs(ref).max())
    x = rng.standard_normal((1, 10, 10, 8)).astype("float32"); w = (rng.standard_normal((16, 3, 3, 8)) / 8).astype("float32")
    xp = np.pad(x.astype("float64"), ((0, 0), (1, 1), (1, 1), (0, 0)))
    ref = np.einsum("nhwcij,oijc->nhwo", np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(1, 2)), w)
    for dt in ("float16", "float32"):
        for fmt, name in ((1, "nhwc"), (0, "nchw")):
            xx, ww = (x, w) if fmt == 1 else (x.transpose(0, 3, 1, 2), w.transpose(0, 3, 1, 2))
            shape = (1, 10, 10, 16) if fmt == 1 else (1, 16, 10, 10)
            y = tvm.runtime.tensor(np.zeros(shape, dt), dev)
            tvm_ffi.get_global_func("tvm.contrib.cudnn.conv2d.forward")(
                1, fmt, 1, 1, 1, 1, 1, 1, 1, tvm.runtime.tensor(np.ascontiguousarray(xx).astype(dt), dev),
                tvm.runtime.tensor(np.ascontiguousarray(ww).astype(dt), dev), y, dt, 1)
            got = y.numpy() if fmt == 1 else y.numpy().transpose(0, 2, 3, 1)
            errs[f"cudnn_conv2d_{name}_{dt}"] = float(np.abs(got - ref).max() / np.abs(ref).max())
    out["max_rel_err"] = errs
print(json.dumps(out))
"""
# fp32 convolutions through cuDNN may run in TF32 on tensor cores (cuDNN's default math on Ampere and later; seen
# on an H100: 3.1e-4 for NHWC, 2e-7 for NCHW), as PyTorch's TF32 rows do; a wrong convolution is off by O(1).
CHECK_RTOL = {"float16": 5e-3, "float32": 1e-4, "cudnn_float32": 2e-3}


def check(directory: Path) -> dict[str, Any]:
    """In a fresh process: both plugins load and register their runtimes and module loaders; on a CUDA device a
    matmul through cuBLAS and a convolution through cuDNN (fp16 and fp32, NHWC and NCHW) match numpy. Returns
    what it saw (``device``: whether a CUDA device was there to run on)."""
    env = dict(os.environ)
    env.pop(cudalibs.PLUGIN_ENV, None)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    try:
        proc = subprocess.run([sys.executable, "-c", _CHECK_SCRIPT, str(directory)], capture_output=True, text=True,
                              timeout=CHECK_TIMEOUT_S, env=env, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        raise TunefarmError(f"checking the cuBLAS/cuDNN plugins in {directory} took over {CHECK_TIMEOUT_S} s") from None
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise TunefarmError(f"the cuBLAS/cuDNN plugins in {directory} do not work with this TVM (exit code "
                            f"{proc.returncode}: {first_error(proc.stderr or proc.stdout)}); rebuild them: "
                            f"{cudalibs.BUILD_HINT} --rebuild")
    result = json.loads(lines[-1])
    for name, err in (result.get("max_rel_err") or {}).items():
        dtype = name.rsplit("_", 1)[1]
        if not err <= CHECK_RTOL.get(f"{name.split('_', 1)[0]}_{dtype}", CHECK_RTOL[dtype]):
            raise TunefarmError(f"a test {name.replace('_', ' ')} through the plugins in {directory} is off by "
                                f"{err:.2e} relative to numpy")
    return result


def ensure_plugins(rebuild: bool = False, log: Callable[[str], None] | None = None) -> CudaPlugins:
    """Checked plugins for the installed TVM: the cached ones (unless ``rebuild``), else built now."""
    log = log or (lambda _msg: None)
    directory = cudalibs.cache_dir()
    if not rebuild and all((directory / lib.file).is_file() for lib in cudalibs.LIBS.values()):
        meta = {}
        try:
            meta = json.loads((directory / "build.json").read_text())
        except (OSError, ValueError):
            pass
        log(f"using {directory} (built {meta.get('built_at', '?')})")
        return CudaPlugins(directory, check(directory), built=False)
    directory, seconds = build(directory, log)
    return CudaPlugins(directory, check(directory), built=True, build_s=seconds)
