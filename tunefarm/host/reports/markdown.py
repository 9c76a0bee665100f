"""How the reports write a value into a Markdown table cell (one way for the tuning report, the compare
report and the benchmarks)."""
from __future__ import annotations


def number(value, digits: int = 3) -> str:
    """``-`` for no value; a float with ``digits`` decimals, or with ``digits`` significant digits when it
    is too small for that (a max abs error of 2e-06 would print as 0.000); anything else as it is."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if value != 0 and abs(value) < 10.0 ** (1 - digits):
        return f"{value:.{digits}g}"
    return f"{value:.{digits}f}"


_CELL_ESCAPES = str.maketrans({"\\": "\\\\", "|": "\\|", "`": "\\`", "[": "\\[", "]": "\\]", "<": "&lt;",
                               ">": "&gt;"})


def cell(value, limit: int = 500) -> str:
    """Text the farm did not write (an agent's id or its error, a reason built from them) as Markdown: one
    line, printable, bounded, and nothing in it read as a table border, code, a link, an image or HTML."""
    text = " ".join(str(value).split())
    text = "".join(c if c.isprintable() else "?" for c in text)
    if len(text) > limit:
        text = text[:limit] + "..."
    return text.translate(_CELL_ESCAPES)


def threads_text(row: dict) -> str:
    """A row's threads cell: the count, and where the agent set them (a model mixing oneDNN and TVM kernels),
    how long idle TVM and OpenMP threads spun (core.threads.MIXED_POOLS; values checked by the comparator)."""
    from tunefarm.core.threads import GOMP_SPIN_ENV, TVM_SPIN_ENV  # pylint: disable=import-outside-toplevel

    text = str(row.get("threads") or "-")
    spin = (row.get("details") or {}).get("pool_spin") or {}
    if spin:
        text += (f" (idle spin: TVM {cell(spin.get(TVM_SPIN_ENV, 'default'), 12)}, "
                 f"OpenMP {cell(spin.get(GOMP_SPIN_ENV, 'default'), 12)})")
    return text
