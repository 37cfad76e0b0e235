"""Benchmark metrics on already-parsed answers (pure functions, no model).

- MMVP: per-question accuracy and pair accuracy (a pair of consecutive
  questions counts only when both are right; random = 25% for two options).
- POPE: accuracy, precision, recall, F1 of the "yes" class, and yes-ratio
  (share of *predictions* that are yes, as in the POPE paper).
- VQA: exact match against the most common reference answer, and the VQA
  soft accuracy ``min(#references equal to the prediction / 3, 1)`` averaged
  over the leave-one-out subsets of the references (10-choose-9 for VQAv2).
Every function also works per category through :func:`by_category`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Callable, Iterable, Sequence

from .answers import normalize_vqa


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0


# --- MMVP ---------------------------------------------------------------------------------------------

def pair_id(index: int) -> int:
    """MMVP pairs are consecutive 1-based indices: (1, 2) -> 0, (3, 4) -> 1, ..."""
    return (int(index) - 1) // 2


def mmvp_pairs(indices: Sequence[int], correct: Sequence[bool]) -> tuple[list[bool], int]:
    """(one outcome per complete pair, in order of first appearance: both questions right; number of
    incomplete pairs). ``indices`` are the 1-based MMVP question indices."""
    if len(indices) != len(correct):
        raise ValueError("indices and correct differ in length")
    pairs: dict[int, list[bool]] = defaultdict(list)
    for i, c in zip(indices, correct):
        pairs[pair_id(i)].append(bool(c))
    complete = [all(v) for v in pairs.values() if len(v) == 2]
    return complete, len(pairs) - len(complete)


def mmvp_scores(indices: Sequence[int], correct: Sequence[bool]) -> dict:
    """Accuracy over questions and over complete pairs (both right).

    ``indices`` are the 1-based MMVP question indices; an incomplete pair (e.g.
    after ``--limit``) is left out of the pair accuracy and counted in ``incomplete_pairs``.
    """
    complete, incomplete = mmvp_pairs(indices, correct)
    return {
        "accuracy": _mean([float(c) for c in correct]),
        "pair_accuracy": _mean([float(v) for v in complete]),
        "n": len(correct),
        "n_pairs": len(complete),
        "incomplete_pairs": incomplete,
    }


# --- POPE ---------------------------------------------------------------------------------------------

def pope_scores(predictions: Sequence[str | None], labels: Sequence[str]) -> dict:
    """Binary metrics with "yes" as the positive class.

    ``predictions`` are ``"yes"``, ``"no"`` or ``None`` (unreadable reply: wrong,
    and counted as a negative prediction, as LLaVA's POPE script does).
    """
    if len(predictions) != len(labels):
        raise ValueError("predictions and labels differ in length")
    tp = fp = fn = tn = 0
    for p, y in zip(predictions, labels):
        yes = p == "yes"
        if y == "yes":
            tp, fn = tp + yes, fn + (not yes)
        else:
            fp, tn = fp + yes, tn + (not yes)
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "unparsed": sum(1 for p in predictions if p is None),
        "n": n,
    }


# --- VQA ----------------------------------------------------------------------------------------------

def vqa_soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction: mean over each reference left out of
    ``min(1, #other references equal to the prediction / 3)``.

    With a single reference answer this is exact match. Both sides are normalised
    with :func:`~fuse.eval.answers.normalize_vqa`.
    """
    if not answers:
        raise ValueError("no reference answers")
    pred = normalize_vqa(prediction)
    refs = [normalize_vqa(a) for a in answers]
    if len(refs) == 1:
        return float(pred == refs[0])
    hits = sum(r == pred for r in refs)
    # leaving out reference i removes one hit when reference i itself equals the prediction
    return _mean([min(1.0, (hits - (r == pred)) / 3.0) for r in refs])


def majority_answer(answers: Sequence[str]) -> str:
    """Most common normalised reference (ties: the first seen)."""
    counts = Counter(normalize_vqa(a) for a in answers)
    best = max(counts.values())
    return next(a for a in (normalize_vqa(x) for x in answers) if counts[a] == best)


def vqa_exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals the most common normalised reference."""
    return float(normalize_vqa(prediction) == majority_answer(answers))


def vqa_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict:
    if len(predictions) != len(answers):
        raise ValueError("predictions and answers differ in length")
    return {
        "exact_match": _mean([vqa_exact_match(p, a) for p, a in zip(predictions, answers)]),
        "soft_accuracy": _mean([vqa_soft_accuracy(p, a) for p, a in zip(predictions, answers)]),
        "n": len(predictions),
    }


# --- per category ---------------------------------------------------------------------------------------

def by_category(categories: Iterable[str | None], score: Callable[[list[int]], dict]) -> dict[str, dict]:
    """``{category: score(indices of that category)}`` for every non-empty category, sorted by name."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(categories):
        if c not in (None, ""):
            groups[str(c)].append(i)
    return {c: score(idx) for c, idx in sorted(groups.items())}


# --- uncertainty ----------------------------------------------------------------------------------------

def paired_bootstrap_interval(a: dict[str, Sequence[float]], b: dict[str, Sequence[float]], n_resamples: int = 2000,
                              level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of ``mean_p mean(a[p]) - mean_p mean(b[p])`` by a paired bootstrap.

    ``a[p]`` / ``b[p]``: two models' scores on the same units of part ``p`` (questions; MMVP pairs), in
    the same order. Each part is resampled on its own, with the same draw for both models (paired: the
    shared difficulty of a question cancels). Units are treated as independent; questions about the
    same image are not quite, so the interval is, if anything, a little narrow (Efron & Tibshirani,
    "An Introduction to the Bootstrap", 1993, ch. 13, percentile interval).
    """
    import numpy as np

    if set(a) != set(b) or any(len(a[p]) != len(b[p]) for p in a):
        raise ValueError("paired bootstrap: both models need the same parts and units")
    rng = np.random.default_rng(seed)
    parts = [p for p in a if len(a[p])]
    if not parts:
        raise ValueError("paired bootstrap: no units")
    diffs = np.zeros(n_resamples)
    for p in parts:
        d = np.asarray(a[p], dtype=float) - np.asarray(b[p], dtype=float)
        idx = rng.integers(0, len(d), size=(n_resamples, len(d)))
        diffs += d[idx].mean(axis=1)
    diffs /= len(parts)
    lo, hi = np.quantile(diffs, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)
