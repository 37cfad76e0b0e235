"""The small files of a fused output: LLM config, generation config, tokenizer copy,
``fuse_config.json`` / ``config.json`` and the README model card (layout: see ``fuse.merge``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

from ..errors import RecipeError
from ..members import resolve_path
from ..recipe import Recipe
from ..dtypes import dtype_name
from .plan import MergePlan
from .sources import BaseInput, MemberInput

FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def union_eos(members: Sequence[MemberInput], text_index: int, extra: Sequence[int]) -> list[int]:
    """The text member's eos ids first, then every other member's, then ``extra`` (no duplicates)."""
    out: list[int] = []
    order = [members[text_index]] + [m for i, m in enumerate(members) if i != text_index]
    for i in [e for m in order for e in m.member.text.eos_token_ids] + list(extra):
        if int(i) not in out:
            out.append(int(i))
    return out


def llm_config(text_member: MemberInput, plan: MergePlan, eos: list[int]) -> dict:
    """A ``LlamaForCausalLM`` config.json for OUT/llm (vocab_size = merged rows)."""
    cfg = dict(text_member.llm.config)
    emb = next((j for j in plan.jobs if j.name == "model.embed_tokens.weight"), None)
    if emb is not None:
        cfg["vocab_size"] = emb.shape[0]
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["model_type"] = "llama"
    cfg["eos_token_id"] = eos if len(eos) > 1 else (eos[0] if eos else cfg.get("eos_token_id"))
    cfg["dtype"] = dtype_name(plan.jobs[0].out_dtype) if plan.jobs else "float32"
    cfg.pop("torch_dtype", None)
    return cfg


def generation_config(cfg: dict, eos: list[int]) -> dict:
    out = {"bos_token_id": cfg.get("bos_token_id"), "eos_token_id": eos or cfg.get("eos_token_id")}
    if cfg.get("pad_token_id") is not None:
        out["pad_token_id"] = cfg["pad_token_id"]
    return out


def tokenizer_source(recipe: Recipe, text_member: MemberInput, base: BaseInput | None) -> Path:
    """Directory holding the tokenizer files copied to OUT/llm (the text member's, else the base's)."""
    for cand in (text_member.member.text.tokenizer_path, base.tokenizer_path if base else None):
        if cand:
            p = resolve_path(cand)
            if any((p / f).is_file() for f in TOKENIZER_FILES):
                return p
    raise RecipeError(f"{recipe.label}: text.member: {text_member.name!r} has no tokenizer files "
                      f"(and the base model has none either); choose another text.member")


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = []
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copyfile(src / f, dst / f)
            copied.append(f)
    return copied


def fuse_config(recipe: Recipe, base: BaseInput | None, members: Sequence[MemberInput], plan: MergePlan,
                text_index: int, eos: list[int], sources: dict) -> dict:
    tm = members[text_index]
    emb = next((j for j in plan.jobs if j.name == "model.embed_tokens.weight"), None)
    out_dtypes = sorted({dtype_name(j.out_dtype) for j in plan.jobs})
    return {
        "format_version": FORMAT_VERSION,
        "base_model": recipe.base_model,
        "members": [{
            "name": m.name, "dir": f"members/{m.name}", "format": m.format, "source": m.spec.model,
            "weight": m.weight, "density": m.spec.density, "eos_token_ids": list(m.member.text.eos_token_ids),
            "vocab_rows": m.llm.vocab_rows, "prompt_style": m.member.text.prompt_style,
            "separator_token_id": m.member.text.separator_token_id,
        } for m in members],
        "merge": {"method": recipe.merge.method, "parameters": dict(recipe.merge.parameters),
                  "dtype": recipe.merge.dtype, "out_dtype": out_dtypes[0] if len(out_dtypes) == 1 else out_dtypes,
                  "seed": recipe.merge.seed},
        "text": {"member": tm.name, "prompt_style": tm.member.text.prompt_style,
                 "placeholder": tm.member.text.placeholder, "eos_token_ids": eos},
        "inference": dict(recipe.inference),
        "llm": {"dir": "llm", "vocab_rows": emb.shape[0] if emb else None, "tensors": len(plan.jobs)},
        "sources": sources,
    }


def model_card(cfg: dict, plan: MergePlan) -> str:
    rows = "\n".join(f"| {i + 1} | {m['name']} | {m['format']} | `{m['source']}` | {m['weight']:.4g} | "
                     f"{m['vocab_rows']} |" for i, m in enumerate(cfg["members"]))
    params = json.dumps(cfg["merge"]["parameters"]) if cfg["merge"]["parameters"] else "defaults"
    return f"""---
tags: [visionfuse, merge, multimodal]
---
# Fused MLLM (VisionFuse)

Training-free fusion of {len(cfg['members'])} same-family multimodal LLMs, made with `fuse merge`
(visionfuse-toolkit). At inference every member's vision branch encodes the image and the
visual-token sequences are concatenated, in the order below, in place of the single image
placeholder; one merged LLM reads them.

| order | member | format | source | weight | vocab rows |
|---|---|---|---|---|---|
{rows}

- Base model: `{cfg['base_model']}`
- LLM merge: mergekit `{cfg['merge']['method']}` ({params}), compute dtype {cfg['merge']['dtype']},
  output dtype {cfg['merge']['out_dtype']}, seed {cfg['merge']['seed']}; {len(plan.jobs)} tensors.
- Text side: tokenizer and prompt style of `{cfg['text']['member']}` (`{cfg['text']['prompt_style']}`);
  stops on any of {cfg['text']['eos_token_ids']}.

## Layout
- `llm/`: the merged LLM, a standalone `LlamaForCausalLM` (`AutoModelForCausalLM.from_pretrained("llm")`).
- `members/<name>/`: each member's vision branch (encoders + projector + preprocessing), copied, not merged.
- `fuse_config.json` (= `config.json` minus the model type): members, order, merge settings,
  text side, inference options and SHA-256 of every source file.
"""


__all__ = ["FORMAT_VERSION", "TOKENIZER_FILES", "copy_tokenizer", "fuse_config", "generation_config", "llm_config",
           "model_card", "tokenizer_source", "union_eos"]
