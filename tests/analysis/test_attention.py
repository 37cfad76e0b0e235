"""``analysis attention``: map placement, metrics on planted attention, the real fused model end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from analysis import attention as A
from analysis.cli import main
from analysis.options import PipelineOptions
from fuse.model.attention import AttentionCapture, SampleAttention


def test_token_grid_and_topk_scatter():
    v = torch.arange(16.0).reshape(1, 16)
    g = A.token_grid(v, [("image", 4, 4)], None, [("image", 4, 4)])
    assert g.shape == (1, 4, 4) and g[0, 1, 2] == 6
    kept = torch.tensor([0, 5, 15])
    g = A.token_grid(torch.tensor([[1.0, 2.0, 3.0]]), None, kept, [("image", 4, 4)])
    assert g[0, 0, 0] == 1 and g[0, 1, 1] == 2 and g[0, 3, 3] == 3 and g.sum() == 6
    assert A.token_grid(v, None, None, None) is None


def test_canvas_respects_view_boxes():
    grid = np.zeros((2, 2))
    grid[0, 0] = 1.0  # all attention on the top-left token
    shape = A.canvas_shape(100, 50)
    assert shape == (24, 48)
    plain = A.to_canvas(grid, (0, 0, 100, 50), 100, 50, shape)
    assert plain.sum() == pytest.approx(1.0)
    assert plain[:12, :24].sum() == pytest.approx(1.0)  # exactly the top-left quadrant
    np.testing.assert_allclose(plain[:12, :24], 1 / (12 * 24))
    # pad-to-square: the grid covers a 100x100 square centred on the 100x50 image (y from -25 to 75); its
    # top-left token covers x in [0, 50), y in [-25, 25): inside the image that is the band y < 25
    padded = A.to_canvas(grid, A.view_box(_Branch(pad=True), 100, 50), 100, 50, shape)
    # (rows of the image with y < 50 = top half of the square): the band y in [0, 25) x [0, 50)
    assert padded[:12, :24].sum() == pytest.approx(1.0)
    # centre crop: the grid covers the central 50x50 square; nothing outside it
    crop = A.to_canvas(np.ones((2, 2)), A.view_box(_Branch(crop=True), 100, 50), 100, 50, shape)
    assert crop[:, :12].sum() == 0 and crop[:, 36:].sum() == 0


class _Enc:
    def __init__(self, pad=False, crop=False):
        self.pad_square = pad
        self.processor = type("P", (), {"do_center_crop": crop, "size": {"shortest_edge": 224}})()


class _Branch:
    def __init__(self, pad=False, crop=False):
        self.encoder = _Enc(pad, crop)


class PlantedModel(torch.nn.Module):
    """Stands in for FusedModel: known attention. Member ``a`` always looks at the top-left token;
    ``b`` looks at the top-left token for questions containing 'same', else at the bottom-right one."""

    member_names = ["a", "b"]

    def __init__(self):
        super().__init__()
        self.branches = {"a": _Branch(), "b": _Branch()}
        self.text = type("T", (), {"placeholder": "<image>"})()
        self.calls = []
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def capture_attention(self, images, prompts, layers=None, query="answer", max_new_tokens=16):
        self.calls.append(prompts)
        samples = []
        for p in prompts:
            wa = torch.zeros(2, 3, 4)  # [H, Q, N=2x2]
            wa[..., 0] = 0.3
            wb = torch.zeros(2, 3, 4)
            wb[..., 0 if "same" in p else 3] = 0.1
            grids = {"a": [("image", 2, 2)], "b": [("image", 2, 2)]}
            samples.append(SampleAttention([5, 6, 7], {}, grids, {"a": None, "b": None}, grids,
                                           {0: {"a": wa, "b": wb}, 1: {"a": wa, "b": wb}}, answer="ok"))
        return AttentionCapture([0, 1], ["a", "b"], samples)


def test_planted_attention_metrics(tmp_path):
    for i in range(2):
        Image.new("RGB", (40, 40), (i * 50, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "bad.png").write_bytes(b"x")
    q = tmp_path / "q.txt"
    q.write_text("# comment\nsame place?\nother place?\n")
    samples, note = A.read_questions(q, tmp_path)
    assert len(samples) == 6 and note is None
    model = PlantedModel()
    res = A.run_attention(model, samples, PipelineOptions(workers=0, batch_size=4, progress=False), topk=25)
    assert len(res.samples) == 4 and len(res.stats.skipped) == 2
    assert all(p.startswith("<image>\n") for call in model.calls for p in call)
    for s in res.samples:
        np.testing.assert_allclose(s.shares["a"], [0.3, 0.3])
        np.testing.assert_allclose(s.shares["b"], [0.1, 0.1])
        r = s.pairs["a|b"]
        if s.question.startswith("same"):
            assert r["js"] == pytest.approx(0.0, abs=1e-12) and r["iou"] == 1.0
        else:  # opposite corners: disjoint maps
            assert r["js"] == pytest.approx(math.log(2)) and r["iou"] == 0.0
        np.testing.assert_allclose(r["js_layers"], [r["js"]] * 2, atol=1e-12)
    summ = A.summarise(res)
    assert summ["share_relative"]["a"] == pytest.approx(0.75)
    assert summ["pairs"]["a|b"]["iou_mean"] == pytest.approx(0.5)
    out = A.build_report(res, "planted", root=tmp_path).write(tmp_path / "rep")
    assert (out / "report.md").read_text().count("![") == 5  # per-layer plot + 4 overlays


def test_read_questions_bad_inputs(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "x.png")
    with pytest.raises(Exception, match="no such questions file"):
        A.read_questions(tmp_path / "none.txt", tmp_path / "img")
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"image": "x.png", "question": "a?"}\n{"image": "y.png", "question": "b?"}\n')
    with pytest.raises(Exception, match=r"line 2: image 'y.png' not found"):
        A.read_questions(bad, tmp_path / "img")
    bad.write_text('{"image": "x.png"}\n')
    with pytest.raises(Exception, match="line 1: expected an object"):
        A.read_questions(bad, tmp_path / "img")
    empty = tmp_path / "e.txt"
    empty.write_text("\n# nothing\n")
    with pytest.raises(Exception, match="no questions"):
        A.read_questions(empty, tmp_path / "img")
    good = tmp_path / "q.json"
    good.write_text(json.dumps([{"image": "x.png", "question": "a?"}]))
    s, note = A.read_questions(good, tmp_path / "img", n=5)
    assert len(s) == 1 and "asked for 5 samples" in note


def test_cli_attention_on_fused_model(fused_dir, square_images, tmp_path, report_checker, recipe_writer, family):
    q = tmp_path / "q.txt"
    q.write_text("What is shown?\nIs it red?\n")
    out = tmp_path / "rep"
    r = CliRunner().invoke(main, ["attention", str(fused_dir), "--images", str(square_images), "--questions", str(q),
                                  "--n", "3", "-o", str(out), "-q", "--workers", "0", "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output
    nums = report_checker(out, min_figures=4)  # per-layer plot + 3 overlays
    assert nums["members"] == ["hf1", "hf2"] and nums["layers"] == [0, 1]
    assert len(nums["samples"]) == 3
    # the report's shares equal FusedModel.capture_attention's own member_share on the same input
    from fuse.images import load_image
    from fuse.model import FusedModel

    s0 = nums["samples"][0]
    model = FusedModel.from_pretrained(fused_dir)
    cap = model.capture_attention([load_image(square_images / s0["image"])], ["<image>\n" + s0["question"]],
                                  query="answer", max_new_tokens=3)
    ref = cap.samples[0].member_share()
    for m in ("hf1", "hf2"):
        assert s0["share"][m] == pytest.approx(ref[m], rel=1e-4)
    assert 0 <= s0["pairs"]["hf1|hf2"]["js"] <= math.log(2)
    # a recipe (members not fused) gets a clear message and no output
    recipe = recipe_writer(tmp_path / "r.yaml", [family["hf1"], family["hf2"]], family["base"])
    for src, msg in ((recipe, "this is a recipe, not a fused model"), (family["hf1"], "not a fused model directory")):
        r = CliRunner().invoke(main, ["attention", str(src), "--images", str(square_images), "--questions", str(q),
                                      "-o", str(tmp_path / "x")])
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output
        assert not (tmp_path / "x").exists()
