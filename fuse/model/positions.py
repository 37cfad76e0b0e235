"""Position ids of visual tokens (MouSi-style position sharing).

A scheme gives each of a member's ``n`` visual tokens a position *offset*
(0-based, non-decreasing); the span then occupies ``max(offset) + 1`` positions
and the next token continues after it. Registry ``POSITION_SCHEMES``:

- ``sequential``: offsets 0..n-1 (ordinary LLaVA behaviour, the default);
- ``share``: every token at offset 0 (the whole member takes ONE position);
- ``groups:K``: token i at offset floor(i * K / n): K consecutive groups of near-equal size;
- ``rows``: the tokens of one grid row share an offset (an h x w grid takes h positions);
  tokens after the grid segments (e.g. separators) take one position each.

Text tokens always advance by one position. Padding positions are 0 (left padding, as
transformers derives them from the attention mask).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..errors import RecipeError
from .budget import valid_grids
from .options import PositionSpec


def _sequential(n: int, grids, spec: PositionSpec) -> torch.Tensor:
    return torch.arange(n)


def _share(n: int, grids, spec: PositionSpec) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.long)


def _groups(n: int, grids, spec: PositionSpec) -> torch.Tensor:
    k = min(int(spec.groups or 1), max(n, 1))
    return torch.arange(n) * k // max(n, 1)


def _rows(n: int, grids, spec: PositionSpec) -> torch.Tensor:
    segs = valid_grids(grids, n)
    if segs is None:
        raise RecipeError("positions 'rows' needs a member whose tokens form a grid "
                          "(not available for this member or after a topk budget); use share or groups:K")
    parts, base = [], 0
    for _, h, w in segs:
        parts.append(base + torch.arange(h).repeat_interleave(w))
        base += h
    covered = sum(h * w for _, h, w in segs)
    parts.append(base + torch.arange(n - covered))
    return torch.cat(parts)


POSITION_SCHEMES: dict[str, Callable[[int, object, PositionSpec], torch.Tensor]] = {
    "sequential": _sequential, "share": _share, "groups": _groups, "rows": _rows,
}


def span_offsets(n: int, spec: PositionSpec, grids: Sequence[tuple[str, int, int]] | None = None) -> torch.Tensor:
    """Position offsets ``[n]`` (long) of a member's span under ``spec``."""
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    return POSITION_SCHEMES[spec.kind](n, grids, spec).long()


def positions_used(offsets: torch.Tensor) -> int:
    """How many position ids a span with these offsets consumes."""
    return int(offsets.max()) + 1 if offsets.numel() else 0
