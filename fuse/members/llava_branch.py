"""LLaVA's vision branch: one ViT encoder -> selected layer(s) -> projector.

Used by both LLaVA checkpoint formats (original ``LlavaLlamaForCausalLM`` and
transformers ``LlavaForConditionalGeneration``). Equal to transformers'
``LlavaModel.get_image_features``: hidden states of ``feature_layers`` (one int,
or several concatenated on channels), CLS dropped for ``select="patch"``, then
the projector.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image

from ..encoders import Encoder, encoder_from_spec
from ..fusions.projectors import build_projector
from .base import VisionBranch


class LlavaBranch(VisionBranch):
    kind = "llava"

    def __init__(self, encoder: Encoder, feature_layers: int | Sequence[int], select: str,
                 projector_type: str, llm_hidden: int, projector_bias: bool = True):
        super().__init__()
        self.encoder = encoder
        self.feature_layers = feature_layers if isinstance(feature_layers, int) else list(feature_layers)
        self.select = select
        self.projector_type = projector_type
        self.projector_bias = projector_bias
        self.llm_hidden = llm_hidden
        n = 1 if isinstance(feature_layers, int) else len(self.feature_layers)
        self.projector = build_projector(projector_type, encoder.hidden_size * n, llm_hidden, projector_bias)

    @property
    def layers(self) -> list[int]:
        return [self.feature_layers] if isinstance(self.feature_layers, int) else list(self.feature_layers)

    @property
    def output_dim(self) -> int:
        return self.llm_hidden

    def spec(self) -> dict[str, Any]:
        return {"encoder": self.encoder.spec(), "feature_layers": self.feature_layers, "select": self.select,
                "projector_type": self.projector_type, "projector_bias": self.projector_bias,
                "llm_hidden": self.llm_hidden}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "LlavaBranch":
        return cls(encoder_from_spec(spec["encoder"]), spec["feature_layers"], spec["select"],
                   spec["projector_type"], spec["llm_hidden"], spec.get("projector_bias", True))

    def preprocess(self, images: Sequence[Image.Image]) -> dict[str, Any]:
        return {"pixel_values": self.encoder.preprocess(images)}

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Selected encoder features before the projector: ``[B, N, D_enc * L]``."""
        feats = self.encoder.features(pixel_values, self.layers, self.select)  # [B, L, N, D]
        return feats.permute(0, 2, 1, 3).flatten(2)

    def forward(self, batch: dict[str, Any], text_embeds=None) -> list[torch.Tensor]:
        feats = self.image_features(batch["pixel_values"])
        tokens = self.projector(feats.to(self.projector_dtype))
        return list(tokens)

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype if any(True for _ in self.projector.parameters()) else self.encoder.dtype

    def token_grids(self, batch: dict[str, Any]):
        if self.select != "patch":
            return None
        h, w = self.encoder.grid
        return [[("image", h, w)] for _ in range(len(batch["pixel_values"]))]
