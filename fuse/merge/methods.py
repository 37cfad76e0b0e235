"""Thin adapter over mergekit's own merge methods (no TIES/DARE of our own).

``MERGE_METHODS`` maps a recipe method name to a :class:`MethodInfo` that knows
how mergekit names it, whether it needs the base model, which parameters are
per member, whether it is *element-wise* (so a big tensor may be merged in row
chunks with a bit-identical result) and roughly how much scratch memory one
call needs. :class:`TensorMerger` calls ``mergekit.merge_methods.merge_tensors``
for one tensor (or one row chunk) exactly as ``mergekit-yaml`` does for a
whole tensor: inputs in member order then the base, cast to the compute dtype,
output cast to the output dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..errors import FuseError, RecipeError
from .kernels import KernelGuard, build_kernel
from .options import KERNEL_CHOICES


class MergeError(FuseError):
    """The merge itself failed (NaN/Inf produced, mergekit rejected the inputs)."""


class MergeParameterError(RecipeError):
    """A method-level parameter (``merge.parameters.<parameter>``) the method does not take, or a value of
    the wrong type; ``reason`` says which. The recipe layer adds the file name."""

    def __init__(self, parameter: str, reason: str):
        super().__init__(f"merge.parameters.{parameter}: {reason}")
        self.parameter, self.reason = parameter, reason


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t`` (min/max propagate NaN; one read-only pass, no mask tensor)."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _mergekit_method(name: str):
    from mergekit import merge_methods

    return merge_methods.get(name)


def _always(densities: Sequence[float | None]) -> bool:
    return True


def _dense(densities: Sequence[float | None]) -> bool:
    """Sparsification at density 1 is the identity, so the method stays element-wise."""
    return all(d is None or d >= 1.0 for d in densities)


@dataclass(frozen=True)
class MethodInfo:
    """What the merge driver needs to know about one mergekit method.

    ``elementwise(densities)``: True when every output element depends only on
    the same element of the inputs (row chunks then give the mergekit result bit
    for bit). TIES' top-k and DARE's l1 rescale/RNG stream are whole-tensor.
    ``scratch(n_inputs, n_members)``: tensors of one unit's size alive at once.
    """

    name: str
    elementwise: Callable[[Sequence[float | None]], bool]
    scratch: Callable[[int, int], int]
    random: bool = False

    @property
    def mergekit(self):
        return _mergekit_method(self.name)

    @property
    def needs_base(self) -> bool:
        from mergekit.merge_methods.base import BasePolicy

        return self.mergekit.spec.contract.base == BasePolicy.REQUIRED

    def shared_parameters(self) -> dict[str, Any]:
        return {p.name: p for p in self.mergekit.spec.shared_parameters}

    def member_parameters(self) -> dict[str, Any]:
        return {p.name: p for p in self.mergekit.spec.input_parameters}

    def validate_parameters(self, params: dict[str, Any]) -> dict[str, Any]:
        """Method-level parameters checked (and converted) by mergekit's own spec of the method;
        :class:`MergeParameterError` for one it does not take or a value of the wrong type."""
        shared = self.shared_parameters()
        out = {}
        for key, value in params.items():
            if key in self.member_parameters():
                raise MergeParameterError(key, f"set per member (members[i].{key}), not under merge.parameters")
            if key not in shared:
                known = ", ".join(shared) or "none"
                raise MergeParameterError(key, f"unknown parameter for {self.name} (known: {known})")
            try:
                out[key] = shared[key].validate(value)
            except Exception:  # pydantic's ValidationError, or whatever a custom validator raises
                kind = getattr(shared[key].value_type, "__name__", "value")
                raise MergeParameterError(key, f"expected a {kind}, got {value!r}") from None
        return out


MERGE_METHODS: dict[str, MethodInfo] = {
    "task_arithmetic": MethodInfo("task_arithmetic", _always, lambda k, n: k + n + 3),
    "ties": MethodInfo("ties", _dense, lambda k, n: k + 4 * n + 4),
    "dare_ties": MethodInfo("dare_ties", _dense, lambda k, n: k + 4 * n + 6, random=True),
    "dare_linear": MethodInfo("dare_linear", _dense, lambda k, n: k + n + 6, random=True),
    "linear": MethodInfo("linear", _always, lambda k, n: k + 2),
}


def method_info(name: str) -> MethodInfo:
    try:
        return MERGE_METHODS[name]
    except KeyError:
        raise FuseError(f"merge method {name!r} is not one of {', '.join(MERGE_METHODS)}") from None


class TensorMerger:
    """Merge one tensor (or a row chunk of one) with a mergekit method.

    Args:
        method: recipe method name.
        member_ids: one id per member (the member names), in recipe order.
        weights, densities: per member (density None = mergekit's default).
        parameters: method-level parameters (already validated).
        dtype: compute dtype; out_dtype: dtype of the returned tensor.
        with_base: pass the base as mergekit's base input (after the members, as mergekit-yaml orders them).
        kernel: ``auto`` replays mergekit's arithmetic in reused buffers where
            :mod:`fuse.merge.kernels` has the method (checked against mergekit on every tensor's
            first rows); ``mergekit`` calls mergekit for every piece.
    """

    BASE_ID = "__base__"

    def __init__(self, method: str, member_ids: Sequence[str], weights: Sequence[float],
                 densities: Sequence[float | None], parameters: dict[str, Any], dtype: torch.dtype,
                 with_base: bool, kernel: str = "auto"):
        if kernel not in KERNEL_CHOICES:
            raise FuseError(f"merge kernel {kernel!r} is not one of {', '.join(KERNEL_CHOICES)}")
        self.info = method_info(method)
        self.method = self.info.mergekit
        self.ids = list(member_ids)
        self.with_base = with_base
        params = dict(self.info.validate_parameters(parameters)) if parameters else {}
        per = self.info.member_parameters()
        if "weight" in per:
            params["weight"] = dict(zip(self.ids, weights))
        if "density" in per and any(d is not None for d in densities):
            default = per["density"].default
            params["density"] = {i: (default if d is None else d) for i, d in zip(self.ids, densities)}
        self.parameters = params
        self.dtype = dtype
        shared = {name: spec.default for name, spec in self.info.shared_parameters().items()}
        shared.update({k: v for k, v in params.items() if k not in per})
        fast = build_kernel(method, shared, weights, dtype, densities) if kernel == "auto" else None
        self.guard = KernelGuard(fast, self.mergekit, f"merge method {method}") if fast is not None else None

    @property
    def uses_kernel(self) -> bool:
        """True while pieces are merged by the in-place replay of mergekit's formula."""
        return self.guard is not None and self.guard.active

    def __call__(self, members: Sequence[torch.Tensor], base: torch.Tensor | None, out_dtype: torch.dtype,
                 name: str) -> torch.Tensor:
        """``members[i]``: [rows, ...] of member i; ``base`` the same rows of the base (or None)."""
        if self.with_base and base is None:
            raise MergeError(f"{name}: method {self.info.name} needs the base tensor")
        if self.guard is not None:
            return self.guard(members, base, out_dtype, name)
        return self.mergekit(members, base, out_dtype, name)

    def mergekit(self, members: Sequence[torch.Tensor], base: torch.Tensor | None, out_dtype: torch.dtype,
                 name: str) -> torch.Tensor:
        """The same merge through ``mergekit.merge_methods.merge_tensors`` (the reference)."""
        from mergekit.merge_methods import merge_tensors

        tensors = list(members)
        ids = list(self.ids)
        base_index = None
        if self.with_base:
            tensors.append(base)
            ids.append(self.BASE_ID)
            base_index = len(tensors) - 1
        try:
            return merge_tensors(tensors, self.method, parameters=self.parameters, ids=ids, base_index=base_index,
                                 name=name, dtype=self.dtype, out_dtype=out_dtype)
        except (ValueError, TypeError) as e:
            raise MergeError(f"{name}: mergekit {self.info.name} failed ({str(e).splitlines()[0]})") from None


__all__ = ["MERGE_METHODS", "MergeError", "MergeParameterError", "all_finite", "MethodInfo", "TensorMerger",
           "method_info"]
