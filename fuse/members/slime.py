"""SliME members: format ``slime`` and vision branch kind ``slime``.

Checkpoint (``LlavaLlamaForCausalLM``, model_type ``llava_llama``, ``mm_projector_type: gated``;
e.g. yifanzhang114/SliME-Llama3-8B):

=====================================================  ==============  ============================
keys                                                   part            module here
=====================================================  ==============  ============================
``model.embed_tokens`` / ``layers.N`` / ``norm``,      ``llm``         (LLaMA names; the embedding
``lm_head``                                                            may have 128257 rows)
``model.vision_tower.vision_tower.vision_model.*``     ``encoder``     CLIP ViT-L/14-336
``model.mm_projector.projection.{0,2}.*``,             ``projector``   :class:`GatedProjector`
``model.mm_projector.{w_gate,w_noise,mean,std}``
``model.mm_projector.attn.*``                          ``resampler``   its 576-query resampler
``model.sampler.post_qformer.*``                       ``sampler``     :class:`LocalSampler`
=====================================================  ==============  ============================

Vision branch (per image), following SliME's ``encode_images`` with ``mm_patch_merge_type: spatial``:

1. anyres views (:mod:`fuse.members.anyres`): global 336 px view + 2..7 crops of 336 px.
2. CLIP layer -2 patch tokens per view ``[1+n, 576, 1024]``.
3. global: gated projector (MLP path and resampler path mixed per token) -> ``[576, D_llm]``.
4. locals: ``post_qformer`` -> 144 tokens per crop, the MLP path of the projector,
   re-ordered row-major over the whole crop grid (``spatial``) -> ``[n*144, D_llm]``;
   then text-guided selection against the prompt's token embeddings (cumulative mass 0.95 + 1),
   computed in the branch's dtype as SliME does (member option ``selection_dtype: float32`` to
   select in float32 instead).
5. sequence ``[global 576][separator][selected locals]``; the separator is the LLM embedding
   of token ``seperator`` (11 = "," for LLaMA-3). The branch stores SliME's own row 11 (read
   from the checkpoint at load time); the fused model binds its merged embedding table with
   :meth:`SliMEBranch.bind_token_embeddings` so the row comes from the LLM actually run, and
   ``batch["separator_embed"]`` (``[D_llm]``) overrides both.

``forward`` needs ``text_embeds``: per image the prompt's token embeddings ``[T, D_llm]`` (every
prompt token except the image placeholder, as SliME's ``get_pure_text_embedding``). Without them
no selection is possible: all local tokens are kept (with a warning).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from safetensors import safe_open

from ..checkpoint import LazyCheckpoint
from ..dtypes import MODEL_DTYPES, dtype_name, torch_dtype
from ..encoders import ClipEncoder, encoder_from_spec
from ..errors import CheckpointError, FormatError
from ..fused_layout import union_eos_ids
from ..state_dict import load_state_dict_strict
from .anyres import anyres_views
from .base import FormatAdapter, LLMPart, Member, VisionBranch, claim_keys, llm_config_from
from .common import eos_ids, llama_llm_keys, tokenizer_dir
from .llava import LLM_RENAME, LLM_RULES, load_clip_tower, require_clip_tower
from .mgm import llama3_eot_ids
from .slime_modules import GatedProjector, LocalSampler
from .text import TextSide

PROJ = "model.mm_projector."
SAMPLER = "model.sampler."
DEFAULT_SEPARATOR_ID = 11  # SliME: tokenizer(",").input_ids[-1] for LLaMA-3


class SliMEBranch(VisionBranch):
    """CLIP + gated projector (global) + compressed, text-selected local crops.

    ``preprocess`` -> ``{"pixel_values": B x [1+n_i, 3, S, S], "image_sizes": [(w, h)],
    "grids": [(cols, rows)]}``; ``forward(batch, text_embeds)`` -> ``B x [576 + 1 + k_i, D_llm]``.
    After ``forward``, ``batch["local_kept"]`` holds each image's kept local indices
    (row-major positions in the ``rows*g x cols*g`` local token map).
    """

    kind = "slime"
    needs_text = True

    def __init__(self, encoder: ClipEncoder, projector: GatedProjector, sampler: LocalSampler, llm_hidden: int,
                 select_layer: int = -2, merge: str = "spatial", use_global_only: bool = False,
                 use_local_only: bool = False, separator_token_id: int = DEFAULT_SEPARATOR_ID):
        super().__init__()
        if merge not in ("spatial", "flat"):
            raise FormatError(f"mm_patch_merge_type {merge!r} not supported by SliME (expected spatial or flat)")
        self.encoder = encoder
        self.projector = projector
        self.sampler = sampler
        self.llm_hidden = llm_hidden
        self.select_layer = select_layer
        self.merge = merge
        self.use_global_only = use_global_only
        self.use_local_only = use_local_only
        self.separator_token_id = separator_token_id
        self.register_buffer("separator", torch.zeros(llm_hidden))
        self._embed_fn = None  # set by bind_token_embeddings (the fused model's merged table)

    def bind_token_embeddings(self, fn) -> None:
        """Use ``fn(ids [n]) -> [n, D_llm]`` (an LLM's embedding table) for the separator row
        instead of the row stored from SliME's own checkpoint."""
        self._embed_fn = fn

    def separator_embedding(self, batch: dict[str, Any]) -> torch.Tensor:
        """``[D_llm]``: ``batch["separator_embed"]``, else the bound table's row, else the stored row."""
        if batch.get("separator_embed") is not None:
            return batch["separator_embed"]
        if self._embed_fn is not None:
            ids = torch.tensor([self.separator_token_id], device=self.separator.device)
            return self._embed_fn(ids)[0]
        return self.separator

    # -- serialisation ------------------------------------------------------
    @property
    def output_dim(self) -> int:
        return self.llm_hidden

    def spec(self) -> dict[str, Any]:
        p, s = self.projector, self.sampler
        return {"encoder": self.encoder.spec(), "mm_hidden": p.attn.dim, "llm_hidden": self.llm_hidden,
                "global_grid": p.attn.grid, "num_heads": p.attn.num_heads, "learnable_gated": p.learnable_gated,
                "local_queries": s.grid ** 2, "top_p": s.top_p, "temperature": s.temperature,
                "select_layer": self.select_layer, "merge": self.merge, "use_global_only": self.use_global_only,
                "use_local_only": self.use_local_only, "separator_token_id": self.separator_token_id,
                "selection_dtype": None if s.selection_dtype is None else dtype_name(s.selection_dtype)}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "SliMEBranch":
        proj = GatedProjector(spec["mm_hidden"], spec["llm_hidden"], spec["global_grid"], spec["num_heads"],
                              spec["learnable_gated"])
        sampler = LocalSampler(spec["mm_hidden"], spec["local_queries"], spec["num_heads"], spec["top_p"],
                               spec["temperature"], selection_dtype(spec.get("selection_dtype")))
        return cls(encoder_from_spec(spec["encoder"]), proj, sampler, spec["llm_hidden"], spec["select_layer"],
                   spec["merge"], spec["use_global_only"], spec["use_local_only"], spec["separator_token_id"])

    # -- pixels -------------------------------------------------------------
    @property
    def crop_size(self) -> int:
        return self.encoder.image_size

    def preprocess(self, images: Sequence[Image.Image]) -> dict[str, Any]:
        pixel_values, sizes, grids = [], [], []
        for im in images:
            v = anyres_views(im, self.crop_size)
            pixel_values.append(self.encoder.processor(v.views, return_tensors="pt")["pixel_values"])
            sizes.append(v.image_size)
            grids.append((v.cols, v.rows))
        return {"pixel_values": pixel_values, "image_sizes": sizes, "grids": grids}

    # -- layout -------------------------------------------------------------
    def local_map_shape(self, grid: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of the local token map of an image cut into ``grid = (cols, rows)`` crops."""
        g = self.sampler.grid
        return grid[1] * g, grid[0] * g

    def token_grids(self, batch: dict[str, Any]) -> list[list[tuple[str, int, int]]]:
        """Per image: ``[("global", 24, 24), ("separator", 1, 1), locals]``; locals are
        ``("local", rows*12, cols*12)`` when all are kept, else ``("local_selected", 1, k)``
        (call after ``forward``, which records the selection in ``batch["local_kept"]``)."""
        gh, gw = self.encoder.grid
        kept = batch.get("local_kept")
        out = []
        for i, grid in enumerate(batch["grids"]):
            rows, cols = self.local_map_shape(grid)
            segs: list[tuple[str, int, int]] = []
            if not self.use_local_only:
                segs.append(("global", gh, gw))
            if not (self.use_local_only or self.use_global_only):
                segs.append(("separator", 1, 1))
            if not self.use_global_only:
                k = len(kept[i]) if kept is not None else rows * cols
                segs.append(("local", rows, cols) if k == rows * cols else ("local_selected", 1, k))
            out.append(segs)
        return out

    # -- forward ------------------------------------------------------------
    def _merge_locals(self, local: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``[n, g*g, D]`` per-crop tokens -> ``[n*g*g, D]`` (row-major over the whole map if spatial)."""
        n, q, d = local.shape
        if self.merge == "flat":
            return local.reshape(n * q, d)
        cols, rows = grid
        g = self.sampler.grid
        return local.view(rows, cols, g, g, d).permute(0, 2, 1, 3, 4).reshape(n * q, d)

    def forward(self, batch: dict[str, Any], text_embeds: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        pvs = batch["pixel_values"]
        if text_embeds is not None and len(text_embeds) != len(pvs):
            raise ValueError(f"got {len(text_embeds)} text embeddings for {len(pvs)} images")
        if text_embeds is None and not self.use_global_only:
            warnings.warn("SliME branch called without prompt embeddings: keeping all local tokens "
                          "(no text-guided selection)", stacklevel=2)
        sep = self.separator_embedding(batch)
        dt = self.projector.projection[0].weight.dtype
        out, kept_all = [], []
        for i, pv in enumerate(pvs):
            feats = self.encoder.features(pv, [self.select_layer], "patch")[:, 0].to(dt)   # [1+n, N, D]
            seq = []
            if not self.use_local_only:
                seq.append(self.projector(feats[:1])[0])                                   # [N, D_llm]
            if not self.use_global_only:
                local = self.projector.projection(self.sampler.compress(feats[1:]))         # [n, Q, D_llm]
                local = self._merge_locals(local, batch["grids"][i])
                if text_embeds is not None:
                    keep = self.sampler.select(local, text_embeds[i].to(local.device))
                else:
                    keep = torch.arange(local.shape[0], device=local.device)
                kept_all.append(keep)
                local = local[keep]
                if not self.use_local_only:
                    seq.append(sep.to(device=local.device, dtype=local.dtype)[None])
                seq.append(local)
            out.append(torch.cat(seq, dim=0))
        if kept_all:
            batch["local_kept"] = kept_all
        return out


def selection_dtype(name: str | None) -> torch.dtype | None:
    """The dtype of SliME's text-guided selection: None = the branch's dtype (SliME's own behaviour)."""
    if name is None:
        return None
    if name not in MODEL_DTYPES:
        raise ValueError(f"expected one of {', '.join(MODEL_DTYPES)} or null (the branch dtype), got {name!r}")
    return torch_dtype(name)


def _read_row(reader: LazyCheckpoint, key: str, row: int) -> torch.Tensor:
    """One row of a stored 2-D tensor without reading the rest (memory-mapped slice)."""
    info = reader.info(key)
    if not 0 <= row < info.shape[0]:
        raise FormatError(f"{reader.path}: separator token id {row} outside {key} ({info.shape[0]} rows)")
    try:
        with safe_open(str(info.file), framework="pt", device="cpu") as fh:
            return fh.get_slice(key)[row:row + 1][0].clone()
    except Exception as e:
        raise CheckpointError(f"{info.file}: cannot read {key} row {row} ({e})") from None


class SliMEAdapter(FormatAdapter):
    name = "slime"
    branch_kind = "slime"

    @classmethod
    def detect(cls, config: dict, keys: list[str]) -> bool:
        archs = config.get("architectures") or []
        llava = "LlavaLlamaForCausalLM" in archs or config.get("model_type") == "llava_llama"
        return llava and (config.get("mm_projector_type") == "gated"
                          or any(k.startswith((PROJ + "projection.", SAMPLER)) for k in keys))

    @classmethod
    def build_member(cls, path: Path, config: dict, reader: LazyCheckpoint, dtype: torch.dtype | None = None,
                     vision: bool = True, **options: Any) -> Member:
        usage, parts = claim_keys(reader.keys(), [
            ("encoder", r"^model\.vision_tower\.vision_tower\."),
            ("resampler", r"^model\.mm_projector\.attn\."),
            ("projector", r"^model\.mm_projector\.(projection\.|(w_gate|w_noise|mean|std)$)"),
            ("sampler", r"^model\.sampler\."),
            *[(p, rx) for rx, p in LLM_RULES],
        ])
        cfg_file = path / "config.json"
        _check_config(config, cfg_file)
        for part, what in (("projector", f"{PROJ}projection.*"), ("resampler", f"{PROJ}attn.*"),
                           ("sampler", f"{SAMPLER}post_qformer.*")):
            if not parts.get(part):
                raise FormatError(f"{path}: SliME checkpoint has no {what} weights")
        llm_conf = llm_config_from(config, path / "config.json")
        sep_id = int(config.get("seperator", config.get("separator", DEFAULT_SEPARATOR_ID)))
        llm = LLMPart(config=llm_conf, keys=llama_llm_keys(parts.get("llm", []), LLM_RENAME), reader=reader)
        if "model.embed_tokens.weight" not in llm.keys:
            raise FormatError(f"{path}: no model.embed_tokens.weight (SliME's separator is an embedding row)")
        require_clip_tower(path, config, parts.get("encoder", []), options)
        branch = None
        if vision:
            encoder = load_clip_tower(reader, config, parts.get("encoder", []), options)
            encoder.pad_square = False
            try:
                llm_hidden, mm_hidden = reader.shape(PROJ + "projection.0.weight")
                global_q = reader.shape(PROJ + "attn.query")[0]
                local_q = reader.shape(SAMPLER + "post_qformer.query")[0]
            except CheckpointError:
                raise FormatError(f"{path}: incomplete SliME projector/sampler weights") from None
            if mm_hidden != encoder.hidden_size:
                raise FormatError(f"{path}: projector input width {mm_hidden} != CLIP width {encoder.hidden_size}")
            if mm_hidden % 128:
                raise FormatError(f"{path}: SliME resamplers use width/128 heads; width {mm_hidden} is not a multiple of 128")
            n_tokens = encoder.grid[0] * encoder.grid[1]
            if global_q != n_tokens or math.isqrt(global_q) ** 2 != global_q:
                raise FormatError(f"{path}: gated projector has {global_q} queries but CLIP gives {n_tokens} tokens")
            dim = int(config.get("mm_resampler_dim", local_q))
            if dim != local_q:
                raise FormatError(f"{cfg_file}: mm_resampler_dim {dim} != post_qformer queries {local_q} in the weights")
            heads = mm_hidden // 128
            projector = GatedProjector(mm_hidden, llm_hidden, math.isqrt(global_q), heads,
                                       int(config.get("mm_learnable_gated", -1)))
            load_state_dict_strict(projector, {k[len(PROJ):]: reader.get(k)
                                               for k in parts["projector"] + parts["resampler"]},
                                   path, "gated projector weights")
            try:
                sel_dtype = selection_dtype(options.get("selection_dtype"))
            except ValueError as e:
                raise FormatError(f"{path}: options.selection_dtype: {e}") from None
            sampler = LocalSampler(mm_hidden, local_q, heads, float(config.get("mm_resampler_topp", 0.95)),
                                   float(config.get("mm_resampler_temp", 1.0)), sel_dtype)
            load_state_dict_strict(sampler, {k[len(SAMPLER):]: reader.get(k) for k in parts["sampler"]}, path,
                                   "sampler weights")

            if llm_hidden != llm_conf["hidden_size"]:
                raise FormatError(f"{path}: projector output {llm_hidden} != LLM hidden_size {llm_conf['hidden_size']}")
            branch = SliMEBranch(encoder, projector, sampler, llm_hidden, int(config.get("mm_vision_select_layer", -2)),
                                 config.get("mm_patch_merge_type", "spatial"), bool(config.get("use_global_only", False)),
                                 bool(config.get("use_local_only", False)), sep_id)
            branch.separator.copy_(_read_row(reader, llm.keys["model.embed_tokens.weight"], sep_id).float())
            if dtype is not None:
                branch.to(dtype)
            branch.eval()
        tok = tokenizer_dir(path)
        eot = llama3_eot_ids(tok)
        style = options.get("prompt_style") or ("slime_llama3" if eot else "vicuna_v1")
        eos = union_eos_ids(eos_ids(path, config), eot)
        text = TextSide(tokenizer_path=tok, prompt_style=style, eos_token_ids=eos, separator_token_id=sep_id)
        return Member(name=path.name, format=cls.name, path=path, llm=llm, vision=branch, text=text,
                      key_usage=usage, config=config)


def _check_config(config: dict, cfg_file: Path) -> None:
    checks = {"mm_projector_type": ("gated",), "mm_resampler_type": ("cosine",),
              "image_aspect_ratio": ("anyres",), "mm_vision_select_feature": ("patch",)}
    defaults = {"mm_projector_type": "gated", "mm_resampler_type": "cosine", "image_aspect_ratio": "anyres",
                "mm_vision_select_feature": "patch"}
    for key, allowed in checks.items():
        val = config.get(key, defaults[key])
        if val not in allowed:
            raise FormatError(f"{cfg_file}: {key} {val!r} is not supported for SliME (expected {allowed[0]!r})")


__all__ = ["SliMEAdapter", "SliMEBranch"]
