"""What the two backend builds (opencl_runtime.py: TVM's OpenCL backend; onednn_runtime.py: the DNNL plugin)
share: the C++ compiler, the compile of their units in parallel into one log, and the line of a log an error
names."""
from __future__ import annotations

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
