"""End to end on tiny checkpoints: a MiniGemini + SliME family on one tiny LLaMA base
(vocab rows 256 vs 257) -> ``fuse merge`` -> ``fuse generate``; token counts per member equal
the formulas (MGM: (grid**2 + global) x 4x4 patch grid; SliME: 4x4 global + 1 separator + kept locals).
Also: ``--dry-run`` of the shipped recipe against config-only stand-ins of the real 8B checkpoints."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from fuse.checkpoint import LazyCheckpoint
from fuse.testing import random_image
from fuse.testing.mgm import build_mgm_member
from fuse.testing.slime import build_slime_member

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
PATCH_GRID = 16  # tiny CLIP: 56 px / 14 = 4x4 (real: 24x24 = 576)


@pytest.fixture(scope="module")
def family(tmp_path_factory, tiny_base):
    d = tmp_path_factory.mktemp("family")
    base = tiny_base
    build_mgm_member(d / "mgm", base, seed=1)
    build_mgm_member(d / "mgm_hd", base, seed=3, hd=True)
    build_slime_member(d / "slime", base, seed=2, extra_rows=1)
    random_image(9, (90, 40)).save(d / "img.png")
    random_image(10, (1, 20)).save(d / "sliver.png")   # extreme aspect ratio (1:20)
    random_image(11, (3, 3)).save(d / "tiny.png")      # smaller than one 14 px ViT patch
    return d


def _recipe(d: Path, base_dir: Path, members: list[dict], name: str) -> Path:
    data = yaml.safe_load((RECIPES / "minigemini_slime.yaml").read_text())  # the shipped recipe, re-pointed
    data["base_model"] = str(base_dir)
    data["members"] = members
    data["output"] = {"dir": f"out_{name}", "max_shard_size": "5GB"}
    p = d / f"{name}.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


@pytest.mark.parametrize("mgm_dir, mgm_views", [("mgm", 1), ("mgm_hd", 5)])
def test_merge_then_generate(family, tiny_base, mgm_dir, mgm_views, run_fuse):
    recipe = _recipe(family, tiny_base, [{"model": mgm_dir, "format": "mgm", "weight": 0.5, "name": "mgm"},
                              {"model": "slime", "format": "slime", "weight": 0.5, "name": "slime"}], mgm_dir)
    r = run_fuse("merge", str(recipe), "--force", "-q", catch_exceptions=False)
    assert r.exit_code == 0, r.output
    fused = family / f"out_{mgm_dir}"
    cfg = json.loads((fused / "fuse_config.json").read_text())
    assert [m["name"] for m in cfg["members"]] == ["mgm", "slime"]
    assert [m["vocab_rows"] for m in cfg["members"]] == [256, 257]
    assert cfg["members"][1]["separator_token_id"] == 11 and cfg["text"]["prompt_style"] == "mgm_llama_3"
    llm = LazyCheckpoint(fused / "llm")
    assert llm.shape("model.embed_tokens.weight")[0] == 257  # SliME's extra row carried
    assert (fused / "members" / "mgm" / "vision_config.json").is_file()

    r = run_fuse("generate", fused, "--image", family / "img.png", "--prompt", "<image>\nWhat colour is the circle?",
                 "--max-new-tokens", "4", "--json", catch_exceptions=False)
    assert r.exit_code == 0, r.output
    payload = json.loads(r.output[r.output.index("{"):])
    assert isinstance(payload["answer"], str)
    tokens = payload["tokens"]
    assert tokens["mgm"] == mgm_views * PATCH_GRID
    # SliME: global + separator + kept locals (between 1 and all 4 tokens of each crop)
    kept = tokens["slime"] - PATCH_GRID - 1
    assert 1 <= kept <= 7 * 4
    assert payload["visual_tokens"] == tokens["mgm"] + tokens["slime"]

    # degenerate images: padded/upscaled (MGM), cut into 2 stacked crops (SliME), never an error
    r = run_fuse("generate", fused, "--image", family / "sliver.png", "--image", family / "tiny.png",
                 "--prompt", "<image>\nWhat is it?", "--max-new-tokens", "2", "--json", catch_exceptions=False)
    assert r.exit_code == 0, r.output
    for item in json.loads(r.output[r.output.index("{"):])["results"]:
        assert item["tokens"]["mgm"] == mgm_views * PATCH_GRID
        assert 1 <= item["tokens"]["slime"] - PATCH_GRID - 1 <= 2 * 4  # both images get a 1x2 crop grid


@pytest.mark.skipif(not os.environ.get("FUSE_SLOW_TESTS"), reason="~45 s of CPU: set FUSE_SLOW_TESTS=1")
def test_dry_run_against_real_size_standins(tmp_path, run_fuse):
    """`fuse merge --dry-run` of recipes/minigemini_slime.yaml on config-only stand-ins of the real
    checkpoints (real configs and key lists, sparse files): 291 LLM tensors, 3 x 16.06 GB read."""
    from fuse.testing.standins import write_standins

    figs = write_standins(tmp_path)
    assert figs["mgm-8b"]["tensors"] == 1038 and figs["slime-8b"]["tensors"] == 714
    assert figs["llama3-8b-instruct"]["bytes"] == 16_060_522_496
    assert figs["mgm-8b"]["bytes"] == 17_115_878_272  # hub: 4.98 + 5.00 + 4.92 + 2.22 GB
    assert [round(s / 1e9, 2) for s in figs["mgm-8b"]["shards"]] == [4.98, 5.0, 4.92, 2.22]
    r = run_fuse("merge", str(tmp_path / "minigemini_slime.yaml"), "--dry-run", catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert re.search(r"LLM tensors\s+291\b", r.output)
    assert re.search(r"bytes to read\s+48\.18\d GB", r.output)
    assert not (tmp_path / "fused").exists()
