"""The visual-token alignment verdict (fuse.alignment): the statistic, the control, `fuse check` / `fuse merge`.

The aligned family is the shipped toy family (members trained with the base LLM frozen first). The
misaligned pair is built here: the same family with the spatial member's projector output rotated by a
random orthogonal matrix, i.e. a member whose tokens carry the same information in a private code.
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
from fuse.toyfamily import ASSETS, MEMBERS


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


def _rotated_member(src: Path, dest: Path, seed: int = 0) -> Path:
    """A copy of ``src`` whose projector output is multiplied by a random orthogonal matrix."""
    shutil.copytree(src, dest)
    path = dest / "model.safetensors"
    sd = load_file(str(path))
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(128, 128, generator=g, dtype=torch.float64))
    last = sorted(k for k in sd if k.startswith("vision.fusion.proj.") and k.endswith(".weight"))[-1]
    bias = last[:-len("weight")] + "bias"
    sd[last] = (q @ sd[last].double()).to(sd[last].dtype)
    sd[bias] = (q @ sd[bias].double()).to(sd[bias].dtype)
    save_file(sd, str(path), metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def branches():
    return {n: load_member(ASSETS / n, dtype=torch.float32).vision for n in MEMBERS}


@pytest.fixture(scope="module")
def images():
    return probe_images(24)


def test_shipped_family_is_aligned(branches, images):
    v = alignment_verdict(branches, images)
    assert v.aligned, v.lines()
    p = v.pairs[0]
    assert p.similarity >= RATIO * p.control and p.similarity > FLOOR


def test_rotated_projector_is_not_aligned(tmp_path, branches, images):
    rot = load_member(_rotated_member(ASSETS / "spatial", tmp_path / "spatial_rot"), dtype=torch.float32).vision
    v = alignment_verdict({"colour": branches["colour"], "spatial_rot": rot}, images)
    assert not v.aligned, v.lines()
    # the rotation keeps every token's norm: the verdict is not about scale
    x = branches["spatial"](branches["spatial"].preprocess(images[:2]))[0]
    y = rot(rot.preprocess(images[:2]))[0]
    assert torch.allclose(x.norm(dim=-1), y.norm(dim=-1), rtol=1e-2)


def test_random_projector_copy_touches_only_the_projector(branches):
    ctrl, replaced = random_projector_copy(branches["colour"], seed=0)
    assert replaced and all(n.startswith("fusion.") for n in replaced)
    before, after = branches["colour"].state_dict(), ctrl.state_dict()
    for k in before:
        same = torch.equal(before[k], after[k])
        assert same == (k not in replaced), k


def _recipe_yaml(tmp_path: Path, spatial: Path) -> Path:
    r = {"base_model": str(ASSETS / "base"),
         "members": [{"model": str(ASSETS / "colour"), "name": "colour"}, {"model": str(spatial), "name": "spatial"}],
         "merge": {"method": "task_arithmetic", "dtype": "float32"}, "text": {"member": "colour"},
         "output": {"dir": str(tmp_path / "fused")}}
    p = tmp_path / "recipe.yaml"
    p.write_text(json.dumps(r))
    return p


def test_fuse_check_and_merge_report_the_verdict(tmp_path):
    good = _recipe_yaml(tmp_path, ASSETS / "spatial")
    res = CliRunner().invoke(main, ["check", str(good), "--n", "16"])
    assert res.exit_code == 0, res.output
    assert "alignment verdict: aligned" in res.output and "warning" not in res.output
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad = _recipe_yaml(bad_dir, _rotated_member(ASSETS / "spatial", bad_dir / "spatial_rot"))
    res = CliRunner().invoke(main, ["check", str(bad), "--n", "16"])
    assert res.exit_code == 0, res.output  # reported, not refused
    assert "NOT aligned" in res.output and "warning:" in res.output
    res = CliRunner().invoke(main, ["merge", str(bad), "--n", "16", "-q"])
    assert res.exit_code == 0, res.output  # fuse merge warns and merges
    assert "warning:" in res.output and "NOT aligned" in res.output
    cfg = json.loads((bad_dir / "fused" / "fuse_config.json").read_text())
    assert cfg["alignment"]["aligned"] is False and cfg["alignment"]["pairs"][0]["b"] == "spatial"
    res = CliRunner().invoke(main, ["check", str(bad), "--no-align-check"])
    assert res.exit_code == 0 and "alignment" not in res.output


def test_fuse_check_with_an_image_directory(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i, im in enumerate(probe_images(6, seed=3)):
        im.save(d / f"{i}.png")
    res = CliRunner().invoke(main, ["check", str(_recipe_yaml(tmp_path, ASSETS / "spatial")), "--images", str(d)])
    assert res.exit_code == 0, res.output
    assert "alignment on 6 images" in res.output
