"""Building a fusion for training: the modules of :mod:`fuse.fusions` built from a training config.

The modules themselves live in ``fuse`` (a trained model is a ``fuse`` Member and its
vision branch runs the same code at inference); this module turns a
:class:`~train.config.TrainConfig` into encoders + a :class:`~fuse.members.comm.CommBranch`,
and names the trainable parameter groups.

Registered fusion types (``fuse.fusions.FUSIONS``): comm, clip, mean_half, mean_all, layerscale,
lln_layerscale, conv_layerscale, a_mof, i_mof, channel_concat. Adding a variant = one
``@register_fusion`` class in :mod:`fuse.fusions.modules`.
"""

from __future__ import annotations

import torch

from fuse.dtypes import torch_dtype
from fuse.encoders import Encoder, build_encoder
from fuse.errors import RecipeError
from fuse.fusions import FusionSpec, build_fusion, fusion_class, make_spec
from fuse.members.comm import CommBranch

from .config import EncoderConfig, TrainConfig

def encoder_dtype(name: str, on_gpu: bool) -> torch.dtype:
    """``auto`` -> bf16 on GPU, float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return torch_dtype(name)


def build_encoder_from_config(role: str, cfg: EncoderConfig, on_gpu: bool = False) -> Encoder:
    """A frozen encoder (eval, no grad) from its config entry."""
    kind = cfg.kind or role
    proc = None
    if cfg.image_size:
        s = int(cfg.image_size)
        proc = {"size": {"shortest_edge": s}, "crop_size": {"height": s, "width": s}}
        if kind in ("siglip",):
            proc = {"size": {"height": s, "width": s}}
    dtype = encoder_dtype(cfg.dtype, on_gpu)
    enc = build_encoder(kind, cfg.source, config=cfg.config, processor=proc, pad_square=cfg.pad_square, dtype=dtype)
    enc.requires_grad_(False)
    return enc.eval()


def roles_needed(cfg: TrainConfig) -> list[str]:
    """Encoder roles the configured fusion consumes."""
    cls = fusion_class(cfg.fusion.type)
    if cls.roles:
        return list(cls.roles)
    return [cfg.fusion.encoder or (next(iter(cfg.fusion.layers)) if cfg.fusion.layers else "clip")]


def fusion_spec_from_config(cfg: TrainConfig, encoders: dict[str, Encoder], llm_hidden: int) -> FusionSpec:
    f = cfg.fusion
    opts = dict(mlp_depth=f.mlp_depth, mlp_ratio=f.mlp_ratio, concat=f.concat, width=f.width, alpha=f.alpha,
                conv_kernel=f.conv_kernel)
    if not fusion_class(f.type).roles:
        opts["encoder"] = roles_needed(cfg)[0]
    try:
        return make_spec(f.type, encoders, llm_hidden, layers=f.layers or None, projector=f.projector, **opts)
    except Exception as e:  # FormatError from the spec builder -> a config error
        from fuse.errors import FuseError

        if isinstance(e, FuseError):
            raise RecipeError(f"fusion: {e}") from None
        raise


def build_branch(cfg: TrainConfig, llm_hidden: int, on_gpu: bool = False) -> CommBranch:
    """Encoders (frozen, from ``cfg.encoders``) + a freshly initialised fusion module."""
    roles = roles_needed(cfg)
    missing = [r for r in roles if r not in cfg.encoders]
    if missing:
        raise RecipeError(f"fusion {cfg.fusion.type!r} needs encoders {roles}; the config has no "
                          f"encoders.{missing[0]} (have: {', '.join(cfg.encoders) or 'none'})")
    encoders = {r: build_encoder_from_config(r, cfg.encoders[r], on_gpu) for r in roles}
    spec = fusion_spec_from_config(cfg, encoders, llm_hidden)
    sources = {r: cfg.encoders[r].source for r in roles}
    return CommBranch(encoders, build_fusion(spec), sources)


def trainable_prefixes(groups: list[str]) -> tuple[str, ...]:
    """Parameter-name prefixes (of :class:`train.model.CommModel`) of the trainable groups."""
    table = {"fusion": "fusion.", "llm": "llm."}
    return tuple(table[g] for g in groups)


__all__ = ["build_branch", "build_encoder_from_config", "encoder_dtype", "fusion_spec_from_config", "roles_needed",
           "trainable_prefixes"]
