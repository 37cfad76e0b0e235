"""Where the members come from: a recipe YAML (members not fused yet) or a fused directory.

- Fused dir ``OUT/`` (written by ``fuse merge``): vision branches from ``OUT/members/<name>``
  (:func:`fuse.members.load_vision_branch`), the LLM's embedding table from ``OUT/llm``
  (read lazily, one tensor), text side from the member's ``vision_config.json``.
- Recipe: its ``members`` list (order kept); each member checkpoint is read with
  :func:`fuse.members.load_member` (vision branch materialised, LLM left on disk). The text
  reference is the recipe's ``base_model`` embedding table when given, else the first member's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from fuse.checkpoint import LazyCheckpoint, read_json
from fuse.errors import CheckpointError, DataError
from fuse.fused_layout import FUSE_CONFIG, LLM_DIR, member_dir

EMBED_KEY = "model.embed_tokens.weight"


@dataclass
class MemberSource:
    """One member's vision branch and text side (LLM not loaded)."""

    name: str
    branch: Any  # fuse.members.VisionBranch
    text: Any = None  # fuse.members.TextSide | None


@dataclass
class Sources:
    kind: str  # "recipe" | "fused"
    path: Path
    members: list[MemberSource]
    embed_table: Callable[[], torch.Tensor]  # -> [V, D_llm], read on demand
    embed_from: str


def is_fused_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / FUSE_CONFIG).is_file()


def is_recipe(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_file() and p.suffix.lower() in (".yaml", ".yml")


def recipe_members(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """``[{"name", "source", "format", "options"}]`` (member order) and the base model of a recipe, read
    with :func:`fuse.recipe.load_recipe` (relative paths resolved, members named as ``fuse merge`` names them)."""
    from fuse.recipe import load_recipe

    r = load_recipe(path)
    out = [{"name": n, "source": m.model, "format": m.format, "options": dict(m.options)}
           for n, m in zip(r.member_names(), r.members)]
    return out, r.base_model


def load_sources(path: str | os.PathLike, dtype: torch.dtype | None = None) -> Sources:
    """Members of a fused dir or a recipe; one-line errors for anything else."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such recipe or fused directory")
    if p.is_dir():
        if not is_fused_dir(p):
            raise DataError(f"{p}: expected a fused directory (with {FUSE_CONFIG}, written by `fuse merge`) "
                            "or a recipe .yaml")
        return _fused_sources(p, dtype)
    if is_recipe(p):
        return _recipe_sources(p, dtype)
    raise DataError(f"{p}: expected a recipe .yaml or a fused directory")


def _fused_sources(p: Path, dtype: torch.dtype | None) -> Sources:
    from fuse.members import load_vision_branch
    from fuse.members.text import TextSide

    cfg = read_json(p / FUSE_CONFIG, "fused model config")
    entries = cfg.get("members")
    if not isinstance(entries, list) or not entries:
        raise CheckpointError(f"{p / FUSE_CONFIG}: field 'members': expected a non-empty list")
    members = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "name" not in e:
            raise CheckpointError(f"{p / FUSE_CONFIG}: members[{i}]: expected an object with 'name' and 'dir'")
        d = p / e.get("dir", member_dir(e["name"]))
        if not d.is_dir():
            raise CheckpointError(f"{d}: vision branch of member {e['name']!r} is missing")
        branch, vcfg = load_vision_branch(d, dtype=dtype)
        text = TextSide.from_dict(vcfg["text"]) if isinstance(vcfg.get("text"), dict) else None
        members.append(MemberSource(e["name"], branch, text))
    llm = p / LLM_DIR

    def table() -> torch.Tensor:
        return LazyCheckpoint(llm).get(EMBED_KEY)

    if not llm.is_dir():
        raise CheckpointError(f"{llm}: missing merged LLM directory")
    return Sources("fused", p, members, table, str(llm))


def _recipe_sources(p: Path, dtype: torch.dtype | None) -> Sources:
    from fuse.members import load_member

    entries, base = recipe_members(p)
    members, first_llm = [], None
    for e in entries:
        m = load_member(e["source"], format=e.get("format") or "auto", dtype=dtype, name=e["name"],
                        **e.get("options", {}))
        members.append(MemberSource(m.name, m.vision, m.text))
        if first_llm is None:
            first_llm = m.llm
    if base:
        from fuse.members import resolve_path

        base_dir = str(resolve_path(base))
        reader = LazyCheckpoint(base_dir)
        key = EMBED_KEY if EMBED_KEY in reader else next(
            (k for k in reader.keys() if k.endswith("embed_tokens.weight")), None)
        if key is None:
            raise CheckpointError(f"{base_dir}: base model has no embed_tokens.weight")
        return Sources("recipe", p, members, lambda: reader.get(key), str(base_dir))
    llm = first_llm
    return Sources("recipe", p, members, lambda: llm.get(EMBED_KEY), f"{members[0].name} (first member's LLM)")


def require_fused(path: str | os.PathLike) -> Path:
    """``path`` must be a fused directory; a recipe (or a plain member) gets a clear message."""
    p = Path(path)
    if is_fused_dir(p):
        return p
    if is_recipe(p):
        raise DataError(f"{p}: this is a recipe, not a fused model; run `fuse merge {p} -o OUT` first "
                        "and pass OUT (attention needs the merged LLM)")
    if p.is_dir():
        raise DataError(f"{p}: not a fused model directory (no {FUSE_CONFIG}); run `fuse merge` first")
    raise DataError(f"{p}: no such fused model directory")
