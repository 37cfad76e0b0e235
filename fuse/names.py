"""Member names: each becomes a directory, ``OUT/members/<name>/``, so it must be a plain directory name.

One scheme everywhere (recipes, ``FusedModel.from_members``, test builders): a name is given, or derived
from the model's path or hub id (:func:`derive_member_name`); names that collide get ``-2``, ``-3``, ...
(:func:`unique_names`). No heavy imports (recipe validation uses this module).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

NAME_RX = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a plain directory name: no separators, no leading dot


def derive_member_name(source: str | os.PathLike) -> str:
    """A member name from a path or hub id, valid as :data:`NAME_RX` requires: the basename of the
    directory it points to (so ``x/..`` or ``.`` name a real directory, never ``..``), with other
    characters replaced by ``_`` and leading dots dropped; ``member`` if nothing is left."""
    p = Path(os.path.expanduser(str(source).rstrip("/\\") or str(source)))
    name = p.name
    if name in ("", ".", "..") or str(p).endswith(("/.", "/..")):
        name = Path(os.path.realpath(p)).name  # what the path points to (a symlinked dir keeps its own name)
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip("._-")
    return stem if NAME_RX.fullmatch(stem) else "member"


def unique_names(names: Iterable[str], reserved: Iterable[str] = ()) -> list[str]:
    """``names`` in order, each kept unless an earlier one or a ``reserved`` name has it; a repeat
    becomes ``name-2``, ``name-3``, ... (the first suffix not taken)."""
    taken = set(reserved)
    out = []
    for name in names:
        cand, k = name, 1
        while cand in taken:
            k += 1
            cand = f"{name}-{k}"
        taken.add(cand)
        out.append(cand)
    return out


__all__ = ["NAME_RX", "derive_member_name", "unique_names"]
