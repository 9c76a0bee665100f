"""cuBLAS and cuDNN for the PyPI TVM wheel: the NVIDIA libraries found here, where the two runtime plugins live,
and loading them into a process.

The wheel is built with ``USE_CUBLAS=OFF`` and ``USE_CUDNN=OFF`` but ships the sources of TVM's cuBLAS and cuDNN
JSON runtimes (``tvm/src/runtime/extra/contrib/{cublas,cudnn}``). ``tunefarm runtime cuda-libs``
(:mod:`tunefarm.device_agents.cuda_libs_runtime`) compiles them against the NVIDIA libraries of this environment
(the ``nvidia-*`` pip packages PyTorch brings, a CUDA toolkit under ``$CUDA_HOME`` or ``/usr/local/cuda``, or the
system's) into ``libtvm_cublas_plugin.so`` and ``libtvm_cudnn_plugin.so``, cached per TVM version and wheel
runtime under ``$XDG_CACHE_HOME/tunefarm/cuda-libs/``. Loaded into a process, a plugin registers its JSON runtime
(``runtime.CublasJSONRuntimeCreate`` / ``runtime.cuDNNJSONRuntimeCreate``: the host's ``relax.ext.cublas`` /
``relax.ext.cudnn`` codegens create their modules with it) and the loader of exported modules
(``ffi.Module.load_from_bytes.cublas_json`` / ``cudnn_json``, which an exported library needs at ``load_module``).

``$TUNEFARM_CUDA_LIBS`` names the directory of the plugins a process (and its children) load; ``off`` turns both
off.
"""
from __future__ import annotations

import ctypes
import glob
import os
import site
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import TunefarmError

PLUGIN_ENV = "TUNEFARM_CUDA_LIBS"
OFF = "off"
BUILD_HINT = "tunefarm runtime cuda-libs"


@dataclass(frozen=True)
class Lib:
    """One of the two plugins: its file, the globals it must register, the vendor library it wraps."""

    name: str  # "cublas" | "cudnn": DeviceInfo.vendor's and placement's name
    file: str
    create_func: str  # the JSON runtime's module constructor (the host's codegen calls it)
    loader_func: str  # the loader of exported modules of this kind
    label: str


LIBS: dict[str, Lib] = {lib.name: lib for lib in (
    Lib("cublas", "libtvm_cublas_plugin.so", "runtime.CublasJSONRuntimeCreate",
        "ffi.Module.load_from_bytes.cublas_json", "cuBLAS (cuBLASLt, TVM's cuBLAS JSON runtime)"),
    Lib("cudnn", "libtvm_cudnn_plugin.so", "runtime.cuDNNJSONRuntimeCreate",
        "ffi.Module.load_from_bytes.cudnn_json", "cuDNN (TVM's cuDNN JSON runtime)"),
)}

# What the build needs: a header the compiler must find, and the shared libraries to link (first match wins).
HEADERS = {"cuda_runtime.h": "the CUDA runtime's headers (pip nvidia-cuda-runtime, or a CUDA toolkit)",
           "crt/host_config.h": "CUDA's crt headers (pip nvidia-cuda-crt, a CUDA toolkit, or Triton's copy)",
           "cublas_v2.h": "cuBLAS's headers (pip nvidia-cublas, or a CUDA toolkit)",
           "cublasLt.h": "cuBLASLt's headers (pip nvidia-cublas, or a CUDA toolkit)",
           "cudnn.h": "cuDNN's headers (pip nvidia-cudnn-cu13 / -cu12, or libcudnn9-dev)"}
LIBRARIES = {"cudart": "the CUDA runtime library libcudart.so (pip nvidia-cuda-runtime, or a CUDA toolkit)",
             "cublas": "libcublas.so (pip nvidia-cublas, or a CUDA toolkit)",
             "cublasLt": "libcublasLt.so (pip nvidia-cublas, or a CUDA toolkit)",
             "cudnn": "libcudnn.so (pip nvidia-cudnn-cu13 / -cu12, or libcudnn9)"}


