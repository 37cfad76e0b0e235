"""VisionFuse toolkit: combine vision encoders in multimodal LLMs.

- ``fuse.encoders``: shared encoder registry (CLIP, SigLIP, DINOv2, ConvNeXt)
- ``fuse.members``: member checkpoints (LLaVA, LLaVA-HF, MGM, SliME, COMM) split into LLM / vision / text
- ``fuse.checkpoint``: lazy safetensors reading, atomic sharded writing
- ``fuse.model``: the fused model (``fuse.load(OUT)`` = ``FusedModel.from_pretrained(OUT)``)

``import fuse`` is cheap: heavy attributes (``load``, ``FusedModel``, ``FusedConfig``) are imported
on first access, and the ``visionfuse`` model type is registered with transformers' ``AutoConfig`` /
``AutoModel`` as soon as transformers' auto classes are imported.
"""

__version__ = "0.1.0"

_LAZY_MODEL = ("load", "FusedModel", "FusedConfig")


def __getattr__(name: str):
    if name in _LAZY_MODEL:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'fuse' has no attribute {name!r}")


def _install_transformers_registration() -> None:
    from .model.registration import install

    install()


_install_transformers_registration()
