"""COMM-family models trained by ``train`` (format ``comm``, vision branch kind ``comm``).

On-disk layout of a member directory (written by :func:`save_comm_member`, read by
:class:`CommAdapter`; ``format_version`` 1)::

    config.json
        architectures: ["CommForCausalLM"], model_type: "comm", comm_format_version: 1
        fusion:        FusionSpec (type, resolved layers per encoder, dims, grid, llm_hidden, options)
        encoders:      {role: {"spec": Encoder.spec(), "source": hub id / dir or null, "stored": bool}}
        text_config:   the LLM's own config (LlamaConfig dict)
        prompt_style, placeholder ("<image>"), eos_token_id (list)
        training:      provenance (stage, steps, data, ...; informational), and optionally
                       question_words (sorted words of every training question; read into
                       TextSide.question_words, used by inference.abstain: unseen_words)
    model.safetensors  (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
        model.*, lm_head.*          the LLM under canonical LLaMA names
        vision.fusion.*             the fusion module (:mod:`fuse.fusions` parameter names)
        vision.encoders.<role>.model.*   frozen encoder weights (transformers names), when stored
    tokenizer files, generation_config.json

Encoders are stored by default so the directory is self-contained; with
``stored: false`` they are rebuilt from ``source`` (a local dir or a hub id already cached).
"""

from __future__ import annotations

import enum
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from PIL import Image
from torch import nn

from ..checkpoint import LazyCheckpoint, ShardedWriter
from ..dtypes import dtype_name
from ..encoders import Encoder, build_encoder, encoder_from_spec
from ..errors import FormatError
from ..fusions import Fusion, FusionSpec, build_fusion
from ..state_dict import load_state_dict_strict
from .base import FormatAdapter, LLMPart, Member, VisionBranch, claim_keys, llm_config_from
from .common import eos_ids, tokenizer_dir
from .text import TextSide

FORMAT_VERSION = 1
ARCHITECTURE = "CommForCausalLM"
MODEL_TYPE = "comm"
VISION_PREFIX = "vision."
LLM_MODEL_TYPES = ("llama",)  # LLMs a fuse Member can hold (canonical LLaMA names + LlamaConfig)


def jsonable(obj: Any) -> Any:
    """Plain JSON types (enums -> values, tuples -> lists), for processor dicts in specs."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, torch.dtype):
        return dtype_name(obj)
    return obj


class CommBranch(VisionBranch):
    """Frozen encoders + a fusion module: ``images -> [N_tokens, D_llm]`` per image.

    ``encode(batch)`` runs the encoders (no grad, eval mode) and returns
    ``{role: [B, L_role, N, D_role]}``; ``fusion(feats) -> [B, N_out, D_llm]``.
    ``forward`` = ``fusion(encode(batch))``; the trainer calls the same two steps.
    """

    kind = "comm"

    def __init__(self, encoders: dict[str, Encoder], fusion: Fusion, sources: dict[str, str | None] | None = None):
        super().__init__()
        roles = fusion.spec.encoders
        missing = [r for r in roles if r not in encoders]
        if missing:
            raise FormatError(f"comm branch: fusion {fusion.spec.type!r} needs encoders {missing}")
        self.encoders = nn.ModuleDict({r: encoders[r] for r in roles})
        self.fusion = fusion
        self.sources = {r: (sources or {}).get(r) for r in roles}
        self.encoders.requires_grad_(False)
        self.encoders.eval()

    # -- module behaviour ---------------------------------------------------------------------
    def train(self, mode: bool = True) -> "CommBranch":
        super().train(mode)
        self.encoders.eval()  # frozen encoders never leave eval mode
        return self

    @property
    def output_dim(self) -> int:
        return self.fusion.spec.llm_hidden

    @property
    def num_tokens(self) -> int:
        return self.fusion.num_tokens()

    @property
    def device(self) -> torch.device:
        return next(self.fusion.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.fusion.parameters()).dtype

    # -- pixels -> tokens ---------------------------------------------------------------------
    def preprocess(self, images: Sequence[Image.Image]) -> dict[str, Any]:
        """``{"pixel_values_<role>": [B, 3, H, W]}`` (each encoder has its own processor)."""
        images = list(images)
        return {f"pixel_values_{r}": enc.preprocess(images) for r, enc in self.encoders.items()}

    @torch.no_grad()
    def encode(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Frozen encoder features of the spec's layers: ``{role: [B, L, N, D]}``."""
        out = {}
        for r, enc in self.encoders.items():
            pv = batch[f"pixel_values_{r}"]
            out[r] = enc.features(pv, self.fusion.spec.layers[r], select="patch")
        return out

    def forward(self, batch: dict[str, Any], text_embeds=None) -> list[torch.Tensor]:
        return list(self.fusion(self.encode(batch)))

    def token_grids(self, batch: dict[str, Any]):
        layout = self.fusion.token_layout()
        if layout is None:
            return None
        n = len(next(iter(v for k, v in batch.items() if k.startswith("pixel_values_"))))
        return [list(layout) for _ in range(n)]

    # -- serialisation ------------------------------------------------------------------------
    def encoder_specs(self) -> dict[str, dict]:
        return {r: jsonable(enc.spec()) for r, enc in self.encoders.items()}

    def spec(self) -> dict[str, Any]:
        return {"fusion": self.fusion.spec.to_dict(), "encoders": self.encoder_specs(), "sources": dict(self.sources)}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "CommBranch":
        fusion = build_fusion(spec["fusion"])
        encoders = {r: encoder_from_spec(s) for r, s in spec["encoders"].items()}
        return cls(encoders, fusion, spec.get("sources"))


