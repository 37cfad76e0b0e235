"""CLIP-blind pair mining: planted pairs found exactly; real embedders match transformers."""

from __future__ import annotations

import csv
import io
import itertools

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from analysis import blind_pairs as B
from analysis.cli import main
from analysis.features import Extractor
from analysis.options import PipelineOptions
from fuse.images import list_images

PLANTED = {(3, 17), (5, 6), (20, 39), (0, 38)}
NOT_BLIND = {(1, 2), (8, 9)}  # (1,2): both encoders agree; (8,9): CLIP only 0.9 similar


def planted_embeddings(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    clip = torch.nn.functional.normalize(torch.randn(n, 16, generator=g), dim=1)
    dino = torch.nn.functional.normalize(torch.randn(n, 12, generator=g), dim=1)
    for i, j in PLANTED:
        clip[j] = clip[i] + 0.01 * torch.randn(16, generator=g)  # CLIP: near-identical
        dino[j] = -dino[i] + 0.05 * torch.randn(12, generator=g)  # DINO: opposite
    clip[2], dino[2] = clip[1] * 3.0, dino[1] * 0.5  # agree in both (scale must not matter)
    ortho = torch.randn(16, generator=g)
    ortho -= (ortho @ clip[8]) * clip[8] / clip[8].norm() ** 2
    clip[9] = 0.9 * clip[8] / clip[8].norm() + np.sqrt(1 - 0.81) * ortho / ortho.norm()  # cos exactly 0.9
    dino[9] = -dino[8]
    return clip, dino


def brute_force(a: torch.Tensor, b: torch.Tensor, a_min: float, b_max: float) -> set[tuple[int, int]]:
    a = torch.nn.functional.normalize(a.double(), dim=1).numpy()
    b = torch.nn.functional.normalize(b.double(), dim=1).numpy()
    return {(i, j) for i, j in itertools.combinations(range(len(a)), 2) if a[i] @ a[j] > a_min and b[i] @ b[j] < b_max}


@pytest.mark.parametrize("block", [7, 16, 4096])
def test_planted_pairs_found_exactly(block):
    clip, dino = planted_embeddings()
    p = B.mine_pairs(clip, dino, 0.95, 0.6, block=block)
    assert set(zip(p.i.tolist(), p.j.tolist())) == PLANTED
    assert p.found == len(PLANTED) and not p.truncated
    assert (np.diff(p.gap) <= 1e-12).all()  # most CLIP-blind first
    assert (p.sim_a > 0.95).all() and (p.sim_b < 0.6).all()


def test_blockwise_equals_brute_force_and_truncation():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 8, generator=g)
    a = base[torch.randint(0, 6, (90,), generator=g)] + 0.3 * torch.randn(90, 8, generator=g)  # clustered
    b = torch.randn(90, 5, generator=g)
    ref = brute_force(a, b, 0.8, 0.2)
    assert len(ref) > 50
    for block in (5, 13, 90, 1000):
        p = B.mine_pairs(a, b, 0.8, 0.2, block=block)
        assert set(zip(p.i.tolist(), p.j.tolist())) == ref
    top = B.mine_pairs(a, b, 0.8, 0.2, block=9, max_pairs=10)
    full = B.mine_pairs(a, b, 0.8, 0.2)
    assert top.found == len(ref) and len(top) == 10 and top.truncated
    np.testing.assert_allclose(top.gap, full.gap[:10])


class StubEmbedder(Extractor):
    """Known outputs: image k (solid colour with red = k) -> row k of ``table``."""

    def __init__(self, table: torch.Tensor, name: str):
        self.table, self.label, self.what = table, name, f"stub {name}"

    @property
    def key(self) -> str:
        return f"stub-{self.label}"

    def to_input(self, image):
        return torch.tensor(image.getpixel((0, 0))[0])

    def run(self, batch, device):
        return [{"embedding": self.table[int(k)]} for k in batch]


@pytest.fixture()
def coded_images(tmp_path):
    d = tmp_path / "coded"
    d.mkdir()
    for k in range(40):
        Image.new("RGB", (48, 40), (k, 200 - 3 * k, 90)).save(d / f"im_{k:02d}.png")
    (d / "zz_broken.png").write_bytes(b"broken")
    return d


