"""Shared CLI plumbing: turn user errors into one-line messages and exit codes."""

from __future__ import annotations

import contextlib
import functools
import gc
import sys
from typing import Any, Callable

import click

from .errors import FuseError


class FriendlyGroup(click.Group):
    """A click group whose commands print ``error: ...`` (no traceback) for user errors."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FuseError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was left half-written", err=True)
            sys.exit(130)


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


def parse_dtype(name: str | None):
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, None: None, "auto": None}
    if name not in table:
        raise FuseError(f"dtype {name!r}: expected one of float32, float16, bfloat16")
    return table[name]
