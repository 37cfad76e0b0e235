"""MiniGemini's aux feature map and "patch info mining" (windowed cross-attention).

- :func:`concat_stage_maps`: the ConvNeXt's 4 stage outputs, stages 1..3 upsampled
  (bilinear, ``align_corners=False``, computed in float32) to stage-0 resolution and
  concatenated on channels: ``[B, sum(C_s), H0, W0]`` (192+384+768+1536 = 2880 for
  ConvNeXt-L at 768 px -> 192x192).
- :func:`window_tokens`: cut that map into the ``g x g`` windows under each query
  token of the ``g x g`` CLIP grid: ``[B, g*g, p*p, C]`` with ``p = H0 / g`` (8 for MGM).
- :class:`PatchInfoMining`: every CLIP patch token ``x_i`` attends over its own window:
  ``q = Lin(LN(x_i))``, ``k = Lin(LN(w))``, ``v = Lin'(LN'(w))``,
  ``m_i = mean_over_the_query(softmax(q k^T / sqrt(D)) v)``; the branch adds ``m_i``
  to ``x_i``. Module names mirror the checkpoint's ``vlm_uni_{query,aux,val}_projector.{0=LN,1=Linear}``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def concat_stage_maps(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[B, C_s, H_s, W_s]`` per stage -> ``[B, sum C_s, H_0, W_0]`` (stage 0 kept as is)."""
    size = maps[0].shape[-2:]
    out = [maps[0]]
    for m in maps[1:]:
        out.append(F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False).to(m.dtype))
    return torch.cat(out, dim=1)


def window_tokens(aux: torch.Tensor, grid: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, grid*grid, p*p, C]``: row-major windows, row-major pixels inside.

    ``H`` and ``W`` must be equal and divisible by ``grid``.
    """
    b, c, h, w = aux.shape
    if h != w or h % grid:
        raise ValueError(f"aux feature map {h}x{w} cannot be cut into {grid}x{grid} equal windows")
    p = h // grid
    x = aux.permute(0, 2, 3, 1).reshape(b, grid, p, grid, p, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, grid * grid, p * p, c)


def _ln_linear(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, d_out))


class PatchInfoMining(nn.Module):
    """Windowed cross-attention from low-res CLIP tokens to high-res ConvNeXt pixels.

    Args:
        query_dim: CLIP width ``D`` (1024); also the output width.
        aux_dim: channels of the concatenated aux map (2880).
    """

    def __init__(self, query_dim: int, aux_dim: int):
        super().__init__()
        self.query_dim, self.aux_dim = query_dim, aux_dim
        self.query_projector = _ln_linear(query_dim, query_dim)
        self.aux_projector = _ln_linear(aux_dim, query_dim)
        self.val_projector = _ln_linear(aux_dim, query_dim)

    def forward(self, tokens: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        """``tokens [B, g*g, D]``, ``aux [B, C, H, W]`` -> mined features ``[B, g*g, D]``.

        The caller adds the result to ``tokens`` (MGM: ``x + mining(x, aux)``).
        """
        grid = round(tokens.shape[1] ** 0.5)
        if grid * grid != tokens.shape[1]:
            raise ValueError(f"patch info mining needs a square token grid, got {tokens.shape[1]} tokens")
        win = window_tokens(aux.to(tokens.dtype), grid)               # [B, N, P, C]
        q = self.query_projector(tokens)                               # [B, N, D]
        k = self.aux_projector(win)                                    # [B, N, P, D]
        v = self.val_projector(win)                                    # [B, N, P, D]
        att = q.unsqueeze(2) @ (k.transpose(-1, -2) / k.shape[-1] ** 0.5)  # [B, N, 1, P]
        att = att.nan_to_num()
        return (att.softmax(-1) @ v).mean(2)                           # [B, N, D]
