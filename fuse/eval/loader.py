"""Open whatever ``fuse eval MODEL`` points at as a model with ``generate(images, prompts, ...)``.

- a fused directory written by ``fuse merge`` (has ``fuse_config.json``): ``FusedModel.from_pretrained``;
- a single member checkpoint (LLaVA, LLaVA-HF, MGM, SliME, or a COMM model trained by
  ``train comm``, which is a member of format ``comm``): wrapped as a one-member fused
  model with ``FusedModel.from_members([load_member(dir)])``, so every model is
  evaluated through the same code path.

``fuse.model`` is imported lazily: the evaluation package works (and is tested)
without it, with any object that has ``generate``.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, FuseError

FUSED_CONFIG = "fuse_config.json"


def _fused_model_class():
    try:
        from ..model import FusedModel  # type: ignore[attr-defined]
    except ModuleNotFoundError as e:
        if e.name in ("fuse.model", f"{__package__.rsplit('.', 1)[0]}.model"):
            raise FuseError("fused-model support (fuse.model) is not available in this installation") from None
        raise
    return FusedModel


def _call(fn, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` with only the keyword arguments it accepts (and that are not None)."""
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    kw = {k: v for k, v in kwargs.items() if v is not None and (takes_any or k in params)}
    return fn(*args, **kw)


def model_kind(path: str | os.PathLike) -> str:
    """``"fused"`` for a ``fuse merge`` output directory, else ``"member"``."""
    return "fused" if (Path(path) / FUSED_CONFIG).is_file() else "member"


def load_for_eval(path: str | os.PathLike, format: str = "auto", dtype: Any = None, device: str | None = None) -> Any:
    """A model with ``generate`` for a fused dir, a member dir or a COMM checkpoint."""
    from ..devices import resolve_device

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such model directory")
    device = str(resolve_device(device)) if device else None
    FusedModel = _fused_model_class()
    if model_kind(p) == "fused":
        model = _call(FusedModel.from_pretrained, p, dtype=dtype)
    else:
        from ..members import load_member

        member = load_member(p, format=format, dtype=dtype)
        model = _call(FusedModel.from_members, [member], dtype=dtype)
    if device and device != "cpu" and hasattr(model, "to"):
        model = model.to(device) or model
    if hasattr(model, "eval"):
        model.eval()
    return model
