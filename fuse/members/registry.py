"""The member-format registry: checkpoint format name -> :class:`FormatAdapter`, and vision-branch kind
-> :class:`VisionBranch` class.

Every built-in adapter and branch is imported and listed here, explicitly (as mergekit's
``merge_methods/registry.py`` lists its methods): nothing registers itself as a side effect of being
imported, so looking a format up never depends on which modules happen to be loaded. Another format
is added with :func:`register_format` / :func:`register_branch`.
"""

from __future__ import annotations

from ..errors import FormatError
from .base import FormatAdapter, VisionBranch
from .comm import CommAdapter, CommBranch
from .llava import LlavaAdapter
from .llava_branch import LlavaBranch
from .llava_hf import LlavaHFAdapter
from .mgm import MGMAdapter, MGMBranch
from .slime import SliMEAdapter, SliMEBranch

FORMATS: dict[str, type[FormatAdapter]] = {
    adapter.name: adapter for adapter in (LlavaHFAdapter, LlavaAdapter, MGMAdapter, SliMEAdapter, CommAdapter)}
VISION_BRANCHES: dict[str, type[VisionBranch]] = {
    branch.kind: branch for branch in (LlavaBranch, MGMBranch, SliMEBranch, CommBranch)}


def register_format(cls: type[FormatAdapter]) -> type[FormatAdapter]:
    """Add a format adapter (usable as a class decorator)."""
    FORMATS[cls.name] = cls
    return cls


def register_branch(cls: type[VisionBranch]) -> type[VisionBranch]:
    """Add a vision-branch class (usable as a class decorator)."""
    VISION_BRANCHES[cls.kind] = cls
    return cls


def format_adapter(name: str) -> type[FormatAdapter]:
    try:
        return FORMATS[name]
    except KeyError:
        raise FormatError(f"format {name!r} unknown; known: auto, {', '.join(sorted(FORMATS))}") from None


def branch_class(kind: str) -> type[VisionBranch]:
    try:
        return VISION_BRANCHES[kind]
    except KeyError:
        raise FormatError(f"unknown vision branch kind {kind!r}; known: {', '.join(sorted(VISION_BRANCHES))}") from None


def detect_format(config: dict, keys: list[str], path=None) -> str:
    """The one format whose adapter recognises ``config`` (config.json) and tensor ``keys``;
    FormatError when none or several do (``path``: the checkpoint, for the message)."""
    hits = [name for name, adapter in FORMATS.items() if adapter.detect(config, keys)]
    if len(hits) == 1:
        return hits[0]
    where = f"{path / 'config.json'}: " if path else ""
    arch = (config.get("architectures") or ["?"])[0]
    if not hits:
        raise FormatError(f"{where}unknown architecture {arch!r} (model_type {config.get('model_type')!r}); "
                          f"supported formats: {', '.join(sorted(FORMATS))}")
    raise FormatError(f"{where}ambiguous format ({', '.join(hits)}); pass format= explicitly")


__all__ = ["FORMATS", "VISION_BRANCHES", "branch_class", "detect_format", "format_adapter", "register_branch",
           "register_format"]
