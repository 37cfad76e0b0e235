"""Metric formulas and answer parsing checked on hand-made predictions with hand-computed figures."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from fuse.eval import metrics as M
from fuse.eval.answers import match_option, normalize_vqa, parse_choice, parse_options, parse_yes_no
from fuse.eval.tasks import Sample, score_mmvp, score_pope, score_vqa


def _mmvp_sample(index: int, answer: int, pattern: str | None) -> Sample:
    return Sample(id=str(index), image=Path(f"{index}.jpg"), question="q", prompt="q",
                  target={"index": index, "options": ["open", "closed"], "answer": answer,
                          "answer_text": ["open", "closed"][answer]}, category=pattern)


def test_mmvp_pair_accuracy_by_hand():
    # pairs (1,2) both right, (3,4) one right, (5,6) both wrong -> 3/6 questions, 1/3 pairs
    s = M.mmvp_scores([1, 2, 3, 4, 5, 6], [True, True, True, False, False, False])
    assert s["accuracy"] == pytest.approx(0.5)
    assert s["pair_accuracy"] == pytest.approx(1 / 3)
    assert (s["n"], s["n_pairs"], s["incomplete_pairs"]) == (6, 3, 0)
    # a truncated pair (question 7 alone) is left out of the pair accuracy
    s = M.mmvp_scores([1, 2, 7], [True, True, True])
    assert s["pair_accuracy"] == 1.0 and s["n_pairs"] == 1 and s["incomplete_pairs"] == 1


def test_mmvp_scoring_matches_letters_and_text_with_pattern_breakdown():
    samples = [_mmvp_sample(1, 0, "state"), _mmvp_sample(2, 1, "state"),
               _mmvp_sample(3, 1, "colour"), _mmvp_sample(4, 0, "colour")]
    outputs = ["(a) Open", "Closed.", "B", "the answer is (b)"]  # right, right, right, wrong
    sc = score_mmvp(samples, outputs)
    assert [r["correct"] for r in sc.records] == [True, True, True, False]
    assert [r["parsed"] for r in sc.records] == ["a", "b", "b", "b"]
    assert sc.metrics["accuracy"] == pytest.approx(0.75)
    assert sc.metrics["pair_accuracy"] == pytest.approx(0.5)
    assert sc.breakdown["state"]["pair_accuracy"] == 1.0
    assert sc.breakdown["colour"]["pair_accuracy"] == 0.0
    assert sc.breakdown["colour"]["accuracy"] == 0.5
    # an optional judge decides replies the matcher cannot read
    sc = score_mmvp(samples[:1], ["no idea"], judge=lambda s, out: 0)
    assert sc.records[0]["correct"] is True


def test_pope_f1_by_hand():
    labels = ["yes"] * 5 + ["no"] * 5
    #         TP   TP     TP     FN    FN(unparsed)   FP     TN    TN    TN    TN
    preds = ["yes", "yes", "yes", "no", None, "yes", "no", "no", "no", "no"]
    s = M.pope_scores(preds, labels)
    precision, recall = 3 / 4, 3 / 5
    assert s["precision"] == pytest.approx(precision)
    assert s["recall"] == pytest.approx(recall)
    assert s["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert s["f1"] == pytest.approx(2 / 3)
    assert s["accuracy"] == pytest.approx(7 / 10)
    assert s["yes_ratio"] == pytest.approx(4 / 10)
    assert s["unparsed"] == 1


def test_pope_scoring_parses_free_text():
    samples = [Sample(str(i), Path("x.jpg"), "q", "q", {"label": y}, cat)
               for i, (y, cat) in enumerate([("yes", "random"), ("no", "random"), ("no", "adversarial")])]
    sc = score_pope(samples, ["Yes, there is one.", "There is not.", "Yes"])
    assert [r["parsed"] for r in sc.records] == ["yes", "no", "yes"]
    assert sc.metrics["accuracy"] == pytest.approx(2 / 3)
    assert sc.breakdown["random"]["accuracy"] == 1.0 and sc.breakdown["adversarial"]["accuracy"] == 0.0


def _soft_reference(pred: str, answers: list[str]) -> float:
    """The VQA definition written out: average over all 10-choose-9 subsets of min(#matches / 3, 1)."""
    accs = [min(sum(a == pred for a in subset) / 3, 1.0) for subset in itertools.combinations(answers, len(answers) - 1)]
    return sum(accs) / len(accs)


def test_vqa_soft_accuracy_by_hand():
    answers = ["red"] * 2 + ["blue"] * 8
    # by hand: leaving out a "red" (2 ways) leaves 1 red -> 1/3; leaving out a "blue" (8 ways) leaves 2 -> 2/3
    assert M.vqa_soft_accuracy("Red.", answers) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10) == 0.6
    assert M.vqa_soft_accuracy("blue", answers) == 1.0
    assert M.vqa_soft_accuracy("green", answers) == 0.0
    mixed = ["two", "2", "2", "3", "two", "three", "2", "4", "3", "2"]
    for pred in ("2", "3", "4", "5"):
        refs = [normalize_vqa(a) for a in mixed]
        assert M.vqa_soft_accuracy(pred, mixed) == pytest.approx(_soft_reference(pred, refs))
    assert M.vqa_soft_accuracy("Two", mixed) == 1.0  # six references say 2 (as "two" or "2")
    # exact match: against the most common reference
    assert M.vqa_exact_match("blue", answers) == 1.0 and M.vqa_exact_match("red", answers) == 0.0
    assert M.vqa_soft_accuracy("Circle", ["circle"]) == 1.0  # one reference: exact match


