"""Builders of tiny checkpoints in real on-disk layouts.

- :func:`build_base_llm`: a LLaMA-architecture base LLM (``LlamaForCausalLM`` layout + tokenizer).
- :func:`build_llava_hf_member`: ``LlavaForConditionalGeneration`` hub layout
  (``language_model.model.*``, ``multi_modal_projector.linear_{1,2}``, ``vision_tower[.vision_model].*``),
  whose LLM is the base plus a small seeded delta (a "fine-tune").
- :func:`llava_hf_to_original` / :func:`build_llava_member`: the same weights in the original
  LLaVA-1.5 layout (``model.mm_projector.{0,2}``, ``model.vision_tower.vision_tower.vision_model.*``).
- :func:`rewrite_weights`: a copy of a checkpoint with edited tensors (NaN, other dtypes, extra rows);
  :func:`random_image`, :func:`png_bomb`: test images.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ..checkpoint import LazyCheckpoint, ShardedWriter
from .tokenizer import tiny_tokenizer

TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=500000.0,
                  tie_word_embeddings=False)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=56,
                 patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32)


def _save(directory: Path, state: dict[str, torch.Tensor], config: dict, max_shard: str | int = "2GB",
          tokenizer=None, eos: list[int] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    w = ShardedWriter(directory, max_shard)
    for k, v in state.items():
        w.add(k, v)
    w.close()
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    if eos is not None:
        (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return directory


def rewrite_weights(src: str | os.PathLike, dst: str | os.PathLike,
                    edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """Copy checkpoint directory ``src`` to ``dst`` and rewrite its safetensors with ``edit(state_dict)``
    applied (the dict is edited in place; its tensors are the checkpoint's, read in full)."""
    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst)
    sd = LazyCheckpoint(dst).state_dict()
    edit(sd)
    for f in dst.glob("*.safetensors*"):
        f.unlink()
    w = ShardedWriter(dst)
    for k, v in sd.items():
        w.add(k, v)
    w.close()
    return dst


