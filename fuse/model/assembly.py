"""Building the LLM input of a fused model from text segments and member visual tokens.

One sample is a list of :class:`Segment` in sequence order (:func:`assemble_inputs` builds them)::

    [text before <image>][member 1 tokens][separator?][member 2 tokens]...[text after <image>]

:func:`assemble` left-pads a batch of samples into ``inputs_embeds [B, L, D]``,
``attention_mask [B, L]`` (1 = real token) and ``position_ids [B, L]``. Position ids
follow each segment's offsets (text: 0, 1, 2...; visual spans: their scheme, see
:mod:`fuse.model.positions`); padding positions are 0. Spans are reported in
padded coordinates as ``name -> (start, end)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from .budget import BudgetResult
from .options import PositionSpec
from .positions import positions_used, span_offsets


@dataclass
class Segment:
    """A run of tokens: ``embeds [n, D]``, position ``offsets [n]`` (long, from 0)."""

    name: str  # "text_before", "text_after", a member name, or "sep:<member>"
    kind: str  # "text" | "visual" | "sep"
    embeds: torch.Tensor
    offsets: torch.Tensor | None = None  # None = sequential
    width: int | None = None  # positions the piece occupies; None = max(offsets) + 1

    def __post_init__(self) -> None:
        if self.offsets is None:
            self.offsets = torch.arange(self.embeds.shape[0])

    @property
    def positions(self) -> int:
        """How many position ids the piece consumes (the next piece starts after them)."""
        return self.width if self.width is not None else positions_used(self.offsets)

    @property
    def length(self) -> int:
        return int(self.embeds.shape[0])


@dataclass
class Assembled:
    """A left-padded batch. ``spans[b][name] = (start, end)`` in padded coordinates."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    spans: list[dict[str, tuple[int, int]]] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # unpadded length per sample
    n_positions: list[int] = field(default_factory=list)  # position ids used per sample (max + 1)

    @property
    def pad(self) -> list[int]:
        """Left padding per sample."""
        return [self.inputs_embeds.shape[1] - n for n in self.lengths]


def sample_positions(segments: list[Segment], parallel: bool = False) -> torch.Tensor:
    """Position ids ``[n]`` of one unpadded sample: each segment starts after the previous one's last position.

    ``parallel``: the members' visual segments (the run between the text before and the text after the
    image) all end at the same position instead of following each other: each member's span is
    right-aligned to the widest one, and the text after the image starts right after it. Every member
    then sees the question at the distance (and the question sits at the positions) it was trained with
    alone, whatever the number of members; the causal order of the tokens is unchanged.
    """
    out, base = [], 0
    width = max((p.positions for p in segments if p.kind != "text"), default=0) if parallel else 0
    in_block = False
    for p in segments:
        if parallel and p.kind != "text":
            if p.length:
                out.append(base + (width - p.positions) + p.offsets.to(torch.long))
            in_block = True
            continue
        if in_block:
            base, in_block = base + width, False
        if p.length:
            out.append(base + p.offsets.to(torch.long))
        base += p.positions
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def assemble(samples: list[list[Segment]], parallel: bool = False) -> Assembled:
    """Concatenate each sample's segments and left-pad the batch (pads: zero embedding, mask 0, position 0).
    ``parallel``: position ids of :func:`sample_positions` with members in parallel."""
    if not samples:
        raise ValueError("no samples to assemble")
    ref = next(p.embeds for s in samples for p in s if p.length)
    dim, dtype, device = ref.shape[-1], ref.dtype, ref.device
    lengths = [sum(p.length for p in s) for s in samples]
    total = max(lengths)
    b = len(samples)
    embeds = torch.zeros(b, total, dim, dtype=dtype, device=device)
    mask = torch.zeros(b, total, dtype=torch.long, device=device)
    pos = torch.zeros(b, total, dtype=torch.long, device=device)
    spans, n_pos = [], []
    for i, segments in enumerate(samples):
        start = total - lengths[i]
        cur, sp = start, {}
        for p in segments:
            embeds[i, cur:cur + p.length] = p.embeds.to(dtype=dtype, device=device)
            sp[p.name] = (cur, cur + p.length)
            cur += p.length
        mask[i, start:] = 1
        sample_pos = sample_positions(segments, parallel)
        pos[i, start:] = sample_pos.to(device)
        spans.append(sp)
        n_pos.append(int(sample_pos.max()) + 1 if sample_pos.numel() else 0)
    return Assembled(embeds, mask, pos, spans, lengths, n_pos)


def assemble_inputs(text_ids: Sequence[tuple[list[int], list[int]]], embed: Callable[[list[int]], torch.Tensor],
                    visual: Mapping[str, Sequence[BudgetResult]], positions: Mapping[str, PositionSpec],
                    separators: Sequence[int | None],
                    kept: Sequence[Mapping[str, torch.Tensor]] | None = None, parallel: bool = False) -> Assembled:
    """The LLM input of a batch: per sample ``[text before][member 1][sep?][member 2]...[text after]``.

    ``text_ids[i]``: the token ids before / after the image placeholder; ``embed(ids) -> [n, D]``: the
    LLM's token embeddings; ``visual[member][i]``: sample i's budgeted tokens, members in visual-token
    order; ``positions[member]``: its position scheme; ``separators[j]``: the token id inserted after
    member ``j`` (None: nothing). ``kept[i][member]``: with a total token cap, the indices of sample i's
    budgeted tokens that stay; they keep their own position ids and the member's span keeps its width,
    so the text after the image sits where it would without the cap. ``parallel``: the members' spans
    share position ids (:func:`sample_positions`)."""
    samples = []
    for i, (before, after) in enumerate(text_ids):
        text_emb = embed(before + after)  # one lookup per sample
        segments = [Segment("text_before", "text", text_emb[:len(before)])]
        for j, (name, per_sample) in enumerate(visual.items()):
            res = per_sample[i]
            offsets = span_offsets(res.count, positions[name], res.grids)
            if kept is None:
                segments.append(Segment(name, "visual", res.tokens, offsets))
            else:
                idx = kept[i][name]
                width = int(offsets.max()) + 1 if res.count else 0
                segments.append(Segment(name, "visual", res.tokens[idx], offsets[idx], width=width))
            if separators[j] is not None:
                segments.append(Segment(f"sep:{name}", "sep", embed([separators[j]])))
        segments.append(Segment("text_after", "text", text_emb[len(before):]))
        samples.append(segments)
    return assemble(samples, parallel)

