"""The merge recipe: a YAML file validated by a pydantic schema.

```yaml
base_model: meta-llama/Meta-Llama-3-8B-Instruct   # path or hub id; required except for `linear`
members:                                          # order = visual-token order at inference
  - model: YanweiLi/MGM-8B      # path or hub id (downloaded by `fuse merge`, see fuse.hub)
    format: auto                # auto|llava-hf|llava|mgm|slime|comm
    weight: 0.5                 # default 1/n
    density: null               # ties / dare_*: fraction of the delta kept
    name: mgm                   # default: the model's basename, de-duplicated (-2, -3 ...)
merge:
  method: task_arithmetic       # task_arithmetic|ties|dare_ties|dare_linear|linear
  parameters: {}                # method-level mergekit parameters (normalize, int8_mask, lambda, rescale)
  dtype: float32                # compute dtype (float64: exact identities for float32 members)
  out_dtype: null               # default: the members' stored dtype
  seed: 0                       # RNG seed of dare_* (same stream as `mergekit-yaml --random-seed`)
text:
  member: null                  # member (name) giving tokenizer + prompt style; default: the first
  extra_eos_ids: []             # added to the union of the members' eos ids
inference: {}                   # copied verbatim into fuse_config.json
output:
  dir: out/fused
  max_shard_size: 5GB
```

Relative paths (``base_model``, ``members[].model``, ``output.dir``) are resolved
against the directory of the recipe file, so a recipe can sit next to its
checkpoints. A value that does not exist there and looks like ``org/name`` is
kept as a hub id. Every validation error is one line naming the file and the
field, e.g. ``recipe.yaml: merge.method: 'foo' is not one of task_arithmetic, ...``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .dtypes import COMPUTE_DTYPES
from .errors import RecipeError
from .names import NAME_RX, derive_member_name, unique_names

MAX_YAML_NODES = 100_000  # a recipe has tens of values; YAML aliases can expand to billions


def check_yaml_size(data: Any, label: str) -> None:
    """Refuse YAML whose aliases expand to more than :data:`MAX_YAML_NODES` values (a "billion laughs"
    bomb would otherwise run a whole merge before failing with MemoryError, or hang on printing)."""
    stack, seen = [data], 0
    while stack:
        x = stack.pop()
        seen += 1
        if seen > MAX_YAML_NODES:
            raise RecipeError(f"{label}: expands to more than {MAX_YAML_NODES} values (YAML aliases?); "
                              "write the values out")
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple, set)):
            stack.extend(x)


DtypeName = Literal[COMPUTE_DTYPES]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class MemberSpec(_Strict):
    """One member MLLM of the family."""

    model: str
    format: str = "auto"  # a name of fuse.members.registry.FORMATS (checked by fuse.merge.validate)
    weight: Optional[float] = None
    density: Optional[float] = None
    name: Optional[str] = None
    options: dict[str, Any] = Field(default_factory=dict)  # passed to the format adapter (e.g. prompt_style)

    @field_validator("model")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a path or hub id, got an empty string")
        return v.strip()

    @field_validator("weight")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError(f"must be a finite number, got {v}")
        return v

    @field_validator("density")
    @classmethod
    def _density(cls, v: float | None) -> float | None:
        if v is not None and not (0.0 < v <= 1.0):
            raise ValueError(f"must be in (0, 1], got {v}")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not NAME_RX.fullmatch(v):
            raise ValueError(f"{v!r} must be a plain directory name (letters, digits, . _ -)")
        return v


class MergeSpec(_Strict):
    method: str = "task_arithmetic"  # a name of fuse.merge.methods.MERGE_METHODS (checked by fuse.merge.validate)
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: DtypeName = "float32"
    out_dtype: Optional[DtypeName] = None
    seed: int = Field(default=0, ge=0)


class TextSpec(_Strict):
    member: Optional[str] = None
    extra_eos_ids: list[int] = Field(default_factory=list)


class OutputSpec(_Strict):
    dir: str = "out/fused"
    max_shard_size: str | int = "5GB"

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, v: str | int) -> str | int:
        from .errors import CheckpointError
        from .units import parse_size

        try:
            n = parse_size(v)
        except CheckpointError:
            raise ValueError(f"{v!r} is not a size like '5GB' or '500MB'") from None
        if n <= 0:
            raise ValueError(f"must be positive, got {v!r}")
        return v


class Recipe(_Strict):
    """A validated recipe. ``source`` is the file it came from (for messages and relative paths)."""

    base_model: Optional[str] = None
    members: list[MemberSpec] = Field(min_length=1)
    merge: MergeSpec = Field(default_factory=MergeSpec)
    text: TextSpec = Field(default_factory=TextSpec)
    inference: dict[str, Any] = Field(default_factory=dict)
    output: OutputSpec = Field(default_factory=OutputSpec)
    source: Optional[str] = Field(default=None, exclude=True)

    # -- derived -----------------------------------------------------------
    @property
    def label(self) -> str:
        return self.source or "recipe"

    def error(self, field: str, message: str) -> RecipeError:
        """A RecipeError naming this recipe's file and ``field``."""
        return RecipeError(f"{self.label}: {field}: {message}")

    def member_names(self) -> list[str]:
        """Names in member order: ``name``, or one derived from the model (its basename) that no other
        member has (:func:`fuse.names.unique_names`)."""
        explicit = [m.name for m in self.members if m.name]
        derived = iter(unique_names([derive_member_name(m.model) for m in self.members if not m.name], explicit))
        return [m.name or next(derived) for m in self.members]

    def weights(self) -> list[float]:
        n = len(self.members)
        return [m.weight if m.weight is not None else 1.0 / n for m in self.members]

    def text_member_index(self) -> int:
        if self.text.member is None:
            return 0
        return self.member_names().index(self.text.member)

    def check(self) -> "Recipe":
        """Cross-field rules of the schema itself (member names, the text member). Raises RecipeError.

        What the method, the formats and the inference options allow is checked where those live, by
        :func:`fuse.merge.validate.validate_recipe` (``fuse check`` / ``fuse merge`` run it first)."""
        seen: set[str] = set()
        for i, m in enumerate(self.members):
            if m.name and m.name in seen:
                raise self.error(f"members[{i}].name", f"{m.name!r} is used by two members")
            seen.add(m.name or "")
        all_names = self.member_names()
        if self.text.member is not None and self.text.member not in all_names:
            raise self.error("text.member", f"{self.text.member!r} is not a member name "
                             f"(members: {', '.join(all_names)})")
        return self


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _describe(err: dict) -> str:
    kind, ctx, value = err.get("type", ""), err.get("ctx") or {}, err.get("input")
    if kind == "literal_error":
        allowed = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return f"{value!r} is not one of {', '.join(allowed)}"
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "too_short" and isinstance(value, list):
        return "needs at least one entry"
    msg = str(err.get("msg", "invalid value"))
    msg = re.sub(r"^Value error, ", "", msg)
    return f"{msg} (got {value!r})" if kind in ("float_parsing", "int_parsing", "float_type", "int_type",
                                                 "string_type", "dict_type", "list_type", "bool_parsing") else msg


