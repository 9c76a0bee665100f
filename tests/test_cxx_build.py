"""The compile step both backend builds share (tunefarm.device_agents.cxx_build, used by opencl_runtime.py and
onednn_runtime.py), with the machine's real C++ compiler on two small units: the builds themselves need OpenCL
or oneDNN headers (tests/test_opencl_runtime.py, tests/test_onednn.py) and skip where those are missing."""
from __future__ import annotations

import pytest

from tunefarm.core.errors import TunefarmError
from tunefarm.device_agents.cxx_build import compile_units, find_cxx


def test_units_compile_together_into_one_log_and_a_failed_one_is_named_with_its_first_error(tmp_path):
    try:
        cxx = find_cxx()
    except TunefarmError as err:
        pytest.skip(str(err))
    src, work = tmp_path / "src", tmp_path / "work"
    src.mkdir()
    work.mkdir()
    (src / "a.cc").write_text("int a() { return 1; }\n")
    (src / "b.cc").write_text("int b() { return not_declared; }\n")
    log = work / "build.log"
    with pytest.raises(TunefarmError) as err:
        compile_units(cxx, ["-O0", "-fPIC"], src, ("a.cc", "b.cc"), work, log, 120)
    message = str(err.value)
    assert message.startswith("compiling b.cc failed (") and "not_declared" in message, message
    assert message.endswith(f"; full log: {log}") and "\n" not in message, message
    assert (work / "a.cc.o").is_file() and not (work / "b.cc.o").exists()

    (src / "b.cc").write_text("int b() { return 2; }\n")
    objects = compile_units(cxx, ["-O0", "-fPIC"], src, ("a.cc", "b.cc"), work, log, 120)
    assert objects == [work / "a.cc.o", work / "b.cc.o"] and all(o.is_file() for o in objects)
    commands = [line for line in log.read_text().splitlines() if line.startswith("$ ")]
    assert commands == [f"$ {cxx} -O0 -fPIC -c {src / u} -o {work / u}.o" for u in ("a.cc", "b.cc")]  # log anew
