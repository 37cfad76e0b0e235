"""``analysis align``: shared-weight members align perfectly, the random-projector control does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from analysis.align import CONTROL_SUFFIX, TEXT, pair, random_projector_copy, run_align
from analysis.cli import main
from analysis.features import select_images
from analysis.options import PipelineOptions
from analysis.sources import load_sources
from fuse.members import load_member


def test_shared_weights_align_control_does_not(family, square_images, recipe_writer, tmp_path):
    recipe = recipe_writer(tmp_path / "r.yaml", [family["hf1"], family["orig1"], family["hf2"]], family["base"])
    src = load_sources(recipe)
    assert [m.name for m in src.members] == ["hf1", "orig1", "hf2"]
    sel = select_images(square_images, 8)
    res = run_align(src, sel.paths, PipelineOptions(batch_size=4, workers=0, progress=False), control="first")
    assert res.entities == ["hf1", "orig1", "hf2", "hf1" + CONTROL_SUFFIX, TEXT]
    same = pair(res, "hf1", "orig1")  # llava-hf vs original layout, same vision weights
    ctrl = pair(res, "hf1", "hf1" + CONTROL_SUFFIX)
    other = pair(res, "hf1", "hf2")
    assert same["cka_tokens"] == pytest.approx(1.0, abs=1e-5)
    assert same["cka_image_means"] == pytest.approx(1.0, abs=1e-5)
    assert same["cos_mean"] == pytest.approx(1.0, abs=1e-6)
    assert same["frechet"] == pytest.approx(0.0, abs=1e-8)
    assert same["kl_sym"] == pytest.approx(0.0, abs=1e-3)
    assert same["mean_gap_rel"] < 1e-4
    # the control is clearly worse on every figure
    assert ctrl["cka_tokens"] < 0.9 and ctrl["cka_image_means"] < 0.95
    assert ctrl["cos_mean"] < 0.9
    assert ctrl["frechet"] > 1e3 * max(same["frechet"], 1e-9)
    assert ctrl["kl_sym"] > 100 * max(same["kl_sym"], 1e-3)
    assert ctrl["mean_gap_rel"] > 0.1
    assert other["cka_tokens"] < same["cka_tokens"]
    # references to the text distribution exist for members, CKA does not apply there
    t = pair(res, "hf1", TEXT)
    assert "cka_tokens" not in t
    assert t["frechet"] > 0
    # streamed moments equal a direct computation over all tokens
    m = load_member(family["hf1"])
    from fuse.images import load_image

    toks = torch.cat(m.visual_tokens([load_image(p) for p in sel.paths])).double().numpy()
    g = res.gauss["hf1"]
    np.testing.assert_allclose(g.mean, toks.mean(0), atol=1e-6)
    np.testing.assert_allclose(g.cov, np.cov(toks.T, bias=True), atol=1e-7)
    assert res.text_info["rows"] == 256


def test_random_projector_copy_touches_only_the_projector(family):
    m = load_member(family["hf1"])
    ctrl, replaced = random_projector_copy(m.vision, seed=0)
    assert replaced and all(n.startswith("projector.") for n in replaced)
    orig = {n: p.detach() for n, p in m.vision.named_parameters()}
    for n, p in ctrl.named_parameters():
        p = p.detach()
        if n in replaced and p.numel() > 1 and float(orig[n].std()) > 0:
            assert not torch.equal(p, orig[n])
            assert float(p.std()) == pytest.approx(float(orig[n].std()), rel=0.3)
        elif n not in replaced:
            assert torch.equal(p, orig[n])


def test_cli_align_fused_dir_report(fused_dir, square_images, tmp_path, report_checker):
    fused = fused_dir
    out = tmp_path / "rep"
    r = CliRunner().invoke(main, ["align", str(fused), "--images", str(square_images), "--n", "6", "-o", str(out),
                                  "--workers", "0", "-q", "--batch-size", "3"])
    assert r.exit_code == 0, r.output
    nums = report_checker(out, min_figures=5)
    assert nums["source"]["kind"] == "fused"
    assert set(nums["entities"]) == {"hf1", "hf2", "hf1" + CONTROL_SUFFIX, "hf2" + CONTROL_SUFFIX, TEXT}
    assert "hf1|hf2" in nums["pairs"] and nums["images"]["done"] == 6
    md = (out / "report.md").read_text()
    assert "| hf1 vs hf2 |" in md and "hf1 vs text" in md
    # refuses to overwrite without --force, leaves it intact
    r = CliRunner().invoke(main, ["align", str(fused), "--images", str(square_images), "-o", str(out), "-q"])
    assert r.exit_code == 2 and "exists" in r.output and (out / "report.md").is_file()


def test_cli_align_bad_inputs(family, images_with_bad, tmp_path, recipe_writer, report_checker):
    recipe = recipe_writer(tmp_path / "r.yaml", [family["hf1"], family["hf2"]], family["base"])
    (tmp_path / "empty").mkdir()
    run = CliRunner().invoke
    r = run(main, ["align", str(recipe), "--images", str(tmp_path / "empty"), "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "no images found" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x").exists()
    r = run(main, ["align", str(tmp_path / "nope.yaml"), "--images", str(images_with_bad), "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "nope.yaml" in r.output
    r = run(main, ["align", str(family["hf1"]), "--images", str(images_with_bad), "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "fuse_config.json" in r.output
    # unreadable images skipped + counted, fewer images than --n: reported, not fatal
    out = tmp_path / "rep"
    r = run(main, ["align", str(recipe), "--images", str(images_with_bad), "--n", "50", "-o", str(out), "-q",
                   "--workers", "0", "--control", "none"])
    assert r.exit_code == 0, r.output
    assert "2 unreadable image(s) skipped" in r.output and "asked for 50 images" in r.output
    nums = report_checker(out)
    assert nums["images"]["skipped"] == 2 and nums["images"]["done"] == 6 and nums["images"]["available"] == 8
    md = (out / "report.md").read_text()
    assert "broken.jpg" in md and "empty.png" in md and "asked for 50 images" in md
