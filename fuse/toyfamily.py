"""The shipped toy family (``fuse/assets/toy_family``) and ``fuse toyworld compare``.

The family is built the way real MLLM families are (LLaVA-1.5, MiniGemini, SliME): one base
LLM, and per member its own frozen vision encoder, a projector trained with the LLM frozen
(stage 1) and a short, small-learning-rate fine-tune of LLM + projector (stage 2). It is
trained by ``train toy-family -o DIR`` (:mod:`train.toyfamily`; ``fuse`` never imports
``train``). This module holds what *using* the family needs: its recipe, the test split,
the evaluation settings, and :func:`compare`, which merges the members with several methods
and evaluates members, fused models (with and without a token budget) and the trained COMM
reference on a test world, writing ``compare.json`` and a per-skill bar chart.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

ASSETS = Path(__file__).resolve().parent / "assets" / "toy_family"
MEMBERS = ("colour", "spatial")
MODELS = ("base",) + MEMBERS + ("comm",)

# the world the family is trained on and tested with (numbers of images; images come in pairs)
WORLD = dict(n_train=2000, n_test=300, size=84, mc_answer="text")

# evaluation settings of figures.json, compare and the tests
EVAL = dict(batch_size=32, max_new_tokens=6)
CHECK_LIMIT = 24  # questions per part of the small re-evaluation that tests reproduce exactly

# recipes/toy_family.yaml holds the same (tests check they agree). Chosen on validation worlds (never a test
# split; see README): the members' spans in parallel position ids, colour first (seed 4242); one answer per
# member, the most probable kept, a member abstaining on questions with a word its training questions never had
# (seeds 4242-4246: gain +0.180 to +0.214 over the best member, every skill >= 0.94x; one answer from both
# members' tokens, the paper's concatenation, is compare's "+none" row).
RECIPE: dict[str, Any] = {
    "base_model": "base",
    "members": [{"model": "colour", "weight": 0.5, "name": "colour"},
                {"model": "spatial", "weight": 0.5, "name": "spatial"}],
    "merge": {"method": "task_arithmetic", "dtype": "float32"},
    "text": {"member": "colour"},
    "inference": {"member_positions": "parallel", "answer_select": "confidence:members", "abstain": "unseen_words"},
}
METHODS = ("task_arithmetic", "ties", "linear")
TIES_DENSITY = 0.5
# the budget row: 24 visual tokens per forward pass, kept by the question's attention. The recipe runs one pass
# per member that may answer (answer_select confidence:members, abstain unseen_words): one pass of one member's
# tokens for a question only one member was trained on, so 24 visual tokens per answer, half of one member's 49
# (compare reports the visual tokens read per answer for every fused row)
BUDGET = "total:24"
SKILL_COLUMNS = ("colour", "position", "count", "shape", "orientation")
COLUMNS = SKILL_COLUMNS + ("vqa", "pope_acc", "mmvp_pair", "mean", "samples_per_s")
DEFAULT_LIMIT: int | None = None  # questions per part in `fuse toyworld compare`: all of them (a 160-question
# slice moved the gain by up to 0.04 on the shipped split, more than the effect being measured)
BOOTSTRAP = dict(n_resamples=2000, level=0.95, seed=0)  # interval printed with the gain


CEILING_PARTS = (("vqa", "exact_match", "n"), ("pope", "accuracy", "n"), ("mmvp", "pair_accuracy", "n_pairs"))


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Table row of a toy-task result: per-skill VQA exact match, overall VQA, POPE accuracy, MMVP
    (question / pair accuracy) and ``mean`` = mean of VQA exact match, POPE accuracy and MMVP pair
    accuracy (the figure the family's acceptance is stated in)."""
    from .toyworld import SKILLS

    m, b = results["metrics"], results["breakdown"]
    row: dict[str, Any] = {}
    for s in SKILLS:
        cm = (b.get("vqa") or {}).get(s) or {}
        row[s] = cm.get("exact_match", cm.get(results["primary"]["vqa"]))
    row["vqa"] = m["vqa"].get("exact_match")
    row["pope_acc"] = m["pope"].get("accuracy")
    row["mmvp_q"] = m["mmvp"].get("accuracy")
    row["mmvp_pair"] = m["mmvp"].get("pair_accuracy")
    parts = [row["vqa"], row["pope_acc"], row["mmvp_pair"]]
    row["mean"] = sum(parts) / 3 if all(isinstance(v, float) for v in parts) else None
    # per part, per skill / POPE category: [score, number of units], what routing_ceiling combines
    row["by_category"] = {part: {c: [cm.get(key), cm.get(n)] for c, cm in (b.get(part) or {}).items()}
                          for part, key, n in CEILING_PARTS}
    row["n"] = results["n"]
    row["samples_per_s"] = results["timing"]["samples_per_s"]
    row["visual_tokens_per_answer"] = results.get("visual_tokens_per_answer")  # fused models: over every pass
    return row


