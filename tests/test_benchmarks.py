"""The benchmark scripts' registries are consistent (the scripts themselves re-train models: too slow here)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

import train.toyfamily as tf

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_member_variant_families_are_consistent():
    tmv = _load("toy_member_variants")
    for name, parts in tmv.FAMILIES.items():
        assert name not in tmv.VARIANTS and all(p in tmv.VARIANTS for p in parts), name
        replaced = [tmv.VARIANTS[p].replaces for p in parts]
        assert None not in replaced and len(set(replaced)) == len(replaced), name  # one variant per shipped member
    assert all(n in tmv.VARIANTS or n in tmv.FAMILIES for n in tmv.DEFAULT)
    for v in tmv.VARIANTS.values():
        assert v.main is None or v.main in tmv.MAIN_ENCODERS
        assert v.replaces is None or v.replaces in tf.ENCODERS


def test_shared_main_encoders_reproduce_the_shipped_colour_encoder(tmp_path):
    """``colour28`` must be the shipped colour member's encoder bit for bit (same spec, same seed): that is
    what makes it *shared* with the shipped colour member in the ``spatial+colour-main`` variant."""
    from safetensors.torch import load_file

    tmv = _load("toy_member_variants")

    def build(name):
        m = tmv.MAIN_ENCODERS[name]
        d = tf.build_encoder_dir(tmp_path / name, name, m.seed, tmv._encoder_spec(m.base_role, m.overrides,
                                                                                   m.tie_channels))
        return load_file(str(d / "model.safetensors"))

    wa = build("colour28")
    b = tf.build_encoder_dir(tmp_path / "b", "colour", list(tf.ENCODERS).index("colour"))
    wb = load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(bool((wa[k] == wb[k]).all()) for k in wa)
    w = build("grey28")
    conv = next(v for k, v in w.items() if k.endswith("patch_embedding.weight"))
    assert bool((conv[:, 0] == conv[:, 1]).all() and (conv[:, 1] == conv[:, 2]).all())  # colour-blind


def test_family_scale_reference_row_is_the_shipped_llm():
    """toy_family_scale.py labels the shipped family "128x4": its LLM config at 128x4 must be the shipped one,
    so a larger size differs from the shipped family in width and depth only."""
    import json

    from fuse.toyfamily import ASSETS

    tfs = _load("toy_family_scale")
    assert tfs.parse_llm("256X8") == (256, 8)
    for bad in ("256", "256x", "100x4", "128x0"):
        with pytest.raises(SystemExit):
            tfs.parse_llm(bad)
    cfg = tfs.llm_config(128, 4)
    assert cfg == {**tf.LLM_CONFIG, "initializer_range": cfg["initializer_range"]}  # init: only a training choice
    shipped = json.loads((ASSETS / "base" / "config.json").read_text())
    shapes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    assert {k: shipped[k] for k in shapes} == {k: cfg[k] for k in shapes}


def test_variant_fused_rows_stay_plain_concatenation(tmp_path):
    """The recipe now selects answers (``confidence:members``); the benchmarks' fused rows must stay plain
    concatenation unless ``--select`` asks, so they reproduce the figures the README gives for them."""
    import json

    from fuse.toyfamily import ASSETS, MEMBERS, RECIPE

    tmv = _load("toy_member_variants")
    members = {m: ASSETS / m for m in MEMBERS}
    assert RECIPE["inference"]["answer_select"] != "none"
    plain = json.loads((tmv.fused_dir(members, tmp_path / "a") / "fuse_config.json").read_text())
    assert plain["inference"] == {**RECIPE["inference"], "answer_select": "none"}
    sel = tmv.fused_dir(members, tmp_path / "b", inference={"answer_select": "pmi:members"})
    assert json.loads((sel / "fuse_config.json").read_text())["inference"]["answer_select"] == "pmi:members"


def test_token_probe_readers_tell_a_local_pattern_from_an_average():
    """The token probe's claim rests on its two readers differing: the per-token reader must find an attribute
    carried by one token anywhere in the image, which the image-mean reader (diluted over N tokens) cannot."""
    import torch

    tp = _load("toy_token_probe")
    g = torch.Generator().manual_seed(0)

    def world(n):
        x = torch.randn(n, 25, 4, generator=g)
        y = torch.randint(0, 2, (n,), generator=g)
        where = torch.randint(0, 25, (n,), generator=g)
        x[torch.arange(n), where, 0] = 6.0  # the object token, flagged
        x[torch.arange(n), where, 1] = torch.where(y == 1, 3.0, -3.0)  # its class, in that token only
        return x, y

    (xtr, ytr), (xva, yva) = world(400), world(200)
    masked = yva.clone()
    masked[:100] = -1  # a skill that does not apply (orientation of a non-triangle) is left out
    n = {"a": 2, "b": 2}
    tokens = tp.probe("tokens", xtr, {"a": ytr, "b": ytr}, xva, {"a": yva, "b": masked}, n)
    mean = tp.probe("mean", xtr, {"a": ytr, "b": ytr}, xva, {"a": yva, "b": masked}, n)
    assert tokens["a"] > 0.95 and tokens["b"] > 0.95
    assert mean["a"] < 0.85
    # the masked accuracy is over the kept half only
    keep = tp.probe("tokens", xtr, {"a": ytr, "b": ytr}, xva[100:], {"a": yva[100:], "b": yva[100:]}, n)
    assert keep["b"] == pytest.approx(tokens["b"], abs=0.02)


def test_token_probe_labels_follow_the_scenes(tmp_path):
    """Labels are the scene attributes' indices in the world's domains; orientation only for triangles."""
    from fuse.toyworld import DOMAINS, generate

    generate(tmp_path / "w", n_train=8, n_test=2, seed=3)
    tp = _load("toy_token_probe")
    paths, ys = tp.labels(tmp_path / "w" / "train")
    scenes = [json.loads(x) for x in (tmp_path / "w" / "train" / "scenes.jsonl").read_text().splitlines()]
    assert [p.name for p in paths] == [Path(s["image"]).name for s in scenes] and all(p.is_file() for p in paths)
    for i, s in enumerate(scenes):
        a = s["attributes"]
        assert ys["shape"][i] == DOMAINS["shape"].index(a["shape"])
        assert ys["count"][i] == DOMAINS["count"].index(a["count"])
        assert ys["orientation"][i] == (DOMAINS["orientation"].index(a["orientation"]) if a["shape"] == "triangle"
                                        else -1)


def test_token_probe_bad_arguments_exit_2_before_any_work(tmp_path):
    tp = _load("toy_token_probe")
    for argv in (["--models", "colour,nope"], ["--raw-depths", "a"], ["--raw-depths", "0"]):
        with pytest.raises(SystemExit) as e:
            tp.main([*argv, "--out", str(tmp_path / "o")])
        assert e.value.code == 2, argv
    assert not (tmp_path / "o").exists()
