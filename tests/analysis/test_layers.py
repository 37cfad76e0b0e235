"""``analysis layers``: per-layer CKA equals a direct computation on the encoder's hidden states."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from analysis import metrics as M
from analysis.cli import main
from analysis.layers import load_encoder, run_layers, token_positions
from analysis.options import PipelineOptions
from fuse.images import list_images, load_image
from fuse.testing import TINY_CLIP


@pytest.fixture()
def clip_config(tmp_path):
    p = tmp_path / "clip.json"
    p.write_text(json.dumps({**TINY_CLIP, "num_hidden_layers": 4}))
    return p


@pytest.mark.parametrize("pool", ["tokens", "mean"])
def test_layer_cka_matches_direct_computation(clip_config, square_images, pool):
    torch.manual_seed(0)
    enc = load_encoder("clip", config=str(clip_config))
    paths = list_images(square_images)[:6]
    res = run_layers(paths, enc, PipelineOptions(seed=3, workers=0, batch_size=4, progress=False), pool=pool,
                     max_tokens=30)
    assert res.labels == ["emb", "1", "2", "3", "4"] and res.cka.shape == (5, 5)
    with torch.no_grad():
        h = enc.features(enc.preprocess([load_image(p) for p in paths]), list(range(5)))  # [B, L, 16, D]
    if pool == "tokens":
        pos = token_positions(16, 5, 3)  # ceil(30 / 6) = 5 positions per image
        assert res.per_image == 5 and res.samples == 30
        x = h[:, :, pos].permute(1, 0, 2, 3).reshape(5, 30, -1).double().numpy()
    else:
        x = h.mean(2).permute(1, 0, 2).double().numpy()
    ref = np.array([[M.linear_cka(x[i], x[j]) for j in range(5)] for i in range(5)])
    np.testing.assert_allclose(res.cka, ref, atol=1e-5)
    np.testing.assert_allclose(np.diag(res.cka), 1.0, atol=1e-6)
    assert (res.cka > -1e-9).all() and (res.cka < 1 + 1e-6).all()


def test_cli_layers_report_and_bad_inputs(clip_config, square_images, tmp_path, report_checker):
    out = tmp_path / "rep"
    run = CliRunner().invoke
    r = run(main, ["layers", "--encoder", "clip", "--config", str(clip_config), "--images", str(square_images),
                   "-o", str(out), "-q", "--workers", "0", "--n", "5", "--max-tokens", "40"])
    assert r.exit_code == 0, r.output
    nums = report_checker(out, min_figures=2)
    assert len(nums["cka"]) == 5 and nums["cka_to_last"][-1] == pytest.approx(1.0)
    assert nums["images"]["done"] == 5
    for args, msg in ((["--encoder", "convnext", "--config", str(clip_config)], "needs a ViT encoder"),
                      (["--encoder", "clip"], "exactly one of --model"),
                      (["--encoder", "clip", "--config", str(tmp_path / "none.json")], "no such config file")):
        r = run(main, ["layers", *args, "--images", str(square_images), "-o", str(tmp_path / "x")])
        assert r.exit_code == 2 and msg in r.output, r.output
        assert not (tmp_path / "x").exists()
