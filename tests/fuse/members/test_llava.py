"""LLaVA members: our visual tokens equal transformers' LlavaForConditionalGeneration.get_image_features."""

from __future__ import annotations

import pytest
import torch

from fuse.checkpoint import LazyCheckpoint
from fuse.members import load_member, load_vision_branch
from fuse.testing import build_llava_hf_member, random_image


def _reference(model, member, images, layer, strategy):
    pv = member.vision.preprocess(images)["pixel_values"]
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pv, vision_feature_layer=layer,
                                       vision_feature_select_strategy=strategy)
    return out.pooler_output


@pytest.mark.parametrize("layer", [-2, [-3, -1]])
@pytest.mark.parametrize("strategy", ["default", "full"])
@pytest.mark.parametrize("prefix", [True, False])
def test_llava_hf_visual_tokens_equal_transformers(tmp_path, tiny_base, layer, strategy, prefix):
    path, model = build_llava_hf_member(tmp_path / "m", tiny_base, seed=3, vision_feature_layer=layer,
                                        select_strategy=strategy, vision_model_prefix=prefix)
    keys = LazyCheckpoint(path).keys()
    assert any(k.startswith("vision_tower.vision_model.") for k in keys) == prefix
    member = load_member(path)
    assert member.format == "llava-hf"
    images = [random_image(0, (56, 56)), random_image(1, (80, 40))]
    ours = member.visual_tokens(images)
    ref = _reference(model, member, images, layer, strategy)
    n = 16 + (strategy == "full")
    for a, b in zip(ours, ref):
        assert a.shape == (n, 64)
        assert (a - b).abs().max() < 1e-5


def test_original_llava_layout_gives_same_tokens(tiny_llava_hf, tiny_llava_orig):
    path, model = tiny_llava_hf
    orig = load_member(tiny_llava_orig)
    assert orig.format == "llava"
    keys = LazyCheckpoint(tiny_llava_orig).keys()
    assert "model.mm_projector.0.weight" in keys and "model.mm_projector.2.bias" in keys
    assert any(k.startswith("model.vision_tower.vision_tower.vision_model.encoder.layers.") for k in keys)
    img = [random_image(7, (56, 56))]
    ref = _reference(model, orig, img, -2, "default")
    assert (orig.visual_tokens(img)[0] - ref[0]).abs().max() < 1e-5


def test_every_key_is_claimed_once_and_llm_names_are_canonical(tiny_llava_hf, tiny_llava_orig):
    for p in (tiny_llava_hf[0], tiny_llava_orig):
        m = load_member(p)
        assert set(m.key_usage) == set(LazyCheckpoint(p).keys())
        assert set(m.key_usage.values()) == {"llm", "encoder", "projector"}
        names = set(m.llm.names())
        assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                "model.layers.1.self_attn.q_proj.weight"} <= names
        assert all(n.startswith(("model.embed_tokens", "model.layers.", "model.norm", "lm_head")) for n in names)


def test_llm_part_matches_transformers_language_model(tiny_llava_hf):
    path, model = tiny_llava_hf
    m = load_member(path)
    llm = m.llm.load_model()
    ids = torch.tensor([[1, 5, 9, 20, 3]])
    with torch.no_grad():
        ours = llm(input_ids=ids).logits
        ref = model(input_ids=ids).logits
    assert (ours - ref).abs().max() < 1e-5


def test_original_layout_without_tower_loads_tower_from_mm_vision_tower(tmp_path, tiny_llava_hf):
    from fuse.testing import llava_hf_to_original

    p = llava_hf_to_original(tiny_llava_hf[0], tmp_path / "notower", include_tower=False, image_aspect_ratio="square")
    m = load_member(p)
    img = [random_image(9, (56, 56))]
    ref = _reference(tiny_llava_hf[1], m, img, -2, "default")
    assert (m.visual_tokens(img)[0] - ref[0]).abs().max() < 1e-5


def test_vision_branch_save_load_round_trip(tmp_path, tiny_llava_hf):
    m = load_member(tiny_llava_hf[0])
    m.save_vision_branch(tmp_path / "vb")
    branch, cfg = load_vision_branch(tmp_path / "vb")
    assert cfg["kind"] == "llava" and cfg["format"] == "llava-hf"
    img = [random_image(4, (60, 45))]
    with torch.no_grad():
        a = branch(branch.preprocess(img))[0]
    assert torch.equal(a, m.visual_tokens(img)[0])


def test_prompt_split_on_placeholder(tiny_llava_hf):
    m = load_member(tiny_llava_hf[0])
    prompt = m.text.prompt("<image>\nWhat colour is the circle?")
    before, after = m.text.encode(prompt)
    tok = m.text.tokenizer
    assert before[0] == tok.bos_token_id and before.count(tok.bos_token_id) == 1
    assert tok.decode(before + after).replace("<|begin_of_text|>", "") == prompt.replace("<image>", "").replace("<|begin_of_text|>", "")
    with pytest.warns(UserWarning, match="no <image>"):
        assert m.text.prompt("no image here").count("<image>") == 1
