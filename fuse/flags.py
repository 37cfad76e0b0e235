"""Command-line flags declared on dataclass fields: options objects describe their own flags.

A field's metadata ``flag(...)`` holds its flag names, help text and how the value is checked (a range,
choices, a path); :func:`fuse.cli_utils.options_from_dataclass` turns such fields into click options and
the parsed values back into one instance. Metadata only: this module imports nothing (the options
objects live in the library, which must not depend on the command-line layer).
"""

from __future__ import annotations

from typing import Any


def flag(*names: str, help: str, off: bool = False, **checks: Any) -> dict[str, Any]:
    """Field metadata for a command-line flag. ``off``: a boolean flag that sets the field to False
    (``--no-checksums`` for ``checksums``). ``checks``: ``min``/``max`` (an integer range), ``choices``,
    ``path`` (``"dir"``: a directory, ``"any"``: any path), ``required``, ``show_default``."""
    return {"cli": {"flags": names, "help": help, "off": off, **checks}}


__all__ = ["flag"]
