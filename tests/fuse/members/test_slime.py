"""SliME members: loading, key accounting, anyres grids, gated projector + local selection vs an
independent reference written from SliME's ``encode_images`` / GatedBlock / TextGuidedSampler."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fuse.checkpoint import LazyCheckpoint
from fuse.errors import FormatError
from fuse.members import detect_format, load_member, load_vision_branch
from fuse.members.anyres import anyres_views, resize_and_pad, select_grid
from fuse.members.slime_modules import cumulative_mass_cut, text_relevance
from fuse.testing import random_image
from fuse.testing.keys import categorize_keys
from fuse.testing.mgm import TINY_MM_CLIP
from fuse.testing.slime import build_slime_member

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_RES = r"(pos_embed|query|attn\.in_proj_weight|attn\.in_proj_bias|attn\.out_proj\.(weight|bias)|ln_(q|kv|post)\.(weight|bias))"

# Every tensor category of a real SliME-8B checkpoint (LlavaLlamaForCausalLM, gated projector), as regexes.
SLIME_KEY_PATTERNS = {
    "llm.embed": r"model\.embed_tokens\.weight",
    "llm.layers": r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj|input_layernorm"
                  r"|post_attention_layernorm)\.weight",
    "llm.norm": r"model\.norm\.weight",
    "llm.head": r"lm_head\.weight",
    "clip.embeddings": r"model\.vision_tower\.vision_tower\.vision_model\.embeddings\."
                       r"(class_embedding|patch_embedding\.weight|position_embedding\.weight)",
    "clip.pre_norm": r"model\.vision_tower\.vision_tower\.vision_model\.pre_layrnorm\.(weight|bias)",
    "clip.layers": r"model\.vision_tower\.vision_tower\.vision_model\.encoder\.layers\.\d+\."
                   r"(self_attn\.(q|k|v|out)_proj|layer_norm1|layer_norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)",
    "clip.post_norm": r"model\.vision_tower\.vision_tower\.vision_model\.post_layernorm\.(weight|bias)",
    "projector.mlp": r"model\.mm_projector\.projection\.[02]\.(weight|bias)",
    "projector.gate": r"model\.mm_projector\.(w_gate|w_noise)",
    "projector.buffers": r"model\.mm_projector\.(mean|std)",
    "resampler": r"model\.mm_projector\.attn\." + _RES,
    "sampler": r"model\.sampler\.post_qformer\." + _RES,
}
PART_OF = {"llm": "llm", "clip": "encoder", "projector": "projector", "resampler": "resampler", "sampler": "sampler"}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_base):
    d = tmp_path_factory.mktemp("slime")
    base = tiny_base
    return {"base": base, "slime": build_slime_member(d / "slime", base, seed=2, extra_rows=1)}


@pytest.fixture(scope="module")
def slime(ckpts):
    return load_member(ckpts["slime"])


def test_tiny_checkpoint_has_every_real_key_category(ckpts):
    hits = categorize_keys(LazyCheckpoint(ckpts["slime"]).keys(), SLIME_KEY_PATTERNS)
    assert all(hits.values()), [n for n, v in hits.items() if not v]
    assert len(hits["resampler"]) == len(hits["sampler"]) == 12


def test_real_slime8b_key_list_has_the_same_categories():
    """The real SliME-8B key list (real architectures at real sizes, see fuse.testing.standins)."""
    from fuse.testing.standins import slime_shapes

    shapes = slime_shapes()
    hits = categorize_keys(shapes, SLIME_KEY_PATTERNS)
    assert all(hits.values())
    assert len(shapes) == 714
    assert shapes["model.embed_tokens.weight"] == (128257, 4096)
    assert shapes["model.mm_projector.attn.query"] == (576, 1024)
    assert shapes["model.sampler.post_qformer.query"] == (144, 1024)
    assert shapes["model.mm_projector.w_gate"] == (1024, 2)


def test_loads_and_claims_every_key_exactly_once(ckpts, slime):
    keys = LazyCheckpoint(ckpts["slime"]).keys()
    assert set(slime.key_usage) == set(keys)
    for cat, ks in categorize_keys(keys, SLIME_KEY_PATTERNS).items():
        for k in ks:
            assert slime.key_usage[k] == PART_OF[cat.split(".")[0]], k
    assert slime.format == "slime" and slime.llm.vocab_rows == 257  # vocab rows come from the shape
    assert set(slime.llm.names()) == set(LazyCheckpoint(ckpts["base"]).keys())
    assert slime.text.separator_token_id == 11 and slime.text.prompt_style == "slime_llama3"
    tok = slime.text.tokenizer
    assert tok.convert_tokens_to_ids("<|eot_id|>") in slime.text.eos_token_ids
    # the stored separator is row 11 of SliME's own embedding table
    assert torch.equal(slime.vision.separator, LazyCheckpoint(ckpts["slime"]).get("model.embed_tokens.weight")[11])


def test_format_detection(ckpts, tmp_path):
    from fuse.testing import build_llava_member

    r = LazyCheckpoint(ckpts["slime"])
    cfg = json.loads((ckpts["slime"] / "config.json").read_text())
    assert detect_format(cfg, r.keys()) == "slime"
    llava = build_llava_member(tmp_path / "llava", ckpts["base"], seed=4)
    assert detect_format(json.loads((llava / "config.json").read_text()), LazyCheckpoint(llava).keys()) == "llava"


def test_unsupported_resampler_type_names_config(ckpts, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(ckpts["slime"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["mm_resampler_type"] = "qformer"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=r"config\.json: mm_resampler_type 'qformer'"):
        load_member(bad)


# -- anyres -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, grid", [
    ((336, 336), (1, 2)),     # n=1 -> 2; (1,2) and (2,1) tie on pixels and waste: first listed wins
    ((672, 336), (2, 1)),     # fits exactly
    ((100, 2000), (1, 3)),    # 1:20 portrait: candidates 1x2,2x1,1x3,3x1 keep 22176/5376/50400/5376 px
    ((4000, 3000), (3, 2)),   # n=107 clamped to 6: 3x2 keeps 896x672 px, the most among 5/6/7-crop grids
    ((1, 20), (1, 2)),        # a 1x20 px sliver: every grid keeps all 20 px; least waste, first listed
])
def test_select_grid_hand_computed(size, grid):
    assert select_grid(*size, crop=336) == grid


def test_resize_and_pad_keeps_aspect_and_centres():
    im = Image.new("RGB", (100, 2000), (200, 100, 50))
    out = resize_and_pad(im, (336, 1008))  # scale 0.504: width ceil(50.4) = 51, pasted at x = (336-51)//2 = 142
    assert out.size == (336, 1008)
    assert out.getpixel((141, 500)) == (0, 0, 0) and out.getpixel((193, 500)) == (0, 0, 0)
    assert out.getpixel((142, 500)) != (0, 0, 0) and out.getpixel((192, 500)) != (0, 0, 0)


def test_anyres_views_counts():
    v = anyres_views(random_image(0, (100, 30)), crop=56)
    assert (v.cols, v.rows) == (2, 1) and len(v.views) == 3 and all(x.size == (56, 56) for x in v.views)
    for size in [(5, 5), (1, 20), (3000, 150)]:
        v = anyres_views(random_image(1, size), crop=56)
        assert 2 <= v.num_crops <= 7 and len(v.views) == v.num_crops + 1


# -- token selection ----------------------------------------------------------------------------------------------
def test_cumulative_mass_cut_on_a_crafted_set():
    """text = 4 x e1, so score_i = 4 cos(t_i, e1): [4, 0, 2.828, -4, 3.578, 0]. softmax ->
    t0 .4994, t4 .3274, t2 .1548, t1 .0092, t5 .0092, t3 .0002; cumulative .4994, .8268, .9815:
    two stay <= 0.95, plus one -> {t0, t4, t2}, returned in original order."""
    e = torch.eye(4)
    local = torch.stack([e[0], e[1], e[0] + e[1], -e[0], 2 * e[0] + e[1], e[2]])
    text = e[0].repeat(4, 1)
    scores = text_relevance(local, text)
    assert torch.allclose(scores, torch.tensor([4, 0, 2 * 2 ** 0.5, -4, 8 / 5 ** 0.5, 0]), atol=1e-5)
    probs = scores.softmax(-1)
    assert torch.allclose(probs[[0, 4, 2]], torch.tensor([0.4994, 0.3274, 0.1548]), atol=1e-4)
    assert cumulative_mass_cut(scores, 0.95).tolist() == [0, 2, 4]
    assert cumulative_mass_cut(scores, 0.40).tolist() == [0]            # nothing <= 0.4: still one token
    assert cumulative_mass_cut(scores, 0.999).tolist() == [0, 1, 2, 4, 5]  # 4 stay <= .999 (.9907), + t5


# -- full forward vs an independent reference --------------------------------------------------------------------
def _ln(x, sd, p, eps=1e-6):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)


def _mha(q, k, v, sd, p, heads):
    """nn.MultiheadAttention by hand: q [Q, D], k/v [L, D] -> [Q, D]."""
    d = q.shape[-1]
    w, b = sd[p + ".in_proj_weight"], sd[p + ".in_proj_bias"]
    qq, kk, vv = q @ w[:d].T + b[:d], k @ w[d:2 * d].T + b[d:2 * d], v @ w[2 * d:].T + b[2 * d:]
    dh = d // heads
    out = []
    for h in range(heads):
        s = slice(h * dh, (h + 1) * dh)
        out.append(torch.softmax(qq[:, s] @ kk[:, s].T / dh ** 0.5, -1) @ vv[:, s])
    return torch.cat(out, -1) @ sd[p + ".out_proj.weight"].T + sd[p + ".out_proj.bias"]


def _resampler(x, sd, p, heads):
    """SliME's Resampler on one map x [L, D] -> [Q, D]."""
    pos, side = sd[p + ".pos_embed"].float(), int(x.shape[0] ** 0.5)
    g = int(pos.shape[0] ** 0.5)
    key_pos = F.interpolate(pos.reshape(1, g, g, -1).permute(0, 3, 1, 2), size=(side, side), mode="bicubic",
                            align_corners=False).permute(0, 2, 3, 1).reshape(side * side, -1)
    kv = _ln(x, sd, p + ".ln_kv")
    q = _ln(sd[p + ".query"], sd, p + ".ln_q") + pos
    return _ln(_mha(q, kv + key_pos, kv, sd, p + ".attn", heads), sd, p + ".ln_post")


