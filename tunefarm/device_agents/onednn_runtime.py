"""TVM's DNNL (oneDNN) JSON runtime for the installed PyPI wheel, built from the wheel's own sources.

The wheel is built with ``USE_DNNL=OFF`` but ships the runtime's C++ sources
(``tvm/src/runtime/extra/contrib/dnnl/*.cc`` and ``.../json/*.h``). Three support headers they include are not
in the wheel; they are in this package (``contrib_support/``, from Apache TVM, with its LICENSE and NOTICE).
The sources use oneDNN's v2 API (``convolution_forward::desc``), so they compile against oneDNN 2.x only:
Debian/Ubuntu's ``libdnnl-dev`` (2.6.3 on bookworm, OpenMP threading). PyPI's ``onednn`` (3.x) ships no
headers and does not compile against them.

:func:`ensure_plugin` finds ``libtvm_dnnl_plugin.so`` in the cache (:func:`tunefarm.core.onednn.cache_dir`)
or builds it (three files, ~15-30 s on 2 cores) in a temporary directory beside the cache entry and renames it
into place; then checks it in a fresh process: it loads, registers the DNNL JSON runtime, and a convolution
run through oneDNN matches numpy. Each missing piece is a one-line :class:`~tunefarm.core.errors.TunefarmError`.
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

from tunefarm.core import onednn
from tunefarm.core.errors import TunefarmError
from tunefarm.device_agents import cxx_build
from tunefarm.device_agents.cxx_build import compile_units, find_cxx, first_error

LIB_NAME = onednn.LIB_NAME
SUPPORT_DIR = Path(__file__).resolve().parent / "contrib_support"
SUPPORT_FILES = ("include/tvm/support/io.h", "include/tvm/support/serializer.h", "src/support/bytes_io.h")
CONTRIB = "src/runtime/extra/contrib"
COMPILE_UNITS = ("dnnl_json_runtime.cc", "dnnl.cc", "dnnl_utils.cc")
WHEEL_SOURCES = (*(f"{CONTRIB}/dnnl/{u}" for u in COMPILE_UNITS), f"{CONTRIB}/dnnl/dnnl_utils.h",
                 f"{CONTRIB}/dnnl/dnnl_kernel.h", f"{CONTRIB}/dnnl/dnnl_tensor_requisite.h",
                 f"{CONTRIB}/json/json_node.h", f"{CONTRIB}/json/json_runtime.h")
DEFINES = ("-DNDEBUG=1", "-DTVM_FFI_CMAKE_LITTLE_ENDIAN=1", "-DTVM_INDEX_DEFAULT_I64=1", "-DTVM_KALLOC_ALIGNMENT=64",
           "-DTVM_THREADPOOL_USE_OPENMP=0", "-DUSE_JSON_RUNTIME=1")
COMPILE_TIMEOUT_S = 600
CHECK_TIMEOUT_S = 180
APT_HINT = ("apt install libdnnl-dev (Debian/Ubuntu's oneDNN 2.x; PyPI's onednn 3.x has no headers and TVM's "
            "DNNL sources need oneDNN's v2 API)")


@dataclass
class OneDNNPlugin:
    """A checked plugin: its path and what the check saw (oneDNN version, ISA, the test conv's error)."""

    path: Path
    info: dict[str, Any] = field(default_factory=dict)
    built: bool = False  # built by this call (else found in the cache)
    build_s: float = 0.0


def wheel_parts() -> dict[str, Path]:
    """The wheel's DNNL sources, runtime headers and libraries; one line if this TVM does not ship them."""
    return cxx_build.wheel_parts(WHEEL_SOURCES, "the DNNL runtime's sources or the runtime it links against",
                                 "USE_DNNL=ON")


def check_onednn_headers(cxx: str) -> str:
    """oneDNN 2.x's headers are where the compiler looks; returns the version they state."""
    probe = ("#include <dnnl.hpp>\n#include <dnnl_version.h>\n"
             "#if DNNL_VERSION_MAJOR != 2\n#error oneDNN major version is not 2\n#endif\n"
             "#define S2(x) #x\n#define S(x) S2(x)\n"
             "const char* v = \"DNNLVERSION=\" S(DNNL_VERSION_MAJOR) \".\" S(DNNL_VERSION_MINOR) \".\" "
             "S(DNNL_VERSION_PATCH);\nint main(){}\n")
    try:
        proc = subprocess.run([cxx, "-std=gnu++17", "-E", "-x", "c++", "-"], input=probe, capture_output=True,
                              text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise TunefarmError(f"cannot run the C++ compiler {cxx}: {err}") from None
    if proc.returncode != 0:
        if "not 2" in proc.stderr:
            raise TunefarmError(f"the oneDNN headers {cxx} finds are not oneDNN 2.x (TVM's DNNL sources use the v2 "
                                f"API): {APT_HINT}")
        raise TunefarmError(f"no oneDNN development files: {cxx} cannot find dnnl.hpp; {APT_HINT}")
    for line in proc.stdout.splitlines():
        if "DNNLVERSION=" in line:
            rest = line.split("DNNLVERSION=", 1)[1]
            return "".join(ch for ch in rest if ch.isdigit() or ch == ".")
    return "2.x"


def build(out_dir: Path | None = None, log: Callable[[str], None] | None = None) -> tuple[Path, float]:
    """Compile and link the plugin from the wheel's sources into ``out_dir`` (default: the cache directory).

    It appears there complete or not at all (built in a temporary directory beside it, then renamed); the
    compiler's output is kept as ``build.log`` next to it, and named in the error on failure.
    Returns (the plugin's path, build seconds)."""
    log = log or (lambda _msg: None)
    cxx = find_cxx()
    parts = wheel_parts()
    version = check_onednn_headers(cxx)
    out_dir = Path(out_dir) if out_dir is not None else onednn.cache_dir()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=out_dir.parent))
    t0 = time.monotonic()
    # The build tree: the wheel's DNNL and JSON runtime sources (their relative includes reach
    # src/support/bytes_io.h) beside the support headers this package carries.
    tree = work / "tree"
    for sub in ("dnnl", "json"):
        shutil.copytree(parts["tvm_dir"] / CONTRIB / sub, tree / CONTRIB / sub)
    for name in SUPPORT_FILES:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(SUPPORT_DIR / name, tree / name)
    flags = [*DEFINES, f"-I{tree / 'include'}", f"-I{parts['include']}", f"-I{parts['ffi_include']}", "-O2", "-fPIC",
             "-fvisibility=hidden", "-std=gnu++20"]
    import tvm  # pylint: disable=import-outside-toplevel

    log(f"building {LIB_NAME} for TVM {tvm.__version__} from the wheel's sources against oneDNN {version} with {cxx}")
    build_log = work / "build.log"
    objects = compile_units(cxx, flags, tree / CONTRIB / "dnnl", COMPILE_UNITS, work, build_log, COMPILE_TIMEOUT_S)
    lib = work / LIB_NAME
    lib_dirs = f"{parts['runtime_lib'].parent}:{parts['ffi_lib'].parent}"
    cmd = [cxx, "-shared", "-o", str(lib), f"-Wl,-soname,{LIB_NAME}", "-Wl,--no-undefined",
           *map(str, objects), str(parts["runtime_lib"]), str(parts["ffi_lib"]), "-ldnnl", f"-Wl,-rpath,{lib_dirs}"]
    with open(build_log, "a") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=COMPILE_TIMEOUT_S,
                              check=False).returncode
    if code != 0:
        text = build_log.read_text()
        if "-ldnnl" in text and "cannot find" in text:
            raise TunefarmError(f"no oneDNN library to link (libdnnl.so): {APT_HINT}; full log: {build_log}")
        raise TunefarmError(f"linking {LIB_NAME} failed ({first_error(text)}); full log: {build_log}")
    seconds = time.monotonic() - t0
    meta = {"tvm": str(tvm.__version__), "onednn_headers": version, "cxx": cxx, "build_s": round(seconds, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sources": str(parts["tvm_dir"] / CONTRIB / "dnnl")}
    final = work / "final"
    final.mkdir()
    shutil.move(str(lib), final / LIB_NAME)
    cxx_build.publish(work, final, out_dir, meta, build_log)
    log(f"built {out_dir / LIB_NAME} in {seconds:.1f} s")
    return out_dir / LIB_NAME, seconds


# A fresh process: load the plugin, run one convolution through oneDNN (the plugin's own packed conv2d,
# no codegen needed), compare it with numpy.
_CHECK_SCRIPT = r"""
import json, sys
import numpy as np
import tvm, tvm_ffi
from tunefarm.core import onednn
out = {}
onednn.load_plugin(sys.argv[1])
out["runtime_registered"] = tvm_ffi.get_global_func(onednn.LOADER_FUNC, allow_missing=True) is not None
rng = np.random.default_rng(0)
x = rng.standard_normal((1, 8, 10, 10), dtype=np.float32)
w = rng.standard_normal((16, 8, 3, 3), dtype=np.float32)
dev = tvm.cpu()
y = tvm.runtime.tensor(np.zeros((1, 16, 10, 10), np.float32), dev)
tvm_ffi.get_global_func("tvm.contrib.dnnl.conv2d")(tvm.runtime.tensor(x, dev), tvm.runtime.tensor(w, dev), y,
                                                   1, 1, 1, 1, 1, 1, 1, False, True, True)  # f32 in and out
xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
cols = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))
ref = np.einsum("nchwij,ocij->nohw", cols, w)
out["conv_max_rel_err"] = float(np.abs(y.numpy() - ref).max() / np.abs(ref).max())
out.update(onednn.library_info())
print(json.dumps(out))
"""
CHECK_RTOL = 1e-4


def check(lib: Path) -> dict[str, Any]:
    """In a fresh process: the plugin loads, registers the DNNL JSON runtime and its module loader, and a 3x3
    convolution through oneDNN matches numpy within 1e-4 relative. Returns oneDNN's version and ISA and the error."""
    env = dict(os.environ)
    env.pop(onednn.PLUGIN_ENV, None)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    try:
        proc = subprocess.run([sys.executable, "-c", _CHECK_SCRIPT, str(lib)], capture_output=True, text=True,
                              timeout=CHECK_TIMEOUT_S, env=env, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        raise TunefarmError(f"checking the oneDNN plugin {lib} took over {CHECK_TIMEOUT_S} s") from None
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise TunefarmError(f"the oneDNN plugin {lib} does not work with this TVM (exit code {proc.returncode}: "
                            f"{first_error(proc.stderr or proc.stdout)}); rebuild it: tunefarm runtime onednn --rebuild")
    result = json.loads(lines[-1])
    if not result.get("runtime_registered"):
        raise TunefarmError(f"the oneDNN plugin {lib} registered no loader for exported DNNL modules")
    if not result.get("conv_max_rel_err", 1.0) <= CHECK_RTOL:
        raise TunefarmError(f"a test convolution through oneDNN ({lib}) is off by {result.get('conv_max_rel_err'):.2e} "
                            "relative to numpy")
    return {k: v for k, v in result.items() if k != "runtime_registered"}


def ensure_plugin(rebuild: bool = False, log: Callable[[str], None] | None = None) -> OneDNNPlugin:
    """A checked plugin for the installed TVM: the cached one (unless ``rebuild``), else built now."""
    log = log or (lambda _msg: None)
    target = onednn.cache_dir() / LIB_NAME
    if not rebuild and target.is_file():
        meta = {}
        try:
            meta = json.loads((target.parent / "build.json").read_text())
        except (OSError, ValueError):
            pass
        log(f"using {target} (built {meta.get('built_at', '?')})")
        return OneDNNPlugin(target, check(target), built=False)
    lib, seconds = build(target.parent, log)
    return OneDNNPlugin(lib, check(lib), built=True, build_s=seconds)
