"""The shipped toy family (fuse/assets/toy_family): assets, recipe, compare command, exact figures, and the
facts VisionFuse relies on (members close to the base, visual tokens aligned)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fuse.toyfamily import (ASSETS, BUDGET, CHECK_LIMIT, COLUMNS, EVAL, MEMBERS, RECIPE, budget_inference, family_recipe,
                            write_test_split)

REPO = Path(__file__).resolve().parents[2]
FIGURES = json.loads((ASSETS / "figures.json").read_text())


@pytest.fixture(scope="module")
def test_split(tmp_path_factory) -> Path:
    return write_test_split(tmp_path_factory.mktemp("toy") / "test", FIGURES["seed"])


def test_assets_small_and_loadable():
    files = [p for p in ASSETS.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 10 * 2**20
    assert max(p.stat().st_size for p in files) < 5 * 2**20
    from safetensors import safe_open

    from fuse.members import load_member

    for name in ("colour", "spatial", "comm"):
        m = load_member(ASSETS / name)
        assert m.format == "comm"
        with safe_open(str(ASSETS / name / "model.safetensors"), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    base = json.loads((ASSETS / "base" / "config.json").read_text())
    assert base["model_type"] == "llama" and base["architectures"] == ["LlamaForCausalLM"]
    # members are fine-tunes of the shipped base: same LLM shapes, finite distance
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(str(ASSETS / "base"), dtype=torch.float32)
    m = load_member(ASSETS / "colour")
    q = "model.layers.0.self_attn.q_proj.weight"
    a, b = llm.state_dict()[q], m.llm.get(q, torch.float32)
    assert a.shape == b.shape and 0 < float((a - b).norm() / a.norm()) < 0.1


def test_members_are_small_task_vectors_from_the_base():
    """Stage 2 is short at a small learning rate: every member's whole LLM stays within a few percent of
    the base (relative L2 over all tensors), as figures.json records; the old jointly trained members
    were ~0.27 away."""
    from fuse.checkpoint import LazyCheckpoint
    from fuse.members import load_member

    base = LazyCheckpoint(ASSETS / "base")
    for name in MEMBERS:
        m = load_member(ASSETS / name, vision=False)
        num = den = 0.0
        for k in base.keys():
            t = base.get(k).double()
            num += float((m.llm.get(k, torch.float64) - t).pow(2).sum())
            den += float(t.pow(2).sum())
        d = (num / den) ** 0.5
        assert 0 < d < 0.05
        assert d == pytest.approx(FIGURES["premise"]["relative_l2_to_base"][name], rel=1e-6)


def test_fuse_does_not_import_train():
    """fuse/ never imports train/ (layering): the toy-family code of fuse loads without it."""
    import subprocess
    import sys

    code = ("import sys, fuse, fuse.toyfamily, fuse.cli, fuse.commands.toyfamily, fuse.alignment; "
            "bad = [m for m in sys.modules if m == 'train' or m.startswith(('train.', 'analysis'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_spatial_member_is_colour_blind_and_colour_member_is_not():
    """Scenes that differ only in colour give the spatial branch (almost) the same tokens: the channel sums of
    two colours differ only by brightness rounding (+-1 of 360); a shape change moves them a lot."""
    import random
    from dataclasses import replace

    from fuse.members import load_member
    from fuse.toyworld import random_scene, render

    scene = replace(random_scene(random.Random(3)), shape="circle", colour="red")
    imgs = [render(scene), render(replace(scene, colour="green")), render(replace(scene, shape="square"))]
    spatial = load_member(ASSETS / "spatial", dtype=torch.float32)
    colour = load_member(ASSETS / "colour", dtype=torch.float32)
    conv = next(m for m in spatial.vision.modules() if isinstance(m, torch.nn.Conv2d))
    w = conv.weight
    assert torch.equal(w[:, 0], w[:, 1]) and torch.equal(w[:, 1], w[:, 2])  # tied across R, G, B

    def rel(t, i, j):
        return float((t[i] - t[j]).norm() / t[i].norm())

    s = spatial.visual_tokens(imgs)
    c = colour.visual_tokens(imgs)
    assert rel(s, 0, 1) < 0.05 * rel(s, 0, 2)
    assert rel(c, 0, 1) > 10 * rel(s, 0, 1)


def test_recipe_matches_module_recipe():
    from fuse.recipe import load_recipe

    r = load_recipe(REPO / "recipes" / "toy_family.yaml")
    ref = family_recipe()
    assert Path(r.base_model) == ASSETS / "base"
    assert [Path(m.model) for m in r.members] == [ASSETS / m["model"] for m in RECIPE["members"]]
    assert r.member_names() == [m["name"] for m in RECIPE["members"]] == ref.member_names()
    assert sorted(r.member_names()) == sorted(MEMBERS)
    assert r.inference == ref.inference == RECIPE["inference"]
    assert r.weights() == ref.weights() == [m["weight"] for m in RECIPE["members"]]
    assert r.merge.method == ref.merge.method == "task_arithmetic"
    assert r.text.member == ref.text.member


def test_compare_command_slice(tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from fuse.cli import main

    out = tmp_path / "cmp"
    res = CliRunner().invoke(main, ["toyworld", "compare", "-o", str(out), "--limit", "4"])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "compare.json").read_text())
    concat = "fused:task_arithmetic+none"  # the recipe selects answers; the default --select none adds the
    # paper's plain concatenation as a row of its own
    assert list(doc["rows"]) == ["colour", "spatial", "fused:task_arithmetic", "fused:ties", "fused:linear",
                                 f"fused:task_arithmetic+{BUDGET}", concat, "comm"]
    for label, row in doc["rows"].items():
        assert set(COLUMNS) <= set(row)
        assert row["n"] == 12 and label in res.output
        assert row["mean"] == pytest.approx((row["vqa"] + row["pope_acc"] + row["mmvp_pair"]) / 3)
    assert doc["shipped_split"] and doc["test_seed"] == FIGURES["seed"]
    sm = doc["summary"]
    best = max(MEMBERS, key=lambda n: doc["rows"][n]["mean"])
    assert sm["best_member"] == best
    assert sm["gain"] == pytest.approx(doc["rows"]["fused:task_arithmetic"]["mean"] - doc["rows"][best]["mean"])
    ci = sm["gain_interval"]
    assert ci["low"] - 1e-9 <= sm["gain"] <= ci["high"] + 1e-9 and ci["level"] == 0.95
    assert "gain" in res.output and "95% interval" in res.output
    with Image.open(out / "compare.png") as im:
        assert im.size[0] > 400 and im.size[1] > 200
    cfg = json.loads((out / f"fused-task_arithmetic_{BUDGET.replace(':', '')}" / "fuse_config.json").read_text())
    assert cfg["inference"] == {**RECIPE["inference"], **budget_inference(BUDGET)}
    assert [m["name"] for m in cfg["members"]] == [m["name"] for m in RECIPE["members"]]
    ties = json.loads((out / "fused-ties" / "fuse_config.json").read_text())
    assert ties["merge"]["method"] == "ties" and ties["inference"] == RECIPE["inference"]
    cfg = json.loads((out / "fused-task_arithmetic_none" / "fuse_config.json").read_text())
    assert cfg["inference"] == {**RECIPE["inference"], "answer_select": "none"}
    assert sm["select"]["gain"] == pytest.approx(doc["rows"][concat]["mean"] - doc["rows"][best]["mean"])
    assert "with answer_select none (plain concatenation)" in res.output
    # visual tokens the LLM read per answer: concatenation reads both members' 49 in one pass; the budget
    # row at most 24 per pass
    assert doc["rows"][concat]["visual_tokens_per_answer"] == 98
    assert doc["rows"][f"fused:task_arithmetic+{BUDGET}"]["visual_tokens_per_answer"] <= 2 * 24
    assert "visual tokens the LLM read per answer" in res.output


def test_compare_on_a_fresh_world(tmp_path):
    """--seed S tests on the test split of a new world: other images than the family's own split."""
    from click.testing import CliRunner

    from fuse.cli import main

    out = tmp_path / "cmp"
    res = CliRunner().invoke(main, ["toyworld", "compare", "-o", str(out), "--limit", "2", "--seed", "101",
                                    "--methods", "task_arithmetic", "--budget", "none",
                                    "--select", "confidence:members"])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "compare.json").read_text())
    assert doc["test_seed"] == 101 and not doc["shipped_split"]
    # --select naming the recipe's own mode adds no row: the default fused row already is that
    assert RECIPE["inference"]["answer_select"] == "confidence:members"
    assert list(doc["rows"]) == ["colour", "spatial", "fused:task_arithmetic", "comm"]
    cfg = json.loads((out / "fused-task_arithmetic" / "fuse_config.json").read_text())
    assert cfg["inference"] == RECIPE["inference"]
    assert "select" not in doc["summary"] and "with answer_select" not in res.output
    own = write_test_split(tmp_path / "own", FIGURES["seed"])
    assert (out / "test" / "images" / "1.png").read_bytes() != (own / "images" / "1.png").read_bytes()
    assert "seed 101" in res.output


