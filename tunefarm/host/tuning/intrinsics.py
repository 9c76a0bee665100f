"""TVM's tensor intrinsics for one target, instead of every architecture's.

MetaSchedule's ``TuneContext`` runs ``import tvm.s_tir.tensor_intrin``, whose package imports the intrinsics of
every architecture TVM knows (CUDA, ROCm, Arm, x86, Hexagon, RISC-V): each one a TVMScript function parsed at
import. In this wheel that import takes 20 s (a 16-core Xeon host) to 55-85 s (a 2-core AMD EPYC), measured
with ``python -X importtime`` on 2026-12-02: ``cuda`` 31.5 s, ``rocm`` 8.3, ``arm_cpu`` 4.6, ``hexagon`` 2.7,
``x86`` 0.8 of 54 s (``arm_cpu``'s includes the 2.1 s of the ``dot_product_common`` it imports). Every fresh
process that tunes pays it: a search worker's session, the host service, a test.

:func:`load_for` imports the submodules a target's design spaces can name (its schedule rules find
intrinsics by name in TVM's registry) and marks the package imported, so that the stock import in
``TuneContext`` is then a no-op:

* ``llvm``: by the target's triple (``mtriple``, else this machine's): x86 -> ``x86``, Arm -> ``arm_cpu``,
  RISC-V -> ``riscv_cpu``; any other triple: the whole package;
* ``cuda`` -> ``cuda``; ``rocm`` -> ``rocm``; ``hexagon`` -> ``hexagon``; ``metal`` -> ``metal``;
* any other kind (OpenCL, Vulkan, ...): the whole package, as stock.

Each call adds what its target needs (a process that tunes a CPU job and then a CUDA job gets both). Once the
whole package has been imported (by TVM or here) every call is a no-op. Call it before creating a
``TuneContext`` (or anything that imports ``tvm.s_tir.tensor_intrin``) for ``target``.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import threading

PACKAGE = "tvm.s_tir.tensor_intrin"
PARTIAL = "_tunefarm_partial"  # set on the package module while only some submodules are loaded
BY_KIND = {"cuda": ("cuda",), "rocm": ("rocm",), "hexagon": ("hexagon",), "metal": ("metal",)}
BY_ARCH = (  # (triple prefixes, submodules) for llvm targets
    (("x86_64", "i386", "i486", "i586", "i686", "amd64"), ("x86",)),
    (("aarch64", "arm64", "arm", "thumb"), ("arm_cpu",)),
    (("riscv",), ("riscv_cpu",)),
)
_lock = threading.Lock()


def submodules_for(target) -> tuple[str, ...] | None:
    """The tensor-intrinsic submodules of ``target`` (a ``tvm.target.Target``); None: the whole package."""
    kind = target.kind.name
    if kind in BY_KIND:
        return BY_KIND[kind]
    if kind != "llvm":
        return None
    triple = str(target.attrs.get("mtriple", "") or "")
    if not triple:
        from tvm.target.codegen import llvm_get_system_triple  # pylint: disable=import-outside-toplevel

        triple = str(llvm_get_system_triple())
    for prefixes, names in BY_ARCH:
        if triple.lower().startswith(prefixes):
            return names
    return None


def _package():
    """The package module, created without running its ``__init__`` (which imports every architecture)."""
    module = sys.modules.get(PACKAGE)
    if module is not None:
        return module
    import tvm.s_tir  # pylint: disable=import-outside-toplevel

    spec = importlib.util.find_spec(PACKAGE)
    module = importlib.util.module_from_spec(spec)
    setattr(module, PARTIAL, True)
    sys.modules[PACKAGE] = module
    tvm.s_tir.tensor_intrin = module
    return module


def load_for(target) -> tuple[str, ...] | None:
    """Import the tensor intrinsics ``target`` can use (see the module's text); returns the submodules
    imported for it, or None when the whole package is (or already was) imported."""
    with _lock:
        module = sys.modules.get(PACKAGE)
        if module is not None and not getattr(module, PARTIAL, False):
            return None  # the whole package: nothing is missing
        names = submodules_for(target)
        if names is None:
            if module is not None:  # partial so far: run the package's own __init__ now, as stock
                spec = module.__spec__
                spec.loader.exec_module(module)
                setattr(module, PARTIAL, False)
            else:
                importlib.import_module(PACKAGE)
            return None
        _package()
        for name in names:
            importlib.import_module(f"{PACKAGE}.{name}")
        return names


def loaded() -> list[str]:
    """The tensor-intrinsic submodules imported in this process (for logs and tests)."""
    prefix = PACKAGE + "."
    return sorted(name[len(prefix):] for name in sys.modules if name.startswith(prefix))