def test_vqa_scoring_and_breakdown():
    samples = [Sample("1", Path("x.jpg"), "q", "q", {"answers": ["red"] * 2 + ["blue"] * 8}, "colour"),
               Sample("2", Path("x.jpg"), "q", "q", {"answers": ["3"]}, "count")]
    sc = score_vqa(samples, ["red", "Three."])
    assert sc.metrics["soft_accuracy"] == pytest.approx((0.6 + 1.0) / 2)
    assert sc.metrics["exact_match"] == pytest.approx(0.5)
    assert sc.breakdown["count"]["exact_match"] == 1.0
    assert sc.records[1]["parsed"] == "3"


@pytest.mark.parametrize("raw,norm", [("Two.", "2"), ("A dog", "dog"), ("black/white", "black white"),
                                      ("1,000", "1000"), ("dont", "don't"), ("Yes!", "yes"), ("3.5", "3.5"),
                                      ("  The Red  ball\n", "red ball"), ("t-shirt", "t shirt"), ("left, right", "left right")])
def test_normalize_vqa(raw, norm):
    assert normalize_vqa(raw) == norm


@pytest.mark.parametrize("text,ans", [("Yes", "yes"), ("yes, there is a dog.", "yes"), ("No.", "no"),
                                      ("There is not a dog.", "no"), ("I think yes", "yes"), ("maybe", None), ("", None)])
def test_parse_yes_no(text, ans):
    assert parse_yes_no(text) == ans


def test_options_and_choice_matching():
    assert parse_options("(a) Open (b) Closed") == ["Open", "Closed"]
    assert parse_options("A. up\nB. down") == ["up", "down"]
    assert parse_options("(a) x (c) y") == [] and parse_options("Open or closed") == []
    opts = ["Open", "Closed"]
    assert [parse_choice(c, opts) for c in ("(a)", "b", "B", "(B)", "Closed", "(c)", "ajar")] == [0, 1, 1, 1, 1, None, None]
    cases = {"(b)": 1, "B": 1, "b. Closed": 1, "Closed": 1, "The answer is A": 0, "Option B": 1, "open": 0,
             "It looks closed to me": 1, "purple": None, "": None}
    for text, want in cases.items():
        assert match_option(text, opts) == want, text
    assert match_option("a circle", ["square", "circle"]) == 1  # the article is not read as option A
    assert match_option("it is dark red", ["dark red", "red"]) == 0  # the longer option wins
    assert match_option("red", ["dark red", "red"]) == 1


def test_paired_bootstrap_interval_against_the_normal_approximation():
    """A constant difference has a zero-width interval; on many Bernoulli units the interval matches the
    normal approximation mean(d) +- 1.96 * sd(d) / sqrt(n) (averaged over parts), and pairing matters."""
    import numpy as np

    from fuse.eval.metrics import paired_bootstrap_interval

    same = {"x": [1.0, 0.0, 1.0], "y": [0.0, 1.0]}
    assert paired_bootstrap_interval(same, same) == (0.0, 0.0)
    plus = {"x": [v + 0.25 for v in same["x"]], "y": [v + 0.25 for v in same["y"]]}
    lo, hi = paired_bootstrap_interval(plus, same)
    assert lo == pytest.approx(0.25) and hi == pytest.approx(0.25)

    rng = np.random.default_rng(1)
    n = 3000
    b = {p: rng.integers(0, 2, n).astype(float) for p in ("vqa", "pope")}
    flip = {p: rng.random(n) < 0.2 for p in b}  # a differs from b on 20% of the units
    a = {p: np.where(flip[p], 1 - b[p], b[p]) for p in b}
    d = {p: a[p] - b[p] for p in b}
    centre = float(np.mean([d[p].mean() for p in b]))
    se = float(np.sqrt(sum(d[p].var(ddof=1) / n for p in b)) / len(b))
    lo, hi = paired_bootstrap_interval({p: list(v) for p, v in a.items()}, {p: list(v) for p, v in b.items()},
                                       n_resamples=4000)
    assert lo == pytest.approx(centre - 1.96 * se, abs=0.25 * se)
    assert hi == pytest.approx(centre + 1.96 * se, abs=0.25 * se)
    # unpaired, the same two models would look far less certain: pairing is what makes the interval tight
    se_unpaired = float(np.sqrt(sum((a[p].var(ddof=1) + b[p].var(ddof=1)) / n for p in b)) / len(b))
    assert hi - lo < 0.75 * 2 * 1.96 * se_unpaired
    with pytest.raises(ValueError):
        paired_bootstrap_interval({"x": [1.0]}, {"x": [1.0, 0.0]})
