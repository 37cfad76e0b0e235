"""Images -> each member's visual tokens, after its token budget (the fused model's ``get_image_features``).

Every branch preprocesses the images with its own transform and runs batched; text-aware branches
(SliME) also get per-image prompt embeddings. Each image's tokens ``[N_m, D]`` are moved to the LLM's
device and dtype and reduced by the member's token budget (:mod:`fuse.model.budget`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from PIL import Image

from ..errors import NumericsError
from ..members import VisionBranch
from .budget import BudgetResult, apply_budget
from .options import BudgetSpec


@dataclass
class EncodedImages:
    """``budgeted[member][i]``: image i's tokens after the budget (``[N, D]`` in the LLM's dtype and device,
    with their grid layout / kept indices, see :class:`~fuse.model.budget.BudgetResult`);
    ``raw_counts``/``raw_grids``: each member's token count and grid before the budget;
    ``seconds``: time spent in each member's branch."""

    budgeted: dict[str, list[BudgetResult]]
    raw_counts: dict[str, list[int]]
    raw_grids: dict[str, list]
    seconds: dict[str, float]


def to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """A preprocessed batch on ``device``; floating tensors in ``dtype`` (the branch's)."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
        out[k] = v
    return out


def encode_images(branches: Mapping[str, VisionBranch], images: Sequence[Image.Image],
                  budgets: Mapping[str, BudgetSpec], text_embeds: Sequence[torch.Tensor | None],
                  question_embeds: Sequence[torch.Tensor | None], dtype: torch.dtype,
                  device: torch.device) -> EncodedImages:
    """Run every branch over ``images`` (one batch per branch) and apply each member's budget.

    ``text_embeds[i]``: ``[T, D]`` prompt embeddings for branches with ``needs_text``; ``question_embeds[i]``:
    what a ``topk`` budget scores tokens against (None when no budget needs it). NaN/Inf visual tokens
    are a :class:`~fuse.errors.NumericsError` naming the member."""
    out = EncodedImages({}, {}, {}, {})
    for name, branch in branches.items():
        t0 = time.perf_counter()
        batch = to_device(branch.preprocess(images), branch.device, branch.dtype)
        te = [e.to(branch.device, branch.dtype) for e in text_embeds] if branch.needs_text else None
        toks = branch(batch, text_embeds=te)
        if not all(bool(torch.isfinite(t).all()) for t in toks):
            raise NumericsError(f"member {name!r}: its vision branch produced NaN/Inf visual tokens "
                                f"(NaN/Inf in its weights, or overflow in {branch.dtype}); no answer is possible")
        grids = branch.token_grids(batch) or [None] * len(images)
        out.seconds[name] = time.perf_counter() - t0
        out.raw_counts[name] = [int(t.shape[0]) for t in toks]
        out.raw_grids[name] = list(grids)
        out.budgeted[name] = [apply_budget(t.to(device, dtype), budgets[name], g, qe)
                              for t, g, qe in zip(toks, grids, question_embeds)]
    return out


__all__ = ["EncodedImages", "encode_images", "to_device"]
