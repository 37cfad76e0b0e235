"""Write a member's LLM part as a plain ``LlamaForCausalLM`` checkpoint (streamed).

Used to feed ``mergekit-yaml`` the same LLMs ``fuse merge`` reads out of MLLM
checkpoints (tests, benchmarks), and handy to pull the LLM out of an MLLM.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..fused_layout import copy_tokenizer
from ..members import LLMPart
from .writer import StreamingShardWriter


def export_llm(llm: LLMPart, directory: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
               max_shard_bytes: int = 5 * 10**9) -> Path:
    d = Path(directory)
    names = sorted(llm.names())
    w = StreamingShardWriter(d, [(n, tuple(llm.shape(n)), llm.dtype(n)) for n in names], max_shard_bytes)
    for n in names:
        w.append(n, llm.get(n))
    w.close()
    cfg = dict(llm.config)
    cfg["vocab_size"] = llm.vocab_rows
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer_dir is not None:
        copy_tokenizer(Path(tokenizer_dir), d)
    return d


__all__ = ["export_llm"]
