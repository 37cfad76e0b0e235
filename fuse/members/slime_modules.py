"""SliME's learned pieces and its text-guided token selection.

- :class:`Resampler`: one cross-attention layer from ``grid**2`` learned queries (+ fixed
  2-D sin-cos positions) to a square token map (keys get the position table bicubically
  resized to the map's side). Checkpoint names: ``pos_embed``, ``query``,
  ``attn.{in_proj_weight,in_proj_bias,out_proj.*}`` (``nn.MultiheadAttention``),
  ``ln_q``, ``ln_kv``, ``ln_post`` (LayerNorm eps 1e-6).
- :class:`GatedProjector` (``mm_projector_type: gated``): two experts - the plain
  mlp2x_gelu ``projection`` and ``projection(attn(x))`` (576-query resampler) - mixed per
  token by ``softmax(x @ w_gate)`` (top-k over the 2 experts, renormalised with +1e-6).
  ``w_noise``, ``mean``, ``std`` are only used in training (noisy gating) but are kept.
- :class:`LocalSampler` (``model.sampler``): ``post_qformer`` compresses each local crop's
  576 CLIP tokens to ``mm_resampler_dim`` (144) tokens.
- :func:`text_relevance` + :func:`cumulative_mass_cut`: each projected local token is scored
  by the *sum* over prompt tokens of its cosine similarity with their embeddings; scores are
  softmaxed (temperature ``mm_resampler_temp``), sorted, and the top tokens are kept while
  the cumulative mass stays <= ``top_p`` (0.95), plus one more; kept tokens stay in their
  original (spatial) order. All of it in the branch's dtype, as SliME's ``TextGuidedSampler``
  computes it in the model's (fp16/bf16 in its evaluation): the rounding of the scores, of the
  softmax, of the cumulative sum and of ``top_p`` itself (0.95 is 0.9502 in fp16, 0.9492 in bf16)
  decides where the cut falls, so a float32 cut keeps a different set on a good share of images.
  ``LocalSampler(selection_dtype=torch.float32)`` is the float32 variant, as an option.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """2-D sin-cos position table ``[grid*grid, dim]`` (first half encodes the column index)."""
    if dim % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}")

    def one_d(d: int, pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1, 1).double() * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([one_d(dim // 2, xs), one_d(dim // 2, ys)], dim=1).float()


def resize_positions(pos: torch.Tensor, side: int) -> torch.Tensor:
    """``[g*g, D]`` table -> ``[side*side, D]`` (bicubic, ``align_corners=False``, in float32)."""
    g = round(pos.shape[0] ** 0.5)
    grid = pos.float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
    out = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(side * side, -1).to(pos.dtype)


class Resampler(nn.Module):
    """``[N, L, D]`` (L a square number) -> ``[N, grid**2, D]``."""

    def __init__(self, grid: int, dim: int, num_heads: int):
        super().__init__()
        self.grid, self.dim, self.num_heads = grid, dim, num_heads
        self.pos_embed = nn.Parameter(sincos_2d(dim, grid), requires_grad=False)
        self.query = nn.Parameter(0.02 * torch.randn(grid * grid, dim))
        self.attn = nn.MultiheadAttention(dim, num_heads)
        self.ln_q = nn.LayerNorm(dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        side = math.isqrt(length)
        if side * side != length:
            raise ValueError(f"resampler input must be a square token map, got {length} tokens")
        key_pos = resize_positions(self.pos_embed.detach(), side)              # [L, D]
        kv = self.ln_kv(x).transpose(0, 1)                                     # [L, N, D]
        q = self.ln_q(self.query)[:, None].expand(-1, n, -1) + self.pos_embed.detach()[:, None]
        out = self.attn(q, kv + key_pos[:, None], kv, need_weights=False)[0]   # [Q, N, D]
        return self.ln_post(out.transpose(0, 1))                               # [N, Q, D]


class GatedProjector(nn.Module):
    """SliME's ``gated`` projector: ``[N, L, D] -> [N, L, D_llm]`` (L = grid**2 for mixing)."""

    num_experts = 2
    top_k = 2

    def __init__(self, mm_hidden: int, llm_hidden: int, grid: int, num_heads: int, learnable_gated: int = -1):
        super().__init__()
        self.attn = Resampler(grid, mm_hidden, num_heads)
        self.projection = nn.Sequential(nn.Linear(mm_hidden, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden))
        self.w_gate = nn.Parameter(torch.zeros(mm_hidden, self.num_experts))
        self.w_noise = nn.Parameter(torch.zeros(mm_hidden, self.num_experts))  # training-only (noisy gating)
        self.register_buffer("mean", torch.tensor([0.0]))
        self.register_buffer("std", torch.tensor([1.0]))
        self.learnable_gated = learnable_gated

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token expert weights ``[..., 2]`` (inference gating: no noise)."""
        probs = (x @ self.w_gate.to(x.dtype)).softmax(-1)
        top, idx = probs.topk(min(self.top_k + 1, self.num_experts), dim=-1)
        top, idx = top[..., :self.top_k], idx[..., :self.top_k]
        top = top / (top.sum(-1, keepdim=True) + 1e-6)
        return torch.zeros_like(probs).scatter(-1, idx, top)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        experts = [self.projection(x), self.projection(self.attn(x))]
        if self.learnable_gated >= 0:
            return experts[self.learnable_gated]
        gates = self.gates(x)                                                   # [N, L, 2]
        return (torch.stack(experts, dim=-1) @ gates.unsqueeze(-1)).squeeze(-1)


class LocalSampler(nn.Module):
    """``model.sampler``: per-crop compression (``post_qformer``) + text-guided selection settings."""

    def __init__(self, mm_hidden: int, num_queries: int, num_heads: int, top_p: float = 0.95,
                 temperature: float = 1.0, selection_dtype: torch.dtype | None = None):
        super().__init__()
        grid = math.isqrt(num_queries)
        if grid * grid != num_queries:
            raise ValueError(f"mm_resampler_dim must be a square number, got {num_queries}")
        self.post_qformer = Resampler(grid, mm_hidden, num_heads)
        self.top_p, self.temperature = top_p, temperature
        self.selection_dtype = selection_dtype  # None: the local tokens' dtype (the branch's), as SliME

    @property
    def grid(self) -> int:
        return self.post_qformer.grid

    def compress(self, crops: torch.Tensor) -> torch.Tensor:
        """``[n, L, D]`` crop features -> ``[n, grid**2, D]``."""
        return self.post_qformer(crops)

    def select(self, local: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Indices (ascending) of the local tokens ``[M, D_llm]`` kept for prompt ``text [T, D_llm]``,
        computed in ``selection_dtype`` (default: ``local``'s dtype)."""
        dt = self.selection_dtype or local.dtype
        return cumulative_mass_cut(text_relevance(local.to(dt), text.to(dt)), self.top_p, self.temperature)


def text_relevance(local: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``[M]``: sum over the ``T`` prompt tokens of cosine(local token, text token), in the inputs' dtype."""
    sim = F.cosine_similarity(local[:, None], text.to(local.dtype)[None], dim=-1)  # [M, T]
    return sim.sum(-1)


def cumulative_mass_cut(scores: torch.Tensor, top_p: float = 0.95, temperature: float = 1.0) -> torch.Tensor:
    """Keep the most probable tokens while their cumulative softmax mass is <= ``top_p``, plus one.

    Softmax, sort, cumulative sum and the comparison run in ``scores``' dtype. Returns the kept
    indices in ascending order (so spatial order is preserved).
    """
    probs = (scores / temperature).softmax(-1)
    sorted_p, order = torch.sort(probs, descending=True)
    k = int((sorted_p.cumsum(0) <= top_p).sum())
    keep = order[:k + 1] if k < order.numel() else order
    return keep.sort().values
