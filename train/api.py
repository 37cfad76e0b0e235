"""Programmatic entry points (what ``train comm`` calls).

>>> from train.api import train_comm
>>> final = train_comm({"llm": "base", "encoders": {...}, "data": {"train": "d.json", "image_root": "img"},
...                     "output_dir": "runs/s1", "max_steps": 100})        # -> runs/s1/final
>>> final2 = train_comm("recipes/comm_stage2.yaml", {"from": str(final), "output_dir": "runs/s2"})
>>> m = fuse.members.load_member(final2)                                   # format "comm"
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .config import TrainConfig, config_from_dict, load_config
from .loop import Trainer, TrainResult


def make_config(config: TrainConfig | dict | str | os.PathLike | None = None,
                overrides: dict[str, Any] | list[str] | None = None) -> TrainConfig:
    """A validated config from a TrainConfig, a dict, or a YAML path, plus dotted overrides."""
    if isinstance(config, TrainConfig):
        if not overrides:
            return config
        config = config.to_yaml_dict()
    if isinstance(config, dict):
        from .config import apply_overrides

        return config_from_dict(apply_overrides(dict(config), overrides))
    return load_config(config, overrides)


def train(config: TrainConfig | dict | str | os.PathLike | None = None,
          overrides: dict[str, Any] | list[str] | None = None) -> TrainResult:
    """Run one stage; returns a :class:`TrainResult` (final dir, last checkpoint, losses)."""
    return Trainer(make_config(config, overrides)).train()


def train_comm(config: TrainConfig | dict | str | os.PathLike | None = None,
               overrides: dict[str, Any] | list[str] | None = None) -> Path:
    """Run one stage and return the output: ``<output_dir>/final`` (a ``comm`` member dir), or the
    checkpoint dir when the run stopped at ``stop_at_step``."""
    res = train(config, overrides)
    return res.final_dir if res.final_dir is not None else res.checkpoint


__all__ = ["make_config", "train", "train_comm"]
