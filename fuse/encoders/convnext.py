"""ConvNeXt encoder (transformers ``ConvNextModel``) and the timm/open_clip key map.

MiniGemini's aux tower is open_clip ``convnext_large_d_320``, i.e. a timm
ConvNeXt trunk stored as ``vision_stem.*`` / ``vision_stages.*``. The map below
renames those keys to transformers' ConvNeXt names (and back, for building test
checkpoints in the original layout):

=======================================  =============================================
timm / open_clip                         transformers ``ConvNextModel``
=======================================  =============================================
``stem.0.{weight,bias}`` (conv 4x4/4)    ``embeddings.patch_embeddings.*``
``stem.1.{weight,bias}`` (LayerNorm2d)   ``embeddings.layernorm.*``
``stages.S.downsample.0.*`` (LN2d)       ``encoder.stages.S.downsampling_layer.0.*``
``stages.S.downsample.1.*`` (conv 2x2)   ``encoder.stages.S.downsampling_layer.1.*``
``stages.S.blocks.B.conv_dw.*``          ``encoder.stages.S.layers.B.dwconv.*``
``stages.S.blocks.B.norm.*``             ``encoder.stages.S.layers.B.layernorm.*``
``stages.S.blocks.B.mlp.fc1.*``          ``encoder.stages.S.layers.B.pwconv1.*``
``stages.S.blocks.B.mlp.fc2.*``          ``encoder.stages.S.layers.B.pwconv2.*``
``stages.S.blocks.B.gamma``              ``encoder.stages.S.layers.B.layer_scale_parameter``
``head.norm.*`` / ``norm_pre.*``         ``layernorm.*``
=======================================  =============================================

``vision_stem.`` / ``vision_stages.`` (MGM) and a leading ``trunk.`` (open_clip)
are accepted as aliases of ``stem.`` / ``stages.``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from ..errors import FormatError
from ..state_dict import load_state_dict_strict
from .base import Encoder, LazyClass
from .vit import CLIP_MEAN, CLIP_STD

if TYPE_CHECKING:
    from transformers import ConvNextConfig

_BLOCK = {"conv_dw": "dwconv", "norm": "layernorm", "mlp.fc1": "pwconv1", "mlp.fc2": "pwconv2"}
_BLOCK_INV = {v: k for k, v in _BLOCK.items()}


def timm_to_hf_key(key: str) -> str | None:
    """Rename one timm/open_clip ConvNeXt key to transformers naming (None if not a trunk key)."""
    k = re.sub(r"^trunk\.", "", key)
    k = re.sub(r"^vision_(stem|stages)\.", r"\1.", k)
    if m := re.fullmatch(r"stem\.0\.(weight|bias)", k):
        return f"embeddings.patch_embeddings.{m[1]}"
    if m := re.fullmatch(r"stem\.1\.(weight|bias)", k):
        return f"embeddings.layernorm.{m[1]}"
    if m := re.fullmatch(r"stages\.(\d+)\.downsample\.([01])\.(weight|bias)", k):
        return f"encoder.stages.{m[1]}.downsampling_layer.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.gamma", k):
        return f"encoder.stages.{m[1]}.layers.{m[2]}.layer_scale_parameter"
    if m := re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(conv_dw|norm|mlp\.fc1|mlp\.fc2)\.(weight|bias)", k):
        return f"encoder.stages.{m[1]}.layers.{m[2]}.{_BLOCK[m[3]]}.{m[4]}"
    if m := re.fullmatch(r"(?:head\.norm|norm_pre)\.(weight|bias)", k):
        return f"layernorm.{m[1]}"
    return None


def hf_to_timm_key(key: str, stem: str = "stem", stages: str = "stages") -> str:
    """Inverse of :func:`timm_to_hf_key` (``stem``/``stages`` prefixes selectable for MGM)."""
    if m := re.fullmatch(r"embeddings\.patch_embeddings\.(weight|bias)", key):
        return f"{stem}.0.{m[1]}"
    if m := re.fullmatch(r"embeddings\.layernorm\.(weight|bias)", key):
        return f"{stem}.1.{m[1]}"
    if m := re.fullmatch(r"encoder\.stages\.(\d+)\.downsampling_layer\.([01])\.(weight|bias)", key):
        return f"{stages}.{m[1]}.downsample.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_scale_parameter", key):
        return f"{stages}.{m[1]}.blocks.{m[2]}.gamma"
    if m := re.fullmatch(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(dwconv|layernorm|pwconv1|pwconv2)\.(weight|bias)", key):
        return f"{stages}.{m[1]}.blocks.{m[2]}.{_BLOCK_INV[m[3]]}.{m[4]}"
    if m := re.fullmatch(r"layernorm\.(weight|bias)", key):
        return f"head.norm.{m[1]}"
    raise KeyError(f"not a ConvNextModel key: {key}")


def convert_timm_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a timm/open_clip/MGM ConvNeXt trunk state dict to ``ConvNextModel`` names.

    Raises FormatError naming the first key that is not part of a ConvNeXt trunk.
    """
    out = {}
    for k, v in sd.items():
        new = timm_to_hf_key(k)
        if new is None:
            raise FormatError(f"ConvNeXt weights: unexpected key {k!r} (not a timm ConvNeXt trunk key)")
        out[new] = v
    return out


