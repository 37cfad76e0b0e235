"""MiniGemini (MGM) members: format ``mgm`` and vision branch kind ``mgm``.

Checkpoint (``MGMLlamaForCausalLM``, model_type ``mgm``; e.g. YanweiLi/MGM-8B, MGM-8B-HD):

=====================================================  ==============  ===========
keys                                                   part            module here
=====================================================  ==============  ===========
``model.embed_tokens`` / ``layers.N`` / ``norm``,      ``llm``         (LLaMA names)
``lm_head``
``model.vision_tower.vision_tower.vision_model.*``     ``encoder``     CLIP ViT-L/14-336
``model.vision_tower_aux.vision_stem.{0,1}.*``,        ``aux_encoder`` ConvNeXt-L (timm names
``model.vision_tower_aux.vision_stages.{0..3}.*``                      -> transformers ConvNextModel)
``model.vlm_uni_{query,aux,val}_projector.{0,1}.*``    ``mining``      :class:`PatchInfoMining`
``model.mm_projector.{0,2}.*``                         ``projector``   mlp2x_gelu
=====================================================  ==============  ===========

Vision branch (per image), following MGM's ``encode_images``:

1. alpha dropped (``Image.convert("RGB")``); padded to square with the CLIP mean colour when the
   config says ``image_aspect_ratio: pad`` (MGM's ``process_images``; otherwise the CLIP
   processor's shortest-edge resize and centre crop do the squaring); CLIP processor at
   ``image_size_aux`` (768; 1536 for HD) -> ConvNeXt input. The CLIP input is that same
   normalised tensor bilinearly resized (``align_corners=False``, no antialias) to ``336 * image_grid``.
2. CLIP layer ``mm_vision_select_layer`` (-2), patch tokens: ``[576, 1024]`` per view.
3. ConvNeXt 4 stage maps -> upsample to stage 0 and concatenate -> ``[2880, 192, 192]``.
4. patch info mining over 8x8 windows, added to the CLIP tokens; mlp2x_gelu projector.

The branch runs in eval mode, so it is deterministic. (MGM's own code never puts its open_clip
ConvNeXt in eval mode, and ``convnext_large_d_320`` has stochastic depth 0.1, so upstream
inference drops residual branches at random; the trunk here has no stochastic depth at all.)

HD (``image_grid: 2``, ``image_global: true``): the 672 px CLIP input is cut into 2x2
336 px crops (row-major) plus a global 336 px view; the aux map is cut likewise (crops)
and bilinearly halved (global). Output ``[global 576][crop 0..3 x 576]`` = 2880 tokens.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from ..checkpoint import LazyCheckpoint
from ..encoders import ClipEncoder, ConvNextEncoder, encoder_from_spec
from ..encoders.convnext import config_from_timm_shapes
from ..errors import FormatError
from ..fusions.projectors import build_projector
from ..fused_layout import union_eos_ids
from ..images import mean_color, pad_to_square, to_rgb
from ..state_dict import load_state_dict_strict
from .base import FormatAdapter, LLMPart, Member, VisionBranch, claim_keys, llm_config_from
from .common import eos_ids, llama_llm_keys, tokenizer_dir
from .llava import LLM_RENAME, LLM_RULES, load_clip_tower, require_clip_tower
from .llava_hf import load_projector
from .mgm_mining import PatchInfoMining, concat_stage_maps
from .text import TextSide, tokenizer_vocab

AUX = "model.vision_tower_aux."
MINING = "model.vlm_uni_"
PROJ = "model.mm_projector."
MGM_ARCHS = ("MGMLlamaForCausalLM", "MiniGeminiLlamaForCausalLM")
MGM_TYPES = ("mgm", "mini_gemini")


class MGMBranch(VisionBranch):
    """CLIP + ConvNeXt aux tower + patch info mining + projector (see module docstring).

    ``preprocess`` -> ``{"pixel_values": [B, V, 3, S, S], "aux_pixel_values": [B, 3, A, A]}``
    with ``V = 1`` (or ``grid**2 (+1 global)`` for HD); ``forward`` -> ``B x [V*N, D_llm]``.
    """

    kind = "mgm"

    def __init__(self, encoder: ClipEncoder, aux_encoder: ConvNextEncoder, mining: PatchInfoMining,
                 projector_type: str, llm_hidden: int, select_layer: int = -2, image_size_aux: int = 768,
                 image_grid: int = 1, image_global: bool = False, pad_square: bool = True):
        super().__init__()
        self.encoder = encoder
        self.aux_encoder = aux_encoder
        self.mining = mining
        self.projector_type = projector_type
        self.llm_hidden = llm_hidden
        self.projector = build_projector(projector_type, mining.query_dim, llm_hidden)
        self.select_layer = select_layer
        self.image_size_aux = image_size_aux
        self.image_grid = image_grid
        self.image_global = image_global
        self.pad_square = pad_square  # config image_aspect_ratio == "pad"
        self._aux_processor = None

    # -- serialisation ------------------------------------------------------
    @property
    def output_dim(self) -> int:
        return self.llm_hidden

    def spec(self) -> dict[str, Any]:
        return {"encoder": self.encoder.spec(), "aux_encoder": self.aux_encoder.spec(),
                "query_dim": self.mining.query_dim, "aux_dim": self.mining.aux_dim,
                "projector_type": self.projector_type, "llm_hidden": self.llm_hidden,
                "select_layer": self.select_layer, "image_size_aux": self.image_size_aux,
                "image_grid": self.image_grid, "image_global": self.image_global, "pad_square": self.pad_square}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "MGMBranch":
        return cls(encoder_from_spec(spec["encoder"]), encoder_from_spec(spec["aux_encoder"]),
                   PatchInfoMining(spec["query_dim"], spec["aux_dim"]), spec["projector_type"], spec["llm_hidden"],
                   spec["select_layer"], spec["image_size_aux"], spec["image_grid"], spec["image_global"],
                   spec.get("pad_square", True))  # branches saved before the flag existed were padded

    # -- layout -------------------------------------------------------------
    @property
    def views_per_image(self) -> int:
        return self.image_grid ** 2 + (1 if self.image_grid > 1 and self.image_global else 0)

    @property
    def tokens_per_image(self) -> int:
        h, w = self.encoder.grid
        return self.views_per_image * h * w

    def token_grids(self, batch: dict[str, Any]) -> list[list[tuple[str, int, int]]]:
        h, w = self.encoder.grid
        if self.image_grid == 1:
            segs = [("image", h, w)]
        else:
            segs = [("global", h, w)] if self.image_global else []
            g = self.image_grid
            segs += [(f"crop_{r}_{c}", h, w) for r in range(g) for c in range(g)]
        return [list(segs) for _ in range(len(batch["aux_pixel_values"]))]

    # -- pixels -------------------------------------------------------------
    @property
    def aux_processor(self):
        """The CLIP processor re-targeted to ``image_size_aux`` (MGM overrides crop_size/size)."""
        if self._aux_processor is None:
            d = {k: v for k, v in self.encoder.processor.to_dict().items()
                 if k not in ("image_processor_type", "processor_class")}
            a = self.image_size_aux
            d.update(size={"shortest_edge": a}, crop_size={"height": a, "width": a})
            self._aux_processor = type(self.encoder.processor)(**d)
        return self._aux_processor

    def preprocess(self, images: Sequence[Image.Image]) -> dict[str, Any]:
        fill = mean_color(tuple(self.encoder.processor.image_mean))
        rgb = [to_rgb(im) for im in images]
        squares = [pad_to_square(im, fill) for im in rgb] if self.pad_square else rgb
        aux = self.aux_processor(squares, return_tensors="pt")["pixel_values"]            # [B, 3, A, A]
        s, g = self.encoder.image_size, self.image_grid
        raw = F.interpolate(aux, size=(s * g, s * g), mode="bilinear", align_corners=False)
        if g == 1:
            views = raw[:, None]
        else:
            b = raw.shape[0]
            views = raw.reshape(b, 3, g, s, g, s).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, 3, s, s)
            if self.image_global:
                glob = F.interpolate(raw, size=(s, s), mode="bilinear", align_corners=False)
                views = torch.cat([views, glob[:, None]], dim=1)                          # [crops..., global]
        return {"pixel_values": views.contiguous(), "aux_pixel_values": aux}

    # -- forward ------------------------------------------------------------
    def aux_map(self, aux_pixel_values: torch.Tensor) -> torch.Tensor:
        """ConvNeXt stage maps concatenated at stage-0 resolution: ``[B, C_aux, H0, W0]``."""
        return concat_stage_maps(self.aux_encoder.feature_maps(aux_pixel_values))

    def mine(self, tokens: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        """``tokens + mining(tokens, aux)`` in the mining module's dtype."""
        dt = next(self.mining.parameters()).dtype
        tokens = tokens.to(dt)
        return tokens + self.mining(tokens, aux.to(dt))

    def forward(self, batch: dict[str, Any], text_embeds=None) -> list[torch.Tensor]:
        pv = batch["pixel_values"]
        b, v = pv.shape[:2]
        feats = self.encoder.features(pv.flatten(0, 1), [self.select_layer], "patch")[:, 0]   # [B*V, N, D]
        n, d = feats.shape[1:]
        feats = feats.view(b, v, n, d)
        aux = self.aux_map(batch["aux_pixel_values"])
        g = self.image_grid
        if g == 1:
            seq = self.mine(feats[:, 0], aux)
        else:
            c, hh = aux.shape[1], aux.shape[-1] // g
            aux_crops = aux.reshape(b, c, g, hh, g, hh).permute(0, 2, 4, 1, 3, 5).reshape(b * g * g, c, hh, hh)
            seq = self.mine(feats[:, :g * g].flatten(0, 1), aux_crops).view(b, g * g * n, -1)
            if self.image_global:
                aux_glob = F.interpolate(aux.float(), scale_factor=1 / g, mode="bilinear",
                                         align_corners=False).to(aux.dtype)
                seq = torch.cat([self.mine(feats[:, g * g], aux_glob), seq], dim=1)          # [global, crops]
        return list(self.projector(seq))


