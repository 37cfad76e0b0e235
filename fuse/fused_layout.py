"""The fused model directory: what ``fuse merge`` and ``FusedModel.save_pretrained`` write and ``fuse.load`` reads.

::

    OUT/
      llm/                 the merged LLM: a plain LlamaForCausalLM checkpoint, the text member's tokenizer,
                           generation_config.json stopping on the eos union
      members/<name>/      one vision branch per member (vision_config.json + vision.safetensors, see
                           fuse.members.save_vision_branch), in visual-token order
      fuse_config.json     FusedConfig's fields: format_version, base_model, members, merge, text, inference, sources
      config.json          the same plus model_type "visionfuse" (what transformers' Auto classes read)
      README.md            the model card

File names, the tokenizer's file list, the eos union and the model card live here, once; this module
imports nothing else from the toolkit (members, merge and model all build on it).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

LLM_DIR = "llm"
MEMBERS_DIR = "members"
FUSE_CONFIG = "fuse_config.json"
CONFIG = "config.json"
MODEL_CARD = "README.md"
FORMAT_VERSION = 1
MODEL_TYPE = "visionfuse"
ARCHITECTURE = "FusedModel"
VISION_CONFIG = "vision_config.json"  # in members/<name>/: branch kind, spec, text side, source format
VISION_WEIGHTS = "vision.safetensors"  # in members/<name>/: the branch's tensors

# Any one of these makes a directory a Hugging Face tokenizer ...
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
# ... and these belong to it too: everything that is copied with it.
TOKENIZER_FILES = (*TOKENIZER_MARKERS, "special_tokens_map.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")


def member_dir(name: str) -> str:
    """``members/<name>``: where member ``name``'s vision branch lives, relative to OUT."""
    return f"{MEMBERS_DIR}/{name}"


def member_entry(name: str, member: Any, source: str | None, weight: float | None,
                 density: float | None = None) -> dict[str, Any]:
    """Member ``name``'s entry of ``fuse_config.json`` ``members`` from an opened member (``format``,
    ``llm.vocab_rows`` and its text side: stop ids, prompt style, separator, training question words)."""
    text = member.text
    return {"name": name, "dir": member_dir(name), "format": member.format, "source": source, "weight": weight,
            "density": density, "eos_token_ids": list(text.eos_token_ids), "vocab_rows": member.llm.vocab_rows,
            "prompt_style": text.prompt_style, "separator_token_id": text.separator_token_id,
            "question_words": text.question_words}


def has_tokenizer(directory: str | os.PathLike) -> bool:
    return any((Path(directory) / f).is_file() for f in TOKENIZER_MARKERS)


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files of ``src`` into ``dst``; returns the names copied."""
    copied = []
    for f in TOKENIZER_FILES:
        if (Path(src) / f).is_file():
            shutil.copyfile(Path(src) / f, Path(dst) / f)
            copied.append(f)
    return copied


def union_eos_ids(*groups: Iterable[int]) -> list[int]:
    """The ids of ``groups`` in order, each once: a checkpoint's eos ids from its several config files
    and chat template, or a fused model's from all its members (generation stops on any of them)."""
    out: list[int] = []
    for group in groups:
        for i in group:
            if int(i) not in out:
                out.append(int(i))
    return out


def fused_eos_ids(member_eos: Sequence[Sequence[int]], text_member: int = 0, extra: Iterable[int] = ()) -> list[int]:
    """A fused model's eos ids: the text member's first (its tokenizer's own end of turn; the first id is
    also the padding fallback), then every other member's in recipe order, then ``extra``."""
    order = [text_member] + [i for i in range(len(member_eos)) if i != text_member]
    return union_eos_ids(*(member_eos[i] for i in order), extra)


def write_configs(directory: str | os.PathLike, fuse_config: dict[str, Any]) -> None:
    """``fuse_config.json`` and ``config.json`` (the same plus the model type transformers reads)."""
    d = Path(directory)
    (d / FUSE_CONFIG).write_text(json.dumps(fuse_config, indent=2, default=str))
    (d / CONFIG).write_text(json.dumps({"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], **fuse_config},
                                       indent=2, default=str))


def model_card(cfg: dict[str, Any]) -> str:
    """The README.md of a fused model directory, from its ``fuse_config.json`` content."""
    rows = "\n".join(f"| {i + 1} | {m['name']} | {m.get('format')} | `{m.get('source')}` | "
                     f"{'-' if m.get('weight') is None else format(m['weight'], '.4g')} | {m.get('vocab_rows')} |"
                     for i, m in enumerate(cfg["members"]))
    merge = cfg.get("merge") or {}
    tensors = (cfg.get("llm") or {}).get("tensors")
    if merge.get("method") in (None, "copy", "external"):
        llm = "not merged: one LLM given as is (FusedModel.from_members or a test build)"
    else:
        params = json.dumps(merge["parameters"]) if merge.get("parameters") else "defaults"
        llm = (f"mergekit `{merge['method']}` ({params}), compute dtype {merge.get('dtype')},\n"
               f"  output dtype {merge.get('out_dtype')}, seed {merge.get('seed')}"
               f"{f'; {tensors} tensors' if tensors is not None else ''}")
    text = cfg["text"]
    return f"""---
tags: [visionfuse, merge, multimodal]
---
# Fused MLLM (VisionFuse)

Training-free fusion of {len(cfg['members'])} same-family multimodal LLMs, made with visionfuse-toolkit.
At inference every member's vision branch encodes the image and the visual-token sequences are
concatenated, in the order below, in place of the single image placeholder; one merged LLM reads them.

| order | member | format | source | weight | vocab rows |
|---|---|---|---|---|---|
{rows}

- Base model: `{cfg.get('base_model')}`
- LLM: {llm}.
- Text side: tokenizer and prompt style of `{text['member']}` (`{text['prompt_style']}`);
  stops on any of {text['eos_token_ids']}.

## Layout
- `{LLM_DIR}/`: the merged LLM, a standalone `LlamaForCausalLM` (`AutoModelForCausalLM.from_pretrained("{LLM_DIR}")`).
- `{MEMBERS_DIR}/<name>/`: each member's vision branch (encoders + projector + preprocessing), copied, not merged.
- `{FUSE_CONFIG}` (= `{CONFIG}` minus the model type): members, order, merge settings,
  text side, inference options and SHA-256 of every source file.

Load with `fuse.load(DIR)` or `fuse generate DIR --image IMG --prompt TEXT`.
"""


__all__ = ["ARCHITECTURE", "CONFIG", "FORMAT_VERSION", "FUSE_CONFIG", "LLM_DIR", "MEMBERS_DIR", "MODEL_CARD",
           "MODEL_TYPE", "TOKENIZER_FILES", "TOKENIZER_MARKERS", "VISION_CONFIG", "VISION_WEIGHTS", "copy_tokenizer",
           "fused_eos_ids", "has_tokenizer", "member_dir", "member_entry", "model_card", "union_eos_ids", "write_configs"]
