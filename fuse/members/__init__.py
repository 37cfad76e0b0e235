"""Member registry: on-disk format name -> adapter, plus ``load_member`` with auto-detection.

>>> m = load_member("liuhaotian/llava-v1.5-7b")        # local dir (or downloaded snapshot)
>>> m.format, m.llm.vocab_rows, m.text.eos_token_ids
>>> tokens = m.visual_tokens([image])                   # list of [576, 4096]
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import LazyCheckpoint, read_json
from ..dtypes import most_common_dtype, parse_dtype
from ..errors import CheckpointError, FormatError
from . import llava, llava_branch, llava_hf  # noqa: F401  (register formats/branches)
from .base import (FORMATS, VISION_BRANCHES, FormatAdapter, LLMPart, Member, VisionBranch, load_vision_branch,
                   register_branch, register_format, save_vision_branch)
from .text import PROMPT_STYLES, TextSide

_EXTRA_LOADED = False


def _load_plugins() -> None:
    """Import the adapters that live in other modules (MGM, SliME, COMM) if present."""
    global _EXTRA_LOADED
    if _EXTRA_LOADED:
        return
    _EXTRA_LOADED = True
    import importlib

    for mod in ("fuse.members.mgm", "fuse.members.slime", "fuse.members.comm"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def resolve_path(source: str | os.PathLike) -> Path:
    """A local checkpoint directory for ``source``: a path, or a hub id already in the local Hugging
    Face cache (no download here; recipes download, see :mod:`fuse.hub`)."""
    from ..hub import local_model

    found = local_model(str(source), weights=False)
    if found is None:
        raise CheckpointError(f"{source}: not a local directory and not in the local Hugging Face cache; "
                              f"download it first (`hf download {source}`) or name it in a recipe "
                              "(`fuse merge` downloads hub models)")
    return found.path


def detect_format(config: dict, keys: list[str], path: Path | None = None) -> str:
    _load_plugins()
    hits = [name for name, ad in FORMATS.items() if ad.detect(config, keys)]
    if len(hits) == 1:
        return hits[0]
    where = f"{path / 'config.json'}: " if path else ""
    arch = (config.get("architectures") or ["?"])[0]
    if not hits:
        raise FormatError(f"{where}unknown architecture {arch!r} (model_type {config.get('model_type')!r}); "
                          f"supported formats: {', '.join(sorted(FORMATS))}")
    raise FormatError(f"{where}ambiguous format ({', '.join(hits)}); pass format= explicitly")


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype | None):
    """Temporarily make ``dtype`` torch's default floating dtype (no-op for None)."""
    if dtype is None or not dtype.is_floating_point:
        yield
        return
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_member(source: str | os.PathLike, format: str = "auto", dtype: torch.dtype | str | None = None,
                name: str | None = None, vision: bool = True, reader: LazyCheckpoint | None = None,
                **options: Any) -> Member:
    """Read a member checkpoint (config.json + safetensors) into a :class:`Member`.

    Only the vision branch is materialised (in ``dtype``: None = float32, ``"source"`` = the
    checkpoint's stored dtype, e.g. bf16 for real 8B members); LLM tensors stay on disk until read.
    ``vision=False`` skips even that (``member.vision`` is None): headers, configs and the
    text side only, which is all a merge needs to plan and check the LLM part. ``reader``: the
    checkpoint's tensors when they are known otherwise (a headers-only view of a hub model).
    """
    _load_plugins()
    path = resolve_path(source)
    if not path.is_dir():
        raise CheckpointError(f"{path}: a member must be a checkpoint directory")
    config = read_json(path / "config.json", "config.json (is this a model directory?)")
    reader = reader or LazyCheckpoint(path)
    fmt = detect_format(config, reader.keys(), path) if format == "auto" else format
    if fmt not in FORMATS:
        raise FormatError(f"format {fmt!r} unknown; known: auto, {', '.join(sorted(FORMATS))}")
    if dtype == "source":
        dtype = most_common_dtype((reader.dtype(k) for k in reader.keys()), floating_only=True)
    else:
        dtype = parse_dtype(dtype)
    with default_dtype(dtype):  # build modules directly in the target dtype: no float32 peak first
        member = FORMATS[fmt].load(path, config, reader, dtype=dtype, vision=vision, **options)
    from ..names import NAME_RX, derive_member_name

    if name is not None and not NAME_RX.fullmatch(name):
        raise FormatError(f"name {name!r}: a member name must be a plain directory name (letters, digits, . _ -)")
    member.name = name or derive_member_name(path)  # never "..": the name becomes OUT/members/<name>
    return member


__all__ = ["FORMATS", "VISION_BRANCHES", "PROMPT_STYLES", "FormatAdapter", "LLMPart", "Member", "TextSide",
           "VisionBranch", "detect_format", "load_member", "load_vision_branch", "register_branch",
           "register_format", "resolve_path", "save_vision_branch"]
