"""Helpers shared by format adapters: eos ids, CLIP config inference, key renaming."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..checkpoint import LazyCheckpoint
from ..errors import FormatError
from ..fused_layout import has_tokenizer, union_eos_ids


def as_list(x: Any) -> list[int]:
    if x is None:
        return []
    return [int(i) for i in x] if isinstance(x, (list, tuple)) else [int(x)]


def eos_ids(path: Path, *configs: dict) -> list[int]:
    """Union of eos ids from generation_config.json and the given config dicts, in order found."""
    gen = path / "generation_config.json"
    sources = []
    if gen.is_file():
        try:
            sources.append(json.loads(gen.read_text()))
        except json.JSONDecodeError:
            pass
    return union_eos_ids(*(as_list(src.get("eos_token_id")) for src in [*sources, *configs]))


def tokenizer_dir(path: Path) -> str | None:
    """The member dir if it holds tokenizer files, else None."""
    return str(path) if has_tokenizer(path) else None


def clip_config_from_keys(reader: LazyCheckpoint, prefix: str, hub_id: str | None = None) -> dict:
    """A CLIPVisionConfig dict for weights stored under ``prefix`` (``...vision_model.``).

    Prefers the config of ``hub_id`` (a local dir, or the local HF cache: no download);
    otherwise infers sizes from tensor shapes with heads = hidden // 64 (true for every
    OpenAI CLIP ViT) and, unless ``hub_id`` names an OpenAI CLIP ViT, warns naming what was
    guessed: a wrong head count changes every visual token without any other sign.
    """
    import warnings

    from transformers import CLIPVisionConfig

    if hub_id:
        try:
            return CLIPVisionConfig.from_pretrained(hub_id, local_files_only=True).to_dict()
        except (OSError, ValueError):
            pass
    try:
        d, _, p, _ = reader.shape(prefix + "embeddings.patch_embedding.weight")
        n_pos = reader.shape(prefix + "embeddings.position_embedding.weight")[0]
        inter = reader.shape(prefix + "encoder.layers.0.mlp.fc1.weight")[0]
    except Exception:
        raise FormatError(f"{reader.path}: vision tower weights under {prefix!r} are incomplete") from None
    layers = 1 + max(int(m[1]) for k in reader.keys() if (m := re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", k)))
    side = round((n_pos - 1) ** 0.5) * p
    heads = max(1, d // 64)
    if not (hub_id and re.search(r"openai/clip-vit", str(hub_id), re.I)):  # the guess is OpenAI CLIP's design
        source = f"mm_vision_tower {hub_id!r} is not available locally" if hub_id else "no tower config is named"
        warnings.warn(f"{reader.path}: {source}; the CLIP tower config was guessed from the weight shapes: {layers} "
                      f"layers, hidden {d}, {heads} attention head{'s' if heads > 1 else ''} (hidden/64, as in OpenAI "
                      f"CLIP), {side} px images, quick_gelu; if the tower differs its visual tokens are wrong",
                      UserWarning, stacklevel=2)
    return CLIPVisionConfig(hidden_size=d, intermediate_size=inter, num_hidden_layers=layers,
                            num_attention_heads=heads, image_size=side, patch_size=p,
                            hidden_act="quick_gelu", layer_norm_eps=1e-5).to_dict()


def llama_llm_keys(keys: list[str], rename: list[tuple[str, str]]) -> dict[str, str]:
    """canonical -> checkpoint key, for keys matched by the (regex, replacement) rules."""
    out = {}
    for k in keys:
        for rx, rep in rename:
            if re.match(rx, k):
                out[re.sub(rx, rep, k)] = k
                break
    return out