def test_select_row_of_pmi_scores_against_the_empty_scene(tmp_path):
    """compare --select pmi[:members]: the null image is the toy world's own empty scene (its background
    colour, what every image shows where there is no object); confidence modes need none."""
    import random

    from fuse.model.options import InferenceOptions
    from fuse.toyfamily import family_recipe, select_inference
    from fuse.toyworld import BACKGROUND, random_scene, render

    inf = select_inference("pmi:members")
    assert inf == {"answer_select": "pmi:members", "null_image": "#%02x%02x%02x" % BACKGROUND}
    assert select_inference("confidence") == {"answer_select": "confidence"}
    recipe = family_recipe(inference=inf, out=tmp_path / "f")
    opts = InferenceOptions.parse(recipe.inference, ["colour", "spatial"])
    assert opts.answer_select == "pmi:members" and opts.null_image == BACKGROUND
    assert render(random_scene(random.Random(0))).getpixel((0, 0)) == BACKGROUND  # a scene's empty corner


def test_merge_records_question_words_and_generate_abstains(tmp_path):
    """A member's training.question_words (written by `train toy-family`) reach fuse_config.json through
    `fuse merge`, and with abstain: unseen_words that member gives no answer to a question with another word:
    the colour question is answered from the colour member's tokens whatever the spatial one would say."""
    import shutil

    from fuse.merge import run_merge
    from fuse.model.fused import FusedModel
    from fuse.toyworld import random_scene, render
    import random

    fam = tmp_path / "fam"
    fam.mkdir()
    for name in ("base", "colour", "comm"):
        (fam / name).symlink_to(ASSETS / name)
    shutil.copytree(ASSETS / "spatial", fam / "spatial")
    cfg = json.loads((fam / "spatial" / "config.json").read_text())
    cfg["training"]["question_words"] = ["are", "objects", "shape", "the", "what"]
    (fam / "spatial" / "config.json").write_text(json.dumps(cfg))
    recipe = family_recipe(fam, out=tmp_path / "fused", inference={"answer_select": "confidence:members"})
    run_merge(recipe, progress=False, checksums=False, align_check=False, echo=lambda *a, **k: None)
    info = {m["name"]: m for m in json.loads((tmp_path / "fused" / "fuse_config.json").read_text())["members"]}
    expected_colour = json.loads((ASSETS / "colour" / "config.json").read_text())["training"].get("question_words")
    assert info["spatial"]["question_words"] == cfg["training"]["question_words"]
    assert info["colour"]["question_words"] == expected_colour
    fused = FusedModel.from_pretrained(tmp_path / "fused")
    imgs = [render(random_scene(random.Random(i))) for i in range(6)]
    qs = ["<image>\nWhat colour are the objects?"] * 3 + ["<image>\nWhat shape are the objects?"] * 3
    on = fused.generate(imgs, qs, max_new_tokens=4, return_details=True, inference={"abstain": "unseen_words"})
    off = fused.generate(imgs, qs, max_new_tokens=4, return_details=True, inference={"abstain": "none"})
    # the shipped colour member was never asked about shape: it sits out the shape questions
    assert "shape" not in (expected_colour or ["shape"]) and "colour" in (expected_colour or [])
    assert on.selected == [["colour"]] * 3 + [["spatial"]] * 3
    assert off.selected != on.selected  # without abstain a member answered a question it was never asked
    assert on.visual_tokens_read == [49] * 6  # one pass per question: one member's 49 tokens


