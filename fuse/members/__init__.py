"""Member checkpoints: one MLLM split into LLM, vision branch and text side.

>>> m = load_member("liuhaotian/llava-v1.5-7b")        # local dir (or downloaded snapshot)
>>> m.format, m.llm.vocab_rows, m.text.eos_token_ids
>>> tokens = m.visual_tokens([image])                   # list of [576, 4096]

Modules: ``base`` (Member, LLMPart, VisionBranch, FormatAdapter), ``registry`` (format name -> adapter,
branch kind -> class), ``loader`` (load_member, load_vision_branch), ``text`` (tokenizer, prompt styles),
one module per format (``llava_hf``, ``llava``, ``mgm``, ``slime``, ``comm``) and their building blocks.
"""

from __future__ import annotations

from .base import FormatAdapter, LLMPart, Member, VisionBranch, save_vision_branch
from .loader import load_member, load_vision_branch, resolve_path
from .registry import FORMATS, VISION_BRANCHES, detect_format, register_branch, register_format
from .text import PROMPT_STYLES, TextSide

__all__ = ["FORMATS", "VISION_BRANCHES", "PROMPT_STYLES", "FormatAdapter", "LLMPart", "Member", "TextSide",
           "VisionBranch", "detect_format", "load_member", "load_vision_branch", "register_branch",
           "register_format", "resolve_path", "save_vision_branch"]