def score_units(results: dict[str, Any]) -> dict[str, list[float]]:
    """Per-unit scores of a toy-task result logged with samples, in sample order, for the three parts of
    ``mean``: VQA exact match per question, POPE correctness per question, MMVP pair correctness per
    complete pair (both questions right)."""
    from .eval.metrics import mmvp_pairs

    recs = results["samples"]
    pairs, _ = mmvp_pairs([r["target"]["index"] for r in recs["mmvp"]], [r["correct"] for r in recs["mmvp"]])
    return {"vqa": [float(r["exact_match"]) for r in recs["vqa"]],
            "pope": [float(bool(r["correct"])) for r in recs["pope"]],
            "mmvp": [float(v) for v in pairs]}


def family_recipe(family: str | os.PathLike = ASSETS, method: str = "task_arithmetic", out: str | os.PathLike = "fused",
                  inference: dict | None = None):
    """The toy-family recipe (:data:`RECIPE`) with ``method`` / ``inference``, paths under ``family``."""
    from .recipe import parse_recipe

    data = copy.deepcopy(RECIPE)
    data["merge"]["method"] = method
    if method == "ties":
        for m in data["members"]:
            m["density"] = TIES_DENSITY
    if inference is not None:
        data["inference"] = {**data["inference"], **inference}
    data["output"] = {"dir": str(Path(out).resolve())}
    return parse_recipe(data, source=f"toy_family[{method}]", root=Path(family))


