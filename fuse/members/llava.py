"""Original LLaVA-1.5 checkpoints (format ``llava``): ``LlavaLlamaForCausalLM``.

Keys: ``model.embed_tokens``, ``model.layers.*``, ``model.norm``, ``lm_head`` (the LLM),
``model.mm_projector.{0,2}`` (mlp2x_gelu), ``model.vision_tower.vision_tower.vision_model.*``
(CLIP; when absent, the tower is loaded from ``mm_vision_tower``, a local dir or hub id).
Config: ``mm_vision_select_layer`` (-2), ``mm_vision_select_feature`` (``patch``),
``mm_projector_type``, ``image_aspect_ratio`` (``pad`` = pad to square with the CLIP mean).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..checkpoint import LazyCheckpoint
from ..encoders import ClipEncoder
from ..errors import FormatError
from .base import FormatAdapter, LLMPart, Member, claim_keys, llm_config_from
from .common import clip_config_from_keys, eos_ids, llama_llm_keys, tokenizer_dir
from .llava_branch import LlavaBranch
from .llava_hf import load_projector
from .text import TextSide

TOWER = "model.vision_tower.vision_tower."
LLM_RULES = [(r"^model\.(embed_tokens|layers|norm)\.", "llm"), (r"^lm_head\.", "llm")]
LLM_RENAME = [(r"^model\.", "model."), (r"^lm_head\.", "lm_head.")]


def require_clip_tower(path: Path, config: dict, tower_keys: list[str], options: dict) -> None:
    """Refuse a checkpoint that neither stores its CLIP tower nor names one (``mm_vision_tower``),
    without building anything (checked even when only the LLM part is opened)."""
    if not tower_keys and not (options.get("vision_tower") or config.get("mm_vision_tower")):
        raise FormatError(f"{path}: no vision tower weights and no mm_vision_tower in config.json")


def load_clip_tower(reader: LazyCheckpoint, config: dict, tower_keys: list[str], options: dict) -> ClipEncoder:
    """The CLIP tower of an original-layout checkpoint (stored keys, else ``mm_vision_tower``)."""
    require_clip_tower(reader.path, config, tower_keys, options)
    hub_id = options.get("vision_tower") or config.get("mm_vision_tower")
    pad = config.get("image_aspect_ratio", "pad") == "pad"
    if not tower_keys:
        return ClipEncoder.from_pretrained(hub_id, pad_square=pad)
    enc = ClipEncoder.from_config(clip_config_from_keys(reader, TOWER + "vision_model.", hub_id), pad_square=pad)
    enc.load_weights({k[len(TOWER):]: reader.get(k) for k in tower_keys}, str(reader.path))
    return enc


class LlavaAdapter(FormatAdapter):
    name = "llava"
    branch_kind = "llava"

    @classmethod
    def copyable_vision(cls, member: Member) -> bool:
        return "encoder" in member.key_usage.values()

    @classmethod
    def detect(cls, config: dict, keys: list[str]) -> bool:
        archs = config.get("architectures") or []
        return ("LlavaLlamaForCausalLM" in archs or config.get("model_type") == "llava_llama") and \
            not any(k.startswith("model.mm_projector.projection.") for k in keys) and \
            config.get("mm_projector_type", "mlp2x_gelu") != "gated"

    @classmethod
    def build_member(cls, path: Path, config: dict, reader: LazyCheckpoint, dtype: torch.dtype | None = None,
                     vision: bool = True, **options: Any) -> Member:
        usage, parts = claim_keys(reader.keys(), [
            ("encoder", r"^model\.vision_tower\.vision_tower\."), ("projector", r"^model\.mm_projector\."),
            *[(p, rx) for rx, p in LLM_RULES],
        ])
        select = config.get("mm_vision_select_feature", "patch")
        if select not in ("patch", "cls_patch"):
            raise FormatError(f"{path / 'config.json'}: mm_vision_select_feature {select!r} (expected patch or cls_patch)")
        llm_conf = llm_config_from(config, path / "config.json")
        proj_type = config.get("mm_projector_type", "linear")
        if not parts.get("projector"):
            raise FormatError(f"{path}: no model.mm_projector.* weights (is this a base LLM, not a LLaVA model?)")
        require_clip_tower(path, config, parts.get("encoder", []), options)
        branch = None
        if vision:
            encoder = load_clip_tower(reader, config, parts.get("encoder", []), options)
            branch = LlavaBranch(encoder, config.get("mm_vision_select_layer", -2),
                                 "patch" if select == "patch" else "full", proj_type, llm_conf["hidden_size"])
            load_projector(branch.projector, {k[len("model.mm_projector."):]: reader.get(k) for k in parts["projector"]},
                           path)
            if dtype is not None:
                branch.to(dtype)
            branch.eval()
        text = TextSide(tokenizer_path=tokenizer_dir(path), prompt_style=options.get("prompt_style", "vicuna_v1"),
                        eos_token_ids=eos_ids(path, config))
        llm = LLMPart(config=llm_conf, keys=llama_llm_keys(parts.get("llm", []), LLM_RENAME), reader=reader)
        return Member(name=path.name, format=cls.name, path=path, llm=llm, vision=branch, text=text,
                      key_usage=usage, config=config)
