"""`train toy-family`: the base LLM's text corpus, the two-stage member recipe, a miniature end-to-end run,
and (FUSE_SLOW_TESTS=1) a full re-training that must reproduce the shipped weights bit for bit."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pytest

from fuse.toyfamily import ASSETS, MEMBERS
from train.toyfamily import (BASE_TRAIN, COMM_TRAIN, DESCRIPTION_KEEP, ENCODERS, LLM_CONFIG, MEMBER_SKILLS,
                             MEMBER_STAGE2_SCALE, STAGE1, STAGE2, base_corpus, scene_description, text_only_records,
                             train_family, training_question_words, weight_digests)

SCENE = {"colour": "red", "shape": "triangle", "count": 2, "side": "left", "orientation": "up"}


def test_scene_description_names_only_true_attributes():
    assert scene_description(SCENE, random.Random(0), keep=1.0) == "two red triangles pointing up on the left"
    assert scene_description(SCENE, random.Random(0), keep=0.0) == "objects"
    assert scene_description({**SCENE, "count": 1, "shape": "circle"}, random.Random(0), 1.0) == "one red circle on the left"
    rng = random.Random(1)
    seen = set()
    for _ in range(300):
        d = scene_description(SCENE, rng)
        words = set(d.split())
        assert words <= {"two", "red", "triangles", "objects", "pointing", "up", "on", "the", "left"}
        seen.add(d)
    assert len(seen) > 10  # attributes are left out at random (keep = DESCRIPTION_KEEP)
    assert 0 < DESCRIPTION_KEEP < 1


def test_base_corpus_has_no_image_and_describes_every_conversation():
    recs = [{"id": f"r{i}", "image": f"images/{i % 2 + 1}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour are the objects?"}, {"from": "gpt", "value": "red"}]}
        for i in range(4)]
    scenes = {"images/1.png": {"attributes": SCENE}, "images/2.png": {"attributes": {**SCENE, "colour": "blue"}}}
    corpus = base_corpus(recs, scenes, seed=0)
    assert len(corpus) == len(text_only_records(recs)) + len(recs) == 1 + 4
    assert not any("<image>" in t["value"] for r in corpus for t in r["conversations"])
    assert all("image" not in r for r in corpus)
    assert base_corpus(recs, scenes, seed=0) == corpus and base_corpus(recs, scenes, seed=1) != corpus


def test_member_recipe_is_two_stage():
    assert STAGE1["lr"] > STAGE2["lr"] and STAGE1["max_steps"] > STAGE2["max_steps"]


def test_shipped_family_was_trained_with_these_settings():
    """The slow bit-for-bit test takes 20+ minutes; this catches a drift between the code and the shipped
    family in milliseconds (the colour member's patch size once did: 7 in the code, 4 in the weights)."""
    figs = json.loads((ASSETS / "figures.json").read_text())
    assert figs["schedules"] == {"base": BASE_TRAIN, "stage1": STAGE1, "stage2": STAGE2, "comm": COMM_TRAIN}
    assert figs["llm_config"] == LLM_CONFIG and figs["description_keep"] == DESCRIPTION_KEEP
    assert figs["member_skills"] == {k: list(v) if v else v for k, v in MEMBER_SKILLS.items()}
    assert figs["member_stage2_scale"] == MEMBER_STAGE2_SCALE
    roles = {"colour": {"clip": "colour"}, "spatial": {"clip": "spatial"},
             "comm": {"clip": "comm_clip", "dinov2": "comm_dinov2"}}
    for member, encoders in roles.items():
        cfg = json.loads((ASSETS / member / "config.json").read_text())
        for key, role in encoders.items():
            stored = cfg["encoders"][key]["spec"]["config"]
            for field, value in ENCODERS[role]["config"].items():
                assert stored[field] == value, (member, key, field)
            for field, value in ENCODERS[role]["processor"].items():
                assert cfg["encoders"][key]["spec"]["processor"][field] == value, (member, key, field)


def test_training_question_words_are_the_human_turns_words(tmp_path):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([
        {"id": "1", "conversations": [{"from": "human", "value": "<image>\nWhat colour are the objects?"},
                                      {"from": "gpt", "value": "red"}]},
        {"id": "2", "conversations": [{"from": "human", "value": "<image>\nHow many? Answer with one WORD."},
                                      {"from": "gpt", "value": "three"}, {"from": "human", "value": "And left?"},
                                      {"from": "gpt", "value": "yes"}]}]))
    assert training_question_words(data) == ["and", "answer", "are", "colour", "how", "left", "many", "objects",
                                             "one", "the", "what", "with", "word"]  # no answers, no "image"


def test_miniature_run_end_to_end(tmp_path):
    """The whole pipeline at toy scale: world, base, two-stage members, COMM, figures (no quality claims)."""
    from fuse.members import load_member

    out = tmp_path / "fam"
    lines = []
    figs = train_family(out, seed=3, steps_scale=0.004, jobs=2, world=dict(n_train=24, n_test=12),
                        echo=lines.append)
    for name in ("base",) + tuple(MEMBERS) + ("comm",):
        assert (out / name / "model.safetensors").is_file()
    for name in MEMBERS:
        cfg = json.loads((out / name / "config.json").read_text())
        stages = cfg["training"]["stages"]
        assert [(s["preset"], s["stage"], s["trainable"]) for s in stages] == [("llava", 1, ["fusion"]),
                                                                               ("llava", 2, ["fusion", "llm"])]
        assert load_member(out / name).format == "comm"
        # what the member was asked is recorded: words of its (skill-selected) training questions, nothing else
        words = set(cfg["training"]["question_words"])
        asked = {"colour": {"colour"}, "position": {"left"}, "count": {"many"}, "shape": {"shape"}}
        skills = MEMBER_SKILLS[name]
        for skill, ws in asked.items():
            assert (ws <= words) == (skills is None or skill in skills), (name, skill)
        assert load_member(out / name).text.question_words == sorted(words)
    assert set(figs["premise"]["relative_l2_to_base"]) == set(MEMBERS)
    assert "aligned" in figs["premise"]["alignment"]
    assert figs["sha256"] == weight_digests(out)
    assert any("relative L2 distance" in x for x in lines) and any("alignment verdict" in x for x in lines)
    assert json.loads((out / "figures.json").read_text())["seed"] == 3


def test_cli_refuses_existing_output(tmp_path):
    from click.testing import CliRunner

    from train.cli import main

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    for extra in ([], ["--force"]):  # --force replaces only what this toolkit wrote
        res = CliRunner().invoke(main, ["toy-family", "-o", str(tmp_path / "x"), *extra])
        assert res.exit_code == 2 and "not written by this toolkit" in res.output, res.output
        assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


@pytest.mark.skipif(not os.environ.get("FUSE_SLOW_TESTS"), reason="re-trains the family (~20 min): FUSE_SLOW_TESTS=1")
def test_retraining_reproduces_the_shipped_family_bit_for_bit(tmp_path):
    from click.testing import CliRunner

    from train.cli import main

    res = CliRunner().invoke(main, ["toy-family", "-o", str(tmp_path / "fam"), "--seed", "0"])
    assert res.exit_code == 0, res.output
    shipped = json.loads((ASSETS / "figures.json").read_text())["sha256"]
    for rel, digest in shipped.items():
        assert hashlib.sha256((tmp_path / "fam" / rel).read_bytes()).hexdigest() == digest, rel
        assert hashlib.sha256((ASSETS / rel).read_bytes()).hexdigest() == digest, rel