def test_compare_rejects_unknown_method(tmp_path):
    from click.testing import CliRunner

    from fuse.cli import main

    res = CliRunner().invoke(main, ["toyworld", "compare", "-o", str(tmp_path / "x"), "--methods", "bogus"])
    assert res.exit_code == 2 and "bogus" in res.output
    assert not (tmp_path / "x").exists()
    res = CliRunner().invoke(main, ["toyworld", "compare", "-o", str(tmp_path / "x"), "--select", "vote"])
    assert res.exit_code == 2 and "--select" in res.output and "confidence" in res.output
    assert not (tmp_path / "x").exists()
    res = CliRunner().invoke(main, ["toyworld", "compare", "-o", str(tmp_path / "x"), "--select", "confidence",
                                    "--methods", "ties"])
    assert res.exit_code == 2 and "task_arithmetic" in res.output
    assert not (tmp_path / "x").exists()


def test_score_units_reproduce_the_table_figures(test_split):
    """The per-unit scores the gain interval is drawn from average to the very figures of the table row."""
    from fuse.eval import EvalConfig, evaluate
    from fuse.eval.loader import load_for_eval
    from fuse.toyfamily import score_units, summarize

    m = load_for_eval(ASSETS / "colour", dtype=torch.float32)
    res = evaluate(m, "toy", test_split, EvalConfig(limit=CHECK_LIMIT, log_samples=True, **EVAL), progress=False)
    row, units = summarize(res), score_units(res)
    assert sum(units["vqa"]) / len(units["vqa"]) == pytest.approx(row["vqa"])
    assert sum(units["pope"]) / len(units["pope"]) == pytest.approx(row["pope_acc"])
    assert len(units["mmvp"]) == res["metrics"]["mmvp"]["n_pairs"]
    assert sum(units["mmvp"]) / len(units["mmvp"]) == pytest.approx(row["mmvp_pair"])
    # the per-category breakdown the routing ceiling combines weights back to the same figures
    for part, overall in (("vqa", "vqa"), ("pope", "pope_acc"), ("mmvp", "mmvp_pair")):
        cats = row["by_category"][part]
        assert len(cats) >= 2 and sum(n for _, n in cats.values()) == len(units[part])
        assert sum(v * n for v, n in cats.values()) / len(units[part]) == pytest.approx(row[overall])


