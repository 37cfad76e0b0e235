"""Config schema: presets, overrides, unknown keys, shipped recipes and accelerate configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuse.errors import RecipeError
from train.config import TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_stage_presets():
    comm1 = load_config(None, ["stage=1", "preset=comm"])
    assert comm1.trainable == ["fusion", "llm"] and comm1.lr == 2e-5 and comm1.global_batch_size == 64
    llava1 = load_config(None, ["stage=1", "preset=llava"])
    assert llava1.trainable == ["fusion"] and llava1.lr == 1e-3 and llava1.global_batch_size == 256
    llava2 = load_config(None, ["stage=2", "preset=llava", "lr=1e-4"])
    assert llava2.trainable == ["fusion", "llm"] and llava2.lr == 1e-4  # explicit value wins over the preset


def test_unknown_keys_list_valid_ones(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("stage: 1\nlearning_rate: 0.1\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: unknown key 'learning_rate'; valid keys: .*\blr\b.*max_steps"):
        load_config(p)
    with pytest.raises(RecipeError, match=r"unknown key 'fusion.mlp_ration'; valid keys in fusion: .*mlp_ratio"):
        load_config(None, ["fusion.mlp_ration=4"])
    with pytest.raises(RecipeError, match=r"unknown key 'encoders.clip.sauce'; valid keys in encoders.clip: .*source"):
        load_config(None, ["encoders.clip.sauce=x"])
    with pytest.raises(RecipeError, match=r"fusion.type: .*unknown fusion type 'commm'"):
        load_config(None, ["fusion.type=commm"])
    with pytest.raises(RecipeError, match=r"key=value"):
        load_config(None, ["nonsense"])


def test_shipped_recipes_validate():
    s1 = load_config(ROOT / "recipes/comm_stage1.yaml")
    assert s1.stage == 1 and s1.fusion.type == "comm" and s1.fusion.layers == {"clip": "all", "dinov2": "last:6"}
    assert s1.fusion.mlp_depth == 2 and s1.fusion.mlp_ratio == 8 and s1.lr == 2e-5 and s1.global_batch_size == 64
    s2 = load_config(ROOT / "recipes/comm_stage2.yaml")
    assert s2.stage == 2 and s2.from_dir and s2.trainable == ["fusion", "llm"]
    assert isinstance(s2, TrainConfig)


def test_accumulation_from_global_batch():
    cfg = load_config(None, ["global_batch_size=64", "per_device_batch_size=4"])
    assert cfg.accumulation_steps(1) == 16 and cfg.accumulation_steps(8) == 2
    with pytest.raises(RecipeError, match="not a multiple"):
        cfg.accumulation_steps(3)


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {}
    for name in ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"):
        c = load_config_from_file(str(ROOT / f"recipes/accelerate/{name}.yaml"))
        kinds[name] = c.distributed_type.value
        if c.deepspeed_config:
            assert (ROOT / c.deepspeed_config["deepspeed_config_file"]).is_file()
    assert kinds == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED"}
