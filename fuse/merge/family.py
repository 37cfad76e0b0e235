"""Family check: can these members be merged, and are they fine-tunes of the base?

Runs on headers, configs and tokenizers plus a few sampled tensors, before any
heavy work:

- same LLM architecture and shape-defining config (hidden size, layers, heads,
  KV heads, head dim, activation, norm eps, tied embeddings, rope theta);
- same tensor names and shapes; embedding/lm_head rows may differ, but only by
  rows appended at the end;
- tokenizer compatibility: a token known to two tokenizers has the same id in both;
- relative L2 distance ``||theta_m - theta_ref|| / ||theta_ref||`` over a few sampled
  weight matrices (reference = the base, or the first member for a base-less
  ``linear`` merge). Fine-tunes sit around 1e-3..1e-1; independently trained
  weights around 1.4. Above ``MAX_DISTANCE`` a member is refused unless
  ``allow_foreign``. Not measured when a model is known by its headers only (a hub
  model before its weights are downloaded): ``fuse merge`` checks again after the download.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import FamilyError
from ..members.base import rope_theta_of
from .sources import BaseInput, MemberInput
from .threads import torch_threads

MAX_DISTANCE = 0.5
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
FAMILY_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "hidden_act", "rms_norm_eps", "tie_word_embeddings", "rope_theta")
SAMPLED_SUFFIXES = ("self_attn.q_proj.weight", "mlp.down_proj.weight")
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)  # non-persistent buffers some old checkpoints store


def family_facts(config: dict) -> dict:
    facts = {k: config.get(k) for k in FAMILY_KEYS}
    facts["rope_theta"] = rope_theta_of(config)
    if facts["head_dim"] is None and config.get("hidden_size") and config.get("num_attention_heads"):
        facts["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    if facts["num_key_value_heads"] is None:
        facts["num_key_value_heads"] = config.get("num_attention_heads")
    return facts


def merge_names(names: Sequence[str]) -> list[str]:
    """The LLM tensors that are merged, in mergekit's execution order (sorted by name)."""
    return sorted(n for n in names if not n.endswith(SKIPPED_SUFFIXES))


@dataclass
class Row:
    """One line of the report."""

    name: str
    format: str
    vocab_rows: int | None
    distance: float | None = None
    problems: list[str] = field(default_factory=list)  # fatal
    notes: list[str] = field(default_factory=list)
    foreign: bool = False
    field: str = ""
    reference: bool = False

    def verdict(self, allow_foreign: bool = False) -> str:
        if self.reference and not self.problems:
            return "reference (base)" if self.field == "base_model" else "; ".join(["reference"] + self.notes)
        if self.problems:
            return "REFUSED: " + self.problems[0]
        if self.foreign:
            return ("foreign (allowed)" if allow_foreign else
                    f"REFUSED: distance {self.distance:.3f} > {MAX_DISTANCE} (not a fine-tune of the reference)")
        return "; ".join(["ok"] + self.notes)


@dataclass
class FamilyReport:
    rows: list[Row]
    reference: str  # "base_model" or the first member's name
    tensor_names: list[str]

    def problem(self, allow_foreign: bool = False) -> tuple[Row, str] | None:
        for r in self.rows:
            if r.problems:
                return r, r.problems[0]
            if r.foreign and not allow_foreign:
                return r, (f"relative L2 distance to {self.reference} is {r.distance:.3f} > {MAX_DISTANCE}: "
                           "not a fine-tune of the same base (pass --allow-foreign to merge anyway)")
        return None

    def ok(self, allow_foreign: bool = False) -> bool:
        return self.problem(allow_foreign) is None

    def raise_if_bad(self, label: str, allow_foreign: bool = False) -> None:
        p = self.problem(allow_foreign)
        if p is not None:
            row, msg = p
            who = row.field if row.field == "base_model" else f"{row.field} ({row.name})"
            raise FamilyError(f"{label}: {who}: {msg}")

    def table(self, allow_foreign: bool = False) -> str:
        head = ("member", "format", "vocab", f"dist to {'base' if self.reference == 'base_model' else self.reference}",
                "verdict")
        lines = [head]
        for r in self.rows:
            dist = "-" if r.distance is None else f"{r.distance:.4f}"
            lines.append((r.name, r.format, "-" if r.vocab_rows is None else str(r.vocab_rows), dist,
                          r.verdict(allow_foreign)))
        widths = [max(len(line[i]) for line in lines) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(line[:4], widths)) + "  " + line[4] for line in lines)