def png_bomb(path: str | os.PathLike, width: int = 15000, height: int | None = None) -> Path:
    """A small PNG file whose header declares ``width`` x ``height`` pixels (default square: 225 Mpx), which
    PIL refuses to open (decompression-bomb check): the input of the "image too large" refusals."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path = Path(path)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height or width, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def random_image(seed: int = 0, size: tuple[int, int] = (64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _llama_config(vocab_size: int, tok, **over) -> "transformers.LlamaConfig":  # noqa: F821
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       **{**TINY_LLAMA, **over})


def build_base_llm(directory: str | os.PathLike, seed: int = 0, vocab_size: int = 256, max_shard: str | int = "2GB",
                   **config_overrides) -> Path:
    """A tiny LLaMA base LLM (``LlamaForCausalLM`` keys) + tokenizer + generation config."""
    from transformers import LlamaForCausalLM

    tok = tiny_tokenizer(vocab_size)
    cfg = _llama_config(vocab_size, tok, **config_overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    d = cfg.to_dict()
    d["architectures"] = ["LlamaForCausalLM"]
    return _save(Path(directory), model.state_dict(), d, max_shard, tok, [tok.eos_token_id])


def finetuned_llm_state(base_dir: str | os.PathLike, seed: int, scale: float = 0.02,
                        extra_rows: int = 0) -> dict[str, torch.Tensor]:
    """Base LLM weights + seeded Gaussian delta (``scale`` x each tensor's std), canonical names.

    ``extra_rows`` appends rows to embed_tokens/lm_head (e.g. SliME's pad token).
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, t in LazyCheckpoint(base_dir).iter_tensors():
        t = t.float()
        std = float(t.std()) if t.numel() > 1 else 1.0
        t = t + scale * max(std, 1e-3) * torch.randn(t.shape, generator=g)
        if extra_rows and k in ("model.embed_tokens.weight", "lm_head.weight"):
            t = torch.cat([t, 0.02 * torch.randn(extra_rows, t.shape[1], generator=g)])
        out[k] = t
    return out


def build_tiny_clip(directory: str | os.PathLike | None = None, seed: int = 0, **over):
    """A tiny ``CLIPVisionModel`` (optionally saved with its preprocessor config)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from ..encoders import ClipEncoder

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(**{**TINY_CLIP, **over})
    model = CLIPVisionModel(cfg).eval()
    if directory is not None:
        model.save_pretrained(str(directory))
        ClipEncoder.build_processor(cfg).save_pretrained(str(directory))
    return model


def build_llava_hf_member(directory: str | os.PathLike, base_dir: str | os.PathLike, seed: int = 1,
                          vision_feature_layer: int | list[int] = -2, select_strategy: str = "default",
                          vision_model_prefix: bool = True, delta: float = 0.02, clip_overrides: dict | None = None,
                          max_shard: str | int = "2GB"):
    """A tiny ``LlavaForConditionalGeneration`` in the hub on-disk layout. Returns (dir, model)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from ..encoders import ClipEncoder

    base_cfg = json.loads((Path(base_dir) / "config.json").read_text())
    tok = tiny_tokenizer(base_cfg["vocab_size"])
    text_cfg = LlamaConfig(**{k: v for k, v in base_cfg.items() if k not in ("architectures", "model_type", "transformers_version")})
    vis_cfg = CLIPVisionConfig(**{**TINY_CLIP, **(clip_overrides or {})})
    cfg = LlavaConfig(vision_config=vis_cfg, text_config=text_cfg, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=select_strategy,
                      image_seq_length=(vis_cfg.image_size // vis_cfg.patch_size) ** 2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    llm = finetuned_llm_state(base_dir, seed, delta)
    model.model.language_model.load_state_dict({k[len("model."):]: v for k, v in llm.items() if k.startswith("model.")})
    model.lm_head.load_state_dict({"weight": llm["lm_head.weight"]})
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.language_model."):
            state["language_model.model." + k[len("model.language_model."):]] = v
        elif k == "lm_head.weight":
            state["language_model.lm_head.weight"] = v
        elif k.startswith("model.vision_tower."):
            rest = k[len("model.vision_tower."):]
            rest = rest[len("vision_model."):] if rest.startswith("vision_model.") else rest
            state["vision_tower." + ("vision_model." if vision_model_prefix else "") + rest] = v
        elif k.startswith("model.multi_modal_projector."):
            state["multi_modal_projector." + k[len("model.multi_modal_projector."):]] = v
        else:
            raise AssertionError(k)
    d = cfg.to_dict()
    d["architectures"] = ["LlavaForConditionalGeneration"]
    out = _save(Path(directory), state, d, max_shard, tok, [tok.eos_token_id])
    ClipEncoder.build_processor(vis_cfg).save_pretrained(str(out))
    return out, model


def llava_hf_to_original(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, include_tower: bool = True,
                         image_aspect_ratio: str = "pad", max_shard: str | int = "2GB",
                         tower_ref: str | os.PathLike | None = None) -> Path:
    """Rewrite a llava-hf checkpoint in the original LLaVA-1.5 layout (``LlavaLlamaForCausalLM``).

    The CLIP tower is also saved as a standalone model in ``<out_dir>-clip`` and named by
    ``mm_vision_tower`` (as the real config names ``openai/clip-vit-large-patch14-336``).
    ``tower_ref``: what ``mm_vision_tower`` records instead of that path (e.g. where the tower
    will be once a temporary build directory is renamed into place).
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from ..encoders import ClipEncoder

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    reader = LazyCheckpoint(hf_dir)
    state, tower = {}, {}
    for k, v in reader.iter_tensors():
        if k.startswith("language_model.model."):
            state["model." + k[len("language_model.model."):]] = v
        elif k == "language_model.lm_head.weight":
            state["lm_head.weight"] = v
        elif k.startswith("multi_modal_projector."):
            state["model.mm_projector." + re.sub(r"linear_(\d)", lambda m: str(2 * (int(m[1]) - 1)),
                                                 k[len("multi_modal_projector."):])] = v
        elif k.startswith("vision_tower."):
            rest = k[len("vision_tower."):]
            rest = rest if rest.startswith("vision_model.") else "vision_model." + rest
            tower[rest] = v
            if include_tower:
                state["model.vision_tower.vision_tower." + rest] = v
    clip_dir = out_dir.with_name(out_dir.name + "-clip")
    vcfg = CLIPVisionConfig(**{k: v for k, v in cfg["vision_config"].items() if k not in ("model_type", "transformers_version")})
    clip = CLIPVisionModel(vcfg)
    ClipEncoder(clip, None).load_weights(tower)
    clip.save_pretrained(str(clip_dir))
    ClipEncoder.build_processor(vcfg).save_pretrained(str(clip_dir))
    layer = cfg.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ValueError("the original LLaVA format has a single mm_vision_select_layer")
    new = {**{k: v for k, v in cfg["text_config"].items() if k not in ("model_type", "architectures")},
           "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
           "mm_vision_tower": str(tower_ref or clip_dir), "mm_hidden_size": vcfg.hidden_size, "mm_projector_type": "mlp2x_gelu",
           "mm_vision_select_layer": layer,
           "mm_vision_select_feature": "patch" if cfg.get("vision_feature_select_strategy") == "default" else "cls_patch",
           "image_aspect_ratio": image_aspect_ratio, "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
           "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False}
    from .tokenizer import tiny_tokenizer as _tok

    tok = _tok(cfg["text_config"]["vocab_size"])
    return _save(out_dir, state, new, max_shard, tok, [tok.eos_token_id])


def build_llava_member(directory: str | os.PathLike, base_dir: str | os.PathLike, seed: int = 1,
                       include_tower: bool = True, tower_ref: str | os.PathLike | None = None, **kw) -> Path:
    """A tiny original-layout LLaVA-1.5 member (built via the llava-hf builder and converted)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        hf, _ = build_llava_hf_member(Path(tmp) / "hf", base_dir, seed, **kw)
        return llava_hf_to_original(hf, directory, include_tower=include_tower, tower_ref=tower_ref)
