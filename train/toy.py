"""Tiny, download-free training setups (tests, benchmarks, toy worlds for other tools).

- :data:`TINY_DINOV2` / :func:`tiny_encoders`: encoder config entries for ``TrainConfig.encoders``
  (random-init CLIP and DINOv2 with the same 4x4 patch grid at 56 px).
- :func:`write_toy_dataset`: ``n`` coloured-shape images + a LLaVA conversation JSON whose
  answers name the colour and shape (memorisable, and learnable from the pixels).
- :func:`toy_config`: a full config dict for a stage-1 run on those pieces.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fuse.testing import TINY_CLIP

TINY_DINOV2 = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=14,
                   image_size=56, layer_norm_eps=1e-6)

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30)}
SHAPES = ("circle", "square", "triangle", "one")


def tiny_encoders(image_size: int = 56, clip: dict | None = None, dinov2: dict | None = None) -> dict[str, dict]:
    """``encoders`` section with random-init tiny CLIP + DINOv2 (same grid)."""
    return {"clip": {"config": {**TINY_CLIP, **(clip or {})}, "image_size": image_size},
            "dinov2": {"config": {**TINY_DINOV2, **(dinov2 or {})}, "image_size": image_size}}


def _draw(colour: tuple[int, int, int], shape: str, size: int, seed: int):
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    bg = tuple(int(x) for x in rng.integers(0, 60, 3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    m = size // 5
    box = (m, m, size - m, size - m)
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    elif shape == "triangle":
        d.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=colour)
    else:
        d.rectangle((size // 2 - m // 2, m, size // 2 + m // 2, size - m), fill=colour)
    return im


def write_toy_dataset(directory: str | os.PathLike, n: int = 16, seed: int = 0, size: int = 64,
                      jsonl: bool = False, name: str = "data") -> tuple[Path, Path]:
    """Write ``n`` images under ``directory/images`` and a LLaVA JSON; returns (json path, image root)."""
    d = Path(directory)
    img_dir = d / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    records = []
    colours = list(COLOURS)
    for i in range(n):
        c, s = colours[i % len(colours)], SHAPES[(i // len(colours)) % len(SHAPES)]
        fn = f"{i:04d}.png"
        _draw(COLOURS[c], s, size, seed * 100003 + i).save(img_dir / fn)
        records.append({"id": str(i), "image": fn, "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the image?"},
            {"from": "gpt", "value": f"a {c} {s}"}]})
    path = d / (f"{name}.jsonl" if jsonl else f"{name}.json")
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records, indent=1))
    return path, img_dir


def toy_config(llm_dir: str | os.PathLike, data_json: str | os.PathLike, image_root: str | os.PathLike,
               output_dir: str | os.PathLike, **over: Any) -> dict[str, Any]:
    """A stage-1 config dict for the toy pieces (tiny widths, CPU friendly)."""
    cfg: dict[str, Any] = {
        "stage": 1, "preset": "comm", "llm": str(llm_dir), "output_dir": str(output_dir),
        "encoders": tiny_encoders(), "fusion": {"type": "comm"},
        "data": {"train": str(data_json), "image_root": str(image_root), "num_workers": 0, "max_length": 256},
        "per_device_batch_size": 4, "global_batch_size": 4, "lr": 3e-3, "warmup_ratio": 0.0,
        "max_steps": 20, "save_every": 1000, "progress": False, "seed": 0,
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


__all__ = ["COLOURS", "SHAPES", "TINY_DINOV2", "tiny_encoders", "toy_config", "write_toy_dataset"]
