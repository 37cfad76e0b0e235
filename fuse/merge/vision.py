"""Write each member's vision branch to ``OUT/members/<name>/`` (copied, never merged).

Two layouts, both read back by :func:`fuse.members.load_vision_branch`:

- ``checkpoint`` (when the adapter says the branch is self-contained,
  ``FormatAdapter.copyable_vision``): the member's own non-LLM tensors, byte for byte
  under their checkpoint names, in ``vision.safetensors``, plus its ``config.json`` and
  the adapter's ``vision_files`` (e.g. ``preprocessor_config.json``). Nothing is built,
  so this costs one streamed read and write of the branch bytes and no transformers import;
  loading rebuilds the branch with the same adapter code that reads the source member.
- ``module`` (otherwise: a tower fetched from ``mm_vision_tower``, SliME's separator row
  borrowed from the LLM embedding, a COMM checkpoint): the branch is built in the stored
  dtype and its state dict saved (``Member.save_vision_branch``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import torch

from ..members import FORMATS
from ..fused_layout import VISION_CONFIG, VISION_WEIGHTS
from ..members.base import CHECKPOINT_LAYOUT
from ..recipe import Recipe
from .methods import MergeError, all_finite
from .sources import MemberInput, Models, copies_vision, open_member
from .writer import StreamingShardWriter

NO_SHARDING = 1 << 62


def _refuse_non_finite(recipe: Recipe, m: MemberInput, key: str, t: torch.Tensor) -> None:
    """Vision weights are copied, not merged, but NaN/Inf in them is as fatal as in the LLM (every
    logit turns NaN and ``generate`` answers nothing): checked like the merged LLM tensors."""
    if not all_finite(t):
        raise MergeError(f"{recipe.label}: {m.field} ({m.name}): vision tensor {key} contains NaN/Inf; "
                         "nothing was written")


def copy_vision_checkpoint(m: MemberInput, directory: Path, recipe: Recipe) -> int:
    """Copy member ``m``'s non-LLM tensors and branch config files into ``directory``. Returns bytes copied."""
    member = m.member
    reader = member.llm.reader
    keys = [k for k, part in member.key_usage.items() if part != "llm" and k in reader]
    directory.mkdir(parents=True, exist_ok=True)
    writer = StreamingShardWriter(directory, [(k, reader.shape(k), reader.dtype(k)) for k in keys], NO_SHARDING)
    try:
        for k in keys:  # one tensor in memory at a time; bytes unchanged (no dtype cast)
            t = reader.get(k)
            _refuse_non_finite(recipe, m, k, t)
            writer.append(k, t)
        (name,) = writer.close()
    except BaseException:
        writer.abort()
        raise
    (directory / name).rename(directory / VISION_WEIGHTS)
    adapter = FORMATS[member.format]
    shutil.copyfile(member.path / "config.json", directory / "config.json")
    for f in adapter.vision_files:
        if (member.path / f).is_file():
            shutil.copyfile(member.path / f, directory / f)
    cfg = {"layout": CHECKPOINT_LAYOUT, "kind": adapter.branch_kind, "format": member.format,
           "source": str(member.path), "options": dict(m.spec.options), "text": member.text.to_dict()}
    (directory / VISION_CONFIG).write_text(json.dumps(cfg, indent=2, default=str))
    return writer.bytes_written


def save_vision_branches(recipe: Recipe, members: Sequence[MemberInput], directory: Path,
                         models: Models | None = None) -> list[str]:
    """Each member's branch into ``directory/<name>``, one member in memory at a time.
    Returns the layout used per member (``checkpoint`` or ``module``). ``models``: as for
    :func:`~fuse.merge.sources.open_member`."""
    layouts = []
    for m in members:
        if copies_vision(m.member):
            copy_vision_checkpoint(m, directory / m.name, recipe)
            layouts.append(CHECKPOINT_LAYOUT)
        else:
            full = open_member(recipe, m.index, keep_vision=True, models=models)
            for k, t in full.member.vision.state_dict().items():
                _refuse_non_finite(recipe, m, k, t)
            full.member.save_vision_branch(directory / m.name)
            del full
            layouts.append("module")
    return layouts


__all__ = ["copy_vision_checkpoint", "save_vision_branches"]