def write_test_split(directory: str | os.PathLike, seed: int = 0) -> Path:
    """The toy world's test split exactly as :func:`fuse.toyworld.generate` writes it (same exclusions),
    without writing the training split. Returns the split dir."""
    from .output_dir import atomic_output_dir
    from .toyworld import build_split, write_split

    size, mc = WORLD["size"], WORLD["mc_answer"]
    train = build_split("train", WORLD["n_train"] // 2, seed, size, mc)
    seen = {hashlib.sha256(b).hexdigest() for b in train.images}
    test = build_split("test", WORLD["n_test"] // 2, seed, size, mc, exclude=seen)
    with atomic_output_dir(directory) as tmp:
        write_split(test, tmp)
    return Path(directory)


def family_seed(family: str | os.PathLike = ASSETS) -> int:
    """The seed of the world the family was trained on (its ``figures.json``; 0 if absent)."""
    f = Path(family) / "figures.json"
    return int(json.loads(f.read_text()).get("seed", 0)) if f.is_file() else 0


def budget_inference(budget: str) -> dict[str, Any]:
    """The ``inference`` section for the budget row: ``total:N[@layer]`` caps all members' tokens together
    (``max_visual_tokens``); anything else is a per-member ``token_budget`` spec (``pool:2``, ``topk:24``)."""
    kind, _, arg = budget.partition(":")
    if kind == "total":
        return {"max_visual_tokens": arg}
    return {"token_budget": budget}


def compare(out: str | os.PathLike = "out/toy_compare", family: str | os.PathLike = ASSETS, seed: int | None = None,
            limit: int | None = DEFAULT_LIMIT, methods: Sequence[str] = METHODS, budget: str | None = BUDGET,
            models: Sequence[str] | None = None, batch_size: int = EVAL["batch_size"], echo=print,
            progress: bool = False, plot: bool = True, force: bool = False, select: str | None = None
            ) -> dict[str, Any]:
    """Merge the toy family (each method), evaluate members, fused models and COMM on a test split.

    ``seed``: None = the family's own test split (the world it was trained on, the "shipped" split);
    otherwise the test split of a fresh world of that seed (images the family never saw).
    Writes ``out/test`` (the split), ``out/fused-<tag>`` (merge outputs), ``out/compare.json`` and
    (``plot``) ``out/compare.png``; returns the JSON document (``rows``: model -> :data:`COLUMNS`
    figures; ``summary``: best member, fused gain over it, share of the gain kept with the budget).
    ``select``: an ``answer_select`` mode (:data:`fuse.model.options.ANSWER_SELECT`) for an extra
    task_arithmetic row ``fused:task_arithmetic+<select>``, summarised like the default fused row; none
    when it is the recipe's own mode (:func:`recipe_select`). ``"none"`` with a recipe that selects
    answers gives the plain-concatenation row, the paper's method.
    Everything is written to a temp dir renamed to ``out`` at the end; an existing ``out`` needs ``force``
    (and is replaced only if an earlier run of this toolkit wrote it); paths in the document name ``out``.
    """
    from .eval.runner import write_results
    from .output_dir import atomic_output_dir

    with atomic_output_dir(out, force=force) as tmp:
        doc = _compare(tmp, Path(family), seed, limit, methods, budget, models, batch_size, echo, progress, select)
        doc["test"] = str(Path(out) / "test")
        if plot and doc["rows"]:
            plot_compare(doc, tmp / "compare.png")
            doc["plot"] = str(Path(out) / "compare.png")
        write_results(doc, tmp / "compare.json")
    return doc


def recipe_select() -> str:
    """The recipe's own ``answer_select`` mode (:data:`RECIPE`): every fused row but ``--select``'s uses it."""
    return RECIPE["inference"].get("answer_select", "none")


def select_inference(select: str) -> dict[str, Any]:
    """The ``inference`` section of ``compare``'s ``--select`` row: that ``answer_select`` mode; the pmi
    modes score against the toy world's empty scene (a flat image of its background colour), the
    content-free image of this world."""
    from .model.options import colour_hex
    from .toyworld import BACKGROUND

    out: dict[str, Any] = {"answer_select": select}
    if select.partition(":")[0] == "pmi":
        out["null_image"] = colour_hex(BACKGROUND)
    return out


def _compare(out: Path, family: Path, seed: int | None, limit: int | None, methods: Sequence[str],
             budget: str | None, models: Sequence[str] | None, batch_size: int, echo, progress: bool,
             select: str | None = None) -> dict[str, Any]:
    from .merge import run_merge

    t_all = time.perf_counter()
    shipped = family_seed(family)
    test_seed = shipped if seed is None else int(seed)
    test = write_test_split(out / "test", test_seed)
    jobs: list[tuple[str, Path]] = [(name, family / name) for name in MEMBERS]
    fused_specs = [(f"fused:{m}", m, None) for m in methods]
    if budget and "task_arithmetic" in methods:
        fused_specs.append((f"fused:task_arithmetic+{budget}", "task_arithmetic", budget_inference(budget)))
    if select is not None and select != recipe_select() and "task_arithmetic" in methods:
        fused_specs.append((f"fused:task_arithmetic+{select}", "task_arithmetic", select_inference(select)))
    merge_s = 0.0
    for label, method, inference in fused_specs:
        if models is not None and label not in models:
            continue
        tag = label.split(":", 1)[1].replace("+", "_").replace(":", "")
        recipe = family_recipe(family, method, out / f"fused-{tag}", inference)
        t0 = time.perf_counter()
        run_merge(recipe, progress=False, checksums=False, align_check=False, echo=lambda *a, **k: None)
        merge_s += time.perf_counter() - t0
        jobs.append((label, Path(recipe.output.dir)))
    jobs.append(("comm", family / "comm"))
    if models is not None:
        jobs = [j for j in jobs if j[0] in models]
    rows: dict[str, dict[str, Any]] = {}
    units: dict[str, dict[str, list[float]]] = {}
    echo(format_header())
    for label, path in jobs:
        rows[label], units[label] = evaluate_model(path, test, label, limit, batch_size, progress)
        echo(format_row(label, rows[label]))
    doc = {"family": str(family), "test": str(test), "test_seed": test_seed, "shipped_split": test_seed == shipped,
           "limit_per_part": limit, "eval": {**EVAL, "batch_size": batch_size}, "ties_density": TIES_DENSITY,
           "budget": budget, "select": select, "columns": list(COLUMNS), "rows": rows,
           "summary": summary(rows, budget, units, select=select),
           "merge_seconds": round(merge_s, 2), "total_seconds": round(time.perf_counter() - t_all, 1)}
    return doc


def evaluate_model(path: str | os.PathLike, test: str | os.PathLike, label: str, limit: int | None = None,
                   batch_size: int = EVAL["batch_size"], progress: bool = False
                   ) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Evaluate one model dir (member, fused or COMM) on a toy split with the family's settings
    (:data:`EVAL`, float32): its table row (:func:`summarize`) and per-unit scores (:func:`score_units`)."""
    import torch

    from .eval import EvalConfig, evaluate
    from .eval.loader import load_for_eval

    cfg = EvalConfig(limit=limit, batch_size=batch_size, max_new_tokens=EVAL["max_new_tokens"], log_samples=True)
    res = evaluate(load_for_eval(path, dtype=torch.float32), "toy", test, cfg, model_name=label, progress=progress)
    return summarize(res), score_units(res)


def routing_ceiling(rows: dict[str, dict[str, Any]], members: Sequence[str] = MEMBERS) -> dict[str, Any] | None:
    """The best ``mean`` a fusion that takes each skill from one member can reach: every VQA skill, POPE
    category and MMVP skill answered as well as the member best at it (``by_category`` of
    :func:`summarize`), weighted by its number of questions (MMVP: pairs).

    VisionFuse's gain comes from members that see different things (its abstract: different MLLMs focus on
    distinct regions given the same query and image); this is what that complementarity is worth on a test
    world, so a gain target can be read against it. It is optimistic by the noise in picking the better of the members on each category
    (on near-chance skills the pick is luck), and a fusion could exceed it only where fused tokens beat
    every member on a skill. None when a member row has no breakdown (an old ``compare.json``)."""
    members = [m for m in members if rows.get(m, {}).get("by_category")]
    if len(members) < 2:
        return None
    parts: dict[str, float] = {}
    for part, _, _ in CEILING_PARTS:
        cats = rows[members[0]]["by_category"].get(part) or {}
        total = sum(cats[c][1] or 0 for c in cats)
        if not total:
            return None
        parts[part] = sum(max((rows[m]["by_category"].get(part) or {}).get(c, [0.0])[0] or 0.0 for m in members)
                          * (cats[c][1] or 0) for c in cats) / total
    mean = sum(parts.values()) / len(parts)
    best = max(rows[m]["mean"] for m in members)
    return {"mean": mean, "gain": mean - best, "parts": parts}


def summary(rows: dict[str, dict[str, Any]], budget: str | None = BUDGET,
            units: dict[str, dict[str, list[float]]] | None = None, members: Sequence[str] = MEMBERS,
            fused_label: str = "fused:task_arithmetic", select: str | None = None) -> dict[str, Any]:
    """Best member by ``mean``; the default fused model's gain over it, per-skill ratios to the best
    member on that skill, and the share of the gain the budgeted fused model keeps. With ``units``
    (:func:`score_units` per row): ``gain_interval``, a paired-bootstrap interval of the gain
    (:data:`BOOTSTRAP`), so a user can tell a gain from the noise of a few hundred questions.
    ``members`` / ``fused_label``: the rows compared (another family's members, another fused row).
    ``select``: the row ``<fused_label>+<select>`` gets the same summary under ``"select"``."""
    members = [n for n in members if n in rows]
    fused = rows.get(fused_label)
    if not members or fused is None:
        return {}
    best = max(members, key=lambda n: rows[n]["mean"])
    gain = fused["mean"] - rows[best]["mean"]
    def ratio(skill: str) -> float | None:  # None: no question of that skill in the slice, or no member scores
        scores = [rows[n][skill] for n in members if rows[n].get(skill) is not None]
        if fused.get(skill) is None or not scores or not max(scores):
            return None
        return fused[skill] / max(scores)

    out: dict[str, Any] = {"best_member": best, "best_member_mean": rows[best]["mean"], "fused_mean": fused["mean"],
                           "gain": gain, "skill_ratio": {s: ratio(s) for s in SKILL_COLUMNS},
                           "visual_tokens_per_answer": fused.get("visual_tokens_per_answer")}
    if units and fused_label in units and best in units:
        from .eval.metrics import paired_bootstrap_interval

        lo, hi = paired_bootstrap_interval(units[fused_label], units[best], **BOOTSTRAP)
        out["gain_interval"] = {"low": lo, "high": hi, **BOOTSTRAP,
                                "method": "paired bootstrap over questions (VQA, POPE) and MMVP pairs"}
    b = rows.get(f"{fused_label}+{budget}") if budget else None
    if b is not None:
        out["budget_gain"] = b["mean"] - rows[best]["mean"]
        out["budget_gain_kept"] = out["budget_gain"] / gain if gain > 0 else None
        out["budget_visual_tokens_per_answer"] = b.get("visual_tokens_per_answer")
    if select and f"{fused_label}+{select}" in rows:
        out["select"] = summary(rows, None, units, members, f"{fused_label}+{select}")
    ceiling = routing_ceiling(rows, members)
    if ceiling is not None:
        out["routing_ceiling"] = ceiling
    return out


def plot_compare(doc: dict[str, Any], path: str | os.PathLike) -> Path:
    """Grouped bars: per skill (VQA exact match) and the three headline figures, one bar per model."""
    from matplotlib.figure import Figure

    rows = doc["rows"]
    cols = list(SKILL_COLUMNS) + ["vqa", "pope_acc", "mmvp_pair", "mean"]
    labels = list(rows)
    fig = Figure(figsize=(max(8.0, 1.1 * len(cols) * max(1, len(labels)) / 3), 4.6))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(labels))
    cmap = {"colour": "#d95f02", "spatial": "#7570b3", "comm": "#666666"}
    fused_colours = ["#1b9e77", "#66a61e", "#a6d854", "#e6ab02", "#8dd3c7"]
    k = 0
    for i, label in enumerate(labels):
        colour = cmap.get(label)
        if colour is None:
            colour = fused_colours[k % len(fused_colours)]
            k += 1
        vals = [rows[label].get(c) or 0.0 for c in cols]
        ax.bar([j + (i - (len(labels) - 1) / 2) * width for j in range(len(cols))], vals, width, label=label,
               color=colour, edgecolor="black", linewidth=0.3)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    split = "shipped test split" if doc.get("shipped_split") else f"fresh test world, seed {doc.get('test_seed')}"
    ax.set_title(f"Toy family: members vs fused vs COMM ({split}, {doc.get('limit_per_part') or 'all'} questions/part)")
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def format_header() -> str:
    return f"{'model':40s} " + " ".join(f"{c[:11]:>11s}" for c in COLUMNS)


def format_row(label: str, row: dict[str, Any]) -> str:
    cells = []
    for c in COLUMNS:
        v = row.get(c)
        cells.append(f"{v:11.1f}" if c == "samples_per_s" and v is not None else
                     f"{v:11.3f}" if isinstance(v, float) else f"{str(v):>11s}")
    return f"{label:40s} " + " ".join(cells)


def format_ratios(skill_ratio: dict[str, float | None]) -> str:
    """``"colour 1.00, count 0.94, ..."``: per-skill ratios to the best member, skills without one left out."""
    return ", ".join(f"{k} {v:.2f}" for k, v in skill_ratio.items() if v is not None)


def format_ceiling(ceiling: dict[str, Any]) -> str:
    """The routing-ceiling line (:func:`routing_ceiling`) of ``compare`` and the member-variant benchmark."""
    return (f"each skill from the member best at it (routing ceiling): mean {ceiling['mean']:.3f}, "
            f"gain {ceiling['gain']:+.3f}")


def format_summary(doc: dict[str, Any]) -> list[str]:
    """The verdict lines under the table: gain of the default fused model, per-skill ratios, budget."""
    sm = doc.get("summary") or {}
    if not sm:
        return []
    ci = sm.get("gain_interval")
    ci_text = (f" ({100 * ci['level']:.0f}% interval {ci['low']:+.3f} .. {ci['high']:+.3f}, paired bootstrap)"
               if ci else "")
    lines = [f"fused (task_arithmetic) mean {sm['fused_mean']:.3f} vs best member ({sm['best_member']}) "
             f"{sm['best_member_mean']:.3f}: gain {sm['gain']:+.3f}{ci_text}"]
    ratios = format_ratios(sm["skill_ratio"])
    lines.append(f"fused / best member per skill: {ratios}")
    if sm.get("visual_tokens_per_answer") is not None:
        lines.append(f"visual tokens the LLM read per answer, over every pass: {sm['visual_tokens_per_answer']:.1f}"
                     + (f" (with the budget: {sm['budget_visual_tokens_per_answer']:.1f})"
                        if sm.get("budget_visual_tokens_per_answer") is not None else ""))
    if "budget_gain" in sm:
        kept = sm.get("budget_gain_kept")
        note = ""
        if kept is not None:
            note = f" ({100 * kept:.0f}% of the gain kept)" if sm["budget_gain"] > 0 else " (none of the gain kept)"
        lines.append(f"with token budget {doc.get('budget')}: gain {sm['budget_gain']:+.3f}{note}")
    sel = sm.get("select")
    if sel:
        ci = sel.get("gain_interval")
        ci_text = f" ({100 * ci['level']:.0f}% interval {ci['low']:+.3f} .. {ci['high']:+.3f})" if ci else ""
        ratios = format_ratios(sel["skill_ratio"])
        mode = doc.get("select")
        mode = f"{mode} (plain concatenation)" if mode == "none" else mode
        lines.append(f"with answer_select {mode}: mean {sel['fused_mean']:.3f}, gain {sel['gain']:+.3f}"
                     f"{ci_text}; per skill {ratios}")
    ceiling = sm.get("routing_ceiling")
    if ceiling:
        lines.append(format_ceiling(ceiling))
    return lines


def format_table(doc: dict[str, Any]) -> str:
    return "\n".join([format_header()] + [format_row(k, r) for k, r in doc["rows"].items()])
