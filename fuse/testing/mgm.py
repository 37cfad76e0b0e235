"""Tiny MiniGemini (``MGMLlamaForCausalLM``) checkpoints in the real on-disk key layout.

Keys written (the real MGM-8B categories, sizes shrunk):

- ``model.embed_tokens.weight``, ``model.layers.N.*``, ``model.norm.weight``, ``lm_head.weight``
  (the base LLM + a seeded delta);
- ``model.vision_tower.vision_tower.vision_model.*`` (CLIP, hidden 128, 2 layers, 56 px / 14 = 4x4 grid);
- ``model.vision_tower_aux.vision_stem.{0,1}.*``, ``model.vision_tower_aux.vision_stages.{0..3}.*``
  (timm-named ConvNeXt, depths 2/1/3/1, dims 8/16/24/32 -> 80 aux channels; no head norm, like MGM);
- ``model.vlm_uni_{query,aux,val}_projector.{0,1}.*`` (patch info mining);
- ``model.mm_projector.{0,2}.*`` (mlp2x_gelu).

Aux input ``image_size_aux`` = 64 (16x16 stage-0 map = 4x4 windows of 4x4 pixels under the
4x4 CLIP grid: the 24x24-windows-of-8x8 layout of the real model, scaled down); HD doubles it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..encoders.convnext import hf_to_timm_key
from .builders import _save, finetuned_llm_state
from .tokenizer import tiny_tokenizer

# Tiny CLIP whose sizes follow OpenAI CLIP's rule heads = hidden / 64 (so shape inference recovers it).
TINY_MM_CLIP = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                    image_size=56, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32)
TINY_CONVNEXT = dict(depths=[2, 1, 3, 1], hidden_sizes=[8, 16, 24, 32], patch_size=4, layer_norm_eps=1e-6,
                     hidden_act="gelu")
TINY_MGM_AUX_SIZE = 64
CLIP_PREFIX = "model.vision_tower.vision_tower."
AUX_PREFIX = "model.vision_tower_aux."


def jitter_(state: dict[str, torch.Tensor], seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """Add seeded noise to 1-D tensors (LayerNorm weights/biases, layer scales, biases) in place,
    so tests notice a wrongly applied norm or bias (fresh inits are all 1s/0s)."""
    g = torch.Generator().manual_seed(seed)
    for k, t in state.items():
        if t.is_floating_point() and t.dim() <= 1:
            state[k] = t + scale * torch.randn(t.shape, generator=g)
    return state


def tiny_clip_state(seed: int, prefix: str = CLIP_PREFIX, **over) -> dict[str, torch.Tensor]:
    """A tiny CLIPVisionModel's weights under ``prefix + "vision_model."`` (hub naming)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    model = CLIPVisionModel(CLIPVisionConfig(**{**TINY_MM_CLIP, **over}))
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("position_ids"):
            continue  # not persisted in real checkpoints
        bare = k[len("vision_model."):] if k.startswith("vision_model.") else k
        out[prefix + "vision_model." + bare] = v
    return jitter_(out, seed + 101)


def tiny_convnext_state(seed: int, image_size: int = TINY_MGM_AUX_SIZE) -> dict[str, torch.Tensor]:
    """A tiny ConvNeXt trunk in MGM's timm naming (``vision_stem`` / ``vision_stages``), no head norm."""
    from transformers import ConvNextConfig, ConvNextModel

    torch.manual_seed(seed)
    model = ConvNextModel(ConvNextConfig(image_size=image_size, **TINY_CONVNEXT))
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("layernorm."):
            continue  # MGM drops the trunk's head (norm_pre/head = None)
        out[AUX_PREFIX + hf_to_timm_key(k, stem="vision_stem", stages="vision_stages")] = v
    state = jitter_(out, seed + 202)
    for k in state:  # layer scale init is 1e-6 (blocks ~ identity): make blocks matter
        if k.endswith(".gamma"):
            state[k] = state[k].abs() + 0.3
    return state


def _linear_state(prefix: str, d_in: int, d_out: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {prefix + "weight": torch.randn(d_out, d_in, generator=g) / d_in ** 0.5,
            prefix + "bias": 0.05 * torch.randn(d_out, generator=g)}


def _ln_state(prefix: str, d: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {prefix + "weight": 1 + 0.1 * torch.randn(d, generator=g), prefix + "bias": 0.1 * torch.randn(d, generator=g)}


def mgm_config(base_cfg: dict, image_grid: int = 1, image_global: bool = False,
               image_size_aux: int = TINY_MGM_AUX_SIZE, clip_hidden: int = 128, aux_hidden: int = 80) -> dict:
    """An MGM config.json: the base LLaMA config plus MGM's multimodal fields (real field names)."""
    llm = {k: v for k, v in base_cfg.items() if k not in ("architectures", "model_type", "transformers_version")}
    return {**llm, "architectures": ["MGMLlamaForCausalLM"], "model_type": "mgm",
            "freeze_mm_mlp_adapter": False, "image_aspect_ratio": "pad", "image_global": image_global,
            "image_grid": image_grid, "image_grid_pinpoints": None, "image_size_aux": image_size_aux,
            "mm_hidden_size": clip_hidden, "mm_hidden_size_aux": aux_hidden, "mm_projector_lr": None,
            "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
            "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
            "mm_vision_tower": "model_zoo/OpenAI/clip-vit-large-patch14-336",
            "mm_vision_tower_aux": "model_zoo/OpenAI/openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup",
            "optimize_vision_tower": False, "optimize_vision_tower_aux": False,
            "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right", "use_cache": True}


def build_mgm_member(directory: str | os.PathLike, base_dir: str | os.PathLike, seed: int = 1, hd: bool = False,
                     include_aux: bool = True, delta: float = 0.02, extra_rows: int = 0,
                     max_shard: str | int = "2GB") -> Path:
    """A tiny MGM checkpoint (``hd=True``: image_grid 2 + global, aux input doubled).

    ``include_aux=False`` writes a broken checkpoint without the ConvNeXt tower (bad-input tests).
    """
    base_cfg = json.loads((Path(base_dir) / "config.json").read_text())
    hidden = base_cfg["hidden_size"]
    grid = 2 if hd else 1
    size_aux = TINY_MGM_AUX_SIZE * grid
    g = torch.Generator().manual_seed(seed + 7)
    state: dict[str, torch.Tensor] = dict(finetuned_llm_state(base_dir, seed, delta, extra_rows))
    clip_hidden = TINY_MM_CLIP["hidden_size"]
    aux_hidden = sum(TINY_CONVNEXT["hidden_sizes"])
    state.update(tiny_clip_state(seed + 11))
    if include_aux:
        state.update(tiny_convnext_state(seed + 13, size_aux))
    for name, d_in in (("query", clip_hidden), ("aux", aux_hidden), ("val", aux_hidden)):
        p = f"model.vlm_uni_{name}_projector."
        state.update(_ln_state(p + "0.", d_in, g))
        state.update(_linear_state(p + "1.", d_in, clip_hidden, g))
    state.update(_linear_state("model.mm_projector.0.", clip_hidden, hidden, g))
    state.update(_linear_state("model.mm_projector.2.", hidden, hidden, g))
    cfg = mgm_config(base_cfg, grid, hd, size_aux, clip_hidden, aux_hidden)
    cfg["vocab_size"] = state["model.embed_tokens.weight"].shape[0]
    tok = tiny_tokenizer(base_cfg["vocab_size"])
    return _save(Path(directory), state, cfg, max_shard, tok, [tok.eos_token_id])
