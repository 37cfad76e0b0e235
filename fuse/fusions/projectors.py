"""Projector registry: LLaVA-style ``mm_projector_type`` strings -> nn.Module builders.

Module names follow LLaVA's original layout (``nn.Sequential``: ``0`` = first
Linear, ``2`` = second Linear for ``mlp2x_gelu``), so original checkpoints load
by stripping their prefix and transformers' ``linear_1/linear_2`` are renamed
to ``0/2``.
"""

from __future__ import annotations

import re
from typing import Callable

from torch import nn

from ..errors import FormatError


def _linear(d_in: int, d_out: int, bias: bool = True) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, d_out, bias=bias))


def _identity(d_in: int, d_out: int, bias: bool = True) -> nn.Module:
    if d_in != d_out:
        raise FormatError(f"identity projector needs equal widths, got {d_in} -> {d_out}")
    return nn.Identity()


def _mlp_gelu(depth: int) -> Callable[..., nn.Module]:
    def build(d_in: int, d_out: int, bias: bool = True) -> nn.Module:
        layers: list[nn.Module] = [nn.Linear(d_in, d_out, bias=bias)]
        for _ in range(1, depth):
            layers += [nn.GELU(), nn.Linear(d_out, d_out, bias=bias)]
        return nn.Sequential(*layers)
    return build


PROJECTORS: dict[str, Callable[..., nn.Module]] = {"linear": _linear, "identity": _identity}


def build_projector(kind: str, d_in: int, d_out: int, bias: bool = True) -> nn.Module:
    """``linear`` | ``identity`` | ``mlp{N}x_gelu`` -> module mapping ``[.., d_in] -> [.., d_out]``."""
    if kind in PROJECTORS:
        return PROJECTORS[kind](d_in, d_out, bias)
    if m := re.fullmatch(r"mlp(\d+)x_gelu", kind):
        return _mlp_gelu(int(m[1]))(d_in, d_out, bias)
    raise FormatError(f"unknown projector type {kind!r}; known: linear, identity, mlpNx_gelu")
