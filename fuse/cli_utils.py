"""Shared CLI plumbing: turn user errors into one-line messages and exit codes."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import sys
import warnings
from typing import Any, Callable, Iterable

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

    Why: once torch is imported, every full collection walks its millions of objects, and several
    such collections ran during the imports of a ``fuse merge``. ``gc.freeze`` moves the start-up
    objects out of later collections too, so the merge loop's collections stay small.
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


def options_from_dataclass(cls: type, param: str = "options", only: Iterable[str] | None = None,
                           help: dict[str, str] | None = None, **defaults: Any) -> Callable:
    """Decorator: one click option per field of dataclass ``cls`` declared with :func:`fuse.flags.flag`, in
    field order; the command receives them as one ``cls`` instance, keyword ``param``. ``only``: these
    fields; ``help``: field -> help text for this command; ``defaults``: field -> default for this command
    (the dataclass's own otherwise)."""
    fields = [f for f in dataclasses.fields(cls) if "cli" in f.metadata and (only is None or f.name in only)]
    names = [f.name for f in fields]

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            kwargs[param] = cls(**{n: kwargs.pop(n) for n in names})
            return fn(*args, **kwargs)

        for f in reversed(fields):
            command = _click_option(f, (help or {}).get(f.name), defaults.get(f.name, f.default))(command)
        return command

    return decorate


def _click_option(f: dataclasses.Field, help: str | None, default: Any) -> Callable:
    spec = dict(f.metadata["cli"])
    flags, text, off = spec.pop("flags"), help or spec["help"], spec.pop("off")
    if f.type in (bool, "bool"):
        return click.option(*flags, f.name, is_flag=True, flag_value=not off, default=default, help=text)
    kw: dict[str, Any] = {"default": default, "help": text, "show_default": spec.get("show_default", False),
                          "required": spec.get("required", False)}
    if "min" in spec or "max" in spec:
        kw["type"] = click.IntRange(min=spec.get("min"), max=spec.get("max"))
    elif "choices" in spec:
        kw["type"] = click.Choice(list(spec["choices"]))
    elif "path" in spec:
        kw["type"] = click.Path(file_okay=spec["path"] != "dir")
    return click.option(*flags, f.name, **kw)
