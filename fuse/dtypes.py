"""Floating dtypes by name: the one table behind recipes, ``--dtype``, the Python API and the trainer.

Names are torch's own (``float32``, ``float16``, ``bfloat16``, ``float64``); ``fp32``/``fp16``/``bf16``
are accepted where a user types a model dtype. Importing this module does not import torch (recipe
validation uses the names before torch is loaded); the functions that return torch dtypes import it.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, Iterable

from .errors import FuseError

if TYPE_CHECKING:  # pragma: no cover
    import torch

MODEL_DTYPES = ("float32", "float16", "bfloat16")  # what a model runs in
COMPUTE_DTYPES = (*MODEL_DTYPES, "float64")          # what merge arithmetic may use (float64: exact identities)
ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def torch_dtype(name: str) -> "torch.dtype":
    """``"bfloat16"`` -> ``torch.bfloat16`` (a name from :data:`COMPUTE_DTYPES` or an alias)."""
    import torch

    name = ALIASES.get(name, name)
    if name not in COMPUTE_DTYPES:
        raise FuseError(f"dtype {name!r}: expected one of {', '.join(COMPUTE_DTYPES)}")
    return getattr(torch, name)


def dtype_name(dtype: "torch.dtype") -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the name configs and messages use)."""
    return str(dtype).replace("torch.", "")


def parse_dtype(value: Any) -> "torch.dtype | None":
    """A model dtype from ``--dtype`` or the Python API: a name from :data:`MODEL_DTYPES` (or an alias),
    a floating ``torch.dtype``, or None/``"auto"`` (None: the stored dtype). Anything else is a
    :class:`~fuse.errors.FuseError` naming what was expected."""
    import torch

    if isinstance(value, torch.dtype):
        if dtype_name(value) in COMPUTE_DTYPES:
            return value
        raise FuseError(f"dtype {value}: models run in a floating dtype (float32, float16 or bfloat16)")
    if value is None or value == "auto":
        return None
    if not isinstance(value, str) or ALIASES.get(value, value) not in MODEL_DTYPES:
        raise FuseError(f"dtype {value!r}: expected one of {', '.join(MODEL_DTYPES)}")
    return torch_dtype(value)


def most_common_dtype(dtypes: Iterable["torch.dtype"], floating_only: bool = False) -> "torch.dtype | None":
    """The dtype most of ``dtypes`` have (ties: the first seen); None when there are none.

    Used to recover a checkpoint's stored dtype from its tensors' headers (norms or buffers may be
    stored in another dtype than the bulk of the weights). ``floating_only`` skips integer/bool tensors."""
    counts = Counter(dt for dt in dtypes if not floating_only or dt.is_floating_point)
    return max(counts, key=counts.__getitem__) if counts else None


__all__ = ["ALIASES", "COMPUTE_DTYPES", "MODEL_DTYPES", "dtype_name", "most_common_dtype", "parse_dtype", "torch_dtype"]
