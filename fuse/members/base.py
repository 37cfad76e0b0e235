"""The member abstraction: one MLLM checkpoint split into LLM, vision branch and text side.

- :class:`LLMPart`: canonical LLaMA-style tensor names (``model.layers.0.self_attn.q_proj.weight``,
  ``lm_head.weight``...) mapped to the checkpoint's own keys, read lazily.
- :class:`VisionBranch`: ``nn.Module`` turning images into visual tokens in the LLM input
  space; a registry entry per kind (``llava``, ``mgm``, ``slime``, ``comm``).
- :class:`~fuse.members.text.TextSide`: tokenizer, prompt style, eos ids.

Every tensor of a checkpoint is claimed by exactly one part (``Member.key_usage``);
loading fails on keys nobody claims, so no weight is silently dropped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from ..checkpoint import LazyCheckpoint
from ..dtypes import most_common_dtype
from ..errors import FormatError
from ..fused_layout import VISION_CONFIG, VISION_WEIGHTS
from ..state_dict import load_state_dict_strict
from .text import TextSide

CHECKPOINT_LAYOUT = "checkpoint"  # vision_config.json "layout" of a byte copy made by fuse merge

# LlamaConfig fields that define the LLM (everything else in an MLLM config is dropped).
LLM_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "pretraining_tp",
    "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters", "attention_bias",
    "attention_dropout", "mlp_bias",
)

# What makes two LLMs "one family" (checked before merging).
FAMILY_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "tie_word_embeddings")


# LlamaConfig's defaults for the fields above (transformers' own values; see tests/fuse/members/test_llm_config.py).
LLAMA_DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048, "initializer_range": 0.02,
    "rms_norm_eps": 1e-6, "use_cache": True, "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2,
    "pretraining_tp": 1, "tie_word_embeddings": False, "attention_bias": False, "attention_dropout": 0.0,
    "mlp_bias": False,
}


LLM_SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def llm_config_from(cfg: dict, where: str | os.PathLike | None = None) -> dict:
    """A ``LlamaForCausalLM`` config dict from an MLLM config (drops mm_*/vision fields).

    Filled with LlamaConfig's defaults and rope folded into ``rope_parameters`` the way
    transformers 5 does, but from plain dicts: opening a member for a merge must not pay
    for importing transformers' modeling code. ``where``: the checkpoint's config file; a
    checkpoint must state its shape fields (:data:`LLM_SHAPE_FIELDS`), so a missing one is
    refused naming the file (a default of 4096 would show up later as a baffling
    "hidden_size 4096 != 64").
    """
    missing = [k for k in LLM_SHAPE_FIELDS if not isinstance(cfg.get(k), int) or isinstance(cfg.get(k), bool)]
    if where is not None and missing:
        raise FormatError(f"{where}: no {', '.join(missing)} (an integer) in the language model's config")
    kept = {k: v for k, v in cfg.items() if k in LLM_CONFIG_FIELDS}
    d = {**LLAMA_DEFAULTS, **kept}
    if d.get("num_key_value_heads") is None:
        d["num_key_value_heads"] = d["num_attention_heads"]
    if d.get("head_dim") is None:
        d["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
    theta = d.pop("rope_theta", None)
    scaling = d.pop("rope_scaling", None)
    rope = dict(d.get("rope_parameters") or {})
    if not rope:
        rope = dict(scaling or {})
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope.setdefault("rope_type", "default")
    if "rope_theta" not in rope:
        rope["rope_theta"] = float(theta) if theta is not None else 10000.0
    d["rope_parameters"] = rope
    d["architectures"] = ["LlamaForCausalLM"]
    d["model_type"] = "llama"
    return d


def rope_theta_of(cfg: dict) -> float | None:
    rp = cfg.get("rope_parameters") or {}
    return rp.get("rope_theta", cfg.get("rope_theta"))


@dataclass
class LLMPart:
    """The member's language model, as canonical names over lazily read checkpoint keys."""

    config: dict
    keys: dict[str, str]  # canonical name -> key in reader
    reader: LazyCheckpoint

    def names(self) -> list[str]:
        return list(self.keys)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.reader.get(self.keys[name], dtype)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.reader.shape(self.keys[name])

    def dtype(self, name: str) -> torch.dtype:
        return self.reader.dtype(self.keys[name])

    @property
    def vocab_rows(self) -> int:
        return self.shape("model.embed_tokens.weight")[0]

    def total_bytes(self) -> int:
        return self.reader.total_bytes(list(self.keys.values()))

    def load_model(self, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
        """Materialise a ``LlamaForCausalLM`` (whole model in memory: for inference only)."""
        from transformers import AutoModelForCausalLM, LlamaConfig
        from transformers.initialization import no_init_weights

        cfg = LlamaConfig(**{k: v for k, v in self.config.items() if k not in ("architectures", "model_type")})
        cfg.vocab_size = self.vocab_rows
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype or torch.float32)
        sd = {n: self.get(n, dtype or self.dtype(n)) for n in self.keys}
        tied = bool(cfg.tie_word_embeddings)  # a tied lm_head is the embedding, never stored
        load_state_dict_strict(model, sd, self.reader.path, "LLM weights and LlamaForCausalLM",
                               may_miss=lambda k: tied and k == "lm_head.weight")
        if tied:
            model.tie_weights()
        return model.to(device).eval()


