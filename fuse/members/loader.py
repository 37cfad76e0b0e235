"""Reading member checkpoints: :func:`load_member` (format auto-detected through :mod:`fuse.members.registry`)
and :func:`load_vision_branch` (a branch saved in a fused model's ``members/<name>/``).

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
from safetensors.torch import load_file

from ..checkpoint import LazyCheckpoint, read_json
from ..dtypes import most_common_dtype, parse_dtype
from ..errors import CheckpointError, FormatError
from ..fused_layout import VISION_CONFIG, VISION_WEIGHTS
from ..names import NAME_RX, derive_member_name
from ..state_dict import load_state_dict_strict
from .base import CHECKPOINT_LAYOUT, Member, VisionBranch
from .registry import FORMATS, branch_class, detect_format, format_adapter


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
    path = resolve_path(source)
    if not path.is_dir():
        raise CheckpointError(f"{path}: a member must be a checkpoint directory")
    config = read_json(path / "config.json", "config.json (is this a model directory?)")
    reader = reader or LazyCheckpoint(path)
    fmt = detect_format(config, reader.keys(), path) if format == "auto" else format
    adapter = format_adapter(fmt)
    if dtype == "source":
        dtype = most_common_dtype((reader.dtype(k) for k in reader.keys()), floating_only=True)
    else:
        dtype = parse_dtype(dtype)
    with default_dtype(dtype):  # build modules directly in the target dtype: no float32 peak first
        member = adapter.load(path, config, reader, dtype=dtype, vision=vision, **options)
    if name is not None and not NAME_RX.fullmatch(name):
        raise FormatError(f"name {name!r}: a member name must be a plain directory name (letters, digits, . _ -)")
    member.name = name or derive_member_name(path)  # never "..": the name becomes OUT/members/<name>
    return member


def load_vision_branch(directory: str | os.PathLike, dtype: torch.dtype | None = None) -> tuple[VisionBranch, dict]:
    """Rebuild a branch written by :func:`save_vision_branch` (``layout: module``, the branch's
    own state dict) or copied by ``fuse merge`` (``layout: checkpoint``: the member's own
    non-LLM tensors and config files, rebuilt by its format adapter); returns (branch, config json)."""
    d = Path(directory)
    cfg = read_json(d / VISION_CONFIG, "vision branch config")
    if not (d / VISION_WEIGHTS).is_file():
        raise CheckpointError(f"{d / VISION_WEIGHTS}: missing vision branch weights")
    if cfg.get("layout") == CHECKPOINT_LAYOUT:
        return _load_copied_branch(d, cfg, dtype), cfg
    branch = branch_class(cfg["kind"]).from_spec(cfg["spec"])
    LazyCheckpoint(d / VISION_WEIGHTS)  # validates header / truncation with a clear error
    load_state_dict_strict(branch, load_file(str(d / VISION_WEIGHTS)), d / VISION_WEIGHTS,
                           f"weights and the {cfg['kind']} branch", error=CheckpointError)
    if dtype is not None:
        branch.to(dtype)
    return branch.eval(), cfg


def _load_copied_branch(d: Path, cfg: dict, dtype: torch.dtype | None) -> VisionBranch:
    fmt = cfg.get("format")
    if fmt not in FORMATS:
        raise CheckpointError(f"{d / VISION_CONFIG}: format {fmt!r} unknown (known: {', '.join(sorted(FORMATS))})")
    member = load_member(d, format=fmt, dtype=dtype, **(cfg.get("options") or {}))
    if member.vision is None:
        raise CheckpointError(f"{d}: the {fmt} adapter built no vision branch")
    return member.vision.eval()


__all__ = ["default_dtype", "load_member", "load_vision_branch", "resolve_path"]
