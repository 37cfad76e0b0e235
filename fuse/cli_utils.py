"""Shared CLI plumbing: turn user errors into one-line messages and exit codes."""

from __future__ import annotations

import contextlib
import functools
import gc
import sys
import warnings
from typing import Any, Callable

import click

from .devices import resolve_device  # noqa: F401  (re-exported: its former home)
from .dtypes import parse_dtype  # noqa: F401  (re-exported: its former home)
from .errors import FuseError


CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}  # of every command group: -h works too


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


@contextlib.contextmanager
def startup_imports():
    """Import heavy libraries with the cyclic GC off, then freeze what they allocated.

    Why: once torch is imported, every full collection walks its millions of objects (0.1-0.2 s
    each; three of them ran during the imports of a ``fuse merge``). ``gc.freeze`` moves the
    start-up objects out of later collections too, so the merge loop's collections stay small.
    """
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


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
