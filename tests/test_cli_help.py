"""`tunefarm --help` lists every command once, under the role that runs it; every command answers --help."""
import subprocess
import sys

import click

from tunefarm.cli import ROLES, main


def _help(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "tunefarm", *args, "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, (args, proc.stderr)
    return proc.stdout


def _sections(text: str) -> dict[str, list[str]]:
    """Help text's unindented headings ("Title:") -> the first word of each of their indented lines."""
    sections, current = {}, None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            current = sections.setdefault(line[:-1], [])
        elif current is not None and line.startswith("  ") and line.strip() and not line.startswith("   "):
            current.append(line.split()[0])
    return sections


def test_top_level_help_groups_every_command_by_role():
    sections = _sections(_help())
    commands = sorted(name for name, cmd in main.commands.items() if not cmd.hidden)
    assert len(commands) >= 18
    titles = [title for title, _ in ROLES]
    assert [t.split()[0] for t in titles] == ["Host", "Device", "Laptop", "Analysis"]
    for title, names in ROLES:
        assert sections.get(title) == list(names), title  # in ROLES' order, only commands that exist
    listed = [name for title in titles for name in sections[title]]
    assert sorted(listed) == commands  # each command exactly once
    assert "Other commands" not in sections and "Commands" not in sections


def _command_paths(group: click.Group, prefix=()):
    for name, cmd in sorted(group.commands.items()):
        yield (*prefix, name)
        if isinstance(cmd, click.Group):
            yield from _command_paths(cmd, (*prefix, name))


def test_every_command_answers_help_by_its_name():
    paths = list(_command_paths(main))
    # every command and sub-command the CLI has, including those the old list left out
    for expected in (("compare",), ("models",), ("delete",), ("search-worker",), ("runtime", "opencl"),
                     ("runtime", "onednn"), ("host", "serve"), ("logs", "best"), ("logs", "show")):
        assert expected in paths
    for path in paths:
        out = _help(*path)
        assert out.startswith("Usage: ") and f" {' '.join(path)} " in out.splitlines()[0], path
        assert len(out.splitlines()) > 4, path