def _aux_size_ok(image_size_aux: int, stem_patch: int, grid: int, image_grid: int) -> bool:
    return image_size_aux % stem_patch == 0 and (image_size_aux // stem_patch) % (grid * image_grid) == 0


class MGMAdapter(FormatAdapter):
    name = "mgm"
    branch_kind = "mgm"

    @classmethod
    def copyable_vision(cls, member: Member) -> bool:
        return "encoder" in member.key_usage.values()

    @classmethod
    def detect(cls, config: dict, keys: list[str]) -> bool:
        archs = config.get("architectures") or []
        return any(a in archs for a in MGM_ARCHS) or config.get("model_type") in MGM_TYPES

    @classmethod
    def build_member(cls, path: Path, config: dict, reader: LazyCheckpoint, dtype: torch.dtype | None = None,
                     vision: bool = True, **options: Any) -> Member:
        usage, parts = claim_keys(reader.keys(), [
            ("encoder", r"^model\.vision_tower\.vision_tower\."),
            ("aux_encoder", r"^model\.vision_tower_aux\."),
            ("mining", r"^model\.vlm_uni_(query|aux|val)_projector\."),
            ("projector", r"^model\.mm_projector\."),
            *[(p, rx) for rx, p in LLM_RULES],
        ])
        cfg_file = path / "config.json"
        if not parts.get("aux_encoder"):
            raise FormatError(f"{path}: MGM checkpoint has no aux vision tower weights "
                              f"({AUX}vision_stem.* / {AUX}vision_stages.*); MGM needs its ConvNeXt tower")
        if not parts.get("mining"):
            raise FormatError(f"{path}: MGM checkpoint has no patch-info-mining weights ({MINING}*_projector.*)")
        if not parts.get("projector"):
            raise FormatError(f"{path}: MGM checkpoint has no {PROJ}* weights")

        llm_conf = llm_config_from(config, path / "config.json")
        require_clip_tower(path, config, parts.get("encoder", []), options)
        branch = None
        if vision:
            encoder = load_clip_tower(reader, config, parts.get("encoder", []), options)
            pad = config.get("image_aspect_ratio") == "pad"  # MGM's process_images pads only then
            encoder.pad_square = pad
            aux_encoder = _load_aux_tower(reader, parts["aux_encoder"], config, path)

            try:
                query_dim = reader.shape(MINING + "query_projector.1.weight")[0]
                aux_dim = reader.shape(MINING + "aux_projector.0.weight")[0]
            except Exception:
                raise FormatError(f"{path}: incomplete patch-info-mining weights ({MINING}*_projector.{{0,1}})") from None
            if query_dim != encoder.hidden_size:
                raise FormatError(f"{path}: mining query width {query_dim} != CLIP width {encoder.hidden_size}")
            stage_sum = sum(aux_encoder.config.hidden_sizes)
            if aux_dim != stage_sum:
                raise FormatError(f"{path}: mining aux width {aux_dim} != sum of ConvNeXt stage widths {stage_sum}")
            mining = PatchInfoMining(query_dim, aux_dim)
            load_state_dict_strict(mining, {k[len(MINING):]: reader.get(k) for k in parts["mining"]}, path,
                                   "patch-info-mining weights")

            image_grid = int(config.get("image_grid", 1) or 1)
            image_global = bool(config.get("image_global", False))
            size_aux = int(config.get("image_size_aux", aux_encoder.config.image_size))
            grid = encoder.grid[0]
            if not _aux_size_ok(size_aux, aux_encoder.config.patch_size, grid, image_grid):
                raise FormatError(f"{cfg_file}: image_size_aux {size_aux} must give a stage-0 map divisible into "
                                  f"{grid * image_grid}x{grid * image_grid} windows")
            select = config.get("mm_vision_select_feature", "patch")
            if select != "patch":
                raise FormatError(f"{cfg_file}: mm_vision_select_feature {select!r} not supported by MGM (expected patch)")
            branch = MGMBranch(encoder, aux_encoder, mining, config.get("mm_projector_type", "mlp2x_gelu"),
                               llm_conf["hidden_size"], int(config.get("mm_vision_select_layer", -2)), size_aux,
                               image_grid, image_global, pad)
            load_projector(branch.projector, {k[len(PROJ):]: reader.get(k) for k in parts["projector"]}, path)
            if dtype is not None:
                branch.to(dtype)
            branch.eval()
        text = mgm_text_side(path, config, options)
        llm = LLMPart(config=llm_conf, keys=llama_llm_keys(parts.get("llm", []), LLM_RENAME), reader=reader)
        return Member(name=path.name, format=cls.name, path=path, llm=llm, vision=branch, text=text,
                      key_usage=usage, config=config)


def _load_aux_tower(reader: LazyCheckpoint, keys: list[str], config: dict, path: Path) -> ConvNextEncoder:
    """The ConvNeXt aux tower from ``model.vision_tower_aux.vision_{stem,stages}.*`` (timm names)."""
    bad = [k for k in keys if not re.match(re.escape(AUX) + r"vision_(stem|stages)\.", k)]
    if bad:
        raise FormatError(f"{path}: unexpected aux tower tensors, e.g. {bad[:3]} (expected vision_stem/vision_stages)")
    shapes = {k[len(AUX):]: reader.shape(k) for k in keys}
    try:
        cfg = config_from_timm_shapes(shapes, image_size=int(config.get("image_size_aux", 768)))
        enc = ConvNextEncoder.from_config(cfg)
        missing = enc.load_timm_state_dict({k[len(AUX):]: reader.get(k) for k in keys})
        with torch.no_grad():  # MGM's trunk has no head norm (unused by feature_maps): make it identity
            for name in missing:
                enc.model.get_parameter(name).fill_(1.0 if name.endswith("weight") else 0.0)
    except FormatError as e:
        raise FormatError(f"{path}: aux tower: {e}") from None
    except (KeyError, IndexError, ValueError, RuntimeError) as e:
        raise FormatError(f"{path}: aux tower weights are not a ConvNeXt trunk ({e})") from None
    return enc


def llama3_eot_ids(tok_path: str | None) -> list[int]:
    """``[id of <|eot_id|>]`` when the tokenizer is LLaMA-3 style (has it), else ``[]``."""
    if tok_path is None:
        return []
    try:
        vocab = tokenizer_vocab(tok_path)
    except Exception:
        return []
    i = vocab.get("<|eot_id|>")
    return [int(i)] if i is not None and "<|start_header_id|>" in vocab else []


def mgm_text_side(path: Path, config: dict, options: dict) -> TextSide:
    """MGM's text side: ``mgm_llama_3`` for LLaMA-3 tokenizers (else ``vicuna_v1``, MGM's
    conv mode for its Vicuna models), stopping on the config/generation eos ids plus ``<|eot_id|>`` (MGM's
    llama_3 separator, on which its generation stops)."""
    tok = tokenizer_dir(path)
    eot = llama3_eot_ids(tok)
    style = options.get("prompt_style") or ("mgm_llama_3" if eot else "vicuna_v1")
    eos = union_eos_ids(eos_ids(path, config), eot)
    return TextSide(tokenizer_path=tok, prompt_style=style, eos_token_ids=eos)


__all__ = ["MGMAdapter", "MGMBranch", "mgm_text_side", "llama3_eot_ids"]
