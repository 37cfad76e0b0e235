"""The visual-token alignment verdict (fuse.alignment): the statistic, the control, `fuse check` / `fuse merge`.

Both pairs are built here from the shipped colour member. Aligned: the member and a sibling whose projector
weights carry 10% relative noise (same encoder, a projector that writes into the same space, as members
trained against one frozen base LLM do). Misaligned: the member and a copy whose projector output is
rotated by a random orthogonal matrix, i.e. the same information in a private code. (The shipped colour and
spatial members see different things, colour vs outlines, and are judged not aligned: see the README.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from fuse.alignment import (FLOOR, RATIO, alignment_verdict, judge, probe_images, random_projector_copy,
                            shared_direction_similarity)
from fuse.cli import main
from fuse.members import load_member
from fuse.toyfamily import ASSETS


def test_shared_direction_similarity_by_hand():
    torch.manual_seed(0)
    a = torch.randn(20, 8, dtype=torch.float64)
    assert shared_direction_similarity(a, a) == pytest.approx(1.0)
    assert shared_direction_similarity(a, 3 * a + 5) == pytest.approx(1.0)  # scale and offset do not matter
    assert shared_direction_similarity(a, -a) == pytest.approx(-1.0)
    b = torch.randn(20, 8, dtype=torch.float64)
    ac, bc = a - a.mean(0), b - b.mean(0)
    assert shared_direction_similarity(a, b) == pytest.approx(float((ac * bc).sum() / (ac.norm() * bc.norm())))
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    assert abs(shared_direction_similarity(a, a @ q)) < 0.5  # same information, rotated: not "aligned"
    with pytest.raises(ValueError):
        shared_direction_similarity(a, b[:, :4])


def test_judge_is_relative_to_the_control():
    assert judge(0.2, 0.05) and not judge(0.2, 0.15)  # 4x vs 1.3x the control level (RATIO 2)
    assert not judge(FLOOR / 2, 0.0)  # a control near 0 alone does not make a pair aligned
    assert RATIO > 1


def _edited_member(src: Path, dest: Path, edit, seed: int = 0) -> Path:
    """A copy of ``src`` whose last projector layer (weight, bias) is replaced by ``edit(w, b, generator)``."""
    shutil.copytree(src, dest)
    path = dest / "model.safetensors"
    sd = load_file(str(path))
    g = torch.Generator().manual_seed(seed)
    last = sorted(k for k in sd if k.startswith("vision.fusion.proj.") and k.endswith(".weight"))[-1]
    bias = last[:-len("weight")] + "bias"
    w, b = edit(sd[last].double(), sd[bias].double(), g)
    sd[last], sd[bias] = w.to(sd[last].dtype), b.to(sd[bias].dtype)
    save_file(sd, str(path), metadata={"format": "pt"})
    return dest


def _rotated_member(src: Path, dest: Path) -> Path:
    """Projector output multiplied by a random orthogonal matrix: same information, private code."""
    def rotate(w, b, g):
        q, _ = torch.linalg.qr(torch.randn(w.shape[0], w.shape[0], generator=g, dtype=torch.float64))
        return q @ w, q @ b
    return _edited_member(src, dest, rotate)


def _noisy_member(src: Path, dest: Path, rel: float = 0.1) -> Path:
    """Projector weights with ``rel`` relative Gaussian noise: a sibling writing into the same space."""
    def perturb(w, b, g):
        return (w + rel * w.std() * torch.randn(w.shape, generator=g, dtype=torch.float64),
                b + rel * b.std() * torch.randn(b.shape, generator=g, dtype=torch.float64))
    return _edited_member(src, dest, perturb)


@pytest.fixture(scope="module")
def colour():
    return load_member(ASSETS / "colour", dtype=torch.float32).vision


@pytest.fixture(scope="module")
def images():
    return probe_images(24)


def test_sibling_projector_is_aligned(tmp_path, colour, images):
    sib = load_member(_noisy_member(ASSETS / "colour", tmp_path / "sibling"), dtype=torch.float32).vision
    v = alignment_verdict({"colour": colour, "sibling": sib}, images)
    assert v.aligned, v.lines()
    p = v.pairs[0]
    assert p.similarity >= RATIO * p.control and p.similarity > FLOOR


def test_rotated_projector_is_not_aligned(tmp_path, colour, images):
    rot = load_member(_rotated_member(ASSETS / "colour", tmp_path / "colour_rot"), dtype=torch.float32).vision
    v = alignment_verdict({"colour": colour, "colour_rot": rot}, images)
    assert not v.aligned, v.lines()
    # the rotation keeps every token's norm: the verdict is not about scale
    x = colour(colour.preprocess(images[:2]))[0]
    y = rot(rot.preprocess(images[:2]))[0]
    assert torch.allclose(x.norm(dim=-1), y.norm(dim=-1), rtol=1e-2)


def test_random_projector_copy_touches_only_the_projector(colour):
    ctrl, replaced = random_projector_copy(colour, seed=0)
    assert replaced and all(n.startswith("fusion.") for n in replaced)
    before, after = colour.state_dict(), ctrl.state_dict()
    for k in before:
        same = torch.equal(before[k], after[k])
        assert same == (k not in replaced), k


def _recipe_yaml(tmp_path: Path, second: Path) -> Path:
    r = {"base_model": str(ASSETS / "base"),
         "members": [{"model": str(ASSETS / "colour"), "name": "colour"}, {"model": str(second), "name": "second"}],
         "merge": {"method": "task_arithmetic", "dtype": "float32"}, "text": {"member": "colour"},
         "output": {"dir": str(tmp_path / "fused")}}
    p = tmp_path / "recipe.yaml"
    p.write_text(json.dumps(r))
    return p


def test_fuse_check_and_merge_report_the_verdict(tmp_path):
    good = _recipe_yaml(tmp_path, _noisy_member(ASSETS / "colour", tmp_path / "sibling"))
    res = CliRunner().invoke(main, ["check", str(good), "--align-n", "16"])
    assert res.exit_code == 0, res.output
    assert "alignment verdict: aligned" in res.output and "warning" not in res.output
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad = _recipe_yaml(bad_dir, _rotated_member(ASSETS / "colour", bad_dir / "colour_rot"))
    res = CliRunner().invoke(main, ["check", str(bad), "--align-n", "16"])
    assert res.exit_code == 0, res.output  # reported, not refused
    assert "NOT aligned" in res.output and "warning:" in res.output
    res = CliRunner().invoke(main, ["merge", str(bad), "--align-n", "16", "-q"])
    assert res.exit_code == 0, res.output  # fuse merge warns and merges
    assert "warning:" in res.output and "NOT aligned" in res.output
    cfg = json.loads((bad_dir / "fused" / "fuse_config.json").read_text())
    assert cfg["alignment"]["aligned"] is False and cfg["alignment"]["pairs"][0]["b"] == "second"
    res = CliRunner().invoke(main, ["check", str(bad), "--no-align-check"])
    assert res.exit_code == 0 and "alignment" not in res.output


def test_fuse_check_with_an_image_directory(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i, im in enumerate(probe_images(6, seed=3)):
        im.save(d / f"{i}.png")
    res = CliRunner().invoke(main, ["check", str(_recipe_yaml(tmp_path, ASSETS / "spatial")), "--align-images", str(d),
                                    "--align-n", "6"])
    assert res.exit_code == 0, res.output
    assert "alignment on 6 images" in res.output