def _compare_config(ref: dict, other: dict, ref_label: str) -> list[str]:
    a, b = family_facts(ref), family_facts(other)
    out = []
    for k in FAMILY_KEYS:
        va, vb = a[k], b[k]
        if isinstance(va, float) and isinstance(vb, float) and math.isclose(va, vb, rel_tol=1e-9):
            continue
        if va != vb:
            out.append(f"{k} {vb} != {va} of {ref_label} (not the same LLM family)")
    return out


def _compare_tensors(ref, other, ref_label: str, base_extra_ok: bool) -> tuple[list[str], list[str]]:
    """Names/shapes of ``other`` against ``ref`` (LLMParts). Returns (problems, notes)."""
    problems, notes = [], []
    rn = set(merge_names(ref.names()))
    on = set(merge_names(other.names()))
    missing = sorted(rn - on) if not base_extra_ok else []
    extra = sorted(on - rn)
    if missing:
        problems.append(f"{len(missing)} LLM tensors of {ref_label} are missing, e.g. {missing[0]}")
    if extra:
        problems.append(f"{len(extra)} LLM tensors are not in {ref_label}, e.g. {extra[0]}")
    for n in sorted(rn & on):
        sa, sb = tuple(ref.shape(n)), tuple(other.shape(n))
        if n in VOCAB_TENSORS:
            if sa[1:] != sb[1:]:
                problems.append(f"{n} shape {list(sb)} vs {list(sa)} of {ref_label}")
        elif sa != sb:
            problems.append(f"{n} shape {list(sb)} vs {list(sa)} of {ref_label}")
        if problems:
            break
    if not problems and "model.embed_tokens.weight" in rn:
        ra, rb = ref.vocab_rows, other.vocab_rows
        if rb > ra:
            notes.append(f"+{rb - ra} appended vocab row{'s' if rb - ra > 1 else ''}")
        elif rb < ra:
            notes.append(f"{ra - rb} fewer vocab rows")
    return problems, notes


def _vocab(tokenizer_path: str | None) -> dict[str, int] | None:
    if not tokenizer_path:
        return None
    from ..members.text import tokenizer_vocab

    return tokenizer_vocab(tokenizer_path)


def tokenizer_problem(ref: dict[str, int], vocab: dict[str, int], ref_label: str) -> tuple[str | None, str | None]:
    """(fatal problem, note). Fatal: a token both know has different ids."""
    shared = ref.keys() & vocab.keys()
    bad = sorted((t for t in shared if ref[t] != vocab[t]), key=lambda t: ref[t])
    if bad:
        t = bad[0]
        return (f"tokenizer maps {t!r} to id {vocab[t]} but {ref_label}'s maps it to {ref[t]} "
                f"({len(bad)} shared tokens have different ids)"), None
    inv_ref = {i: t for t, i in ref.items()}
    renamed = sum(1 for t, i in vocab.items() if i in inv_ref and inv_ref[i] != t)
    return None, (f"{renamed} ids carry other tokens than in {ref_label}" if renamed else None)


