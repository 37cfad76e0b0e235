"""MiniGemini (MGM) members: loading, key accounting, patch info mining, forward vs an independent
reference written from MGM's ``encode_images`` / ``unified_resampler``, prompt, bad inputs."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fuse.checkpoint import LazyCheckpoint
from fuse.errors import FormatError
from fuse.members import load_member, load_vision_branch
from fuse.members.mgm_mining import PatchInfoMining
from fuse.testing import random_image
from fuse.testing.keys import categorize_keys
from fuse.testing.mgm import TINY_CONVNEXT, TINY_MM_CLIP, build_mgm_member

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Every tensor category of a real MGM-8B checkpoint (MGMLlamaForCausalLM), as regexes.
MGM_KEY_PATTERNS = {
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
    "aux.stem": r"model\.vision_tower_aux\.vision_stem\.[01]\.(weight|bias)",
    "aux.downsample": r"model\.vision_tower_aux\.vision_stages\.[123]\.downsample\.[01]\.(weight|bias)",
    "aux.blocks": r"model\.vision_tower_aux\.vision_stages\.[0-3]\.blocks\.\d+\."
                  r"((conv_dw|norm|mlp\.fc1|mlp\.fc2)\.(weight|bias)|gamma)",
    "mining.query": r"model\.vlm_uni_query_projector\.[01]\.(weight|bias)",
    "mining.aux": r"model\.vlm_uni_aux_projector\.[01]\.(weight|bias)",
    "mining.val": r"model\.vlm_uni_val_projector\.[01]\.(weight|bias)",
    "projector": r"model\.mm_projector\.[02]\.(weight|bias)",
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_base):
    d = tmp_path_factory.mktemp("mgm")
    base = tiny_base
    return {"base": base, "mgm": build_mgm_member(d / "mgm", base, seed=1),
            "hd": build_mgm_member(d / "mgm_hd", base, seed=3, hd=True),
            "noaux": build_mgm_member(d / "mgm_noaux", base, seed=1, include_aux=False), "dir": d}


@pytest.fixture(scope="module")
def mgm(ckpts):
    return load_member(ckpts["mgm"])


@pytest.fixture(scope="module")
def mgm_hd(ckpts):
    return load_member(ckpts["hd"])


def test_tiny_checkpoint_has_every_real_key_category(ckpts):
    hits = categorize_keys(LazyCheckpoint(ckpts["mgm"]).keys(), MGM_KEY_PATTERNS)
    assert all(hits.values()), [n for n, v in hits.items() if not v]
    stages = {int(re.search(r"vision_stages\.(\d)", k)[1]) for k in hits["aux.blocks"]}
    assert stages == {0, 1, 2, 3}
    assert not any("vision_stages.0.downsample" in k for k in hits["aux.downsample"])  # stage 0 has none (timm)


def test_real_mgm8b_key_list_has_the_same_categories():
    """The real MGM-8B key list (real architectures at real sizes, see fuse.testing.standins) falls into
    exactly the categories above; its size matches the hub listing (17.12 GB in 4 shards, index 109 kB)."""
    from fuse.testing.standins import mgm_shapes

    shapes = mgm_shapes()
    hits = categorize_keys(shapes, MGM_KEY_PATTERNS)
    assert all(hits.values())
    assert len(shapes) == 1038 and len(hits["llm.layers"]) == 32 * 9 and len(hits["aux.blocks"]) == 36 * 9
    assert sum(math.prod(s) for s in shapes.values()) * 2 == 17_115_878_272
    assert shapes["model.vlm_uni_aux_projector.0.weight"] == (2880,)


def test_loads_and_claims_every_key_exactly_once(ckpts, mgm):
    keys = LazyCheckpoint(ckpts["mgm"]).keys()
    assert set(mgm.key_usage) == set(keys)
    hits = categorize_keys(keys, MGM_KEY_PATTERNS)
    part_of = {"llm": "llm", "clip": "encoder", "aux": "aux_encoder", "mining": "mining", "projector": "projector"}
    for cat, ks in hits.items():
        for k in ks:
            assert mgm.key_usage[k] == part_of[cat.split(".")[0]], k
    base_names = set(LazyCheckpoint(ckpts["base"]).keys())
    assert set(mgm.llm.names()) == base_names
    assert mgm.llm.vocab_rows == 256 and mgm.format == "mgm"
    # every vision tensor really ended up in the branch: same count of parameters
    vision_keys = [k for k, p in mgm.key_usage.items() if p != "llm"]
    n_ckpt = sum(LazyCheckpoint(ckpts["mgm"]).info(k).nbytes // 4 for k in vision_keys)
    n_branch = sum(p.numel() for n, p in mgm.vision.named_parameters()
                   if not n.startswith("aux_encoder.model.layernorm"))  # MGM's trunk has no head norm
    assert n_ckpt == n_branch


def test_missing_aux_tower_is_a_clear_error(ckpts):
    with pytest.raises(FormatError, match=r"no aux vision tower weights \(model\.vision_tower_aux\.vision_stem"):
        load_member(ckpts["noaux"])


def test_bad_image_size_aux_names_config(ckpts, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ckpts["mgm"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["image_size_aux"] = 60  # 15x15 stage-0 map cannot be cut into 4x4 windows
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=r"config\.json: image_size_aux 60"):
        load_member(bad)


# -- patch info mining ------------------------------------------------------------------------------------------
def mining_loop(mining: PatchInfoMining, tokens: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    """Straightforward loop over the g x g windows (one query token at a time)."""
    b, n, d = tokens.shape
    g = int(n ** 0.5)
    p = aux.shape[-1] // g
    qp, kp, vp = mining.query_projector, mining.aux_projector, mining.val_projector

    def ln_lin(seq, x):
        x = F.layer_norm(x, x.shape[-1:], seq[0].weight, seq[0].bias, seq[0].eps)
        return x @ seq[1].weight.T + seq[1].bias

    out = torch.zeros(b, n, d, dtype=tokens.dtype)
    for bi in range(b):
        for i in range(g):
            for j in range(g):
                win = aux[bi, :, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(aux.shape[1], p * p).T  # [p*p, C]
                q = ln_lin(qp, tokens[bi, i * g + j])                    # [D]
                k, v = ln_lin(kp, win), ln_lin(vp, win)                   # [p*p, D]
                w = torch.softmax(k @ q / d ** 0.5, dim=0)               # [p*p]
                out[bi, i * g + j] = w @ v
    return out


def test_patch_info_mining_matches_a_loop_over_the_24x24_windows():
    torch.manual_seed(0)
    d, c, g, p = 32, 48, 24, 8  # MGM's layout: 24x24 queries, 8x8 pixels each (192x192 map); small widths
    mining = PatchInfoMining(d, c)
    with torch.no_grad():
        for m in mining.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)
    tokens, aux = torch.randn(2, g * g, d), torch.randn(2, c, g * p, g * p)
    with torch.no_grad():
        fast = mining(tokens, aux)
        ref = mining_loop(mining, tokens, aux)
    assert (fast - ref).abs().max().item() < 1e-5


# -- full forward vs an independent reference --------------------------------------------------------------------
def _timm_to_hf(k: str) -> str | None:
    """The few renames from MGM's timm ConvNeXt keys to transformers' (independent of fuse)."""
    k = re.sub(r"^vision_stem\.0\.", "embeddings.patch_embeddings.", k)
    k = re.sub(r"^vision_stem\.1\.", "embeddings.layernorm.", k)
    k = re.sub(r"^vision_stages\.(\d)\.downsample\.", r"encoder.stages.\1.downsampling_layer.", k)
    k = re.sub(r"^vision_stages\.(\d)\.blocks\.(\d+)\.", r"encoder.stages.\1.layers.\2.", k)
    for a, b in (("conv_dw", "dwconv"), ("norm", "layernorm"), ("mlp.fc1", "pwconv1"), ("mlp.fc2", "pwconv2"),
                 ("gamma", "layer_scale_parameter")):
        k = re.sub(rf"layers\.(\d+)\.{re.escape(a)}", rf"layers.\1.{b}", k)
    return k


def reference_mgm_tokens(ckpt, image: Image.Image) -> torch.Tensor:
    """MGM's encode_images for one image, written from the original code with plain transformers parts."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, ConvNextConfig, ConvNextModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    cfg = json.loads((ckpt / "config.json").read_text())
    sd = LazyCheckpoint(ckpt).state_dict()
    g, glob, a = cfg["image_grid"], cfg["image_global"], cfg["image_size_aux"]
    clip = CLIPVisionModel(CLIPVisionConfig(**TINY_MM_CLIP)).eval()
    pre = "model.vision_tower.vision_tower.vision_model."
    clip.load_state_dict({k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}, strict=False)
    conv = ConvNextModel(ConvNextConfig(image_size=a, **TINY_CONVNEXT)).eval()
    aux_sd = {_timm_to_hf(k[len("model.vision_tower_aux."):]): v for k, v in sd.items()
              if k.startswith("model.vision_tower_aux.")}
    missing, unexpected = conv.load_state_dict(aux_sd, strict=False)
    assert not unexpected and set(missing) == {"layernorm.weight", "layernorm.bias"}

    # preprocessing: expand2square with the CLIP mean, CLIP processor at image_size_aux, bilinear to 56*g
    w, h = image.size
    side = max(w, h)
    sq = Image.new("RGB", (side, side), tuple(int(x * 255) for x in CLIP_MEAN))
    sq.paste(image, ((side - w) // 2, (side - h) // 2))
    proc = CLIPImageProcessorPil(size={"shortest_edge": a}, crop_size={"height": a, "width": a},
                                 image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    images_aux = proc([sq], return_tensors="pt")["pixel_values"]
    s = TINY_MM_CLIP["image_size"]
    raw = F.interpolate(images_aux, size=(s * g, s * g), mode="bilinear", align_corners=False)
    with torch.no_grad():
        stages = conv(images_aux, output_hidden_states=True).hidden_states[1:]
        size0 = stages[0].shape[-2:]
        aux_raw = torch.cat([stages[0]] + [F.interpolate(x, size=size0, mode="bilinear", align_corners=False)
                                           for x in stages[1:]], dim=1)
        mining = PatchInfoMining(TINY_MM_CLIP["hidden_size"], aux_raw.shape[1])
        mining.load_state_dict({k[len("model.vlm_uni_"):]: v for k, v in sd.items() if k.startswith("model.vlm_uni_")})

        def clip_tokens(x):
            return clip(x, output_hidden_states=True).hidden_states[-2][:, 1:]

        if g == 1:
            feats = clip_tokens(raw)
            seq = feats + mining_loop(mining, feats, aux_raw)
        else:
            crops = [raw[:, :, r * s:(r + 1) * s, c * s:(c + 1) * s] for r in range(g) for c in range(g)]
            hh = aux_raw.shape[-1] // g
            parts = []
            if glob:
                gl = clip_tokens(F.interpolate(raw, size=(s, s), mode="bilinear", align_corners=False))
                aux_g = F.interpolate(aux_raw, scale_factor=1 / g, mode="bilinear", align_corners=False)
                parts.append(gl + mining_loop(mining, gl, aux_g))
            for idx, crop in enumerate(crops):
                r, c = divmod(idx, g)
                f = clip_tokens(crop)
                parts.append(f + mining_loop(mining, f, aux_raw[:, :, r * hh:(r + 1) * hh, c * hh:(c + 1) * hh]))
            seq = torch.cat(parts, dim=1)
        x = F.gelu(seq @ sd["model.mm_projector.0.weight"].T + sd["model.mm_projector.0.bias"])
        return (x @ sd["model.mm_projector.2.weight"].T + sd["model.mm_projector.2.bias"])[0]


@pytest.mark.parametrize("which", ["mgm", "hd"])
def test_forward_matches_reference(ckpts, mgm, mgm_hd, which):
    member = mgm if which == "mgm" else mgm_hd
    image = random_image(5, (70, 40))
    ours = member.visual_tokens([image])[0]
    ref = reference_mgm_tokens(ckpts[which], image)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-4


def test_token_counts_follow_the_formula(mgm, mgm_hd):
    """tokens = (image_grid**2 + image_global) * (image_size / patch)**2 (576 / 2880 for the real models)."""
    grid = (TINY_MM_CLIP["image_size"] // TINY_MM_CLIP["patch_size"]) ** 2
    images = [random_image(1, (64, 48)), random_image(2, (20, 90))]
    assert [t.shape for t in mgm.visual_tokens(images)] == [(grid, 64)] * 2
    assert [t.shape for t in mgm_hd.visual_tokens(images)] == [((2 ** 2 + 1) * grid, 64)] * 2
    batch = mgm_hd.vision.preprocess(images[:1])
    grids = mgm_hd.vision.token_grids(batch)[0]
    assert [s[0] for s in grids] == ["global", "crop_0_0", "crop_0_1", "crop_1_0", "crop_1_1"]
    assert sum(h * w for _, h, w in grids) == 5 * grid


def test_batched_equals_single(mgm):
    ims = [random_image(7, (50, 30)), random_image(8, (30, 50))]
    both = mgm.visual_tokens(ims)
    for im, t in zip(ims, both):
        assert torch.allclose(mgm.visual_tokens([im])[0], t, atol=1e-5)


@pytest.mark.parametrize("size", [(1, 1), (5, 3), (1, 20), (2000, 100)])
def test_degenerate_images_are_padded_and_upscaled(mgm, size):
    """Smaller than one ViT patch, or extreme aspect: padded to square (CLIP mean) and resized, never an error."""
    toks = mgm.visual_tokens([random_image(3, size)])[0]
    assert toks.shape == (16, 64) and torch.isfinite(toks).all()


def test_prompt_is_mgm_conv_llama_3(mgm):
    """MGM's conv_llama_3 (LLAMA_3 style): system + sep, then role + message + sep; the assistant role is
    literally the *system* header; the tokenizer adds <|begin_of_text|>."""
    system = ("<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision assistant. "
              "You are able to understand the visual content that the user provides, and assist the user with a "
              "variety of tasks using natural language.")
    user, assistant, sep = ("<|start_header_id|>user<|end_header_id|>\n\n",
                            "<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>")
    q = "<image>\nWhat colour is the circle?"
    expected = "<|begin_of_text|>" + system + sep + user + q + sep + assistant
    assert mgm.text.prompt(q) == expected
    before, after = mgm.text.encode(expected)
    tok = mgm.text.tokenizer
    assert before[0] == tok.bos_token_id and before.count(tok.bos_token_id) == 1
    assert mgm.text.eos_token_ids == [tok.convert_tokens_to_ids("<|eot_id|>")]


def test_vision_branch_roundtrip(mgm_hd, tmp_path):
    mgm_hd.save_vision_branch(tmp_path / "vb")
    branch, cfg = load_vision_branch(tmp_path / "vb")
    assert cfg["kind"] == "mgm" and cfg["format"] == "mgm" and cfg["text"]["prompt_style"] == "mgm_llama_3"
    im = [random_image(4, (33, 77))]
    with torch.no_grad():
        assert torch.equal(branch(branch.preprocess(im))[0], mgm_hd.visual_tokens(im)[0])


def test_non_llama3_tokenizer_gets_vicuna_v1(ckpts, tmp_path):
    """MGM-7B/13B (Vicuna) use conv_vicuna_v1: system + ' USER: ' + q + ' ASSISTANT:' (SeparatorStyle.TWO)."""
    import shutil

    from fuse.members.text import PROMPT_STYLES

    d = tmp_path / "no_tok"
    shutil.copytree(ckpts["mgm"], d, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    m = load_member(d)
    assert m.text.prompt_style == "vicuna_v1" and m.text.tokenizer_path is None
    assert PROMPT_STYLES["vicuna_v1"]("<image>\nQ?", None) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nQ? ASSISTANT:")
