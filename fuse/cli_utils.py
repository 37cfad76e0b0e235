"""Shared CLI plumbing: turn user errors into one-line messages and exit codes."""

from __future__ import annotations

import functools
import sys
import warnings
from typing import Any, Callable

import click

from .errors import FuseError


class FriendlyGroup(click.Group):
    """A click group whose commands print ``error: ...`` (no traceback) for user errors."""

    def invoke(self, ctx: click.Context) -> Any:
        import signal

        from .output_dir import interrupt_on_sigterm

        try:
            with interrupt_on_sigterm(), warnings.catch_warnings():  # `kill` cleans up like Ctrl-C
                warnings.showwarning = _show_warning
                return super().invoke(ctx)
        except FuseError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt as e:
            signum = getattr(e, "signum", signal.SIGINT)
            how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
            click.echo(f"{how}: nothing was left half-written", err=True)
            sys.exit(128 + signum)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings of this toolkit (UserWarning) as one ``warning: ...`` line; others as Python prints them."""
    if issubclass(category, UserWarning) and not issubclass(category, (DeprecationWarning, FutureWarning)):
        click.echo(f"warning: {message}", err=True)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def user_errors(fn: Callable) -> Callable:
    """Decorator for entry points outside a FriendlyGroup."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except FuseError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)

    return wrapper


def parse_dtype(name: str | None):
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, None: None, "auto": None}
    if name not in table:
        raise FuseError(f"dtype {name!r}: expected one of float32, float16, bfloat16")
    return table[name]