def test_pipeline_with_stub_encoders(coded_images, report_checker, tmp_path):
    clip, dino = planted_embeddings()
    paths = list_images(coded_images)
    res = B.run_blind_pairs(paths, StubEmbedder(clip, "clip"), StubEmbedder(dino, "dino"),
                            PipelineOptions(workers=2, batch_size=6, progress=False), block=8)
    found = {(res.paths[i].name, res.paths[j].name) for i, j in zip(res.pairs.i, res.pairs.j)}
    assert found == {(f"im_{i:02d}.png", f"im_{j:02d}.png") for i, j in PLANTED}
    assert len(res.stats.skipped) == 1
    from analysis.features import select_images

    rep = B.build_report(res, select_images(coded_images), 0.95, 0.6, top=3, root=coded_images)
    out = rep.write(tmp_path / "rep")
    nums = report_checker(out, min_figures=2)
    assert nums["pairs_found"] == 4 and nums["images"]["skipped"] == 1
    rows = list(csv.DictReader(io.StringIO((out / "pairs.csv").read_text())))
    assert {(r["image_a"], r["image_b"]) for r in rows} == found
    with Image.open(out / "figures" / "contact_sheet.png") as im:
        assert im.height >= 3 * 160


def test_cli_with_registered_stub_embedders(coded_images, tmp_path, monkeypatch, report_checker):
    clip, dino = planted_embeddings()
    monkeypatch.setitem(B.EMBEDDERS, "stubclip", lambda src, dtype=None: StubEmbedder(clip, "clip"))
    monkeypatch.setitem(B.EMBEDDERS, "stubdino", lambda src, dtype=None: StubEmbedder(dino, "dino"))
    out = tmp_path / "rep"
    r = CliRunner().invoke(main, ["blind-pairs", "--images", str(coded_images), "--clip", "x", "--dino", "y",
                                  "--clip-kind", "stubclip", "--dino-kind", "stubdino", "-o", str(out), "-q",
                                  "--workers", "0", "--cache", str(tmp_path / "cache")])
    assert r.exit_code == 0, r.output
    assert "4 pair(s)" in r.output and "1 unreadable image(s) skipped" in r.output
    report_checker(out, min_figures=2)
    r = CliRunner().invoke(main, ["blind-pairs", "--images", str(coded_images), "--clip", "x", "--dino", "y",
                                  "--clip-kind", "nope", "-o", str(tmp_path / "r2")])
    assert r.exit_code == 2 and "embedder 'nope' unknown" in r.output


def test_real_embedders_match_transformers(tmp_path, square_images):
    """CLIP embedding = CLIPVisionModelWithProjection.image_embeds; DINO = Dinov2Model pooler_output."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model

    from fuse.testing import TINY_CLIP

    torch.manual_seed(0)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP)).eval()
    clip.save_pretrained(tmp_path / "clip")
    dino = Dinov2Model(Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    patch_size=8, image_size=56)).eval()  # 7x7 grid (patch 14 runs at 336 px)
    dino.save_pretrained(tmp_path / "dino")
    ce = B.build_embedder("clip", str(tmp_path / "clip"))
    de = B.build_embedder("dinov2", str(tmp_path / "dino"))
    assert ce.projection is not None and "projection" in ce.what
    paths = list_images(square_images)[:4]
    res = B.run_blind_pairs(paths, ce, de, PipelineOptions(workers=0, progress=False), clip_min=-1.0, dino_max=2.0)
    assert res.pairs.found == 6  # every pair passes these thresholds
    from fuse.images import load_image

    imgs = [load_image(p) for p in paths]
    with torch.no_grad():
        ref_c = clip(pixel_values=ce.encoder.preprocess(imgs)).image_embeds
        ref_d = dino(pixel_values=de.encoder.preprocess(imgs)).pooler_output
    torch.testing.assert_close(res.emb_clip, ref_c, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(res.emb_dino, ref_d, atol=1e-5, rtol=1e-4)
    # CLI end to end with real (tiny) checkpoints; fewer than 2 readable images is a clear error
    out = tmp_path / "rep"
    r = CliRunner().invoke(main, ["blind-pairs", "--images", str(square_images), "--clip", str(tmp_path / "clip"),
                                  "--dino", str(tmp_path / "dino"), "-o", str(out), "-q", "--workers", "0"])
    assert r.exit_code == 0, r.output
    one = tmp_path / "one"
    one.mkdir()
    Image.new("RGB", (20, 20)).save(one / "a.png")
    r = CliRunner().invoke(main, ["blind-pairs", "--images", str(one), "--clip", str(tmp_path / "clip"),
                                  "--dino", str(tmp_path / "dino"), "-o", str(tmp_path / "r3"), "-q", "--workers", "0"])
    assert r.exit_code == 2 and "at least 2 readable images" in r.output