def nvidia_roots() -> list[Path]:
    """Where NVIDIA's libraries may be, in order: the ``nvidia/*`` pip packages of every site-packages this Python
    sees (PyTorch's CUDA wheels bring them), ``$CUDA_HOME``/``$CUDA_PATH``, ``/usr/local/cuda[-*]``, Triton's copy
    of CUDA's headers (``crt/`` is in no pip package PyTorch pulls in), the system."""
    sites: list[str] = []
    try:
        sites += site.getsitepackages()
    except AttributeError:  # some virtualenvs
        pass
    sites += [site.getusersitepackages(), *sys.path]
    roots: list[Path] = []
    for s in dict.fromkeys(p for p in sites if p):
        nv = Path(s) / "nvidia"
        if nv.is_dir():
            roots += sorted(p for p in nv.iterdir() if p.is_dir())
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            roots.append(Path(os.environ[var]))
    roots += [Path("/usr/local/cuda"), *sorted(map(Path, glob.glob("/usr/local/cuda-[0-9]*")), reverse=True)]
    roots += [Path(s) / "triton" / "backends" / "nvidia" for s in dict.fromkeys(p for p in sites if p)
              if (Path(s) / "triton" / "backends" / "nvidia").is_dir()]
    roots += [Path("/usr"), Path("/usr/local")]
    return list(dict.fromkeys(roots))


def _lib_dirs(root: Path) -> list[Path]:
    return [root / d for d in ("lib", "lib64", "lib/x86_64-linux-gnu", "targets/x86_64-linux/lib")]


def _inc_dirs(root: Path) -> list[Path]:
    return [root / d for d in ("include", "include/x86_64-linux-gnu", "targets/x86_64-linux/include")]


def find_header(name: str, roots: list[Path] | None = None) -> Path | None:
    for root in roots if roots is not None else nvidia_roots():
        for inc in _inc_dirs(root):
            if (inc / name).is_file():
                return inc / name
    return None


def find_library(stem: str, roots: list[Path] | None = None) -> Path | None:
    """``lib<stem>.so`` or its newest versioned file (``libcublas.so.13``) under the roots, first root first."""
    for root in roots if roots is not None else nvidia_roots():
        for d in _lib_dirs(root):
            plain = d / f"lib{stem}.so"
            if plain.exists():
                return plain
            versioned = sorted(glob.glob(str(d / f"lib{stem}.so.[0-9]*")), key=lambda p: (len(p), p))
            if versioned:
                return Path(versioned[0])
    return None


def find_nvidia(which: tuple[str, ...] = ("cublas", "cudnn"), roots: list[Path] | None = None) -> dict[str, Path]:
    """Headers and libraries for the plugins in ``which``: ``{"cuda_runtime.h": path, ..., "lib:cudart": path}``.
    One line naming the first missing piece (and where it was looked for) otherwise."""
    roots = roots if roots is not None else nvidia_roots()
    headers = ["cuda_runtime.h", "crt/host_config.h"] + (["cublas_v2.h", "cublasLt.h"] if "cublas" in which else []) + (
        ["cudnn.h"] if "cudnn" in which else [])
    libs = ["cudart"] + (["cublas", "cublasLt"] if "cublas" in which else []) + (["cudnn"] if "cudnn" in which else [])
    found: dict[str, Path] = {}
    where = ", ".join(str(r) for r in roots[:6]) + (f" and {len(roots) - 6} more" if len(roots) > 6 else "")
    for name in headers:
        path = find_header(name, roots)
        if path is None:
            raise TunefarmError(f"no {name}: {HEADERS[name]} not found (looked in {where}; set CUDA_HOME)")
        found[name] = path
    for stem in libs:
        path = find_library(stem, roots)
        if path is None:
            raise TunefarmError(f"no lib{stem}.so: {LIBRARIES[stem]} not found (looked in {where}; set CUDA_HOME)")
        found[f"lib:{stem}"] = path
    return found


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tunefarm" / "cuda-libs"


def cache_dir() -> Path:
    """The cache directory of the installed TVM version and wheel runtime (as :func:`tunefarm.core.onednn.cache_dir`:
    a plugin built against another runtime may miss its symbols)."""
    from .onednn import wheel_cache_dir  # pylint: disable=import-outside-toplevel

    return wheel_cache_dir(cache_root())


def disabled() -> bool:
    return os.environ.get(PLUGIN_ENV, "").strip().lower() == OFF


def plugin_dir() -> Path | None:
    """The directory this process takes the plugins from: ``$TUNEFARM_CUDA_LIBS`` (``off``: none), else the cache
    of the installed TVM; None when neither holds a plugin."""
    named = os.environ.get(PLUGIN_ENV, "").strip()
    if named.lower() == OFF:
        return None
    if named:
        if not Path(named).is_dir():
            raise TunefarmError(f"{PLUGIN_ENV}={named!r} is not a directory (build the plugins: {BUILD_HINT})")
        return Path(named)
    cached = cache_dir()
    return cached if any((cached / lib.file).is_file() for lib in LIBS.values()) else None