def config_from_timm_shapes(shapes: Mapping[str, Sequence[int]], **kw) -> ConvNextConfig:
    """Infer depths/dims of a ConvNeXt from timm-named key shapes (no data needed)."""
    hf = {timm_to_hf_key(k): tuple(s) for k, s in shapes.items()}
    if "embeddings.patch_embeddings.weight" not in hf:
        raise FormatError("ConvNeXt weights: no stem convolution (stem.0.weight) found")
    stem = hf["embeddings.patch_embeddings.weight"]
    depths, dims = [], []
    s = 0
    while any(k and k.startswith(f"encoder.stages.{s}.") for k in hf):
        depths.append(1 + max(int(k.split(".")[4]) for k in hf if k and k.startswith(f"encoder.stages.{s}.layers.")))
        dims.append(hf[f"encoder.stages.{s}.layers.0.dwconv.weight"][0])
        s += 1
    from transformers import ConvNextConfig

    return ConvNextConfig(num_channels=stem[1], patch_size=stem[2], num_stages=len(depths), depths=depths, hidden_sizes=dims,
                          layer_norm_eps=1e-6, hidden_act="gelu", **kw)


class ConvNextEncoder(Encoder):
    """transformers ``ConvNextModel``; features are per-stage maps rather than layers.

    ``feature_maps(pixel_values)`` -> list of 4 stage outputs ``[B, C_s, H/2^(s+2), W/2^(s+2)]``.
    ``features(pixel_values, layers=[s])`` returns ``[B, L, N, D]`` for stages of equal shape
    (index 0 = stem output, 1..4 = stages, like ``hidden_states``).
    """

    kind = "convnext"
    model_cls = LazyClass("transformers", "ConvNextModel")
    config_cls = LazyClass("transformers", "ConvNextConfig")
    processor_cls = LazyClass("transformers.models.convnext.image_processing_pil_convnext", "ConvNextImageProcessorPil")
    num_prefix_tokens = 0
    # open_clip convnext: CLIP mean/std, plain resize to the square size (crop_pct only < 384).
    default_processor = {"size": lambda s: {"shortest_edge": s}, "crop_pct": 1.0,
                         "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}

    @staticmethod
    def image_size_of(config) -> int:
        return int(getattr(config, "image_size", 224))

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_sizes[-1])

    @property
    def num_layers(self) -> int:
        return len(self.config.depths)

    @property
    def patch_size(self) -> int:
        return int(self.config.patch_size) * 2 ** (len(self.config.depths) - 1)

    def load_timm_state_dict(self, sd: Mapping[str, torch.Tensor]) -> list[str]:
        """Load timm/open_clip-named weights; returns the HF keys the source did not have."""
        head_norm = {"layernorm.weight", "layernorm.bias"}  # final head norm: MGM's trunk has none
        return load_state_dict_strict(self.model, convert_timm_state_dict(sd), "timm state dict", "ConvNeXt weights",
                                      may_miss=head_norm.__contains__)

    def hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(pixel_values=pixel_values.to(self.device, self.dtype), output_hidden_states=True)
        return tuple(out.hidden_states)

    def feature_maps(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The 4 stage outputs, each ``[B, C_s, H_s, W_s]``."""
        return list(self.hidden_states(pixel_values)[1:])

    def features(self, pixel_values: torch.Tensor, layers: Sequence[int] = (-1,), select: str = "patch") -> torch.Tensor:
        hs = self.hidden_states(pixel_values)
        maps = [hs[i].flatten(2).transpose(1, 2) for i in layers]
        if len({m.shape for m in maps}) != 1:
            raise ValueError("convnext: requested stages have different shapes; use feature_maps()")
        return torch.stack(maps, dim=1)