def test_routing_ceiling_takes_each_category_from_its_best_member():
    """Hand-computed: each part's categories weighted by their unit counts, each at its better member."""
    from fuse.toyfamily import SKILL_COLUMNS, format_summary, routing_ceiling, summary

    def row(vqa, pope, mmvp, mean):
        return {"mean": mean, "by_category": {"vqa": {"colour": [vqa[0], 2], "count": [vqa[1], 6]},
                                              "pope": {"colour": [pope[0], 5], "shape": [pope[1], 5]},
                                              "mmvp": {"colour": [mmvp[0], 2], "count": [mmvp[1], 2]}}}

    rows = {"colour": row((1.0, 0.5), (0.8, 0.4), (0.5, 0.0), 0.55),
            "spatial": row((0.0, 1.0), (0.6, 0.6), (0.0, 1.0), 0.50)}
    got = routing_ceiling(rows)
    assert got["parts"] == pytest.approx({"vqa": (2 * 1.0 + 6 * 1.0) / 8, "pope": (5 * 0.8 + 5 * 0.6) / 10,
                                          "mmvp": (2 * 0.5 + 2 * 1.0) / 4})
    assert got["mean"] == pytest.approx((1.0 + 0.7 + 0.75) / 3) and got["gain"] == pytest.approx(got["mean"] - 0.55)
    rows["fused:task_arithmetic"] = {"mean": 0.6, **{s: None for s in SKILL_COLUMNS}}
    doc = {"summary": summary(rows, None)}
    assert doc["summary"]["routing_ceiling"] == got
    assert "routing ceiling): mean 0.817, gain +0.267" in format_summary(doc)[-1]
    assert routing_ceiling({"colour": {"mean": 0.5}, "spatial": rows["spatial"]}) is None  # an old compare.json


def test_compare_evaluates_every_question_by_default():
    from fuse.toyfamily import DEFAULT_LIMIT

    assert DEFAULT_LIMIT is None


@pytest.mark.parametrize("name", ["colour", "spatial", "comm"])
def test_shipped_figures_reproduce_exactly(name, test_split):
    """figures.json was measured on the shipped (float16) weights right after training; greedy decoding
    of the same questions must give the very same figures."""
    from fuse.eval import EvalConfig, evaluate
    from fuse.eval.loader import load_for_eval

    check = FIGURES["check"]
    assert check["limit"] == CHECK_LIMIT and check["config"] == EVAL
    m = load_for_eval(ASSETS / name, dtype=torch.float32)
    res = evaluate(m, "toy", test_split, EvalConfig(limit=CHECK_LIMIT, **EVAL), progress=False)
    assert res["metrics"] == check["rows"][name]["metrics"]
    assert res["breakdown"] == check["rows"][name]["breakdown"]
