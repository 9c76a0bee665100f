"""Installs per role (pyproject.toml): the laptop's commands need neither TVM nor torch.

The client commands run in a fresh interpreter whose imports of TVM, torch and the other heavy packages raise
ImportError (a meta-path blocker installed by a sitecustomize module), as on a laptop with `pip install
'.[client]'`.
"""
import os
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Everything the base install (`.[client]`) does not bring.
HEAVY = ("tvm", "tvm_ffi", "torch", "torchvision", "onnx", "onnxruntime", "onnxscript", "xgboost", "numpy",
         "matplotlib", "tornado", "psutil", "cloudpickle", "scipy")
BLOCKER = f"""
import importlib.abc, sys
HEAVY = {HEAVY!r}
class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ImportError(f"{{name}} is blocked: a client install has no {{name.split('.')[0]}}")
sys.meta_path.insert(0, _Blocked())
"""


@pytest.fixture
def laptop_env(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFARM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")  # no client.yaml of this machine's user
    env["TUNEFARM_TOKEN"] = "not-a-real-token"
    return env


def _tunefarm(env, *args, timeout=60):
    return subprocess.run([sys.executable, "-m", "tunefarm", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


def test_the_blocker_blocks(laptop_env):
    proc = subprocess.run([sys.executable, "-c", "import tvm"], capture_output=True, text=True, env=laptop_env,
                          timeout=60)
    assert proc.returncode != 0 and "tvm is blocked" in proc.stderr


@pytest.mark.parametrize("command", ["submit", "follow", "pull", "jobs", "cancel", "resume", "delete", "devices"])
def test_client_commands_answer_help_without_tvm_or_torch(laptop_env, command):
    proc = _tunefarm(laptop_env, command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: ") and "blocked" not in proc.stderr


def test_client_commands_run_without_tvm_or_torch(laptop_env, tmp_path):
    """Past --help: each command reads its settings (and submit its job file) and reaches for the farm, which
    is not there: a one-line error about the farm, not an ImportError."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens once the socket is closed
    for args in (["submit", ROOT / "configs" / "jobs" / "resnet18-cpu.yaml", "--farm", url],
                 ["pull", "some-job", "-o", tmp_path / "out", "--farm", url],
                 ["jobs", "--farm", url], ["devices", "--farm", url]):
        proc = _tunefarm(laptop_env, *args)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1, (args, proc.stderr)
        assert lines[0].startswith(f"tunefarm: error: cannot reach the farm at {url}"), (args, lines)


def test_base_install_is_the_client_and_roles_are_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {req.split("=")[0].split("[")[0].strip().lower() for req in project["dependencies"]}
    assert not base & ({name.replace("_", "-") for name in HEAVY} | {"apache-tvm", "apache-tvm-ffi"}), base
    extras = project["optional-dependencies"]
    assert {"client", "agent", "host", "test"} <= set(extras)
    for role in ("agent", "host"):
        assert "apache-tvm==0.27.0.post1" in extras[role] and "apache-tvm-ffi==0.1.14.post1" in extras[role]
    assert "tunefarm[host,agent]" in extras["test"]  # make install / make test: every role, as before
    assert project["scripts"]["tunefarm"] == "tunefarm.cli:main"
