"""Tiny, deterministic checkpoints in the real on-disk layouts (for tests, benchmarks, ``fuse demo``).

Every builder takes a ``seed`` and writes a directory in well under a second.
Shapes are the real models' up to width: same key names, same structure.
"""

from .builders import (TINY_CLIP, TINY_LLAMA, build_base_llm, build_llava_hf_member, build_llava_member,
                       build_tiny_clip, llava_hf_to_original, png_bomb, random_image, rewrite_weights,
                       tiny_tokenizer)

__all__ = ["TINY_CLIP", "TINY_LLAMA", "build_base_llm", "build_llava_hf_member", "build_llava_member",
           "build_tiny_clip", "llava_hf_to_original", "png_bomb", "random_image", "rewrite_weights",
           "tiny_tokenizer"]