class VisionBranch(nn.Module):
    """Images -> visual tokens in the LLM input space. One registry entry per kind.

    Subclasses implement ``preprocess`` (PIL -> batch dict), ``forward``
    (batch -> list of ``[N_i, D_llm]``, one per image: counts may differ per
    image, e.g. SliME's selected locals), ``spec``/``from_spec`` (JSON config
    to rebuild with random weights before ``load_state_dict``).
    """

    kind: ClassVar[str] = ""
    needs_text: ClassVar[bool] = False  # True when forward uses the prompt's text embeddings

    def preprocess(self, images: Sequence[Image.Image]) -> dict[str, Any]:
        raise NotImplementedError

    def forward(self, batch: dict[str, Any], text_embeds: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "VisionBranch":
        raise NotImplementedError

    @property
    def output_dim(self) -> int:
        raise NotImplementedError

    def token_grids(self, batch: dict[str, Any]) -> list[list[tuple[str, int, int]]] | None:
        """Optional spatial layout of each image's tokens, for attention maps:
        per image a list of ``(segment name, grid h, grid w)`` in token order. None if unknown."""
        return None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


@dataclass
class Member:
    """One MLLM checkpoint, split into its three parts."""

    name: str
    format: str
    path: Path
    llm: LLMPart
    vision: VisionBranch | None  # None when loaded with vision=False
    text: TextSide
    key_usage: dict[str, str] = field(default_factory=dict)  # checkpoint key -> part name
    config: dict = field(default_factory=dict)  # the checkpoint's config.json

    @torch.no_grad()
    def visual_tokens(self, images: Sequence[Image.Image], text_embeds: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """``images`` -> one ``[N_i, D_llm]`` tensor per image."""
        self.vision.eval()
        return self.vision(self.vision.preprocess(list(images)), text_embeds=text_embeds)

    def vision_source_dtype(self) -> torch.dtype | None:
        """The most common dtype of the checkpoint's non-LLM tensors (None if unknown)."""
        reader = self.llm.reader
        return most_common_dtype(reader.dtype(key) for key, part in self.key_usage.items()
                                 if part != "llm" and key in reader)

    def save_vision_branch(self, directory: str | os.PathLike) -> None:
        """Write the branch in the dtype it had in the source checkpoint (no silent size/precision change)."""
        save_vision_branch(self.vision, directory, text=self.text, dtype=self.vision_source_dtype(),
                           extra={"format": self.format, "source": str(self.path)})

    def usage_summary(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for part in self.key_usage.values():
            out[part] = out.get(part, 0) + 1
        return out


def save_vision_branch(branch: VisionBranch, directory: str | os.PathLike, text: TextSide | None = None,
                       extra: dict | None = None, dtype: torch.dtype | None = None) -> None:
    """Write ``vision_config.json`` (kind, spec, text side) and ``vision.safetensors``.

    ``dtype`` casts floating-point tensors (e.g. back to the source checkpoint's bf16).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    sd = {}
    for k, v in branch.state_dict().items():
        v = v.detach().contiguous().cpu()
        sd[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    save_file(sd, str(d / VISION_WEIGHTS), metadata={"format": "pt"})
    cfg = {"kind": branch.kind, "spec": branch.spec(), **(extra or {})}
    if text is not None:
        cfg["text"] = text.to_dict()
    (d / VISION_CONFIG).write_text(json.dumps(cfg, indent=2, default=str))


class FormatAdapter:
    """Reads one on-disk checkpoint format into a :class:`Member` (listed in :mod:`fuse.members.registry`).

    ``branch_kind``: the :class:`VisionBranch` kind the adapter builds. ``vision_files``:
    small files besides ``config.json`` that building the branch reads (copied with it).
    An adapter implements :meth:`detect` and :meth:`build_member`, the one override point for
    reading; :meth:`load` (the entry point) is the same for every adapter.
    """

    name: ClassVar[str] = ""
    branch_kind: ClassVar[str] = ""
    vision_files: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "load" in cls.__dict__:  # it would skip the no-init wrapper below
            raise TypeError(f"{cls.__name__}: format adapters implement build_member, not load")

    @classmethod
    def copyable_vision(cls, member: "Member") -> bool:
        """True when the branch can be rebuilt from the checkpoint's own non-LLM tensors plus
        ``config.json`` and ``vision_files`` alone (no external tower, nothing borrowed from
        the LLM): ``fuse merge`` then copies those bytes instead of building the branch."""
        return False

    @classmethod
    def detect(cls, config: dict, keys: list[str]) -> bool:
        raise NotImplementedError

    @classmethod
    def load(cls, path: Path, config: dict, reader: LazyCheckpoint, vision: bool = True, **options: Any) -> Member:
        """Run :meth:`build_member` without random weight init: every parameter is then loaded strictly
        from the checkpoint (or from the tower it names), so initialising it first is wasted work.

        ``vision=False``: LLM part, text side and key usage only (``member.vision`` is None):
        no module is built, so a merge never imports transformers' modeling code.
        """
        if not vision:
            return cls.build_member(path, config, reader, vision=False, **options)
        from transformers.initialization import no_init_weights

        with no_init_weights():
            return cls.build_member(path, config, reader, **options)

    @classmethod
    def build_member(cls, path: Path, config: dict, reader: LazyCheckpoint, dtype: torch.dtype | None = None,
                     vision: bool = True, **options: Any) -> Member:
        """Read the checkpoint at ``path`` (``config``: its config.json, ``reader``: its tensors) into a
        :class:`Member`; build the vision branch in ``dtype`` unless ``vision`` is False. ``options``:
        the recipe member's ``options`` (unknown ones are a TypeError naming them)."""
        raise NotImplementedError


def claim_keys(keys: Sequence[str], rules: Sequence[tuple[str, Any]]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Assign every key to the first rule whose regex matches.

    Args:
        rules: ``(part name, compiled regex or str prefix)`` in priority order.
    Returns:
        (key -> part, part -> keys). Raises FormatError listing unclaimed keys.
    """
    import re

    usage: dict[str, str] = {}
    parts: dict[str, list[str]] = {}
    compiled = [(p, re.compile(r) if isinstance(r, str) else r) for p, r in rules]
    unclaimed = []
    for k in keys:
        for part, rx in compiled:
            if rx.match(k):
                usage[k] = part
                parts.setdefault(part, []).append(k)
                break
        else:
            unclaimed.append(k)
    if unclaimed:
        raise FormatError(f"{len(unclaimed)} checkpoint tensors are not used by any part, e.g. {unclaimed[:3]}; "
                          "refusing to drop weights silently")
    return usage, parts
