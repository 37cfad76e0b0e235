"""Byte sizes written by people ('5GB', '500MB', '2GiB'); no heavy imports (used by recipe validation)."""

from __future__ import annotations

import re

from .errors import CheckpointError


def parse_size(size: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / 1234 -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", str(size), re.I)
    if not m:
        raise CheckpointError(f"shard size {size!r}: expected a number of bytes like '5GB' or '500MB'")
    num, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
    base = 1024 if binary else 1000
    return int(num * base ** "_KMGT".index(unit or "_"))


__all__ = ["parse_size"]