def _loaded_key(name: str) -> str:
    return f"tvm_{name}_plugin"


def loaded(name: str) -> Path | None:
    from tvm.base import _LOADED_LIBS  # pylint: disable=import-outside-toplevel

    lib = _LOADED_LIBS.get(_loaded_key(name))
    return Path(lib._name) if lib is not None else None  # pylint: disable=protected-access


def load_plugin(name: str, directory: str | Path | None = None, export_env: bool = True) -> Path:
    """Load the ``name`` plugin (``cublas`` | ``cudnn``) from ``directory`` (default :func:`plugin_dir`) into this
    process and check what it registered; with ``export_env`` name the directory in ``$TUNEFARM_CUDA_LIBS`` for
    child processes (an agent's RPC sessions). A second call is a no-op. One line when it cannot."""
    import tvm_ffi  # pylint: disable=import-outside-toplevel
    from tvm.base import _LOADED_LIBS  # pylint: disable=import-outside-toplevel

    lib = LIBS[name]
    done = loaded(name)
    if done is not None:
        return done
    folder = Path(directory) if directory is not None else plugin_dir()
    if folder is None:
        raise TunefarmError(f"no {lib.label.split(' ')[0]} plugin for this TVM " + (
            f"(turned off: {PLUGIN_ENV}=off)" if disabled() else f"(build it once: {BUILD_HINT})"))
    path = folder / lib.file
    if not path.is_file():
        raise TunefarmError(f"no {lib.file} in {folder} (build it: {BUILD_HINT})")
    try:
        handle = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as err:
        raise TunefarmError(f"cannot load {path}: {str(err).strip()[:200]} (the NVIDIA libraries it was built "
                            f"against moved? rebuild: {BUILD_HINT} --rebuild)") from None
    for func in (lib.create_func, lib.loader_func):
        if tvm_ffi.get_global_func(func, allow_missing=True) is None:
            raise TunefarmError(f"{path} loaded but registered no {func}: it is not TVM's {name} plugin")
    _LOADED_LIBS[_loaded_key(name)] = handle
    if export_env:
        os.environ[PLUGIN_ENV] = str(folder)
    return path


def load_if_named() -> list[Path]:
    """In a process that may run modules with cuBLAS/cuDNN parts (an agent's RPC session, a runner): load the
    plugins of the directory ``$TUNEFARM_CUDA_LIBS`` names, if it names one."""
    named = os.environ.get(PLUGIN_ENV, "").strip()
    if not named or named.lower() == OFF:
        return []
    return [load_plugin(name, named) for name in LIBS if (Path(named) / LIBS[name].file).is_file()]


def versions() -> dict[str, str]:
    """cuBLAS's and cuDNN's versions as the loaded libraries state them (their C API); missing keys: not loaded."""
    out: dict[str, str] = {}
    for name, soname, func in (("cudnn", "libcudnn.so.9", "cudnnGetVersion"),
                               ("cublas", "libcublasLt.so.13", "cublasLtGetVersion"),
                               ("cublas", "libcublasLt.so.12", "cublasLtGetVersion")):
        if name in out:
            continue
        try:
            handle = ctypes.CDLL(soname, mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
            getter = getattr(handle, func)
        except (OSError, AttributeError):
            continue
        getter.restype = ctypes.c_size_t
        v = int(getter())
        out[name] = f"{v // 10000}.{v // 100 % 100}.{v % 100}"  # both: major * 10000 + minor * 100 + patch
    return out


def probe() -> dict[str, Any]:
    """What an agent reports (DeviceInfo.vendor["cublas"], ["cudnn"]): ``{"available": bool, ...}`` each, with the
    plugin and the library's version when it is loaded, else why not. A machine without the plugins built says
    so (it loads nothing then: a CPU agent does not pull in CUDA's libraries)."""
    if disabled():
        return {name: {"available": False, "reason": f"turned off ({PLUGIN_ENV}=off)"} for name in LIBS}
    try:
        folder = plugin_dir()
    except TunefarmError as err:
        return {name: {"available": False, "reason": str(err)[:300]} for name in LIBS}
    if folder is None:
        return {name: {"available": False, "reason": f"no plugin built for this TVM ({BUILD_HINT})"} for name in LIBS}
    out: dict[str, Any] = {}
    for name in LIBS:
        try:
            out[name] = {"available": True, "plugin": str(load_plugin(name, folder))}
        except TunefarmError as err:
            out[name] = {"available": False, "reason": str(err)[:300]}
    for name, version in versions().items():
        if out.get(name, {}).get("available"):
            out[name]["version"] = version
    return out
