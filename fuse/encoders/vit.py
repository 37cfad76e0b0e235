"""ViT-style encoders from transformers: CLIP, SigLIP, DINOv2."""

from __future__ import annotations

from .base import Encoder, LazyClass

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ClipEncoder(Encoder):
    """``CLIPVisionModel`` (e.g. openai/clip-vit-large-patch14-336): 1 CLS + grid tokens."""

    kind = "clip"
    model_cls = LazyClass("transformers", "CLIPVisionModel")
    config_cls = LazyClass("transformers", "CLIPVisionConfig")
    processor_cls = LazyClass("transformers.models.clip.image_processing_pil_clip", "CLIPImageProcessorPil")
    num_prefix_tokens = 1
    default_processor = {
        "size": lambda s: {"shortest_edge": s}, "crop_size": lambda s: {"height": s, "width": s},
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
    }


class SiglipEncoder(Encoder):
    """``SiglipVisionModel`` (e.g. google/siglip-so400m-patch14-384): grid tokens only, no CLS."""

    kind = "siglip"
    model_cls = LazyClass("transformers", "SiglipVisionModel")
    config_cls = LazyClass("transformers", "SiglipVisionConfig")
    processor_cls = LazyClass("transformers.models.siglip.image_processing_pil_siglip", "SiglipImageProcessorPil")
    num_prefix_tokens = 0
    default_processor = {"size": lambda s: {"height": s, "width": s}}


class Dinov2Encoder(Encoder):
    """``Dinov2Model``; run at 336 px by default so ViT-L/14 gives a 24x24 grid.

    transformers' DINOv2 embeddings interpolate the position table to the input
    size on every forward, so any multiple of the patch size works.
    """

    kind = "dinov2"
    model_cls = LazyClass("transformers", "Dinov2Model")
    config_cls = LazyClass("transformers", "Dinov2Config")
    processor_cls = LazyClass("transformers.models.bit.image_processing_pil_bit", "BitImageProcessorPil")
    num_prefix_tokens = 1
    default_processor = {
        "size": lambda s: {"shortest_edge": s}, "crop_size": lambda s: {"height": s, "width": s},
        "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD), "do_convert_rgb": True,
    }

    @staticmethod
    def image_size_of(config) -> int:
        # The pretrained table is 518 px; COMM (and we) run DINOv2 at 336 px by default.
        return 336 if int(getattr(config, "patch_size", 14)) == 14 else int(config.image_size)

