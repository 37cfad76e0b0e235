"""The shared feature pipeline: equals Member.visual_tokens, skips+counts bad images, caches."""

from __future__ import annotations

import pytest
import torch

from analysis.features import (BranchTokens, EncoderFeatures, ExtractStats, extract, iter_features, merge_inputs,
                               select_images)
from fuse.errors import DataError
from fuse.images import list_images, load_image
from fuse.members import load_member


class Counting(BranchTokens):
    """Counts model invocations (to prove cache hits run no model)."""

    calls = 0

    def run(self, batch, device):
        Counting.calls += 1
        return super().run(batch, device)


def test_tokens_equal_member_visual_tokens_and_bad_images_counted(family, images_with_bad):
    m = load_member(family["hf1"])
    paths = list_images(images_with_bad)
    idx, outs, st = extract(paths, BranchTokens(m.vision, "hf1"), batch_size=3, workers=0, progress=False)
    assert st.requested == 8 and st.done == 6 and len(st.skipped) == 2
    assert {p.rsplit("/", 1)[-1] for p, _ in st.skipped} == {"broken.jpg", "empty.png"}
    assert all("unreadable" in r for _, r in st.skipped)
    assert [paths[i].name for i in idx] == [p.name for p in paths if p.name not in ("broken.jpg", "empty.png")]
    for i, o in zip(idx, outs):
        ref = m.visual_tokens([load_image(paths[i])])[0]
        assert o["tokens"].shape == ref.shape == (16, 64)
        torch.testing.assert_close(o["tokens"], ref, atol=1e-5, rtol=1e-5)
        assert o["grid"].tolist() == [[4, 4]]


def test_workers_and_cache_make_reruns_free(family, square_images, tmp_path):
    m = load_member(family["hf1"])
    paths = list_images(square_images)[:7]
    ext = Counting(m.vision, "hf1")
    Counting.calls = 0
    _, first, st1 = extract(paths, ext, batch_size=4, workers=2, cache_dir=tmp_path / "c", progress=False)
    assert Counting.calls == 2 and st1.computed == 7 and st1.cache_hits == 0
    assert len(list((tmp_path / "c").rglob("*.safetensors"))) == 7
    _, second, st2 = extract(paths, ext, batch_size=4, workers=2, cache_dir=tmp_path / "c", progress=False)
    assert Counting.calls == 2, "cached images must not run the model"
    assert st2.cache_hits == 7 and st2.computed == 0
    for a, b in zip(first, second):
        assert torch.equal(a["tokens"], b["tokens"])
    # another model (different weights) gets its own cache entries
    other = Counting(load_member(family["hf2"]).vision, "hf2")
    _, _, st3 = extract(paths, other, batch_size=4, workers=0, cache_dir=tmp_path / "c", progress=False)
    assert st3.computed == 7 and st3.cache_hits == 0


def test_several_extractors_share_one_decode(family, square_images):
    m = load_member(family["hf1"])
    paths = list_images(square_images)[:3]
    exts = {"tok": BranchTokens(m.vision, "hf1"), "enc": EncoderFeatures(m.vision.encoder, [-2, -1])}
    batches = list(iter_features(paths, exts, batch_size=2, workers=0, progress=False))
    assert [b.indices for b in batches] == [[0, 1], [2]]
    out = batches[0].outputs[0]
    assert out["enc"]["features"].shape == (2, 16, 32)
    pv = m.vision.encoder.preprocess([load_image(paths[0])])
    torch.testing.assert_close(out["enc"]["features"], m.vision.encoder.features(pv, [-2, -1])[0])


def test_select_images_bad_inputs(tmp_path, square_images):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        select_images(tmp_path / "empty")
    with pytest.raises(DataError, match="not an image directory"):
        select_images(tmp_path / "missing")
    with pytest.raises(DataError, match="positive"):
        select_images(square_images, 0)
    few = select_images(square_images, 500)
    assert len(few.paths) == 12 and "asked for 500 images" in few.note
    some = select_images(square_images, 5, seed=3)
    assert len(some.paths) == 5 and some.note is None and some.paths == sorted(some.paths)
    assert select_images(square_images, 5, seed=3).paths == some.paths


def test_all_unreadable_yields_nothing(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    for i in range(3):
        (d / f"{i}.png").write_bytes(b"nope")
    from fuse.testing import build_tiny_clip
    from fuse.encoders import ClipEncoder

    enc = ClipEncoder(build_tiny_clip(), ClipEncoder.build_processor(build_tiny_clip().config))
    st = ExtractStats()
    assert list(iter_features(list_images(d), EncoderFeatures(enc, [-1]), workers=0, progress=False, stats=st)) == []
    assert st.done == 0 and len(st.skipped) == 3


def test_merge_inputs():
    a = {"pixel_values": torch.zeros(1, 3, 2, 2), "sizes": [(2, 2)], "mode": "pad"}
    b = {"pixel_values": torch.ones(1, 3, 2, 2), "sizes": [(4, 4)], "mode": "pad"}
    m = merge_inputs([a, b])
    assert m["pixel_values"].shape == (2, 3, 2, 2) and m["sizes"] == [(2, 2), (4, 4)] and m["mode"] == "pad"
    with pytest.raises(TypeError):
        merge_inputs([a, {**b, "mode": "crop"}])
