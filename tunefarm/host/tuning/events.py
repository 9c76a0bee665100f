"""What the tuning engine tells whoever runs it. The engine (host/tuning) never prints: it calls an
:class:`Events` object, and the one who runs it chooses how that is shown.

The CLI (and ``tune_job``'s callers that pass none: the benchmarks, quickstart) render them on a Rich console
(host/console.py, ``ConsoleEvents``); the plain :class:`Events` shows nothing (a plan read in a test, the
service's views, a search worker that wants no output).

A line is Rich markup ("[yellow]warning[/]: ..."): text the farm does not write itself (a job's key, an agent's
id, a reason an agent gave, an address it registered) goes in through :func:`esc`, so that it is shown as it is
and never read as markup. ``print`` and ``status`` are the part of Rich's Console that the host's modules use
(host/comparator.py takes either), which is why they carry those names.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager, Sequence


def esc(text: object) -> str:
    """``text`` as it is, inside a markup line (Rich's escaping)."""
    from rich.markup import escape  # pylint: disable=import-outside-toplevel

    return escape(str(text))


class Bar:
    """A progress bar: shown live inside ``with bar:`` (the tuning run), moved by :meth:`update`."""

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, completed: int, status: str) -> None:
        """``completed`` trials of the bar's total; ``status`` the text beside the bar."""


class Events:
    """The engine's events; this one shows nothing. See the module's docstring."""

    def print(self, markup: str) -> None:
        """A line for the user (Rich markup)."""

    def status(self, what: str) -> ContextManager:
        """Something long is going on (a spinner while the ``with`` block runs)."""
        return nullcontext()

    def progress(self, total: int, completed: int, status: str) -> Bar:
        """The run's progress bar: ``total`` trials, ``completed`` of them already."""
        return Bar()

    def task_table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        """A table of a job's tasks: column 0 the task's index, column 1 its name (plain text, never markup,
        shown whole), the others its figures (markup, e.g. "[red]NO[/]")."""

    def markdown(self, text: str) -> None:
        """A Markdown document (the evaluation's report)."""
