"""transformers ``LlavaForConditionalGeneration`` checkpoints (format ``llava-hf``).

On-disk layouts accepted:
- hub layout (llava-hf/*): ``language_model.model.*``, ``language_model.lm_head.*``,
  ``multi_modal_projector.linear_{1,2}.*``, ``vision_tower.vision_model.*`` or ``vision_tower.*``;
- transformers >= 4.52 runtime layout: ``model.language_model.*``, ``lm_head.*``,
  ``model.multi_modal_projector.*``, ``model.vision_tower.*``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import LazyCheckpoint
from ..encoders import MODEL_TYPES, encoder_class
from ..errors import FormatError
from ..state_dict import load_state_dict_strict
from .base import FormatAdapter, LLMPart, Member, claim_keys, llm_config_from
from .common import eos_ids, llama_llm_keys, tokenizer_dir
from .llava_branch import LlavaBranch
from .text import TextSide, has_chat_template

LLM_RENAME = [
    (r"^language_model\.model\.", "model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^model\.language_model\.", "model."),
    (r"^lm_head\.", "lm_head."),
]
VISION_RX = r"^(model\.)?vision_tower\."
PROJ_RX = r"^(model\.)?multi_modal_projector\."


def _proj_key(k: str) -> str:
    k = re.sub(PROJ_RX, "", k)
    return re.sub(r"^linear_(\d)", lambda m: str(2 * (int(m[1]) - 1)), k)


class LlavaHFAdapter(FormatAdapter):
    name = "llava-hf"
    branch_kind = "llava"
    vision_files = ("preprocessor_config.json",)

    @classmethod
    def copyable_vision(cls, member: Member) -> bool:
        return True

    @classmethod
    def detect(cls, config: dict, keys: list[str]) -> bool:
        return "LlavaForConditionalGeneration" in (config.get("architectures") or []) or config.get("model_type") == "llava"

    @classmethod
    def build_member(cls, path: Path, config: dict, reader: LazyCheckpoint, dtype: torch.dtype | None = None,
                     vision: bool = True, **options: Any) -> Member:
        usage, parts = claim_keys(reader.keys(), [
            ("encoder", VISION_RX), ("projector", PROJ_RX),
            ("llm", r"^(language_model\.|model\.language_model\.|lm_head\.)"),
        ])
        text_cfg, vis_cfg = config.get("text_config") or {}, config.get("vision_config") or {}
        mt = vis_cfg.get("model_type", "clip_vision_model")
        if mt not in MODEL_TYPES:
            raise FormatError(f"{path / 'config.json'}: vision_config.model_type {mt!r} is not supported "
                              f"(known: {', '.join(sorted(MODEL_TYPES))})")
        layer = config.get("vision_feature_layer", -2)
        select = "patch" if config.get("vision_feature_select_strategy", "default") == "default" else "full"
        llm_keys = llama_llm_keys(parts.get("llm", []), LLM_RENAME)
        llm_conf = llm_config_from(text_cfg, f"{path / 'config.json'} (text_config)")
        act = config.get("projector_hidden_act", "gelu")
        if act != "gelu":
            raise FormatError(f"{path / 'config.json'}: projector_hidden_act {act!r} not supported (gelu only)")
        branch = None
        if vision:
            enc_cls = encoder_class(MODEL_TYPES[mt])
            proc = None
            if (path / "preprocessor_config.json").is_file():
                proc = {k: v for k, v in enc_cls.processor_cls.from_pretrained(str(path)).to_dict().items()
                        if k not in ("image_processor_type", "processor_class")}
            encoder = enc_cls.from_config(vis_cfg, processor=proc)
            branch = LlavaBranch(encoder, layer, select, "mlp2x_gelu", llm_conf["hidden_size"],
                                 projector_bias=config.get("multimodal_projector_bias", True))
            encoder.load_weights({re.sub(VISION_RX, "", k): reader.get(k) for k in parts.get("encoder", [])}, str(path))
            load_projector(branch.projector, {_proj_key(k): reader.get(k) for k in parts.get("projector", [])}, path)
            if dtype is not None:
                branch.to(dtype)
            branch.eval()
        tok = tokenizer_dir(path)
        style = "chat_template" if tok is None or has_chat_template(tok) else "vicuna_v1"
        text = TextSide(tokenizer_path=tok, prompt_style=options.get("prompt_style", style),
                        eos_token_ids=eos_ids(path, text_cfg, config))
        llm = LLMPart(config=llm_conf, keys=llm_keys, reader=reader)
        return Member(name=path.name, format=cls.name, path=path, llm=llm, vision=branch, text=text,
                      key_usage=usage, config=config)


def load_projector(projector: torch.nn.Module, sd: dict, path: Path) -> None:
    """Strictly load projector weights; FormatError naming the checkpoint otherwise."""
    load_state_dict_strict(projector, sd, path, "projector weights and the projector described by config.json")