def question_words_of(config: dict, path: Path) -> list[str] | None:
    """``training.question_words`` of a comm config: a sorted list of lower-case words, or None when absent."""
    words = (config.get("training") or {}).get("question_words")
    if words is None:
        return None
    if not (isinstance(words, list) and all(isinstance(w, str) for w in words)):
        raise FormatError(f"{path / 'config.json'}: training.question_words: expected a list of words, "
                          f"got {type(words).__name__}")
    return sorted(words)


def _encoder_from_entry(role: str, entry: dict, path: Path) -> Encoder:
    spec = entry.get("spec") or {}
    if entry.get("stored", True):
        return encoder_from_spec(spec)
    source = entry.get("source")
    if not source:
        raise FormatError(f"{path / 'config.json'}: encoders.{role} is not stored and has no source")
    return build_encoder(spec.get("kind", role), source, processor=spec.get("processor"),
                         pad_square=spec.get("pad_square", False))


def load_comm_branch(path: Path, config: dict, reader: LazyCheckpoint) -> tuple[CommBranch, dict, dict]:
    """The trained vision branch of a comm directory: (branch, key usage, part -> keys).

    Every checkpoint key must be ``vision.*`` or an LLM key (``model.*`` / ``lm_head.*``).
    """
    where = path / "config.json"
    version = config.get("comm_format_version")
    if version != FORMAT_VERSION:
        raise FormatError(f"{where}: comm_format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    for fld in ("fusion", "encoders", "text_config"):
        if not isinstance(config.get(fld), dict):
            raise FormatError(f"{where}: missing object field {fld!r}")
    usage, parts = claim_keys(reader.keys(), [("vision", r"^vision\."), ("llm", r"^(model\.|lm_head\.)")])
    fusion = build_fusion(config["fusion"])
    encoders = {r: _encoder_from_entry(r, e, path) for r, e in config["encoders"].items()}
    branch = CommBranch(encoders, fusion, {r: e.get("source") for r, e in config["encoders"].items()})
    vis = {k[len(VISION_PREFIX):]: reader.get(k) for k in parts.get("vision", [])}
    stored_enc = {r for r, e in config["encoders"].items() if e.get("stored", True)}

    def may_miss(key: str) -> bool:  # encoders not stored were loaded from their source; buffers rebuilt at init
        return key.endswith("position_ids") or (key.startswith("encoders.") and key.split(".")[1] not in stored_enc)

    load_state_dict_strict(branch, vis, path, "vision.* weights and the comm branch described by config.json",
                           may_miss=may_miss)
    return branch.eval(), usage, parts


class CommAdapter(FormatAdapter):
    """Reads the layout written by :func:`save_comm_member` (see the module docstring)."""

    name = "comm"
    branch_kind = "comm"

    @classmethod
    def detect(cls, config: dict, keys: list[str]) -> bool:
        return config.get("model_type") == MODEL_TYPE or ARCHITECTURE in (config.get("architectures") or [])

    @classmethod
    def build_member(cls, path: Path, config: dict, reader: LazyCheckpoint, dtype: torch.dtype | None = None,
                     vision: bool = True, **options: Any) -> Member:
        where = path / "config.json"
        text_cfg = config.get("text_config") or {}
        mt = text_cfg.get("model_type", "llama")
        if mt not in LLM_MODEL_TYPES:
            raise FormatError(f"{where}: text_config.model_type {mt!r}: a fuse member needs a LLaMA-architecture "
                              f"LLM ({', '.join(LLM_MODEL_TYPES)})")
        if vision:
            branch, usage, parts = load_comm_branch(path, config, reader)
            if dtype is not None:
                branch.to(dtype)
        else:
            branch = None
            usage, parts = claim_keys(reader.keys(), [("vision", r"^vision\."), ("llm", r"^(model\.|lm_head\.)")])
        llm_conf = llm_config_from(text_cfg, f"{path / 'config.json'} (text_config)")
        llm = LLMPart(config=llm_conf, keys={k: k for k in parts.get("llm", [])}, reader=reader)
        if "model.embed_tokens.weight" not in llm.keys:
            raise FormatError(f"{path}: no LLM weights (model.embed_tokens.weight) in the checkpoint")
        text = TextSide(tokenizer_path=tokenizer_dir(path),
                        prompt_style=options.get("prompt_style", config.get("prompt_style", "chat_template")),
                        placeholder=config.get("placeholder", "<image>"),
                        eos_token_ids=eos_ids(path, config, text_cfg),
                        question_words=question_words_of(config, path))
        return Member(name=path.name, format=cls.name, path=path, llm=llm, vision=branch, text=text,
                      key_usage=usage, config=config)


def save_comm_member(directory: str | os.PathLike, branch: CommBranch, llm_tensors: Iterable[tuple[str, torch.Tensor]],
                     text_config: dict, *, tokenizer=None, prompt_style: str = "chat_template",
                     eos_token_ids: list[int] | None = None, store_encoders: bool = True,
                     training: dict | None = None, max_shard: str | int = "5GB",
                     dtype: torch.dtype | None = None) -> Path:
    """Write a ``comm`` member into ``directory`` (the caller makes it atomic).

    ``llm_tensors`` yields ``(canonical LLaMA name, tensor)`` pairs (streamed into shards);
    ``dtype`` casts floating tensors on the way out (e.g. bfloat16 for release).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    w = ShardedWriter(d, max_shard)

    def cast(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().cpu()
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    seen: set[str] = set()
    for name, t in llm_tensors:
        if not (name.startswith("model.") or name.startswith("lm_head.")):
            raise ValueError(f"LLM tensor {name!r} is not under model.* / lm_head.*")
        w.add(name, cast(t))
        seen.add(name)
    for k, t in branch.state_dict().items():
        if k.endswith("position_ids"):
            continue
        if k.startswith("encoders.") and not store_encoders:
            continue
        w.add(VISION_PREFIX + k, cast(t))
    w.close()
    eos = list(eos_token_ids or [])
    cfg = {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "comm_format_version": FORMAT_VERSION,
        "fusion": branch.fusion.spec.to_dict(),
        "encoders": {r: {"spec": s, "source": branch.sources.get(r), "stored": store_encoders}
                     for r, s in branch.encoder_specs().items()},
        "text_config": jsonable(text_config), "prompt_style": prompt_style, "placeholder": "<image>",
        "eos_token_id": eos, "training": jsonable(training or {}),
    }
    if dtype is not None:
        cfg["torch_dtype"] = jsonable(dtype)
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(d))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": eos if len(eos) != 1 else eos[0]}, indent=2))
    return d


__all__ = ["CommAdapter", "CommBranch", "FusionSpec", "jsonable", "load_comm_branch", "save_comm_member"]
