"""The tuning engine's events (host/tuning/events.py) rendered on a Rich console: what ``tunefarm tune``,
``tunefarm logs show`` and ``tunefarm quickstart`` show, and a search worker's lines on its stderr.

A table of a job's tuning tasks (``tunefarm tune --plan``, ``tunefarm logs show``):

Task names are long (mobilenet_v3_small's run to 68 characters: ``fused_conv2d39_add47_add48_tir_clip30_...``),
and a Rich table squeezed into the terminal cuts the widest column first: the name, to ``fused_…``. So the
table is printed as a Rich table only where it fits whole; on a narrower console every task takes two lines,
its index and its whole name on the first, its figures under the column headers on the second.

The evaluation's report (report.md, the ``markdown`` event) is Rich's Markdown, with its tables printed the same
way: Rich's table where it fits whole; else the tasks table in the two-line form above, and any other table
(the backends', 11 columns) row by row, the row's first cell on a line and its other cells after their column
headers on the next lines. No cell is cut to ``…``.
"""
from __future__ import annotations

import functools
from typing import Sequence, Union

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

from tunefarm.host.tuning.events import Bar, Events

Cell = Union[str, Text]  # str: Rich markup (e.g. "[red]NO[/]"); a name is given as Text (never markup)

GAP = "  "


def _text(cell: Cell) -> Text:
    return cell if isinstance(cell, Text) else Text.from_markup(cell)


def _fits(console: Console, options: ConsoleOptions, table: Table) -> bool:
    """``table`` fits ``options``' width with no cell wrapped or cut."""
    return console.measure(table, options=options.update_width(1 << 20)).maximum <= options.max_width


def print_task_table(console: Console, title: str, columns: Sequence[str], rows: Sequence[Sequence[Cell]]) -> None:
    """Print ``rows`` under ``columns``: the first column the task's index, the second its name, the others
    its figures (right-aligned)."""
    table = Table(title=Text(title))
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 1 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    if _fits(console, console.options, table):
        console.print(table)
        return
    for line in _task_lines(title, columns, rows):
        console.print(line)


def _task_lines(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Cell]]) -> list[Text]:
    """The task table's narrow form: two lines a task (see the module's docstring)."""
    cells = [[_text(c) for c in row] for row in rows]
    index_w = max([len(columns[0])] + [row[0].cell_len for row in cells])
    widths = [max([len(col)] + [row[i].cell_len for row in cells]) for i, col in enumerate(columns) if i > 1]
    indent = " " * (index_w + len(GAP))
    figures_header = GAP.join(col.rjust(w) for col, w in zip(columns[2:], widths))
    lines = [Text(title, style="table.title")] if title is not None else []
    lines += [Text(columns[0].rjust(index_w) + GAP + columns[1], style="table.header"),
              Text(indent + figures_header, style="table.header"), Text(indent + "─" * len(figures_header))]
    for row in cells:
        lines.append(Text.assemble(" " * (index_w - row[0].cell_len), row[0], GAP, row[1]))
        figures = Text(indent)
        for i, (cell, width) in enumerate(zip(row[2:], widths)):
            figures.append(GAP if i else "")
            figures.append(" " * (width - cell.cell_len))
            figures.append_text(cell)
        lines.append(figures)
    return lines


def _row_lines(columns: Sequence[str], rows: Sequence[Sequence[Text]], width: int) -> list[Text]:
    """A table too wide for ``width``, row by row: the first cell on a line, then "header: cell" of the others,
    as many on a line as fit (a longer one on a line of its own, wrapped, never cut)."""
    lines = []
    for row in rows:
        lines.append(Text.assemble(row[0], style="bold"))
        line = Text(GAP)
        for col, cell in zip(columns[1:], row[1:]):
            item = Text.assemble((f"{col}:", "markdown.table.header"), " ", cell)
            if line.plain.strip() and line.cell_len + len(GAP) + item.cell_len > width:
                lines.append(line)
                line = Text(GAP)
            line.append(GAP if line.plain.strip() else "")
            line.append_text(item)
        if line.plain.strip():
            lines.append(line)
    return lines


@functools.lru_cache(maxsize=None)
def _report_markdown() -> type:
    """Rich's Markdown with tables whole at any width (see the module's docstring); imported when first used."""
    from rich.markdown import Markdown, TableElement  # pylint: disable=import-outside-toplevel

    class ReportTable(TableElement):
        def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
            (table,) = super().__rich_console__(console, options)
            head = self.header.row.cells if self.header is not None and self.header.row is not None else []
            columns = [cell.content.plain.strip() for cell in head]
            rows = [[cell.content for cell in row.cells] for row in self.body.rows] if self.body is not None else []
            if _fits(console, options, table) or not columns or not rows:
                yield table
            elif columns[:2] == ["#", "task"]:
                yield from _task_lines(None, columns, rows)
            else:
                yield from _row_lines(columns, rows, options.max_width)

    class ReportMarkdown(Markdown):
        elements = {**Markdown.elements, "table_open": ReportTable}

    return ReportMarkdown


def print_markdown(console: Console, text: str) -> None:
    """A Markdown document (the evaluation's report.md) on ``console``, its tables whole at any width."""
    console.print(_report_markdown()(text))


class _RichBar(Bar):
    """The live tuning bar: "tuning", the bar, N/M trials, the status, elapsed, ETA."""

    def __init__(self, console: Console, total: int, completed: int, status: str):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,  # pylint: disable=import-outside-toplevel
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.progress = Progress(TextColumn("[bold]tuning"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=console, transient=False)
        self.bar = self.progress.add_task("tune", total=total, completed=completed, status=status)

    def __enter__(self) -> "_RichBar":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def update(self, completed: int, status: str) -> None:
        self.progress.update(self.bar, completed=completed, status=status)


class ConsoleEvents(Events):
    """The engine's events on ``console`` (default: the terminal, no highlighting of numbers and paths)."""

    def __init__(self, console: Console | None = None):
        self.console = console if console is not None else Console(highlight=False)

    def print(self, markup: str) -> None:
        self.console.print(markup)

    def status(self, what: str):
        return self.console.status(what)

    def progress(self, total: int, completed: int, status: str) -> Bar:
        return _RichBar(self.console, total, completed, status)

    def task_table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        print_task_table(self.console, title, columns,
                         [[row[0], Text(row[1]), *row[2:]] for row in rows])  # the name: never markup

    def markdown(self, text: str) -> None:
        print_markdown(self.console, text)