def _mlp(x, sd):
    x = F.gelu(x @ sd["model.mm_projector.projection.0.weight"].T + sd["model.mm_projector.projection.0.bias"])
    return x @ sd["model.mm_projector.projection.2.weight"].T + sd["model.mm_projector.projection.2.bias"]


def reference_slime(ckpt, image, text):
    """SliME's encode_images (spatial merge) for one 100x30 image (grid 2x1 worked out by hand)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    sd = {k: v.float() for k, v in LazyCheckpoint(ckpt).state_dict().items()}
    clip = CLIPVisionModel(CLIPVisionConfig(**TINY_MM_CLIP)).eval()
    pre = "model.vision_tower.vision_tower.vision_model."
    clip.load_state_dict({k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}, strict=False)
    s = 56
    assert image.size == (100, 30)  # grid (cols 2, rows 1); fit: 112 x ceil(30*1.12)=34, pasted at y=(56-34)//2
    canvas = Image.new("RGB", (112, 56), (0, 0, 0))
    canvas.paste(image.resize((112, 34), Image.Resampling.BICUBIC), (0, 11))
    views = [image.resize((s, s), Image.Resampling.BICUBIC), canvas.crop((0, 0, 56, 56)), canvas.crop((56, 0, 112, 56))]
    proc = CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                                 image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    heads = TINY_MM_CLIP["hidden_size"] // 128
    with torch.no_grad():
        feats = clip(proc(views, return_tensors="pt")["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
        x = feats[0]
        gates = torch.softmax(x @ sd["model.mm_projector.w_gate"], -1)
        gates = gates / (gates.sum(-1, keepdim=True) + 1e-6)
        glob = gates[:, :1] * _mlp(x, sd) + gates[:, 1:] * _mlp(_resampler(x, sd, "model.mm_projector.attn", heads), sd)
        crops = [_mlp(_resampler(f, sd, "model.sampler.post_qformer", heads), sd) for f in feats[1:]]  # [4, D] each
        rows, cols, g = 1, 2, 2
        local = torch.stack([crops[r * cols + c][i * g + j] for r in range(rows) for i in range(g)
                             for c in range(cols) for j in range(g)])  # row-major over the 2 x 4 token map
        score = torch.stack([sum(F.cosine_similarity(t, u, dim=0) for u in text) for t in local])
        probs = torch.softmax(score, 0)
        order = sorted(range(len(probs)), key=lambda i: -probs[i].item())
        total, k = 0.0, 0
        for i in order:
            total += probs[i].item()
            if total > 0.95:
                break
            k += 1
        keep = sorted(order[:k + 1])
        sep = sd["model.embed_tokens.weight"][11]
        return torch.cat([glob, sep[None], local[keep]]), keep


@pytest.mark.parametrize("focus", [None, 5])
def test_forward_matches_reference(ckpts, slime, focus):
    image = random_image(11, (100, 30))
    batch = slime.vision.preprocess([image])
    with torch.no_grad():
        loc = slime.vision.projector.projection(slime.vision.sampler.compress(
            slime.vision.encoder.features(batch["pixel_values"][0], [-2])[:, 0][1:]))
    # crafted prompt: a random one (near-uniform scores) or 30 copies of one local token (peaked scores)
    text = torch.randn(6, 64) if focus is None else loc[1, 1].repeat(30, 1) + 0.01 * torch.randn(30, 64)
    ours = slime.vision(batch, text_embeds=[text])[0]
    ref, keep = reference_slime(ckpts["slime"], image, text)
    assert batch["local_kept"][0].tolist() == keep
    assert ours.shape == ref.shape == (16 + 1 + len(keep), 64)
    assert (ours - ref).abs().max().item() < 1e-4
    if focus is not None:
        assert len(keep) < 8  # the cut really dropped tokens


def test_token_count_formula_and_grids(slime):
    """tokens = global (4x4 here, 24x24 real) + 1 separator + kept locals; grids describe that layout."""
    ims = [random_image(2, (64, 48)), random_image(3, (1, 20)), random_image(4, (5, 5))]
    batch = slime.vision.preprocess(ims)
    text = [torch.randn(5, 64) for _ in ims]
    toks = slime.vision(batch, text_embeds=text)
    grids = slime.vision.token_grids(batch)
    for t, kept, g, segs in zip(toks, batch["local_kept"], batch["grids"], grids):
        assert t.shape[0] == 16 + 1 + len(kept)
        assert 1 <= len(kept) <= g[0] * g[1] * 4
        assert segs[:2] == [("global", 4, 4), ("separator", 1, 1)]
        assert sum(h * w for _, h, w in segs) == t.shape[0]
    assert batch["grids"][1] == (1, 2)  # the 1x20 image: 2 crops stacked vertically


def test_without_text_keeps_all_locals_with_a_warning(slime):
    batch = slime.vision.preprocess([random_image(5, (100, 30))])
    with pytest.warns(UserWarning, match="without prompt embeddings"):
        t = slime.vision(batch)[0]
    assert t.shape[0] == 16 + 1 + 2 * 4
    assert slime.vision.token_grids(batch)[0][2] == ("local", 2, 4)


def test_bound_embedding_table_provides_the_separator(ckpts, tmp_path):
    member = load_member(ckpts["slime"])
    table = torch.nn.Embedding(257, 64)
    member.vision.bind_token_embeddings(lambda ids: table(ids))
    batch = member.vision.preprocess([random_image(6, (64, 64))])
    with torch.no_grad():
        out = member.vision(batch, text_embeds=[torch.randn(3, 64)])[0]
        assert torch.equal(out[16], table.weight[11])


def test_prompt_is_slime_llama3(slime):
    """SliME's conv_llama_3: no system prompt, '<|start_header_id|>{role}<|end_header_id|>\\n\\n{msg}<|eot_id|>'
    for the user, an open assistant header; the tokenizer adds <|begin_of_text|>."""
    q = "<image>\nHow many objects?"
    expected = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + q + "<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert slime.text.prompt(q) == expected


def test_vision_branch_roundtrip(slime, tmp_path):
    slime.save_vision_branch(tmp_path / "vb")
    branch, cfg = load_vision_branch(tmp_path / "vb")
    assert cfg["kind"] == "slime" and cfg["text"]["separator_token_id"] == 11
    ims = [random_image(7, (90, 40))]
    text = [torch.randn(4, 64)]
    with torch.no_grad():
        a = branch(branch.preprocess(ims), text_embeds=text)[0]
        b = slime.vision(slime.vision.preprocess(ims), text_embeds=text)[0]
    assert torch.equal(a, b)
    assert math.isclose(branch.sampler.top_p, 0.95)
