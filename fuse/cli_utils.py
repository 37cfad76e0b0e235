"""Shared CLI plumbing: turn user errors into one-line messages and exit codes."""

from __future__ import annotations

import contextlib
import functools
import gc
import sys
import warnings
from typing import Any, Callable

import click

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


def parse_dtype(name):
    """A model dtype from ``--dtype`` or the Python API: a name, a floating ``torch.dtype`` or None/"auto"."""
    import torch

    if isinstance(name, torch.dtype):
        if name in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            return name
        raise FuseError(f"dtype {name}: models run in a floating dtype (float32, float16 or bfloat16)")
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, None: None, "auto": None}
    if not isinstance(name, (str, type(None))) or name not in table:
        raise FuseError(f"dtype {name!r}: expected one of float32, float16, bfloat16")
    return table[name]


def resolve_device(device):
    """``None``/"auto" -> cuda if available else cpu; anything else must be a device this machine has."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise FuseError(f"--device {device!r}: expected cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FuseError(f"--device {device}: CUDA is not available on this machine (torch "
                        f"{torch.__version__}{', a CPU-only build' if torch.version.cuda is None else ''})")
    if dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except Exception as e:  # no such backend / index, driver error: torch raises several types
            raise FuseError(f"--device {device}: not usable on this machine ({str(e).splitlines()[0][:150]})") from None
    return dev
