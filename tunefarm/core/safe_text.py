"""Text that came from the network, made safe to print on a terminal or write to a log.

Rich's markup escape (``rich.markup.escape``) stops ``[red]`` from styling a table, but not a control
character: a key or agent id holding ``\\x1b[2J`` clears the operator's screen, moves the cursor, rewrites the
title bar or hides a line when ``tunefarm devices`` prints it or ``tail -f tracker.log`` shows it (issue 32,
item 6). :func:`printable` writes every character that is not printable (C0/C1 controls, DEL, line and
paragraph separators, bidi overrides and other format characters) as a visible escape, the way Python's
``repr`` does, and can bound the length. Use it on every field a peer chose before it is printed or logged;
escape rich markup on top where the text goes through rich.
"""
from __future__ import annotations

from typing import Any


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(value: Any, limit: int | None = None) -> str:
    """``str(value)`` with each non-printable character written as ``\\xNN`` / ``\\uNNNN`` (a backslash is
    kept as it is), cut to ``limit`` characters (``...`` at the end) when ``limit`` is given."""
    text = value if isinstance(value, str) else str(value)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else _escape(c) for c in text)
    if limit is not None and len(text) > limit:
        text = text[:max(0, limit - 3)] + "..."
    return text
