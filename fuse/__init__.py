"""VisionFuse toolkit: combine vision encoders in multimodal LLMs.

- ``fuse.encoders``: shared encoder registry (CLIP, SigLIP, DINOv2, ConvNeXt)
- ``fuse.members``: member checkpoints (LLaVA, LLaVA-HF, MGM, SliME, COMM) split into LLM / vision / text
- ``fuse.checkpoint``: lazy safetensors reading, atomic sharded writing
"""

__version__ = "0.1.0"
