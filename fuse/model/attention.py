"""Capturing attention from chosen text positions to each member's visual tokens.

Used by :meth:`fuse.model.FusedModel.capture_attention` (and through it by
``analysis attention``): :func:`capture` runs the prepared samples one at a time.
Attention probabilities only exist with the ``eager`` attention implementation, so
the LLM is switched to eager for the capture forward pass and switched back afterwards. Forward hooks sit only on the
requested layers' ``self_attn`` modules; each hook slices the weights it needs
(query rows x member key spans) at once, so the full ``[B, H, L, L]`` matrices
of other layers are never kept.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from ..errors import FuseError


@dataclass
class SampleAttention:
    """Attention of one sample.

    Coordinates are positions in this sample's unpadded sequence.

    - ``query_positions``: the Q query positions whose attention was kept;
    - ``spans``: segment name -> (start, end): ``text_before``, each member name, ``sep:<member>``, ``text_after``
      and, with ``query="answer"``, ``answer``;
    - ``grids``: member -> its kept tokens' grid segments ``[(name, h, w), ...]`` (None when not a grid,
      e.g. after ``topk``); ``kept``: member -> indices of the kept tokens among the member's original
      tokens (``topk`` only, else None); ``raw_grids``: member -> the branch's grid before any budget;
    - ``weights[layer][member]``: attention probabilities ``[H, Q, N_member]`` (float32, CPU);
    - ``answer``/``answer_ids``: the greedy answer when ``query="answer"``.
    """

    query_positions: list[int]
    spans: dict[str, tuple[int, int]]
    grids: dict[str, list | None]
    kept: dict[str, torch.Tensor | None]
    raw_grids: dict[str, list | None]
    weights: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    answer: str | None = None
    answer_ids: list[int] | None = None

    def member_share(self, layers: Sequence[int] | None = None) -> dict[str, float]:
        """Share of attention mass each member's span receives (mean over layers, heads, queries)."""
        layers = list(self.weights) if layers is None else list(layers)
        out = {}
        for m in next(iter(self.weights.values())):
            out[m] = float(torch.stack([self.weights[l][m].sum(-1).mean() for l in layers]).mean())
        return out

    def member_map(self, member: str, layers: Sequence[int] | None = None) -> torch.Tensor:
        """Attention over the member's tokens ``[N_member]``, averaged over layers, heads and queries."""
        layers = list(self.weights) if layers is None else list(layers)
        return torch.stack([self.weights[l][member].mean(dim=(0, 1)) for l in layers]).mean(0)


@dataclass
class AttentionCapture:
    """Result of ``FusedModel.capture_attention``: ``layers`` (non-negative indices, ascending),
    ``members`` (visual-token order) and one :class:`SampleAttention` per input."""

    layers: list[int]
    members: list[str]
    samples: list[SampleAttention]


def llm_layer_indices(layers: int | Sequence[int] | None, n_layers: int) -> list[int]:
    """None -> all layers; negative indices count from the end; errors name the valid range."""
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, int):
        layers = [layers]
    return sorted({index_from_end(l, n_layers, f"layers: {l} is out of range for an LLM with {n_layers} layers")
                   for l in layers})


def index_from_end(i: int, n: int, error: str) -> int:
    """``i`` in ``[-n, n)`` as an index in ``[0, n)`` (negatives count from the end); FuseError(``error``)
    otherwise."""
    j = int(i) + n if int(i) < 0 else int(i)
    if not 0 <= j < n:
        raise FuseError(error)
    return j


def decoder_layers(llm) -> Sequence[torch.nn.Module]:
    """The decoder blocks of a causal LM (``model.layers`` for LLaMA-style models)."""
    base = llm.get_decoder() if hasattr(llm, "get_decoder") else llm.model
    return base.layers


@contextlib.contextmanager
def eager_attention(llm) -> Iterator[None]:
    """Temporarily switch ``llm`` to eager attention (the only one that returns probabilities)."""
    previous = llm.config._attn_implementation
    if previous == "eager":
        yield
        return
    llm.set_attn_implementation("eager")
    try:
        yield
    finally:
        llm.set_attn_implementation(previous)


