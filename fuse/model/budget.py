"""Token-budget strategies: how many of a member's visual tokens reach the LLM.

Long fused sequences (n members x hundreds of tokens) cost prefill time; these
strategies trade tokens for speed. A registry ``BUDGETS`` maps a kind to a
function ``(tokens [N, D], grids, text_embeds [T, D] | None, spec) -> BudgetResult``:

- ``all``: keep every token (default; the paper's setting).
- ``pool``: average-pool each grid segment of the member (``VisionBranch.token_grids``)
  with ``stride x stride`` windows (partial windows at odd borders average what they
  cover: a 24x24 grid -> 12x12, 5x5 -> 3x3), or adaptively to ``size`` = (h, w).
  Tokens outside any grid segment (e.g. a separator) are kept as they are. A member
  with no known grid is pooled 1-D over windows of ``stride**2`` consecutive tokens.
- ``topk``: the ``k`` tokens with the highest similarity to the prompt's text token
  embeddings (score of a token = max over text tokens of the cosine similarity), kept in
  their original order.

Every result reports its token count (``BudgetResult.count``), the grid layout of the
kept tokens when it is still a grid, and for ``topk`` the kept indices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .options import BudgetSpec

Segments = list[tuple[str, int, int]]  # (segment name, grid h, grid w) in token order


@dataclass
class BudgetResult:
    """Kept tokens ``[M, D]``; ``grids``: layout of the first tokens (None if not a grid);
    ``kept``: indices into the member's original tokens (``topk`` only)."""

    tokens: torch.Tensor
    grids: Segments | None = None
    kept: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return int(self.tokens.shape[0])


def valid_grids(grids: Sequence[tuple[str, int, int]] | None, n_tokens: int) -> Segments | None:
    """``grids`` if its segments fit in ``n_tokens`` tokens, else None."""
    if not grids:
        return None
    segs = [(str(n), int(h), int(w)) for n, h, w in grids]
    return segs if sum(h * w for _, h, w in segs) <= n_tokens else None


def keep_all(tokens: torch.Tensor, grids: Segments | None, text_embeds: torch.Tensor | None,
             spec: BudgetSpec) -> BudgetResult:
    return BudgetResult(tokens, valid_grids(grids, tokens.shape[0]))


def pool(tokens: torch.Tensor, grids: Segments | None, text_embeds: torch.Tensor | None,
         spec: BudgetSpec) -> BudgetResult:
    n, d = tokens.shape
    x = tokens.float()
    segs = valid_grids(grids, n)
    if segs is None:  # no spatial layout: 1-D windows of stride**2 tokens (or adaptive to h*w)
        seq = x.T.unsqueeze(0)  # [1, D, N]
        if spec.size:
            out = F.adaptive_avg_pool1d(seq, min(n, spec.size[0] * spec.size[1]))
        else:
            win = spec.stride * spec.stride
            out = F.avg_pool1d(seq, win, win, ceil_mode=True)
        return BudgetResult(out[0].T.to(tokens.dtype))
    parts, new_grids, off = [], [], 0
    for name, h, w in segs:
        grid = x[off:off + h * w].T.reshape(1, d, h, w)
        if spec.size:
            y = F.adaptive_avg_pool2d(grid, (min(h, spec.size[0]), min(w, spec.size[1])))
        else:
            y = F.avg_pool2d(grid, spec.stride, spec.stride, ceil_mode=True)
        hh, ww = y.shape[-2:]
        parts.append(y.reshape(d, hh * ww).T)
        new_grids.append((name, int(hh), int(ww)))
        off += h * w
    parts.append(x[off:])
    return BudgetResult(torch.cat(parts).to(tokens.dtype), new_grids)


def topk(tokens: torch.Tensor, grids: Segments | None, text_embeds: torch.Tensor | None,
         spec: BudgetSpec) -> BudgetResult:
    n = tokens.shape[0]
    k = min(int(spec.k or n), n)
    if text_embeds is None or text_embeds.shape[0] == 0:
        raise ValueError("topk token budget needs the prompt's text embeddings")
    sim = F.normalize(tokens.float(), dim=-1) @ F.normalize(text_embeds.float().to(tokens.device), dim=-1).T  # [N, T]
    idx = sim.max(dim=-1).values.topk(k).indices.sort().values
    return BudgetResult(tokens[idx], None, idx)


BUDGETS: dict[str, Callable[..., BudgetResult]] = {"all": keep_all, "pool": pool, "topk": topk}


def apply_budget(tokens: torch.Tensor, spec: BudgetSpec, grids: Sequence[tuple[str, int, int]] | None = None,
                 text_embeds: torch.Tensor | None = None) -> BudgetResult:
    """Apply ``spec`` to one image's tokens ``[N, D]`` of one member."""
    return BUDGETS[spec.kind](tokens, list(grids) if grids else None, text_embeds, spec)


def expected_count(spec: BudgetSpec, n_tokens: int, grids: Sequence[tuple[str, int, int]] | None = None) -> int:
    """The count ``apply_budget`` produces, from the formulas alone (for planning/docs/tests)."""
    if spec.kind == "all":
        return n_tokens
    if spec.kind == "topk":
        return min(int(spec.k or n_tokens), n_tokens)
    segs = valid_grids(grids, n_tokens)
    if segs is None:
        if spec.size:
            return min(n_tokens, spec.size[0] * spec.size[1])
        return math.ceil(n_tokens / spec.stride ** 2)
    covered = sum(h * w for _, h, w in segs)
    if spec.size:
        kept = sum(min(h, spec.size[0]) * min(w, spec.size[1]) for _, h, w in segs)
    else:
        kept = sum(math.ceil(h / spec.stride) * math.ceil(w / spec.stride) for _, h, w in segs)
    return kept + n_tokens - covered


def select_total(scores: Sequence[torch.Tensor], total: int) -> list[torch.Tensor]:
    """Indices (ascending) to keep in each member's tokens so that ``total`` tokens are kept over all
    members: the highest ``scores`` (one ``[N_m]`` tensor per member) win, ties to the earlier token."""
    counts = [int(s.shape[0]) for s in scores]
    if sum(counts) <= total:
        return [torch.arange(n) for n in counts]
    flat = torch.cat([s.float() for s in scores])
    order = torch.argsort(-flat, stable=True)[:total]
    out, off = [], 0
    for n in counts:
        mine = order[(order >= off) & (order < off + n)] - off
        out.append(mine.sort().values)
        off += n
    return out
