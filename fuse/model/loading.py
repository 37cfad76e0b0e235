"""Reading and writing a fused model directory (the layout of :mod:`fuse.fused_layout`).

:meth:`FusedModel.from_pretrained <fuse.model.FusedModel.from_pretrained>` checks every file before it
loads anything big (a missing branch is one line naming it, not a traceback after a minute of loading),
then loads the merged LLM with transformers' ``AutoModelForCausalLM`` and each member's branch with
:func:`fuse.members.load_vision_branch`; :func:`save_fused_model` writes the same layout atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import LazyCheckpoint, read_json
from ..errors import CheckpointError
from ..fused_layout import (CONFIG, FUSE_CONFIG, LLM_DIR, MODEL_CARD, MODEL_TYPE, VISION_CONFIG, VISION_WEIGHTS,
                            fused_eos_ids, has_tokenizer, member_dir, model_card)
from ..members import TextSide, VisionBranch, load_vision_branch, save_vision_branch
from ..output_dir import atomic_output_dir
from .config import FusedConfig

# what AutoModel.from_pretrained passes along for hub downloads (a fused dir is always local)
HUB_KWARGS = {"cache_dir", "force_download", "proxies", "revision", "token", "local_files_only", "subfolder",
              "trust_remote_code", "code_revision", "_commit_hash", "adapter_kwargs", "_from_auto", "device_map"}


def read_fused_config(root: Path) -> FusedConfig:
    """``root/fuse_config.json`` (or a ``config.json`` of model type ``visionfuse``) as a FusedConfig."""
    path = root / FUSE_CONFIG if (root / FUSE_CONFIG).is_file() or not (root / CONFIG).is_file() else root / CONFIG
    data = read_json(path, "fused model config (fuse_config.json)")
    if path.name != FUSE_CONFIG and data.get("model_type") != MODEL_TYPE:
        arch = (data.get("architectures") or [data.get("model_type") or "unknown"])[0]
        raise CheckpointError(f"{root}: not a fused model (no {FUSE_CONFIG}; config.json describes a {arch}); "
                              "`fuse merge` writes fused models; `fuse eval` and "
                              "FusedModel.from_members([load_member(dir)]) take a single model")
    return FusedConfig(**{k: v for k, v in data.items() if k not in ("model_type", "transformers_version")})


def member_dirs(root: Path, config: FusedConfig) -> list[Path]:
    """Each member's branch directory, after checking that it lies inside ``root`` and holds its files."""
    where = root / FUSE_CONFIG
    if not config.members:
        raise CheckpointError(f"{where}: 'members' is empty")
    for i, m in enumerate(config.members):
        if not isinstance(m, dict) or not m.get("name"):
            raise CheckpointError(f"{where}: members[{i}] has no 'name'")
    dirs = [root / m.get("dir", member_dir(m["name"])) for m in config.members]
    for m, mdir in zip(config.members, dirs):
        if not os.path.realpath(mdir).startswith(os.path.realpath(root) + os.sep):
            raise CheckpointError(f"{where}: member {m['name']!r} dir {m.get('dir')!r} is outside {root}")
    for m, mdir in zip(config.members, dirs):  # check every file before loading anything big
        if not mdir.is_dir():
            raise CheckpointError(f"{mdir}: missing vision branch directory of member {m['name']!r}")
        for f in (VISION_CONFIG, VISION_WEIGHTS):
            if not (mdir / f).is_file():
                raise CheckpointError(f"{mdir / f}: missing file of member {m['name']!r}")
    return dirs


def load_llm(llm_dir: Path, dtype: torch.dtype | None, attn_implementation: str | None = None) -> nn.Module:
    """``AutoModelForCausalLM`` from a directory, with one-line errors naming missing files."""
    from transformers import AutoModelForCausalLM

    if not llm_dir.is_dir():
        raise CheckpointError(f"{llm_dir}: missing merged LLM directory")
    read_json(llm_dir / "config.json", "LLM config.json")
    LazyCheckpoint(llm_dir)  # clear error on missing/truncated safetensors shards
    kw: dict[str, Any] = {"dtype": dtype if dtype is not None else "auto", "use_safetensors": True}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(str(llm_dir), **kw)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{llm_dir}: cannot load the merged LLM ({str(e).splitlines()[0]})") from None
    return model.eval()


def load_branches(config: FusedConfig, dirs: list[Path], dtype: torch.dtype | None
                  ) -> tuple[dict[str, VisionBranch], dict[str, TextSide]]:
    """Every member's vision branch (recipe order) and the text side it was saved with (if any)."""
    branches, texts = {}, {}
    for m, mdir in zip(config.members, dirs):
        branch, vcfg = load_vision_branch(mdir, dtype=dtype)
        branches[m["name"]] = branch
        if vcfg.get("text"):
            texts[m["name"]] = TextSide.from_dict(vcfg["text"])
    return branches, texts


def fused_text_side(root: Path, config: FusedConfig, member_texts: dict[str, TextSide]) -> TextSide:
    """The text member's TextSide, with the fused eos union and the tokenizer saved in ``llm/`` if any."""
    names = config.member_names
    tm = config.text.get("member") or names[0]
    if tm not in names:
        raise CheckpointError(f"{root / FUSE_CONFIG}: text.member {tm!r} is not one of the members {names}")
    base = member_texts.get(tm) or TextSide(tokenizer_path=None)
    llm_dir = root / LLM_DIR
    tok_path = str(llm_dir) if has_tokenizer(llm_dir) else base.tokenizer_path
    if tok_path is None:
        raise CheckpointError(f"{llm_dir}: no tokenizer files (tokenizer.json / tokenizer_config.json) and "
                              f"member {tm!r} records none")
    eos = config.text.get("eos_token_ids")
    if eos is None:  # a config written without the union: every member's, the text member's first
        eos = fused_eos_ids([m.get("eos_token_ids") or [] for m in config.members], names.index(tm))
    return TextSide(tokenizer_path=tok_path, prompt_style=config.text.get("prompt_style") or base.prompt_style,
                    placeholder=config.text.get("placeholder") or base.placeholder,
                    eos_token_ids=[int(i) for i in (eos or base.eos_token_ids)],
                    separator_token_id=base.separator_token_id)


def save_fused_model(model: nn.Module, save_directory: str | os.PathLike, force: bool = True) -> None:
    """Write ``model`` (a FusedModel) in the fused layout, atomically (see :meth:`FusedModel.save_pretrained`)."""
    with atomic_output_dir(save_directory, force=force) as tmp:
        model.llm.save_pretrained(str(tmp / LLM_DIR))
        model.text.tokenizer.save_pretrained(str(tmp / LLM_DIR))
        members = []
        for info in model.config.members:
            name = info["name"]
            d = member_dir(name)
            save_vision_branch(model.branches[name], tmp / d, text=model.member_texts.get(name),
                               extra={"format": info.get("format"), "source": info.get("source")})
            members.append({**info, "dir": d})
        model.config.members = members
        (tmp / FUSE_CONFIG).write_text(json.dumps(model.config.fuse_dict(), indent=2, default=str))
        model.config.save_pretrained(str(tmp))  # config.json, with transformers' own fields
        (tmp / MODEL_CARD).write_text(model_card(model.config.fuse_dict()))


__all__ = ["HUB_KWARGS", "fused_text_side", "load_branches", "load_llm", "member_dirs", "read_fused_config",
           "save_fused_model"]
