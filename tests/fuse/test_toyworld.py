"""Toy world: deterministic bytes, pairs differing in exactly one attribute, rendering that matches the
ground truth, skills separable by resolution/colour, every output format readable by the harness."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from scipy import ndimage

from fuse.cli import main
from fuse.errors import CheckpointError, DataError
from fuse.eval import EvalConfig, evaluate
from fuse.eval.prompts import multiple_choice_prompt, short_answer_prompt
from fuse.eval.tasks import load_mmvp, load_pope, load_vqa
from fuse.toyworld import (ATTRIBUTES, BACKGROUND, COLOURS, SKILLS, generate, make_pair, random_scene, render,
                           select_skills)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy") / "world"
    generate(root, n_train=60, n_test=40, seed=3)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _scenes(split: Path) -> list[dict]:
    return [json.loads(line) for line in (split / "scenes.jsonl").read_text().splitlines()]


def test_same_seed_same_bytes(world, tmp_path):
    generate(tmp_path / "again", n_train=60, n_test=40, seed=3)
    a, b = _files(world), _files(tmp_path / "again")
    assert a.keys() == b.keys() and len(a) > 100
    assert all(a[k] == b[k] for k in a)
    generate(tmp_path / "other", n_train=60, n_test=40, seed=4)
    c = _files(tmp_path / "other")
    assert a["train/images/1.png"] != c["train/images/1.png"]


def test_pairs_differ_in_exactly_one_attribute(world):
    for split in ("train", "test"):
        scenes = _scenes(world / split)
        assert len(scenes) == {"train": 60, "test": 40}[split]
        seen_skills = set()
        for a, b in zip(scenes[0::2], scenes[1::2]):
            assert a["pair"] == b["pair"] and a["varied"] == b["varied"]
            diff = [k for k in ATTRIBUTES if a["attributes"][k] != b["attributes"][k]]
            assert diff == [SKILLS[a["varied"]].attribute]
            assert a["radius"] == b["radius"] and a["brightness"] == b["brightness"]
            img_a = (world / split / a["image"]).read_bytes()
            assert img_a != (world / split / b["image"]).read_bytes()
            seen_skills.add(a["varied"])
        assert seen_skills == set(SKILLS)  # skills are balanced over pairs


def test_mmvp_pairs_have_same_question_and_different_answers(world):
    samples = load_mmvp(world / "test" / "Questions.csv")
    assert len(samples) == 40
    for a, b in zip(samples[0::2], samples[1::2]):
        assert a.question == b.question and a.target["options"] == b.target["options"]
        assert a.target["answer"] != b.target["answer"]
        assert a.category == b.category in SKILLS


def _objects(img: Image.Image) -> tuple[np.ndarray, np.ndarray, int]:
    arr = np.asarray(img).astype(int)
    mask = np.any(arr != np.array(BACKGROUND), axis=-1)
    labels, n = ndimage.label(mask)
    return arr, labels, n


def test_rendering_matches_ground_truth(world):
    split = world / "test"
    for s in _scenes(split):
        attrs = s["attributes"]
        arr, labels, n = _objects(Image.open(split / s["image"]))
        assert n == attrs["count"], s
        rgb = tuple(int(round(c * s["brightness"])) for c in COLOURS[attrs["colour"]])
        obj = arr[labels > 0]
        assert (obj == np.array(rgb)).all()  # no anti-aliasing: every object pixel has the scene colour
        xs = np.nonzero(labels)[1]
        half = arr.shape[1] / 2
        assert (xs < half).all() if attrs["side"] == "left" else (xs >= half).all()
        for k in range(1, n + 1):
            ys_k, xs_k = np.nonzero(labels == k)
            h, w = ys_k.max() - ys_k.min() + 1, xs_k.max() - xs_k.min() + 1
            fill = len(ys_k) / (h * w)
            expect = {"square": (0.97, 1.01), "circle": (0.7, 0.9), "triangle": (0.45, 0.7)}[attrs["shape"]]
            assert expect[0] <= fill <= expect[1], (s, fill)
            if attrs["shape"] == "triangle":  # mass sits at the base: below the box centre when pointing up
                below = ys_k.mean() > (ys_k.min() + ys_k.max()) / 2
                assert below == (attrs["orientation"] == "up"), s


def _thumb_colour(img: Image.Image) -> str:
    """Colour read from a 7x7 thumbnail: hue of the most saturated thumbnail pixel."""
    t = np.asarray(img.resize((7, 7), Image.BOX)).astype(float).reshape(-1, 3)
    px = t[np.argmax(t.max(1) - t.min(1))]
    px = px / np.linalg.norm(px - px.mean())
    names = list(COLOURS)
    refs = [np.array(COLOURS[c], float) for c in names]
    return names[int(np.argmax([px @ ((r - r.mean()) / np.linalg.norm(r - r.mean())) for r in refs]))]


def test_skills_are_separable_by_resolution_and_colour_vision(world):
    split = world / "test"
    scenes = _scenes(split)
    # coarse: the colour survives a 7x7 thumbnail
    for s in scenes:
        assert _thumb_colour(Image.open(split / s["image"])) == s["attributes"]["colour"]
    # a channel-averaging (luminance-only) encoder cannot tell the two images of a colour pair apart
    colour_pairs = [(a, b) for a, b in zip(scenes[0::2], scenes[1::2]) if a["varied"] == "colour"]
    assert colour_pairs
    for a, b in colour_pairs:
        la = np.asarray(Image.open(split / a["image"])).astype(int).sum(-1)
        lb = np.asarray(Image.open(split / b["image"])).astype(int).sum(-1)
        assert np.abs(la - lb).max() <= 2
    # fine: at 7x7 the two images of a shape or orientation pair are much closer than at full resolution
    for a, b in zip(scenes[0::2], scenes[1::2]):
        if a["varied"] in ("shape", "orientation"):
            ia, ib = Image.open(split / a["image"]), Image.open(split / b["image"])
            full = np.abs(np.asarray(ia, float) - np.asarray(ib, float)).max()
            small = np.abs(np.asarray(ia.resize((7, 7), Image.BOX), float)
                           - np.asarray(ib.resize((7, 7), Image.BOX), float)).max()
            assert small < 0.5 * full


def test_test_split_is_held_out(world):
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    train = {digest(p) for p in (world / "train" / "images").iterdir()}
    test = {digest(p) for p in (world / "test" / "images").iterdir()}
    assert train and test and not train & test


def test_formats_are_consistent(world):
    manifest = json.loads((world / "toyworld.json").read_text())
    for split in ("train", "test"):
        d = world / split
        conv = json.loads((d / "llava.json").read_text())
        counts = manifest["splits"][split]
        assert len(conv) == counts["conversations"] == counts["mmvp_questions"] + counts["vqa_questions"] + counts["pope_questions"]
        assert len({c["id"] for c in conv}) == len(conv)
        vqa, pope, mmvp = load_vqa(d / "vqa.jsonl"), load_pope(d / "pope.jsonl"), load_mmvp(d / "Questions.csv")
        assert (len(vqa), len(pope), len(mmvp)) == (counts["vqa_questions"], counts["pope_questions"], counts["mmvp_questions"])
        labels = [s.target["label"] for s in pope]
        assert 0.3 < labels.count("yes") / len(labels) < 0.7
        prompts = {c["conversations"][0]["value"] for c in conv}
        assert all(p.startswith("<image>\n") for p in prompts)
        # training prompts are exactly what the evaluation sends
        assert {"<image>\n" + s.prompt for s in vqa + pope} <= prompts
        assert {"<image>\n" + s.prompt for s in mmvp} <= prompts
        answers = {c["conversations"][1]["value"] for c in conv}
        vocab = {a for s in SKILLS.values() for a in s.answers} | {"yes", "no"}
        assert answers <= vocab
        for c in conv:
            assert (d / c["image"]).is_file() and c["skill"] in SKILLS and c["kind"] in ("open", "yesno", "choice")
    # orientation is asked about triangles only
    for s in load_vqa(world / "test" / "vqa.jsonl"):
        if s.category == "orientation":
            assert s.target["answers"][0] in ("up", "down")
    q = SKILLS["colour"].question
    assert short_answer_prompt(q) in manifest["world"]["prompts"]["open"].replace("{question}", q)
    assert multiple_choice_prompt(q, ["red", "blue"]).startswith(q)


def test_colour_oracle_scores_only_colour(world):
    """End to end through the `toy` task: a stub that sees colour only is perfect on colour and nowhere else."""

    class ColourOracle:
        def generate(self, images, prompts, max_new_tokens, **kw):
            out = []
            for im, p in zip(images, prompts):
                c = _thumb_colour(im)
                if "What colour" in p:
                    out.append(c)
                elif p.split("\n")[1].startswith("Is there a") and " object" in p:
                    out.append("yes" if f" {c} object" in p else "no")
                else:
                    out.append("left")
            return out

    res = evaluate(ColourOracle(), "toy", world, EvalConfig(batch_size=16), progress=False)
    assert set(res["metrics"]) == {"vqa", "pope", "mmvp"}
    assert res["breakdown"]["vqa"]["colour"]["exact_match"] == 1.0
    assert res["breakdown"]["pope"]["colour"]["accuracy"] == 1.0
    assert res["breakdown"]["mmvp"]["colour"]["pair_accuracy"] == 1.0
    assert res["breakdown"]["mmvp"]["position"]["pair_accuracy"] == 0.0  # always "left": one of each pair wrong
    scenes = _scenes(world / "test")
    left = sum(s["attributes"]["side"] == "left" for s in scenes) / len(scenes)
    assert res["breakdown"]["vqa"]["position"]["exact_match"] == pytest.approx(left)
    assert res["breakdown"]["vqa"]["count"]["exact_match"] == 0.0


def test_select_skills(world):
    conv = json.loads((world / "train" / "llava.json").read_text())
    sub = select_skills(conv, ["colour", "position"], kinds=["open"])
    assert sub and {c["skill"] for c in sub} == {"colour", "position"} and {c["kind"] for c in sub} == {"open"}
    with pytest.raises(DataError, match="unknown skill"):
        select_skills(conv, ["smell"])


def test_scene_sampling_is_valid():
    import random

    rng = random.Random(0)
    for _ in range(200):
        s = random_scene(rng)
        assert len(s.centres) == 4 and 3 <= s.radius
        a, b = make_pair(rng, "count", 84)
        assert a.count != b.count and a.centres == b.centres
        _, _, n = _objects(render(a))
        assert n == a.count


def test_cli_generate_and_errors(tmp_path):
    r = CliRunner().invoke(main, ["toyworld", "generate", "-o", str(tmp_path / "w"), "--n-train", "8",
                                  "--n-test", "4", "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert "train 8 images (4 pairs)" in r.output
    assert (tmp_path / "w" / "test" / "Questions.csv").is_file()
    r = CliRunner().invoke(main, ["toyworld", "generate", "-o", str(tmp_path / "w"), "--n-train", "8"])
    assert r.exit_code == 2 and "output exists" in r.stderr
    r = CliRunner().invoke(main, ["toyworld", "generate", "-o", str(tmp_path / "x"), "--n-train", "7"])
    assert r.exit_code == 2 and "n_train=7" in r.stderr and not (tmp_path / "x").exists()
    r = CliRunner().invoke(main, ["toyworld", "subset", str(tmp_path / "w" / "train" / "llava.json"),
                                  "--skills", "colour", "-o", str(tmp_path / "w" / "train" / "colour.json")])
    assert r.exit_code == 0, r.output
    kept = json.loads((tmp_path / "w" / "train" / "colour.json").read_text())
    assert kept and all(c["skill"] == "colour" for c in kept)
    with pytest.raises(CheckpointError):
        generate(tmp_path / "w", n_train=2, n_test=2)
    # 32-36 px cannot hold 4 objects: generate used to loop forever there; now a clear error, nothing written
    r = CliRunner().invoke(main, ["toyworld", "generate", "-o", str(tmp_path / "y"), "--size", "36"])
    assert r.exit_code == 2 and "size=36" in r.stderr and "at least 40 px" in r.stderr
    assert not (tmp_path / "y").exists()


def test_smallest_size_places_every_scene():
    """At MIN_SIZE every draw fits (the guard in random_scene never fires at a size generate accepts)."""
    import random

    from fuse.toyworld import MIN_SIZE

    rng = random.Random(1)
    for _ in range(300):
        s = random_scene(rng, MIN_SIZE)
        assert len(s.centres) == 4 and s.radius >= 3
    with pytest.raises(DataError, match="could not place 4 objects"):
        random_scene(random.Random(0), 36)
