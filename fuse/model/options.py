"""Inference options of a fused model: token budget, position sharing, separators.

These come from the recipe's ``inference`` section (copied verbatim into
``fuse_config.json`` by ``fuse merge``) and can be overridden per call (the ``inference``
argument of ``FusedModel.prepare/forward/generate/capture_attention``, same keys and values) or
on the ``fuse generate`` command line. Every field accepts one spec for all members or
a mapping ``member name -> spec``::

    inference:
      token_budget: pool:2            # all | pool[:S] | pool:HxW | topk:K  (or {kind: topk, k: 64})
      positions: {slime: share}       # sequential | share | groups:K | rows
      separator: none                 # none | member | <token id>
      max_visual_tokens: 49           # cap on all members' tokens together, kept by the question's attention
                                      # (or {tokens: 49, layer: 1}: the LLM layer whose attention scores them)
      member_positions: parallel      # sequential (each member's span after the previous one) | parallel
                                      # (every member's span ends where the text after the image starts)
      answer_select: confidence       # none | confidence (greedy answers with all members' tokens and with
                                      # each member's alone; the one of highest log-probability is returned)
                                      # | confidence:members (each member's tokens alone only)
                                      # | pmi | pmi:members (the same candidates, each scored by its
                                      # log-probability minus that on a content-free image, null_image)
      null_image: "#000000"           # the content-free image of the pmi modes: a flat colour, #rrggbb
      abstain: unseen_words           # none | unseen_words: under answer_select, a member whose training
                                      # questions (its recorded question_words) lack a word of the question
                                      # gives no candidate for it (members that record none never abstain)

Specs are parsed here once (:func:`parse_budget`, :func:`parse_positions`) into
small dataclasses; invalid values raise :class:`~fuse.errors.RecipeError`
naming the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

from ..errors import FuseError, RecipeError


@dataclass(frozen=True)
class BudgetSpec:
    """How many of a member's visual tokens to keep.

    ``kind``: ``all`` | ``pool`` (average ``stride x stride`` windows of the grid, or
    adaptive pooling to ``size`` = (h, w)) | ``topk`` (``k`` tokens most similar to the
    prompt's text embeddings).
    """

    kind: str = "all"
    stride: int = 2
    size: tuple[int, int] | None = None
    k: int | None = None

    def __str__(self) -> str:
        if self.kind == "pool":
            return f"pool:{self.size[0]}x{self.size[1]}" if self.size else f"pool:{self.stride}"
        if self.kind == "topk":
            return f"topk:{self.k}"
        return self.kind


@dataclass(frozen=True)
class PositionSpec:
    """How a member's visual tokens use position ids (MouSi-style position sharing).

    ``kind``: ``sequential`` (one position per token, the default) | ``share`` (all tokens of the
    member share one position) | ``groups`` (``groups`` consecutive groups, one position each) |
    ``rows`` (the tokens of one grid row share a position).
    """

    kind: str = "sequential"
    groups: int | None = None

    def __str__(self) -> str:
        return f"groups:{self.groups}" if self.kind == "groups" else self.kind


INFERENCE_KEYS = ("token_budget", "positions", "separator", "max_visual_tokens", "member_positions", "answer_select",
                  "null_image", "abstain")
MEMBER_POSITIONS = ("sequential", "parallel")  # how the members' spans are placed relative to each other
# which token sets the merged LLM answers with before the best-scored answer is kept (generate only):
# "<score>[:members]", score = confidence (the answer's log-probability) or pmi (minus its log-probability
# given the same members' tokens of a content-free image, ``null_image``)
ANSWER_SELECT = ("none", "confidence", "confidence:members", "pmi", "pmi:members")
# when a member sits out answer_select's comparison for a question: never, or when the question has a word that
# none of the member's training questions had (FusedModel.generate; the words come from the member's metadata)
ABSTAIN = ("none", "unseen_words")
NULL_IMAGE = "#000000"  # default content-free image of the pmi modes: a flat black image
BUDGET_KINDS = ("all", "pool", "topk")
POSITION_KINDS = ("sequential", "share", "groups", "rows")


def _int(value: Any, field_name: str, minimum: int = 1) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        v = int(str(value).strip())
    except ValueError:
        raise RecipeError(f"{field_name}: expected an integer, got {value!r}") from None
    if v < minimum:
        raise RecipeError(f"{field_name}: expected an integer >= {minimum}, got {value!r}")
    return v


def parse_budget(spec: Any, field_name: str = "inference.token_budget") -> BudgetSpec:
    """``"all"``, ``"pool"``, ``"pool:2"``, ``"pool:12x12"``, ``"topk:64"`` or a dict -> BudgetSpec."""
    if spec is None:
        return BudgetSpec()
    if isinstance(spec, BudgetSpec):
        return spec
    if isinstance(spec, Mapping):
        kind = str(spec.get("kind", ""))
        extra = set(spec) - {"kind", "stride", "size", "k"}
        if extra:
            raise RecipeError(f"{field_name}: unknown key(s) {sorted(extra)} (expected kind, stride, size, k)")
        arg = spec.get("k") if kind == "topk" else (spec.get("size") or spec.get("stride"))
        if kind == "pool" and spec.get("size") is not None:
            size = spec["size"]
            size = (size, size) if isinstance(size, int) else tuple(size)
            arg = f"{size[0]}x{size[1]}"
        spec = kind if arg is None else f"{kind}:{arg}"
    if not isinstance(spec, str):
        raise RecipeError(f"{field_name}: expected a string like 'pool:2' or a mapping, got {spec!r}")
    kind, _, arg = spec.strip().partition(":")
    if kind not in BUDGET_KINDS:
        raise RecipeError(f"{field_name}: unknown token budget {kind!r}; known: {', '.join(BUDGET_KINDS)}")
    if kind == "all":
        if arg:
            raise RecipeError(f"{field_name}: 'all' takes no argument")
        return BudgetSpec("all")
    if kind == "topk":
        if not arg:
            raise RecipeError(f"{field_name}: topk needs a count, e.g. 'topk:64'")
        return BudgetSpec("topk", k=_int(arg, field_name))
    if "x" in arg:
        h, _, w = arg.partition("x")
        return BudgetSpec("pool", size=(_int(h, field_name), _int(w, field_name)))
    return BudgetSpec("pool", stride=_int(arg, field_name) if arg else 2)


def parse_positions(spec: Any, field_name: str = "inference.positions") -> PositionSpec:
    """``"sequential"``, ``"share"``, ``"groups:8"``, ``"rows"`` or a dict -> PositionSpec."""
    if spec is None:
        return PositionSpec()
    if isinstance(spec, PositionSpec):
        return spec
    if isinstance(spec, Mapping):
        extra = set(spec) - {"kind", "groups"}
        if extra:
            raise RecipeError(f"{field_name}: unknown key(s) {sorted(extra)} (expected kind, groups)")
        spec = f"{spec.get('kind', '')}:{spec['groups']}" if spec.get("groups") is not None else str(spec.get("kind", ""))
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = "share" if spec == 1 else f"groups:{spec}"
    if not isinstance(spec, str):
        raise RecipeError(f"{field_name}: expected a string like 'share' or 'groups:8', got {spec!r}")
    kind, _, arg = spec.strip().partition(":")
    if kind not in POSITION_KINDS:
        raise RecipeError(f"{field_name}: unknown position scheme {kind!r}; known: {', '.join(POSITION_KINDS)}")
    if kind == "groups":
        if not arg:
            raise RecipeError(f"{field_name}: groups needs a count, e.g. 'groups:8'")
        return PositionSpec("groups", groups=_int(arg, field_name))
    if arg:
        raise RecipeError(f"{field_name}: {kind!r} takes no argument")
    return PositionSpec(kind)


def _per_member(value: Any, names: Sequence[str], parse, field_name: str, default: Any) -> dict[str, Any]:
    """One spec for all members, or ``{name: spec}`` (members not named get ``default``)."""
    is_mapping = isinstance(value, Mapping) and "kind" not in value
    if not is_mapping:
        spec = parse(value if value is not None else default, field_name)
        return {n: spec for n in names}
    unknown = [k for k in value if k not in names]
    if unknown:
        raise RecipeError(f"{field_name}: unknown member(s) {unknown}; members are {list(names)}")
    return {n: parse(value.get(n, default), f"{field_name}.{n}") for n in names}


@dataclass(frozen=True)
class TotalBudget:
    """A cap on the visual tokens of all members together (after each member's own budget).

    The ``tokens`` kept are those the last prompt position attends to most in LLM layer ``layer``
    (0-based; mean over heads), across members: a question about colour keeps the tokens that carry
    colour, whichever member wrote them (text-guided selection in the spirit of FastV, Chen et al.
    2024, "An Image is Worth 1/2 Tokens After Layer 2"). Kept tokens keep their position ids.
    """

    tokens: int
    layer: int = 1

    def __str__(self) -> str:
        return f"{self.tokens}@layer{self.layer}"


def parse_total(spec: Any, field_name: str = "inference.max_visual_tokens") -> TotalBudget | None:
    """``None``, an int, ``"49"``, ``"49@1"`` or ``{tokens: 49, layer: 1}`` -> TotalBudget | None."""
    if spec is None or isinstance(spec, TotalBudget):
        return spec
    if isinstance(spec, Mapping):
        extra = set(spec) - {"tokens", "layer"}
        if extra or "tokens" not in spec:
            raise RecipeError(f"{field_name}: expected keys tokens (and layer), got {sorted(spec)}")
        return TotalBudget(_int(spec["tokens"], f"{field_name}.tokens"),
                           _int(spec.get("layer", 1), f"{field_name}.layer", minimum=0))
    tokens, _, layer = str(spec).strip().partition("@")
    return TotalBudget(_int(tokens, field_name), _int(layer, field_name, minimum=0) if layer else 1)


def parse_member_positions(spec: Any, separator: Any = "none",
                           field_name: str = "inference.member_positions") -> str:
    """``None`` (sequential), ``"sequential"`` or ``"parallel"``. Parallel spans have no room for separator
    tokens between members, so the two are refused together."""
    value = "sequential" if spec is None else spec
    if value not in MEMBER_POSITIONS:
        raise RecipeError(f"{field_name}: expected one of {', '.join(MEMBER_POSITIONS)}, got {spec!r}")
    if value == "parallel" and separator not in (None, "none"):
        raise RecipeError(f"{field_name}: 'parallel' places the members' spans side by side; it cannot be combined "
                          f"with a separator (got separator {separator!r})")
    return value


def parse_answer_select(spec: Any, field_name: str = "inference.answer_select") -> str:
    """``None`` (none) or one of :data:`ANSWER_SELECT`."""
    value = "none" if spec is None else spec
    if value not in ANSWER_SELECT:
        raise RecipeError(f"{field_name}: expected one of {', '.join(ANSWER_SELECT)}, got {spec!r}")
    return value


def parse_abstain(spec: Any, field_name: str = "inference.abstain") -> str:
    """``None`` (none) or one of :data:`ABSTAIN`."""
    value = "none" if spec is None else spec
    if value not in ABSTAIN:
        raise RecipeError(f"{field_name}: expected one of {', '.join(ABSTAIN)}, got {spec!r}")
    return value


def parse_null_image(spec: Any, field_name: str = "inference.null_image") -> tuple[int, int, int]:
    """``None`` (:data:`NULL_IMAGE`) or a colour ``"#rrggbb"`` -> (r, g, b)."""
    value = NULL_IMAGE if spec is None else spec
    if not (isinstance(value, str) and re.fullmatch(r"#[0-9a-fA-F]{6}", value)):
        raise RecipeError(f"{field_name}: expected a colour '#rrggbb' (e.g. '#000000'), got {spec!r}")
    return tuple(int(value[k:k + 2], 16) for k in (1, 3, 5))  # type: ignore[return-value]


def colour_hex(rgb: Sequence[int]) -> str:
    """(r, g, b) -> ``"#rrggbb"``, the form :func:`parse_null_image` reads."""
    return "#%02x%02x%02x" % tuple(rgb)


def answer_candidates(select: str, names: Sequence[str]) -> list[list[str]]:
    """The member subsets whose visual tokens the merged LLM answers with under ``select``
    (:data:`ANSWER_SELECT`): every member together first (``confidence``, ``pmi``), then each member alone."""
    if select == "none":
        return [list(names)]
    alone = [[n] for n in names]
    return alone if select.endswith(":members") or len(names) == 1 else [list(names)] + alone


def _known_keys(section: Mapping[str, Any] | None) -> dict[str, Any]:
    section = dict(section or {})
    unknown = sorted(set(section) - set(INFERENCE_KEYS))
    if unknown:
        raise RecipeError(f"inference: unknown key(s) {unknown}; known: {sorted(INFERENCE_KEYS)}")
    return section


@dataclass
class InferenceOptions:
    """Resolved per-member options (member name -> spec), the separator policy and the total cap."""

    budget: dict[str, BudgetSpec] = field(default_factory=dict)
    positions: dict[str, PositionSpec] = field(default_factory=dict)
    separator: str | int = "none"  # "none" | "member" | token id inserted between members
    total: TotalBudget | None = None
    member_positions: str = "sequential"  # one of MEMBER_POSITIONS (fuse.model.assembly.sample_positions)
    answer_select: str = "none"  # one of ANSWER_SELECT (FusedModel.generate)
    null_image: tuple[int, int, int] = parse_null_image(None)  # flat colour the pmi modes score against
    abstain: str = "none"  # one of ABSTAIN (FusedModel.generate, with answer_select)

    @classmethod
    def parse(cls, section: Mapping[str, Any] | None, names: Sequence[str]) -> "InferenceOptions":
        """Validate a recipe/fuse_config ``inference`` section for members ``names``."""
        section = _known_keys(section)
        sep = section.get("separator", "none")
        if sep is None:
            sep = "none"
        if isinstance(sep, bool) or not (sep in ("none", "member") or isinstance(sep, int)):
            raise RecipeError(f"inference.separator: expected none, member or a token id, got {sep!r}")
        return cls(budget=_per_member(section.get("token_budget"), names, parse_budget, "inference.token_budget", "all"),
                   positions=_per_member(section.get("positions"), names, parse_positions, "inference.positions",
                                         "sequential"),
                   separator=sep, total=parse_total(section.get("max_visual_tokens")),
                   member_positions=parse_member_positions(section.get("member_positions"), sep),
                   answer_select=parse_answer_select(section.get("answer_select")),
                   null_image=parse_null_image(section.get("null_image")),
                   abstain=parse_abstain(section.get("abstain")))

    def override(self, names: Sequence[str], overrides: Mapping[str, Any] | None = None) -> "InferenceOptions":
        """A copy with what ``overrides`` gives replaced: the keys and values of an ``inference`` section
        (``token_budget``, ``positions``, ``separator``, ``max_visual_tokens``, ``member_positions``,
        ``answer_select``, ``null_image``, ``abstain``; a ``{member: spec}`` mapping replaces those members
        only; None keeps the current value)."""
        overrides = _known_keys(overrides)
        out = replace(self, budget=dict(self.budget), positions=dict(self.positions))
        if overrides.get("answer_select") is not None:
            out.answer_select = parse_answer_select(overrides["answer_select"], "answer_select")
        if overrides.get("abstain") is not None:
            out.abstain = parse_abstain(overrides["abstain"], "abstain")
        if overrides.get("null_image") is not None:
            out.null_image = parse_null_image(overrides["null_image"], "null_image")
        if overrides.get("max_visual_tokens") is not None:
            out.total = parse_total(overrides["max_visual_tokens"], "max_visual_tokens")
        if overrides.get("token_budget") is not None:
            out.budget.update(_per_member(overrides["token_budget"], names, parse_budget, "token_budget", "all"))
        if overrides.get("positions") is not None:
            out.positions.update(_per_member(overrides["positions"], names, parse_positions, "positions",
                                             "sequential"))
        if overrides.get("separator") is not None:
            out.separator = InferenceOptions.parse({"separator": overrides["separator"]}, names).separator
        if overrides.get("member_positions") is not None or overrides.get("separator") is not None:
            out.member_positions = parse_member_positions(overrides.get("member_positions") or self.member_positions,
                                                          out.separator, "member_positions")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"token_budget": {n: str(s) for n, s in self.budget.items()},
                "positions": {n: str(s) for n, s in self.positions.items()}, "separator": self.separator,
                "max_visual_tokens": str(self.total) if self.total else None, "member_positions": self.member_positions,
                "answer_select": self.answer_select, "null_image": colour_hex(self.null_image),
                "abstain": self.abstain}


def refuse_inference_keywords(kwargs: Mapping[str, Any]) -> None:
    """token_budget= / positions= / separator= used to be keywords of their own; passed that way now they
    would reach transformers' GenerationConfig (or the LLM) and be ignored silently."""
    old = [k for k in INFERENCE_KEYS if k in kwargs]
    if old:
        raise FuseError(f"{old[0]}=...: inference options are passed together, as inference={{{old[0]!r}: ...}}")

