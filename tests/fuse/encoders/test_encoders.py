"""Encoder registry: features equal transformers' own forward; ConvNeXt timm key map round-trips."""

from __future__ import annotations

import torch
from transformers import ConvNextModel

from fuse.encoders import ENCODERS, build_encoder, encoder_from_spec
from fuse.encoders.convnext import (ConvNextEncoder, config_from_timm_shapes, convert_timm_state_dict,
                                    hf_to_timm_key, timm_to_hf_key)
from fuse.testing import TINY_CLIP, random_image

VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, patch_size=14)


def test_registry_has_required_encoders():
    assert {"clip", "siglip", "dinov2", "convnext"} <= set(ENCODERS)


def test_clip_multilayer_features_equal_hidden_states():
    torch.manual_seed(0)
    enc = build_encoder("clip", config=TINY_CLIP)
    pv = enc.preprocess([random_image(1), random_image(2, (30, 90))])
    assert pv.shape == (2, 3, 56, 56)
    ref = enc.model(pixel_values=pv, output_hidden_states=True).hidden_states
    feats = enc.features(pv, layers=[1, -2, -1])
    assert feats.shape == (2, 3, 16, 32)
    for j, i in enumerate([1, -2, -1]):
        torch.testing.assert_close(feats[:, j], ref[i][:, 1:], rtol=0, atol=0)
    full = enc.features(pv, layers=[-2], select="full")
    assert full.shape == (2, 1, 17, 32)


def test_dinov2_at_336_gives_576_patch_tokens_per_layer():
    enc = build_encoder("dinov2", config={**VIT, "image_size": 518})
    pv = enc.preprocess([random_image(0, (500, 400))])
    assert pv.shape[-2:] == (336, 336)
    assert enc.grid == (24, 24)
    feats = enc.features(pv, layers=[1, 2, 3, 4])
    assert feats.shape == (1, 4, 576, 32)
    ref = enc.model(pixel_values=pv, output_hidden_states=True).hidden_states
    torch.testing.assert_close(feats[:, 3], ref[4][:, 1:], rtol=0, atol=0)


def test_siglip_has_no_prefix_token():
    enc = build_encoder("siglip", config={**VIT, "image_size": 56})
    feats = enc.features(enc.preprocess(random_image(0)), layers=[-1])
    assert feats.shape == (1, 1, 16, 32)


def test_encoder_spec_round_trip():
    enc = build_encoder("clip", config=TINY_CLIP, pad_square=True)
    again = encoder_from_spec(enc.spec(), enc.model.state_dict())
    img = random_image(3, (40, 70))
    torch.testing.assert_close(again.preprocess(img), enc.preprocess(img))
    torch.testing.assert_close(again.features(again.preprocess(img)), enc.features(enc.preprocess(img)))


def test_convnext_timm_key_map_round_trip_gives_identical_outputs():
    torch.manual_seed(0)
    enc = build_encoder("convnext", config=dict(hidden_sizes=[8, 16, 24, 32], depths=[2, 1, 3, 1], image_size=64,
                                                layer_norm_eps=1e-6))
    with torch.no_grad():  # make layer-scale and norms non-trivial
        for p in enc.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    timm_sd = {hf_to_timm_key(k, stem="vision_stem", stages="vision_stages"): v
               for k, v in enc.model.state_dict().items() if not k.startswith("layernorm.")}
    assert "vision_stages.2.blocks.2.mlp.fc1.weight" in timm_sd and "vision_stem.0.weight" in timm_sd
    assert "vision_stages.1.downsample.1.weight" in timm_sd and "vision_stages.0.blocks.1.gamma" in timm_sd
    cfg = config_from_timm_shapes({k: v.shape for k, v in timm_sd.items()}, image_size=64)
    assert cfg.depths == [2, 1, 3, 1] and cfg.hidden_sizes == [8, 16, 24, 32]
    again = ConvNextEncoder.from_config(cfg)
    missing = again.load_timm_state_dict(timm_sd)
    assert set(missing) == {"layernorm.weight", "layernorm.bias"}
    pv = enc.preprocess(random_image(5, (80, 64)))
    for a, b in zip(enc.feature_maps(pv), again.feature_maps(pv)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_convnext_key_map_covers_every_transformers_key():
    model = ConvNextModel(config_from_timm_shapes({"stem.0.weight": (8, 3, 4, 4), "stages.0.blocks.0.conv_dw.weight": (8, 1, 7, 7),
                                                   "stages.1.blocks.0.conv_dw.weight": (16, 1, 7, 7)}))
    for k in model.state_dict():
        assert timm_to_hf_key(hf_to_timm_key(k)) == k
    assert set(convert_timm_state_dict({hf_to_timm_key(k): v for k, v in model.state_dict().items()})) == set(model.state_dict())
