"""The package's layout holds: no import cycles in tunefarm/, and no role imports another role's internals.

Imports are read from the source (``ast``), top-level and function-level alike: a lazy import is still a
dependency. ``python tests/test_layout.py`` prints the module graph's cycles and role violations.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tunefarm"

# What each part of the package may import from tunefarm (besides itself). The roles talk through core
# (wire formats, job specs) and the tracker's client; the laptop client and the agents never reach into
# the host, and nothing but the CLI reaches into everything.
ALLOWED = {
    "tunefarm.core": set(),
    "tunefarm.tracker": {"tunefarm.core"},
    "tunefarm.device_agents": {"tunefarm.core", "tunefarm.tracker.client"},
    "tunefarm.client": {"tunefarm.core"},
    "tunefarm.testing": {"tunefarm.core", "tunefarm.tracker.client"},
    "tunefarm.host": {"tunefarm.core", "tunefarm.tracker.client", "tunefarm.testing"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """tunefarm modules that ``path`` imports (``from pkg import name`` counts ``pkg.name`` when it is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith("tunefarm") and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    # importing a module imports its packages' __init__ too, but those hold no imports of their own here
    return {name: {t for t in imports_of(path, modules) if t != "tunefarm"} for name, path in files.items()}


def cycles(deps: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(deps.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            comp = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                comp.append(item)
                if item == node:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for node in sorted(deps):
        if node not in index:
            visit(node)
    return out


def role_violations(deps: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, targets in sorted(deps.items()):
        role = next((r for r in ALLOWED if mod == r or mod.startswith(r + ".")), None)
        if role is None:
            continue  # tunefarm.cli, tunefarm.__main__: the entry points may import every role
        for target in sorted(targets):
            if target == role or target.startswith(role + "."):
                continue
            if not any(target == a or target.startswith(a + ".") for a in ALLOWED[role]):
                bad.append(f"{mod} imports {target}")
    return bad


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_no_role_imports_another_roles_internals():
    assert role_violations(graph()) == []


# Boundaries inside the host (issue 30). The search workers are a role of their own folder: its protocol and
# dealing stand alone, the worker's side and the host's side never import each other, and the tuning engine
# reaches the folder only through the host's driver.
INSIDE = {
    "tunefarm.host.search_workers.protocol": {"tunefarm.core"},
    "tunefarm.host.search_workers.dealing": set(),
    "tunefarm.host.search_workers.worker": {"tunefarm.core", "tunefarm.host.search_workers.protocol",
                                            "tunefarm.host.tuning", "tunefarm.host.console"},
    "tunefarm.host.search_workers.driver": {"tunefarm.core", "tunefarm.tracker.client",
                                            "tunefarm.host.search_workers.protocol",
                                            "tunefarm.host.search_workers.dealing", "tunefarm.host.tuning"},
    # The runner's parts, each below the next: transport steps, the session pool, a batch, the runner.
    "tunefarm.host.tuning.transport": {"tunefarm.core"},
    "tunefarm.host.tuning.sessions": {"tunefarm.core", "tunefarm.host.tuning.transport"},
    "tunefarm.host.tuning.batch": {"tunefarm.core", "tunefarm.host.tuning.transport",
                                   "tunefarm.host.tuning.sessions"},
}
SEARCH_WORKERS_FROM_TUNING = {"tunefarm.host.search_workers.driver"}


def inside_violations(deps: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, allowed in INSIDE.items():
        for target in sorted(deps.get(mod, ())):
            if not any(target == a or target.startswith(a + ".") for a in allowed):
                bad.append(f"{mod} imports {target}")
    for mod, targets in sorted(deps.items()):
        if mod.startswith("tunefarm.host.tuning."):
            bad += [f"{mod} imports {t}" for t in sorted(targets)
                    if t.startswith("tunefarm.host.search_workers") and t not in SEARCH_WORKERS_FROM_TUNING]
    return bad


def tune_tasks_callers() -> list[str]:
    """Modules that call MetaSchedule's ``tune_tasks`` (``ms.tune_tasks(...)``, ``tune_tasks(...)``)."""
    out = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name == "tune_tasks":
                    out.append(module_name(path))
                    break
    return sorted(out)


def test_search_workers_keep_their_boundaries():
    assert inside_violations(graph()) == []


def test_one_module_runs_the_tuning_loop():
    """The host's job and a search worker's share both tune through tuning/loop.py: the loop exists once."""
    assert tune_tasks_callers() == ["tunefarm.host.tuning.loop"]


MAX_MODULE_LINES = 600


def long_modules() -> list[str]:
    return sorted(f"{module_name(p)}: {n} lines" for p in PACKAGE.rglob("*.py")
                  if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES)


def test_no_module_is_over_600_lines():
    assert long_modules() == []


def backend_tables() -> list[str]:
    """Modules other than core/backends.py that spell out a table of backends (a literal dict, list, tuple or
    set naming three or more of them): a backend is described in one place, the rest derived from it."""
    sys.path.insert(0, str(PACKAGE.parent))
    from tunefarm.core.backends import BACKENDS  # pylint: disable=import-outside-toplevel

    names = set(BACKENDS) | {b.runner for b in BACKENDS.values()}
    out = []
    for path in PACKAGE.rglob("*.py"):
        if module_name(path) == "tunefarm.core.backends":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            items = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
            if isinstance(node, (ast.Dict, ast.List, ast.Tuple, ast.Set)) and items:
                found = {i.value for i in items if isinstance(i, ast.Constant) and i.value in names}
                if len(found) >= 3:
                    out.append(f"{module_name(path)}:{node.lineno}")
    return sorted(out)


def test_a_backend_is_described_in_one_place():
    assert backend_tables() == []


# Where a process may be started or signalled besides core/procs.py, each for its reason (as core/procs.py says).
PROCESS_EXCEPTIONS = {
    "tunefarm.core.torchless": "TVM's PopenWorker protocol: inherited pipe fds, TVM stops it",
    "tunefarm.device_agents.build_service": "forked build children (multiprocessing fork) inheriting loaded TVM",
    "tunefarm.device_agents.cxx_build": "parallel compiler runs waited for within one call",
    "tunefarm.host.tuning.builder": "kills one TVM PopenWorker's process, which TVM started",
    "tunefarm.device_agents.rpc_server": "re-raises a signal to itself",
    "tunefarm.testing.netns": "kills what is left in a namespace by pid (ip netns pids)",
}
PROCESS_CALLS = {("subprocess", "Popen"), ("os", "killpg"), ("os", "kill")}


def process_handling(source: str, filename: str = "<source>") -> list[int]:
    """Lines of ``source`` that start or signal a process by hand: subprocess.Popen, os.kill/killpg, a
    start_new_session argument, multiprocessing (one-shot ``subprocess.run`` calls are not counted)."""
    lines = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Call):
            func = node.func
            if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                    and (func.value.id, func.attr) in PROCESS_CALLS):
                lines.append(node.lineno)
            elif any(k.arg == "start_new_session" for k in node.keywords):
                lines.append(node.lineno)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(n.split(".")[0] == "multiprocessing" for n in names):
                lines.append(node.lineno)
    return sorted(set(lines))


def process_handlers() -> list[str]:
    """Modules, other than core/procs.py and the listed exceptions, that start or signal processes by hand."""
    return sorted(f"{module_name(p)}:{line}" for p in PACKAGE.rglob("*.py")
                  if module_name(p) not in {"tunefarm.core.procs", *PROCESS_EXCEPTIONS}
                  for line in process_handling(p.read_text(), str(p)))


def test_processes_are_started_and_stopped_in_core_procs():
    assert process_handlers() == []
    for module in PROCESS_EXCEPTIONS:  # every exception is still needed (else it goes from the list)
        path = PACKAGE.parent.joinpath(*module.split(".")).with_suffix(".py")
        assert process_handling(path.read_text(), str(path)), module
    sample = ("import os, subprocess\nimport multiprocessing.connection\nsubprocess.Popen(['x'])\n"
              "os.killpg(1, 9)\nf(['x'], start_new_session=True)\nsubprocess.run(['x'])\n")
    assert process_handling(sample) == [2, 3, 4, 5]


# Rich modules that draw on a console. The engine may use rich.markup (escaping text for a line it emits).
DRAWING = ("rich.console", "rich.progress", "rich.table", "rich.markdown", "rich.text", "rich.live", "rich.status")


def console_output(source: str, filename: str = "<source>") -> list[str]:
    """What in ``source`` writes to a console: a drawing Rich module imported, a ``Console(...)`` made, a
    ``console.print``/``console.status``, a bare ``print(...)``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{node.lineno}: imports {n}" for n in names if n.startswith(DRAWING)]
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in ("Console", "print"):
                found.append(f"{node.lineno}: {func.id}(...)")
            elif (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                  and func.value.id == "console"):
                found.append(f"{node.lineno}: console.{func.attr}(...)")
    return found


# host/tuning writes no console output: the engine emits events (tuning/events.py) that the CLI renders
# (host/console.py). One print stays, for its reason:
ENGINE_OUTPUT_LEFT = {
    # A damaged database file's warning on stderr, from JobDir's readers, which every role calls (the CLI, the
    # service, whose host.log keeps it): said once per process, at the place that finds the damage.
    "tunefarm.host.tuning.jobdir": 1,
}


def engine_console_output() -> dict[str, list[str]]:
    out = {}
    for path in (PACKAGE / "host" / "tuning").rglob("*.py"):
        found = console_output(path.read_text(), str(path))
        if found:
            out[module_name(path)] = found
    return out


def test_the_tuning_engine_writes_no_console_output():
    found = engine_console_output()
    assert {m: len(f) for m, f in found.items()} == ENGINE_OUTPUT_LEFT, found
    sample = ("from rich.console import Console\nfrom rich.markup import escape\nconsole.print('x')\n"
              "Console()\nprint('y')\nevents.print('z')\n")
    assert console_output(sample) == ["1: imports rich.console", "3: console.print(...)", "4: Console(...)",
                                      "5: print(...)"]


def test_the_checker_sees_cycles_and_violations():
    deps = {"tunefarm.core.a": {"tunefarm.host.x"}, "tunefarm.host.x": {"tunefarm.host.y"},
            "tunefarm.host.y": {"tunefarm.host.x"}, "tunefarm.client.c": {"tunefarm.host.x"}}
    assert cycles(deps) == [["tunefarm.host.x", "tunefarm.host.y"]]
    assert role_violations(deps) == ["tunefarm.client.c imports tunefarm.host.x",
                                     "tunefarm.core.a imports tunefarm.host.x"]
    real = graph()
    assert "tunefarm.core.errors" in real["tunefarm.core.jobspec"]  # a relative import, resolved
    assert inside_violations({"tunefarm.host.search_workers.worker": {"tunefarm.host.search_workers.driver"},
                              "tunefarm.host.tuning.job": {"tunefarm.host.search_workers.worker"}}) == [
        "tunefarm.host.search_workers.worker imports tunefarm.host.search_workers.driver",
        "tunefarm.host.tuning.job imports tunefarm.host.search_workers.worker"]


if __name__ == "__main__":
    found = graph()
    for comp in cycles(found):
        print("cycle:", " <-> ".join(comp))
    for line in role_violations(found) + inside_violations(found):
        print("role:", line)
    print("tune_tasks called in:", ", ".join(tune_tasks_callers()))
    for line in (long_modules() + [f"backend table: {where}" for where in backend_tables()]
                 + [f"process handled outside core/procs.py: {where}" for where in process_handlers()]):
        print(line)
