"""Loading weights into a built module, strictly: every parameter/buffer given, nothing left over.

``torch.nn.Module.load_state_dict(strict=True)`` raises a multi-line RuntimeError; checkpoints are
user input, so a mismatch must be one line naming the file and the part instead (and a few keys a
checkpoint legitimately lacks, e.g. non-persistent ``position_ids``, must be allowed).
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from .errors import FormatError, FuseError


def load_state_dict_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], where: object,
                           what: str, *, may_miss: Callable[[str], bool] = lambda key: False,
                           error: type[FuseError] = FormatError) -> list[str]:
    """Load ``state_dict`` into ``module``; raise ``error("<where>: <what> do not fit (missing [...],
    unexpected [...])")`` on any key the module lacks or any key of the module not given, except the
    missing ones ``may_miss`` accepts. Returns those accepted missing keys."""
    missing, unexpected = module.load_state_dict(dict(state_dict), strict=False)
    allowed = [k for k in missing if may_miss(k)]
    missing = [k for k in missing if not may_miss(k)]
    if missing or unexpected:
        raise error(f"{where}: {what} do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return allowed


__all__ = ["load_state_dict_strict"]
