"""Encoder registry: name -> :class:`~fuse.encoders.base.Encoder` subclass.

>>> enc = build_encoder("clip", "openai/clip-vit-large-patch14-336")   # hub id or local dir
>>> enc = build_encoder("dinov2", config={...})                         # tiny, random init
>>> feats = enc.features(enc.preprocess(images), layers=[-2])           # [B, 1, 576, 1024]
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import FormatError
from ..state_dict import load_state_dict_strict
from .base import Encoder
from .convnext import ConvNextEncoder
from .vit import ClipEncoder, Dinov2Encoder, SiglipEncoder

ENCODERS: dict[str, type[Encoder]] = {
    "clip": ClipEncoder,
    "siglip": SiglipEncoder,
    "dinov2": Dinov2Encoder,
    "convnext": ConvNextEncoder,
}

# model_type in a config.json -> registry name (for auto-detection)
MODEL_TYPES = {"clip_vision_model": "clip", "clip": "clip", "siglip_vision_model": "siglip", "siglip": "siglip",
               "dinov2": "dinov2", "convnext": "convnext"}


def encoder_class(name: str) -> type[Encoder]:
    try:
        return ENCODERS[name]
    except KeyError:
        raise FormatError(f"unknown encoder {name!r}; known: {', '.join(sorted(ENCODERS))}") from None


def build_encoder(name: str, source: str | os.PathLike | None = None, *, config: Any = None,
                  processor: dict | None = None, pad_square: bool = False,
                  dtype: torch.dtype | None = None, **kwargs: Any) -> Encoder:
    """Build a registered encoder from ``source`` (dir/hub id) or from ``config`` (random init)."""
    cls = encoder_class(name)
    if source is not None:
        return cls.from_pretrained(source, processor=processor, pad_square=pad_square, dtype=dtype, **kwargs)
    if config is None:
        raise ValueError("build_encoder needs a source or a config")
    return cls.from_config(config, processor=processor, pad_square=pad_square, dtype=dtype)


def encoder_from_spec(spec: dict, state_dict: dict[str, torch.Tensor] | None = None,
                      dtype: torch.dtype | None = None) -> Encoder:
    """Rebuild an encoder saved with :meth:`Encoder.spec` (+ its ``model`` state dict)."""
    enc = encoder_class(spec["kind"]).from_config(spec["config"], processor=spec.get("processor"),
                                                  pad_square=spec.get("pad_square", False))
    if state_dict is not None:
        load_state_dict_strict(enc.model, state_dict, f"{spec['kind']} encoder", "weights and its spec")
    if dtype is not None:
        enc.model.to(dtype)
    return enc


__all__ = ["ENCODERS", "MODEL_TYPES", "Encoder", "build_encoder", "encoder_class", "encoder_from_spec",
           "ClipEncoder", "SiglipEncoder", "Dinov2Encoder", "ConvNextEncoder"]
