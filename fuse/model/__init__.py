"""The fused model: merged LLM + every member's vision branch (``FusedModel``).

>>> import fuse
>>> model = fuse.load("out/fused")                     # FusedModel.from_pretrained
>>> model.generate(["cat.jpg"], ["<image>\\nWhat is this?"], max_new_tokens=32)

Modules, along the lines transformers' Llava model is split: ``fused`` (FusedModel: the API),
``loading`` (reading/writing the fused directory), ``encoding`` (images -> each member's budgeted visual
tokens), ``assembly`` (text + visual tokens -> inputs_embeds, positions, mask), ``generation``
(generation settings, stopping, NaN/Inf checks), ``attention`` (attention capture); and ``config``
(FusedConfig, model_type ``visionfuse``), ``options`` (inference options), ``budget`` (token budgets),
``positions`` (position sharing), ``registration`` (transformers Auto-class registration).

Attribute access is lazy so ``import fuse`` stays cheap (no torch/transformers import).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "FusedModel": "fuse.model.fused", "FusedInputs": "fuse.model.fused", "GenerationResult": "fuse.model.generation",
    "load": "fuse.model.fused", "FusedConfig": "fuse.model.config", "InferenceOptions": "fuse.model.options",
    "AttentionCapture": "fuse.model.attention", "SampleAttention": "fuse.model.attention",
    "BUDGETS": "fuse.model.budget", "POSITION_SCHEMES": "fuse.model.positions", "register": "fuse.model.registration",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        if name != "register":
            from .registration import register

            register()
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fuse.model' has no attribute {name!r}")


__all__ = list(_LAZY)