def _sampled_names(names: Sequence[str], num_layers: int) -> list[str]:
    layers = sorted({0, num_layers // 2, max(num_layers - 1, 0)})
    wanted = [f"model.layers.{i}.{s}" for i in layers for s in SAMPLED_SUFFIXES]
    got = [n for n in wanted if n in names]
    return got or [n for n in names if n not in VOCAB_TENSORS][:4]


SAMPLE_ELEMENTS = 2**22  # per sampled tensor: rows beyond this are subsampled (8 evenly spaced blocks)
SAMPLE_BLOCKS = 8
DISTANCE_BLOCK = 2**16  # elements converted to float64 at a time


def sampled_rows(rows: int, row_elements: int, budget: int = SAMPLE_ELEMENTS,
                 blocks: int = SAMPLE_BLOCKS) -> list[tuple[int, int]]:
    """Row ranges of one tensor that the distance is measured on: every row when the tensor has at
    most ``budget`` elements, else ``blocks`` evenly spaced blocks of ``budget / blocks`` elements."""
    if rows * row_elements <= budget:
        return [(0, rows)]
    per = max(1, budget // blocks // max(row_elements, 1))
    starts = sorted({(rows - per) * i // (blocks - 1) for i in range(blocks)})
    return [(a, a + per) for a in starts]


def relative_distance(ref, other, names: Sequence[str]) -> float:
    """``sqrt(sum ||other - ref||^2) / sqrt(sum ||ref||^2)`` over ``names`` (LLMParts), on at most
    ``SAMPLE_ELEMENTS`` elements of each tensor (:func:`sampled_rows`): a few MB in memory at a
    time and a fraction of a second for an 8B model, whose fine-tune deltas are spread over all rows."""
    with torch_threads(1):  # 64K-element blocks: more threads only add waiting on a busy machine
        return _relative_distance(ref, other, names)


def _relative_distance(ref, other, names: Sequence[str]) -> float:
    num = den = 0.0
    bx, by = torch.empty(DISTANCE_BLOCK, dtype=torch.float64), torch.empty(DISTANCE_BLOCK, dtype=torch.float64)
    for n in names:
        shape = ref.shape(n)
        rows = shape[0] if shape else 1
        row_el = math.prod(shape[1:]) if len(shape) > 1 else 1
        for a, b in sampled_rows(rows, row_el):
            x = (ref.reader.get_rows(ref.keys[n], a, b) if shape else ref.get(n)).reshape(-1)
            y = (other.reader.get_rows(other.keys[n], a, b) if shape else other.get(n)).reshape(-1)
            # float64 in cache-sized blocks through two reused buffers: a fresh float64 copy of a
            # 4M-element sample costs more in page faults and conversion than the arithmetic
            for s in range(0, x.numel(), DISTANCE_BLOCK):
                k = min(DISTANCE_BLOCK, x.numel() - s)
                x64, y64 = bx[:k].copy_(x[s:s + k]), by[:k].copy_(y[s:s + k])
                den += float(torch.dot(x64, x64))
                num += float(torch.dot(y64.sub_(x64), y64))
            del x, y
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


def check_family(base: BaseInput | None, members: Sequence[MemberInput], check_tokenizers: bool = True) -> FamilyReport:
    """Compare every member with the reference (base, else the first member). Never raises on a
    mismatch: problems are collected in the report (``report.raise_if_bad``)."""
    rows: list[Row] = []
    if base is not None:
        ref_llm, ref_label = base.llm, "base_model"
        brow = Row("base", "(base)", base.llm.vocab_rows if "model.embed_tokens.weight" in base.llm.keys else None,
                   field="base_model", reference=True)
        if base.architecture != "LlamaForCausalLM":
            brow.problems.append(f"architecture {base.architecture} is not LlamaForCausalLM (the members' LLM)")
        rows.append(brow)
    else:
        ref_llm, ref_label = members[0].llm, members[0].name
    ref_vocab, ref_tok, tok_label = None, None, ref_label
    if check_tokenizers:  # reference tokenizer: the base's, else the first member that has one
        candidates = ([("base_model", base.tokenizer_path)] if base is not None else []) + \
            [(m.name, m.member.text.tokenizer_path) for m in members]
        for label, path in candidates:
            if path:
                ref_vocab, ref_tok, tok_label = _vocab(path), path, label
                break
    names = merge_names(members[0].llm.names())  # the base may hold extra tensors; members must all agree
    sampled = _sampled_names(names, int(ref_llm.config.get("num_hidden_layers") or 0))
    for m in members:
        row = Row(m.name, m.format, m.llm.vocab_rows if "model.embed_tokens.weight" in m.llm.keys else None,
                  field=m.field, reference=base is None and m is members[0])
        rows.append(row)
        if rows[0].problems and rows[0].field == "base_model":
            continue
        row.problems += _compare_config(ref_llm.config, m.llm.config, ref_label)
        if not row.problems:
            p, notes = _compare_tensors(ref_llm, m.llm, ref_label, base_extra_ok=base is not None)
            if base is not None and not p:  # the base may store extra tensors; the members must agree with each other
                p2, _ = _compare_tensors(members[0].llm, m.llm, members[0].name, base_extra_ok=False)
                p += p2
            row.problems += p
            row.notes += notes
        if not row.problems and ref_vocab is not None and m.member.text.tokenizer_path and \
                m.member.text.tokenizer_path != ref_tok:
            fatal, note = tokenizer_problem(ref_vocab, _vocab(m.member.text.tokenizer_path), tok_label)
            if fatal:
                row.problems.append(fatal)
            elif note:
                row.notes.append(note)
        elif check_tokenizers and not m.member.text.tokenizer_path:
            row.notes.append("no tokenizer files: ids not checked")
        if not row.problems and sampled and not row.reference:
            if ref_llm.reader.has_data and m.llm.reader.has_data:
                row.distance = relative_distance(ref_llm, m.llm, sampled)
                row.foreign = row.distance > MAX_DISTANCE
            else:  # a hub model seen through its headers: the merge measures it once the weights are in
                row.notes.append("distance not measured (weights not downloaded)")
    return FamilyReport(rows, ref_label, names)


__all__ = ["FAMILY_KEYS", "MAX_DISTANCE", "FamilyReport", "Row", "check_family", "family_facts", "merge_names",
           "relative_distance", "sampled_rows", "tokenizer_problem"]
