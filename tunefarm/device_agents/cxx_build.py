"""What the backend builds (opencl_runtime.py: TVM's OpenCL backend; onednn_runtime.py: the DNNL plugin;
cuda_libs_runtime.py: the cuBLAS/cuDNN plugins) share: the C++ compiler, the wheel's parts they build against, the
compile of their units in parallel into one log, the line of a log an error names, and putting a finished build in
its cache directory in one step."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

from tunefarm.core.errors import TunefarmError


def find_cxx() -> str:
    """The C++ compiler: ``$CXX``, else c++ / g++ / clang++ on PATH."""
    wanted = os.environ.get("CXX", "").strip()
    if wanted:
        found = shutil.which(wanted.split()[0])
        if not found:
            raise TunefarmError(f"no C++ compiler: CXX={wanted!r} is not on PATH")
        return found
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    raise TunefarmError("no C++ compiler (c++, g++ or clang++) on PATH: install one (apt install g++) or set CXX")


def first_error(text: str) -> str:
    """The first line of a compiler's output that says error (else its last line), for a one-line message."""
    for line in text.splitlines():
        if "error" in line.lower():
            return line.strip()[:300]
    lines = [l for l in text.splitlines() if l.strip()]
    return lines[-1].strip()[:300] if lines else "no output"


def compile_units(cxx: str, flags: Sequence[str], src_dir: Path, units: Sequence[str], work: Path,
                  build_log: Path, timeout_s: float) -> list[Path]:
    """Compile ``src_dir/unit`` of each unit into ``work/unit.o``, all at once; each command and the compiler's
    output go to ``build_log`` (written anew). Returns the objects; one line naming the units that failed (or
    ran past ``timeout_s``), the log's first error and the log, if any did."""
    procs = []
    with open(build_log, "w") as out:
        for unit in units:
            cmd = [cxx, *flags, "-c", str(src_dir / unit), "-o", str(work / (unit + ".o"))]
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            procs.append((unit, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)))
        failed = []
        for unit, proc in procs:
            try:
                if proc.wait(timeout=timeout_s) != 0:
                    failed.append(unit)
            except subprocess.TimeoutExpired:
                proc.kill()
                failed.append(unit)
    if failed:
        raise TunefarmError(f"compiling {', '.join(failed)} failed ({first_error(build_log.read_text())}); "
                            f"full log: {build_log}")
    return [work / (unit + ".o") for unit in units]


def wheel_parts(sources: Sequence[str], what: str, source_flag: str) -> dict[str, Path]:
    """The installed TVM wheel's runtime headers and libraries (``tvm_dir``, ``include``, ``ffi_include``,
    ``runtime_lib``, ``ffi_lib``), with ``sources`` (paths under the tvm package) checked to be there; one line
    naming ``what`` is missing and ``source_flag`` (how a source build gets it) if this TVM does not ship them."""
    import tvm  # pylint: disable=import-outside-toplevel
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    tvm_dir, ffi_dir = Path(tvm.__file__).parent, Path(tvm_ffi.__file__).parent
    parts = {"tvm_dir": tvm_dir, "include": tvm_dir / "include", "ffi_include": ffi_dir / "include",
             "runtime_lib": tvm_dir / "lib" / "libtvm_runtime.so", "ffi_lib": ffi_dir / "lib" / "libtvm_ffi.so"}
    missing = [str(p) for p in parts.values() if not p.exists()]
    missing += [str(tvm_dir / name) for name in sources if not (tvm_dir / name).is_file()]
    if missing:
        raise TunefarmError(f"this TVM install ({tvm_dir}, TVM {tvm.__version__}) does not ship {what} ({missing[0]}"
                            f"{' and %d more' % (len(missing) - 1) if len(missing) > 1 else ''}): use the PyPI wheel "
                            f"apache-tvm==0.27.0.post1, or a TVM built from source with {source_flag}")
    return parts


def publish(work: Path, final: Path, out_dir: Path, meta: dict, build_log: Path) -> None:
    """A finished build (``final``, inside the temporary ``work``) becomes ``out_dir`` in one rename, with its
    compiler log and ``build.json`` (``meta``); an older ``out_dir`` is replaced and ``work`` removed."""
    shutil.move(str(build_log), final / "build.log")
    (final / "build.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(final, out_dir)
    shutil.rmtree(work, ignore_errors=True)
