"""oneDNN (DNNL) for the PyPI TVM wheel: where its runtime plugin lives, and loading it into a process.

The wheel is built with ``USE_DNNL=OFF``, but it ships the source of TVM's DNNL JSON runtime
(``tvm/src/runtime/extra/contrib/dnnl``). ``tunefarm runtime onednn``
(:mod:`tunefarm.device_agents.onednn_runtime`) compiles it against the system's oneDNN 2.x (Debian's
``libdnnl-dev``) into ``libtvm_dnnl_plugin.so``, cached per TVM version and wheel runtime under
``$XDG_CACHE_HOME/tunefarm/onednn/``. Loaded into a process, the plugin registers
``runtime.DNNLJSONRuntimeCreate`` (the host's ``relax.ext.dnnl`` codegen creates its modules with it) and
the loader of exported DNNL modules (``ffi.Module.load_from_bytes.dnnl_json``, which an exported library
with oneDNN parts needs at ``load_module``).

Both roles use this module: the host to compile, an agent (and the RPC sessions its server forks) to run.
``$TUNEFARM_ONEDNN_PLUGIN`` names the plugin a process (and its children) load; ``off`` turns oneDNN off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
from pathlib import Path
from typing import Any

from .errors import TunefarmError

LIB_NAME = "libtvm_dnnl_plugin.so"
PLUGIN_ENV = "TUNEFARM_ONEDNN_PLUGIN"
OFF = "off"
LOADED_KEY = "tvm_dnnl_plugin"  # its entry in tvm.base._LOADED_LIBS
CREATE_FUNC = "runtime.DNNLJSONRuntimeCreate"
MODULE_KIND = "dnnl_json"  # the DNNL JSON runtime's module kind: written into a library that imports one
LOADER_FUNC = f"ffi.Module.load_from_bytes.{MODULE_KIND}"

# dnnl_cpu_isa_t values of oneDNN 2.x (dnnl_types.h) -> names, for what the agent reports.
_ISA_NAMES = {0x1: "sse41", 0x3: "avx", 0x7: "avx2", 0x407: "avx2_vnni", 0xf: "avx512_mic", 0x1f: "avx512_mic_4ops",
              0x27: "avx512_core", 0x67: "avx512_core_vnni", 0xe7: "avx512_core_bf16", 0x3e7: "avx512_core_amx",
              0x0: "all"}
_RUNTIME_NAMES = {0: "none", 1: "sequential", 2: "omp", 4: "tbb", 8: "threadpool"}


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tunefarm" / "onednn"


def _wheel_libs() -> tuple[Path, Path]:
    import tvm  # pylint: disable=import-outside-toplevel
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    return (Path(tvm.__file__).parent / "lib" / "libtvm_runtime.so",
            Path(tvm_ffi.__file__).parent / "lib" / "libtvm_ffi.so")


def cache_dir() -> Path:
    """The cache directory of the installed TVM version and wheel runtime (a plugin built for another
    runtime would be linked against symbols that may not be there)."""
    return wheel_cache_dir(cache_root())


def wheel_cache_dir(root: Path) -> Path:
    """``root``'s directory for the installed TVM version and wheel runtime: ``tvm-<version>-<hash of its
    libtvm_runtime.so and libtvm_ffi.so>`` (shared by every plugin built against the wheel)."""
    import tvm  # pylint: disable=import-outside-toplevel

    sha = hashlib.sha256()
    for path in _wheel_libs():
        sha.update(path.name.encode())
        try:
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    sha.update(chunk)
        except OSError:
            sha.update(b"missing")
    return root / f"tvm-{tvm.__version__}-{sha.hexdigest()[:12]}"


def disabled() -> bool:
    return os.environ.get(PLUGIN_ENV, "").strip().lower() == OFF


def find_plugin() -> Path | None:
    """The plugin this process should use: ``$TUNEFARM_ONEDNN_PLUGIN`` (a file; ``off``: none), else the
    cached build for the installed TVM, else None."""
    named = os.environ.get(PLUGIN_ENV, "").strip()
    if named.lower() == OFF:
        return None
    if named:
        if not Path(named).is_file():
            raise TunefarmError(f"{PLUGIN_ENV}={named!r} is not a file (build the plugin: tunefarm runtime onednn)")
        return Path(named)
    cached = cache_dir() / LIB_NAME
    return cached if cached.is_file() else None


def loaded() -> Path | None:
    """The plugin loaded into this process, if any."""
    from tvm.base import _LOADED_LIBS  # pylint: disable=import-outside-toplevel

    lib = _LOADED_LIBS.get(LOADED_KEY)
    return Path(lib._name) if lib is not None else None  # pylint: disable=protected-access


def load_plugin(path: str | Path | None = None, export_env: bool = True) -> Path:
    """Load the plugin (``path``, default :func:`find_plugin`) into this process and check that it registered
    the DNNL JSON runtime; with ``export_env``, name it in ``$TUNEFARM_ONEDNN_PLUGIN`` for child processes.
    A second call is a no-op. One-line TunefarmError when there is none or it does not load."""
    import tvm_ffi  # pylint: disable=import-outside-toplevel
    from tvm.base import _LOADED_LIBS  # pylint: disable=import-outside-toplevel

    done = loaded()
    if done is not None:
        return done
    lib = Path(path) if path is not None else find_plugin()
    if lib is None:
        raise TunefarmError("no oneDNN plugin for this TVM " + ("(turned off: " + PLUGIN_ENV + "=off)" if disabled()
                                                              else "(build it once: tunefarm runtime onednn)"))
    try:
        handle = ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    except OSError as err:
        raise TunefarmError(f"cannot load the oneDNN plugin {lib}: {str(err).strip()} (rebuild it: tunefarm runtime "
                            "onednn --rebuild; it needs the oneDNN 2.x library, apt install libdnnl-dev)") from None
    if tvm_ffi.get_global_func(CREATE_FUNC, allow_missing=True) is None:
        raise TunefarmError(f"{lib} loaded but registered no {CREATE_FUNC}: it is not TVM's DNNL plugin")
    _LOADED_LIBS[LOADED_KEY] = handle
    if export_env:
        os.environ[PLUGIN_ENV] = str(lib)
    return lib


def load_if_named() -> Path | None:
    """In a process that may run modules with oneDNN parts (an agent's RPC session, a runner): load the plugin
    ``$TUNEFARM_ONEDNN_PLUGIN`` names, if it names one. None: not named (or ``off``)."""
    named = os.environ.get(PLUGIN_ENV, "").strip()
    if not named or named.lower() == OFF:
        return None
    return load_plugin(named)


def library_info() -> dict[str, Any]:
    """The oneDNN library the loaded plugin uses: version, commit, CPU threading runtime, the ISA it picks here
    (oneDNN's own C API: ``dnnl_version``, ``dnnl_get_effective_cpu_isa``). Empty if it cannot be asked."""

    class _Version(ctypes.Structure):  # dnnl_version_t
        _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int),
                    ("hash", ctypes.c_char_p), ("cpu_runtime", ctypes.c_uint), ("gpu_runtime", ctypes.c_uint)]

    for name in ("libdnnl.so.2", ctypes.util.find_library("dnnl")):
        if not name:
            continue
        try:
            dnnl = ctypes.CDLL(name)
        except OSError:
            continue
        dnnl.dnnl_version.restype = ctypes.POINTER(_Version)
        ver = dnnl.dnnl_version().contents
        dnnl.dnnl_get_effective_cpu_isa.restype = ctypes.c_int
        isa = int(dnnl.dnnl_get_effective_cpu_isa())
        return {"version": f"{ver.major}.{ver.minor}.{ver.patch}", "commit": (ver.hash or b"").decode()[:40],
                "cpu_runtime": _RUNTIME_NAMES.get(int(ver.cpu_runtime), hex(int(ver.cpu_runtime))),
                "isa": _ISA_NAMES.get(isa, hex(isa)), "library": name}
    return {}


def probe() -> dict[str, Any]:
    """What an agent reports about oneDNN (DeviceInfo.vendor["onednn"]): ``{"available": bool, ...}``, with the
    plugin's path, oneDNN's version, ISA and threading runtime when it is loaded, else why not."""
    if disabled():
        return {"available": False, "reason": f"turned off ({PLUGIN_ENV}=off)"}
    try:
        lib = find_plugin()
        if lib is None:
            return {"available": False, "reason": "no plugin built for this TVM (tunefarm runtime onednn)"}
        lib = load_plugin(lib)
    except TunefarmError as err:
        return {"available": False, "reason": str(err)[:300]}
    return {"available": True, "plugin": str(lib), **library_info()}
