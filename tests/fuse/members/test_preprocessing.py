"""Preprocessing as the original MiniGemini / SliME / LLaVA code does it: alpha dropped
(``Image.convert("RGB")``), MGM's ``image_aspect_ratio`` honoured, SliME's text-guided selection in
the branch's dtype (checked against an independent computation written from SliME's
``TextGuidedSampler``), MGM's branch deterministic (eval mode)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fuse.images import load_image, to_rgb
from fuse.members import load_member
from fuse.members.slime_modules import LocalSampler
from fuse.merge.threads import torch_threads
from fuse.testing.mgm import build_mgm_member
from fuse.testing.slime import build_slime_member


@pytest.fixture(scope="module")
def members(tmp_path_factory, tiny_base):
    d = tmp_path_factory.mktemp("prep")
    mgm = build_mgm_member(d / "mgm", tiny_base, seed=1)
    square = d / "mgm_square"  # same weights, config without image_aspect_ratio: pad
    shutil.copytree(mgm, square)
    cfg = json.loads((square / "config.json").read_text())
    cfg["image_aspect_ratio"] = "square"
    (square / "config.json").write_text(json.dumps(cfg))
    slime = build_slime_member(d / "slime", tiny_base, seed=2, extra_rows=1)
    return {"mgm": load_member(mgm), "mgm_square": load_member(square), "slime": load_member(slime), "dir": d}


def half_transparent(size=(90, 40), seed=0) -> Image.Image:
    """RGBA noise whose alpha runs from 0 to 255 (composited and dropped alpha differ a lot)."""
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    rgba[..., 3] = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :]
    return Image.fromarray(rgba, "RGBA")


def test_alpha_is_dropped_like_convert_rgb(tmp_path):
    rgba = half_transparent()
    la = rgba.convert("LA")
    pal = rgba.convert("RGB").quantize(16)
    pal.info["transparency"] = 3
    for im in (rgba, la, pal):
        im.save(tmp_path / "x.png")
        ref = np.asarray(Image.open(tmp_path / "x.png").convert("RGB"))
        assert np.array_equal(np.asarray(load_image(tmp_path / "x.png")), ref), im.mode
        assert np.array_equal(np.asarray(to_rgb(im)), np.asarray(im.convert("RGB"))), im.mode
    white = np.asarray(load_image(rgba, alpha="white")).astype(int)
    assert white[:, 0].min() == 255  # alpha 0 -> the white background (explicit option only)
    assert not np.array_equal(white, np.asarray(rgba.convert("RGB")))
    with pytest.raises(ValueError, match="alpha"):
        load_image(rgba, alpha="black")


@pytest.mark.parametrize("name", ["mgm", "slime"])
def test_rgba_image_gives_the_pixels_of_convert_rgb(members, name, tmp_path):
    rgba = half_transparent()
    rgba.save(tmp_path / "rgba.png")
    branch = members[name].vision
    ours = branch.preprocess([load_image(tmp_path / "rgba.png")])
    ref = branch.preprocess([Image.open(tmp_path / "rgba.png").convert("RGB")])
    composited = branch.preprocess([load_image(tmp_path / "rgba.png", alpha="white")])
    key = "aux_pixel_values" if name == "mgm" else "pixel_values"
    got, want, comp = (x[key] if name == "mgm" else x[key][0] for x in (ours, ref, composited))
    assert torch.equal(got, want)
    assert (got - comp).abs().max() > 0.5  # compositing would really change the pixels
    direct = branch.preprocess([rgba])  # a PIL image handed to the branch itself: alpha dropped too
    assert torch.equal(direct[key] if name == "mgm" else direct[key][0], want)


def test_mgm_pads_only_when_the_config_says_pad(members):
    """MGM's process_images: expand2square with the CLIP mean only for image_aspect_ratio 'pad';
    otherwise the CLIP processor alone (shortest edge to image_size_aux, centre crop)."""
    from transformers import CLIPImageProcessor

    im = Image.fromarray(np.random.default_rng(3).integers(0, 256, (30, 90, 3), dtype=np.uint8), "RGB")
    pad, square = members["mgm"].vision, members["mgm_square"].vision
    assert pad.pad_square and not square.pad_square
    a = pad.image_size_aux
    proc = CLIPImageProcessor(size={"shortest_edge": a}, crop_size={"height": a, "width": a},
                              image_mean=list(pad.encoder.processor.image_mean),
                              image_std=list(pad.encoder.processor.image_std))
    fill = tuple(int(x * 255) for x in pad.encoder.processor.image_mean)
    padded = Image.new("RGB", (90, 90), fill)
    padded.paste(im, (0, 30))
    torch.testing.assert_close(pad.preprocess([im])["aux_pixel_values"],
                               proc(padded, return_tensors="pt")["pixel_values"], atol=1e-5, rtol=0)
    torch.testing.assert_close(square.preprocess([im])["aux_pixel_values"],
                               proc(im, return_tensors="pt")["pixel_values"], atol=1e-5, rtol=0)
    spec = square.spec()
    assert spec["pad_square"] is False and type(square).from_spec(spec).pad_square is False


def slime_selection(local: torch.Tensor, text: torch.Tensor, top_p: float = 0.95, temp: float = 1.0) -> torch.Tensor:
    """Written from SliME's TextGuidedSampler + TextGuidedRouterCosine, in the inputs' dtype:
    masked cosine sum, softmax with temperature, sort, cumsum, ``<= top_p`` positions plus one."""
    sim = F.cosine_similarity(local.unsqueeze(1), text.unsqueeze(0), dim=-1)
    mask = torch.ones(text.shape[0], dtype=torch.bool)
    sim = sim.masked_fill(~mask.unsqueeze(0), 0.0).sum(dim=-1)
    probs = F.softmax(sim / temp, dim=-1)
    sorted_probs, sorted_idx = torch.sort(probs, descending=True)
    selected = (torch.cumsum(sorted_probs, dim=0) <= top_p).nonzero(as_tuple=True)[0]
    if selected.numel() < sorted_idx.numel():
        selected = sorted_idx[:selected.numel() + 1]
    return selected.sort().values


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_slime_selection_runs_in_the_branch_dtype(dtype):
    g = torch.Generator().manual_seed(0)
    sampler, f32 = LocalSampler(64, 4, 1), LocalSampler(64, 4, 1, selection_dtype=torch.float32)
    differs = 0
    with torch_threads(1):
        for _ in range(20):
            text = torch.randn(12, 256, generator=g)
            local = torch.randn(288, 256, generator=g) * 0.5 + text.mean(0) * 3 * torch.rand(288, 1, generator=g)
            local, text = local.to(dtype), text.to(dtype)
            kept = sampler.select(local, text)
            assert torch.equal(kept, slime_selection(local, text))
            ref32 = slime_selection(local.float(), text.float())
            assert torch.equal(f32.select(local, text), ref32)
            differs += not torch.equal(kept, ref32)
    assert differs >= 3  # the dtype really decides the cut on these inputs (fp16 6/20, bf16 16/20 measured)


def test_slime_branch_selects_in_its_dtype_and_keeps_the_option(members, tmp_path):
    from fuse.members import load_vision_branch
    from fuse.testing import random_image

    branch = members["slime"].vision
    bf = type(branch).from_spec(branch.spec())
    bf.load_state_dict(branch.state_dict())
    bf = bf.to(torch.bfloat16).eval()
    image = random_image(11, (100, 30))
    batch = bf.preprocess([image])
    with torch.no_grad(), torch_threads(1):
        local = bf.projector.projection(bf.sampler.compress(
            bf.encoder.features(batch["pixel_values"][0], [-2])[:, 0][1:].to(torch.bfloat16)))
        local = bf._merge_locals(local, batch["grids"][0])
        text = local[1].float().repeat(20, 1) + 0.3 * torch.randn(20, local.shape[-1])
        bf(batch, text_embeds=[text])
    assert local.dtype == torch.bfloat16
    assert batch["local_kept"][0].tolist() == slime_selection(local, text.to(torch.bfloat16)).tolist()

    opt = load_member(members["slime"].path, selection_dtype="float32")
    assert opt.vision.sampler.selection_dtype == torch.float32
    opt.save_vision_branch(tmp_path / "slime")
    assert load_vision_branch(tmp_path / "slime")[0].sampler.selection_dtype == torch.float32
    from fuse.errors import FormatError

    with pytest.raises(FormatError, match="selection_dtype"):
        load_member(members["slime"].path, selection_dtype="float8")


def test_mgm_branch_is_deterministic_in_eval_mode(members):
    from fuse.testing import random_image

    branch = members["mgm"].vision
    assert not branch.training and not branch.aux_encoder.training
    batch = branch.preprocess([random_image(4, (64, 48))])
    with torch.no_grad():
        a, b = branch(batch)[0], branch(batch)[0]
    assert torch.equal(a, b)
