"""The shared vision-encoder interface.

An :class:`Encoder` wraps one transformers vision model plus its PIL image
processor (no torchvision). Everything that needs pixels -> features (members,
the COMM trainer, analysis) goes through it:

- ``preprocess(images) -> pixel_values [B, 3, H, W]``
- ``features(pixel_values, layers, select) -> [B, L, N, D]``: the hidden states
  of the requested layers, HF indexing (0 = embedding output, i = output of
  block i, negatives count from the end, so -2 is LLaVA's "penultimate layer").
  ``select="patch"`` drops prefix tokens (CLS/registers), ``"full"`` keeps them.
- ``grid``: (h, w) of the patch grid at the configured image size.

Encoders are built from a local dir or hub id (``from_pretrained``), from a
config (tiny models in tests), and serialise to a JSON ``spec`` + state dict so
a member's vision branch can be saved and rebuilt without the source checkpoint.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch
from PIL import Image
from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

from ..errors import CheckpointError
from ..images import mean_color, pad_to_square, to_rgb

Select = str  # "patch" | "full"


class LazyClass:
    """A class attribute naming a transformers class, imported on first access.

    ``model_cls = LazyClass("transformers", "CLIPVisionModel")`` keeps ``import fuse``
    (and the merge path, which never builds an encoder) free of transformers' modeling
    imports, which cost seconds of start-up.
    """

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __get__(self, obj: Any, owner: type | None = None) -> type:
        return getattr(importlib.import_module(self.module), self.name)


class Encoder(nn.Module):
    """A frozen-by-default vision encoder with its preprocessing."""

    kind: ClassVar[str] = ""
    model_cls: ClassVar[type[PreTrainedModel]]
    config_cls: ClassVar[type[PretrainedConfig]]
    processor_cls: ClassVar[type]
    num_prefix_tokens: ClassVar[int] = 1
    default_processor: ClassVar[dict[str, Any]] = {}

    def __init__(self, model: PreTrainedModel, processor: Any, pad_square: bool = False):
        super().__init__()
        self.model = model
        self.processor = processor
        self.pad_square = pad_square

    # -- construction -------------------------------------------------------
    @classmethod
    def from_config(cls, config: PretrainedConfig | dict, processor: dict | None = None,
                    pad_square: bool = False, dtype: torch.dtype | None = None) -> "Encoder":
        """Randomly initialised encoder from a (possibly tiny) config."""
        if isinstance(config, dict):
            config = cls.config_cls(**{k: v for k, v in config.items() if k not in ("model_type", "transformers_version")})
        model = cls.model_cls(config)
        if dtype is not None:
            model = model.to(dtype)
        return cls(model.eval(), cls.build_processor(config, processor), pad_square)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, processor: dict | None = None,
                        pad_square: bool = False, dtype: torch.dtype | None = None,
                        **kwargs: Any) -> "Encoder":
        """Load weights (+ preprocessor_config.json when present) from a dir or hub id.
        safetensors weights only: a pickled ``pytorch_model.bin`` is never opened."""
        try:
            model = cls.model_cls.from_pretrained(str(source), dtype=dtype, **{**kwargs, "use_safetensors": True})
        except OSError as e:
            raise CheckpointError(f"{source}: cannot load {cls.kind} encoder ({str(e).splitlines()[0]})") from None
        proc = None
        if processor is None and os.path.isfile(os.path.join(str(source), "preprocessor_config.json")):
            proc = cls.processor_cls.from_pretrained(str(source))
        return cls(model.eval(), proc or cls.build_processor(model.config, processor), pad_square)

    @classmethod
    def build_processor(cls, config: PretrainedConfig, overrides: dict | None = None) -> Any:
        size = cls.image_size_of(config)
        kw = {k: (v(size) if callable(v) else v) for k, v in cls.default_processor.items()}
        kw.update(overrides or {})
        return cls.processor_cls(**kw)

    @staticmethod
    def image_size_of(config: PretrainedConfig) -> int:
        return int(getattr(config, "image_size", 224))

    def load_weights(self, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load a transformers-named state dict, with or without the ``vision_model.`` level.

        transformers 5 keeps CLIP/SigLIP vision weights without ``vision_model.`` at run time
        while hub checkpoints have it; both spellings are accepted. Raises FormatError naming
        ``source`` on missing or unexpected keys.
        """
        from ..state_dict import load_state_dict_strict

        own = set(self.model.state_dict())
        uses_prefix = any(k.startswith("vision_model.") for k in own)
        fixed = {}
        for k, v in state_dict.items():
            bare = k[len("vision_model."):] if k.startswith("vision_model.") else k
            fixed["vision_model." + bare if uses_prefix else bare] = v
        load_state_dict_strict(self.model, fixed, source, f"{self.kind} encoder weights and its config",
                               may_miss=lambda k: k.endswith("position_ids"))  # a buffer, rebuilt at init

    # -- serialisation ------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        """JSON-able description from which :func:`fuse.encoders.encoder_from_spec` rebuilds it."""
        proc = self.processor.to_dict()
        proc.pop("image_processor_type", None)
        proc.pop("processor_class", None)
        return {"kind": self.kind, "config": self.model.config.to_dict(), "processor": proc,
                "pad_square": self.pad_square}

    # -- facts --------------------------------------------------------------
    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def image_size(self) -> int:
        """Side of the square input the processor produces."""
        crop = getattr(self.processor, "crop_size", None)
        if getattr(self.processor, "do_center_crop", False) and crop:
            return int(crop["height"])
        size = self.processor.size
        return int(size.get("height") or size.get("shortest_edge"))

    @property
    def patch_size(self) -> int:
        return int(self.config.patch_size)

    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // self.patch_size
        return g, g

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- pixels -------------------------------------------------------------
    def prepare_image(self, image: Image.Image) -> Image.Image:
        image = to_rgb(image)
        if self.pad_square:
            image = pad_to_square(image, mean_color(tuple(self.processor.image_mean)))
        return image

    def preprocess(self, images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        """PIL image(s) -> ``pixel_values [B, 3, H, W]`` (float32)."""
        if isinstance(images, Image.Image):
            images = [images]
        images = [self.prepare_image(im) for im in images]
        return self.processor(images, return_tensors="pt")["pixel_values"]

    def hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """All hidden states, each ``[B, T, D]`` (T = prefix + patches)."""
        out = self.model(pixel_values=pixel_values.to(self.device, self.dtype), output_hidden_states=True)
        return out.hidden_states

    def features(self, pixel_values: torch.Tensor, layers: Sequence[int] = (-2,),
                 select: Select = "patch") -> torch.Tensor:
        """Stacked hidden states of ``layers``: ``[B, L, N, D]``.

        N = grid h*w with ``select="patch"``; prefix tokens included with ``"full"``.
        """
        if select not in ("patch", "full"):
            raise ValueError(f"select must be 'patch' or 'full', got {select!r}")
        hs = self.hidden_states(pixel_values)
        n = len(hs)
        for i in layers:
            if not -n <= i < n:
                raise ValueError(f"{self.kind}: layer {i} out of range for {n} hidden states")
        start = self.num_prefix_tokens if select == "patch" else 0
        return torch.stack([hs[i][:, start:] for i in layers], dim=1)

    def forward(self, pixel_values: torch.Tensor, layers: Sequence[int] = (-2,), select: Select = "patch") -> torch.Tensor:
        return self.features(pixel_values, layers, select)
