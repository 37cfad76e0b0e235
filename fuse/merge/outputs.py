"""What ``fuse merge`` writes besides the tensors: the LLM's config.json and generation_config.json, the
``fuse_config.json`` content, and where the tokenizer comes from (file names, tokenizer file list, eos
union and model card: :mod:`fuse.fused_layout`)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..dtypes import dtype_name
from ..errors import RecipeError
from ..fused_layout import FORMAT_VERSION, LLM_DIR, fused_eos_ids, has_tokenizer, member_entry
from ..members import resolve_path
from ..recipe import Recipe
from .plan import MergePlan
from .sources import BaseInput, MemberInput


def union_eos(members: Sequence[MemberInput], text_index: int, extra: Sequence[int]) -> list[int]:
    """The fused eos ids (:func:`fuse.fused_layout.fused_eos_ids`) of the opened members."""
    return fused_eos_ids([m.member.text.eos_token_ids for m in members], text_index, extra)


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
            if has_tokenizer(p):
                return p
    raise RecipeError(f"{recipe.label}: text.member: {text_member.name!r} has no tokenizer files "
                      f"(and the base model has none either); choose another text.member")


def fuse_config(recipe: Recipe, base: BaseInput | None, members: Sequence[MemberInput], plan: MergePlan,
                text_index: int, eos: list[int], sources: dict) -> dict:
    tm = members[text_index]
    emb = next((j for j in plan.jobs if j.name == "model.embed_tokens.weight"), None)
    out_dtypes = sorted({dtype_name(j.out_dtype) for j in plan.jobs})
    return {
        "format_version": FORMAT_VERSION,
        "base_model": recipe.base_model,
        "members": [member_entry(m.name, m.member, m.spec.model, m.weight, m.spec.density) for m in members],
        "merge": {"method": recipe.merge.method, "parameters": dict(recipe.merge.parameters),
                  "dtype": recipe.merge.dtype, "out_dtype": out_dtypes[0] if len(out_dtypes) == 1 else out_dtypes,
                  "seed": recipe.merge.seed},
        "text": {"member": tm.name, "prompt_style": tm.member.text.prompt_style,
                 "placeholder": tm.member.text.placeholder, "eos_token_ids": eos},
        "inference": dict(recipe.inference),
        "llm": {"dir": LLM_DIR, "vocab_rows": emb.shape[0] if emb else None, "tensors": len(plan.jobs)},
        "sources": sources,
    }


__all__ = ["fuse_config", "generation_config", "llm_config", "tokenizer_source", "union_eos"]