def _resolve(value: str, root: Path) -> str:
    """A recipe path relative to the recipe dir; ``org/name`` that does not exist there stays a hub id."""
    p = Path(os.path.expanduser(value))
    if p.is_absolute():
        return str(p)
    local = Path(os.path.normpath(root / p))
    if local.exists():
        return str(local)
    looks_like_hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", value) is not None and not value.startswith(".")
    return value if looks_like_hub_id else str(local)


def parse_recipe(data: Any, source: str | None = None, root: str | os.PathLike | None = None) -> Recipe:
    """Validate a recipe mapping against the schema. ``root``: directory that relative paths are resolved
    against. (What the merge method and the member formats allow: :func:`fuse.merge.validate.validate_recipe`.)"""
    label = source or "recipe"
    check_yaml_size(data, label)
    if not isinstance(data, dict):
        raise RecipeError(f"{label}: expected a mapping with base_model, members, merge, ... at the top level")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        first = errors[0]
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise RecipeError(f"{label}: {_field_path(first['loc'])}: {_describe(first)}{more}") from None
    recipe.source = source
    if root is not None:
        root = Path(root)
        if recipe.base_model:
            recipe.base_model = _resolve(recipe.base_model, root)
        for m in recipe.members:
            m.model = _resolve(m.model, root)
        out = Path(os.path.expanduser(recipe.output.dir))
        recipe.output.dir = os.path.normpath(out if out.is_absolute() else root / out)
    return recipe.check()


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read a recipe YAML file and validate it against the schema (relative paths resolved against its
    directory; see :func:`parse_recipe`)."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{p}: no such recipe file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{p}: invalid YAML{where} ({getattr(e, 'problem', None) or e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{p}: cannot read ({e})") from None
    return parse_recipe(data, source=str(p), root=p.parent.resolve())


__all__ = ["MemberSpec", "MergeSpec", "OutputSpec", "Recipe", "TextSpec",
           "check_yaml_size", "load_recipe", "parse_recipe"]