@contextlib.contextmanager
def record_attention(llm, layers: list[int], query_positions: torch.Tensor,
                     key_spans: dict[str, tuple[int, int]]) -> Iterator[dict[int, dict[str, torch.Tensor]]]:
    """Hook ``layers`` of ``llm`` (batch of ONE sequence) and collect ``[H, Q, N_span]`` per key span.

    Yields the dict that the hooks fill during the forward pass run inside the context.
    """
    store: dict[int, dict[str, torch.Tensor]] = {}
    blocks = decoder_layers(llm)
    handles = []

    def make_hook(idx: int):
        def hook(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise RuntimeError("attention weights not returned: the LLM is not running eager attention")
            rows = weights[0, :, query_positions.to(weights.device), :]  # [H, Q, L]
            store[idx] = {name: rows[..., s:e].detach().float().cpu().clone() for name, (s, e) in key_spans.items()}
        return hook

    try:
        for i in layers:
            handles.append(blocks[i].self_attn.register_forward_hook(make_hook(i)))
        with eager_attention(llm):
            yield store
    finally:
        for h in handles:
            h.remove()


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the needed layer has run."""


@torch.no_grad()
def last_position_attention(llm, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                            position_ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Attention probabilities of each sequence's last position over all positions in decoder layer
    ``layer``, averaged over heads: ``[B, L]``. Layers after ``layer`` are not run (the forward stops
    there), so the cost is ``layer + 1`` decoder layers over the sequence."""
    blocks = decoder_layers(llm)
    idx = llm_layer_indices(layer, len(blocks))[0]
    store: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise RuntimeError("attention weights not returned: the LLM is not running eager attention")
        store["w"] = weights[:, :, -1, :].float().mean(1)  # [B, L]
        raise _StopForward

    handle = blocks[idx].self_attn.register_forward_hook(hook)
    try:
        with eager_attention(llm):
            llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return store["w"]
def query_positions(query: Any, n: int, spans: dict[str, tuple[int, int]], n_answer: int) -> list[int]:
    """The attending positions of one sample of ``n`` prompt tokens (see ``capture_attention``'s ``query``);
    ``n_answer``: greedy answer tokens appended after the prompt."""
    if query == "last":
        return [n - 1]
    if query == "answer":
        return [n - 1] + list(range(n, n + max(n_answer - 1, 0)))
    if query == "text_after":
        s, e = spans["text_after"]
        if e <= s:
            raise FuseError("query 'text_after': this prompt has no text after the image")
        return list(range(s, e))
    if isinstance(query, str):
        raise FuseError(f"query {query!r}: expected 'last', 'answer', 'text_after' or a list of positions")
    return [index_from_end(p, n, f"query position {p} is outside the prompt of {n} tokens") for p in query]


def capture(model: Any, inputs: Any, layers: list[int], query: Any, answers: list[list[int]]) -> AttentionCapture:
    """Attention of every sample of ``inputs`` (the fused model's prepared batch) to each member's tokens.

    Each sample runs alone, unpadded, through ``model.llm`` with ``layers`` hooked; ``answers[b]``: greedy
    answer ids appended after sample b's prompt (``query="answer"``), else empty."""
    asm = inputs.assembled
    samples = []
    for b, (n, pad) in enumerate(zip(asm.lengths, asm.pad)):
        emb = asm.inputs_embeds[b:b + 1, pad:]
        pos = asm.position_ids[b:b + 1, pad:]
        spans = {k: (s - pad, e - pad) for k, (s, e) in asm.spans[b].items()}
        q = query_positions(query, n, spans, len(answers[b]))
        if answers[b]:
            extra = model.embed_ids(answers[b]).unsqueeze(0).to(emb.dtype)
            emb = torch.cat([emb, extra], 1)
            pos = torch.cat([pos, pos[:, -1:] + 1 + torch.arange(len(answers[b]), device=pos.device)], 1)
            spans["answer"] = (n, n + len(answers[b]))
        key_spans = {m: spans[m] for m in model.member_names}
        with record_attention(model.llm, layers, torch.tensor(q, dtype=torch.long), key_spans) as store:
            model.llm(inputs_embeds=emb, position_ids=pos, use_cache=False)
        samples.append(SampleAttention(
            query_positions=q, spans=spans, grids=inputs.grids[b], kept=inputs.kept[b],
            raw_grids=inputs.raw_grids[b], weights={l: store[l] for l in layers},
            answer=model.decode(answers[b]) if query == "answer" else None,
            answer_ids=answers[b] if query == "answer" else None))
    return AttentionCapture(layers=layers, members=model.member_names, samples=samples)

