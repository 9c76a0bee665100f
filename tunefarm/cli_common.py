"""What every tunefarm command shares: one-line errors and exit codes."""
from __future__ import annotations

import functools
import sys

import click

from tunefarm.core.errors import TunefarmError


def one_line_errors(func):
    """Turn TunefarmError (and Ctrl-C) into a one-line message and an exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except TunefarmError as err:
            click.echo(f"tunefarm: error: {err}", err=True)
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("tunefarm: interrupted", err=True)
            sys.exit(130)

    return wrapper
