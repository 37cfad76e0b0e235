"""Tiny SliME (``LlavaLlamaForCausalLM`` with the ``gated`` projector) checkpoints, real key layout.

Keys written (the real SliME-8B categories, sizes shrunk):

- ``model.embed_tokens.weight`` (base rows + ``extra_rows``, e.g. 257 for SliME's pad row),
  ``model.layers.N.*``, ``model.norm.weight``, ``lm_head.weight``;
- ``model.vision_tower.vision_tower.vision_model.*`` (tiny CLIP: hidden 128, 56 px, 4x4 grid);
- ``model.mm_projector.projection.{0,2}.*``, ``model.mm_projector.{w_gate,w_noise,mean,std}``;
- ``model.mm_projector.attn.{pos_embed,query,attn.in_proj_*,attn.out_proj.*,ln_q,ln_kv,ln_post}.*``
  (the global resampler: 16 queries = the 4x4 CLIP grid, as 576 = 24x24 for the real model);
- ``model.sampler.post_qformer.*`` (local compression to ``mm_resampler_dim`` = 4 tokens per crop).

Crops are 56 px (the tiny CLIP's input side, standing for 336).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..members.slime_modules import GatedProjector, LocalSampler
from .builders import _save, finetuned_llm_state
from .mgm import TINY_MM_CLIP, jitter_, tiny_clip_state
from .tokenizer import tiny_tokenizer

TINY_SLIME_LOCAL_QUERIES = 4  # 2x2 per crop (real: 144 = 12x12)


def slime_config(base_cfg: dict, vocab_rows: int, clip_hidden: int = 128, resampler_dim: int = TINY_SLIME_LOCAL_QUERIES,
                 separator: int = 11) -> dict:
    """A SliME config.json: the base LLaMA config plus SliME's multimodal fields (real field names)."""
    llm = {k: v for k, v in base_cfg.items() if k not in ("architectures", "model_type", "transformers_version")}
    return {**llm, "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "vocab_size": vocab_rows,
            "image_aspect_ratio": "anyres",
            "image_grid_pinpoints": [[672, 672], [336, 672], [672, 336], [336, 1008], [1008, 336], [336, 1344],
                                     [1344, 336]],
            "mm_hidden_size": clip_hidden, "mm_learnable_gated": -1, "mm_patch_merge_type": "spatial",
            "mm_projector_lr": None, "mm_projector_type": "gated", "mm_resampler_dim": resampler_dim,
            "mm_resampler_temp": 1.0, "mm_resampler_topp": 0.95, "mm_resampler_type": "cosine",
            "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
            "mm_vision_select_layer": -2, "mm_vision_tower": "openai/clip-vit-large-patch14-336",
            "seperator": separator, "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right",
            "tune_mm_mlp_adapter": False, "use_global_only": False, "use_local_only": False, "use_mm_proj": True}


def build_slime_member(directory: str | os.PathLike, base_dir: str | os.PathLike, seed: int = 2, extra_rows: int = 1,
                       delta: float = 0.02, gate_scale: float = 1.0, max_shard: str | int = "2GB") -> Path:
    """A tiny SliME checkpoint whose LLM is the base + a seeded delta, with ``extra_rows`` pad rows."""
    base_cfg = json.loads((Path(base_dir) / "config.json").read_text())
    hidden = base_cfg["hidden_size"]
    clip_hidden = TINY_MM_CLIP["hidden_size"]
    grid = TINY_MM_CLIP["image_size"] // TINY_MM_CLIP["patch_size"]
    heads = clip_hidden // 128
    state: dict[str, torch.Tensor] = dict(finetuned_llm_state(base_dir, seed, delta, extra_rows))
    state.update(tiny_clip_state(seed + 11))
    torch.manual_seed(seed + 17)
    proj = GatedProjector(clip_hidden, hidden, grid, heads)
    sampler = LocalSampler(clip_hidden, TINY_SLIME_LOCAL_QUERIES, heads)
    g = torch.Generator().manual_seed(seed + 19)
    with torch.no_grad():  # a non-trivial gate (zeros would give a constant 50/50 mix)
        proj.w_gate.copy_(gate_scale * torch.randn(proj.w_gate.shape, generator=g) / clip_hidden ** 0.5)
        proj.w_noise.copy_(0.01 * torch.randn(proj.w_noise.shape, generator=g))
    proj_state = jitter_({k: v.detach().clone() for k, v in proj.state_dict().items()
                          if k not in ("mean", "std")}, seed + 23)
    proj_state.update(mean=torch.tensor([0.0]), std=torch.tensor([1.0]))
    samp_state = jitter_({k: v.detach().clone() for k, v in sampler.state_dict().items()}, seed + 29)
    state.update({"model.mm_projector." + k: v for k, v in proj_state.items()})
    state.update({"model.sampler." + k: v for k, v in samp_state.items()})
    rows = state["model.embed_tokens.weight"].shape[0]
    cfg = slime_config(base_cfg, rows, clip_hidden)
    tok = tiny_tokenizer(base_cfg["vocab_size"])
    return _save(Path(directory), state, cfg, max_shard, tok, [tok.eos_token_id])
