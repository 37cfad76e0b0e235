"""Allocation-free replays of mergekit's element-wise merge formulas, checked against mergekit.

Why: every call of ``mergekit.merge_methods.merge_tensors`` pays for parameter binding, dtype
alignment and fresh tensors for every intermediate, several times the arithmetic of a cache-sized
row chunk; at Llama-3-8B widths that overhead was most of ``fuse merge``'s wall time
(``benchmarks/merge_real_width.py`` measures it; ``--kernel mergekit`` turns the kernels off). A kernel here issues *the same torch operations in the same order, on the same
dtypes and memory layout* as mergekit's method, but into per-thread buffers that are reused
from chunk to chunk, so every element goes through identical IEEE operations and the result
is bit-identical by construction (no reassociation, no fused multiply-add).

"Same operations" is a claim about one mergekit version, so it is also checked at run time:
:class:`KernelGuard` merges the first rows of every tensor both ways before the kernel is
used on that tensor; on any difference it warns and hands the rest of the merge back to
mergekit (``fuse merge --kernel mergekit`` does that from the start).

Registry (recipe method -> builder): ``task_arithmetic`` (Ilharco et al. 2023, eq. 1:
``theta = theta_base + lambda * sum_i w_i (theta_i - theta_base)``, optionally divided by
``sum_i w_i``) and ``linear`` (Wortsman et al. 2022: ``sum_i w_i theta_i / sum_i w_i``).
TIES and DARE stay on mergekit (top-k and random masks are whole-tensor operations).
"""

from __future__ import annotations

import math
import threading
import warnings
from typing import Any, Callable, Sequence

import torch

from .reader import Scratch


class _Buffers(threading.local):
    """Per-thread reusable :class:`~fuse.merge.reader.Scratch` buffers by name (merge workers run
    kernels concurrently; each thread gets its own)."""

    def __init__(self) -> None:
        self.storage: dict[str, Scratch] = {}

    def take(self, key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return self.storage.setdefault(key, Scratch()).take(dtype, shape)


class TaskArithmeticKernel:
    """mergekit's ``GeneralizedTaskArithmeticMerge.merge_group`` without sparsification or consensus.

    mergekit, for inputs already cast to the compute dtype: ``deltas = empty([n, *shape])``;
    ``deltas[i] = member_i - base``; ``deltas *= weights`` (a ``[n, 1, ...]`` tensor of the
    compute dtype); ``mixed = deltas.sum(0)``; ``/= divisor`` if normalize (weights summed, a
    ``|divisor| < 1e-8`` replaced by 1); ``*= lambda`` if lambda != 1; ``base + mixed``; cast to
    ``out_dtype``. The same calls below, with ``out=`` into reused buffers.
    """

    def __init__(self, weights: Sequence[float], normalize: bool, lam: float, dtype: torch.dtype):
        self.n = len(weights)
        self.dtype = dtype
        w = torch.tensor(list(weights), dtype=dtype)
        self.weights = w
        self.normalize = normalize
        self.lam = lam
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
        self.divisor = divisor
        self._buf = _Buffers()

    def __call__(self, members: Sequence[torch.Tensor], base: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        shape = tuple(base.shape)
        deltas = self._buf.take("deltas", self.dtype, (self.n, *shape))
        for i, m in enumerate(members):
            torch.sub(m, base, out=deltas[i])
        deltas.mul_(self.weights.view(self.n, *([1] * len(shape))))
        mixed = self._buf.take("mixed", self.dtype, shape)
        torch.sum(deltas, dim=0, out=mixed)
        if self.normalize:
            mixed.div_(self.divisor)
        if self.lam != 1:
            mixed.mul_(self.lam)
        mixed = torch.add(base, mixed, out=mixed)
        return mixed.to(out_dtype, copy=True)


class LinearKernel:
    """mergekit's ``linear_merge`` for one tensor: ``result = zeros(float32 or float64)``;
    ``result.addcmul_(t_i, w_i)`` in member order; ``/= sum(w)`` if normalize; cast back to the
    inputs' dtype, then to ``out_dtype``. mergekit runs it on a batch of one tensor (a leading
    axis of size 1), which the views below reproduce."""

    def __init__(self, weights: Sequence[float], normalize: bool, dtype: torch.dtype):
        self.dtype = dtype
        self.acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        w = torch.tensor([list(weights)], dtype=self.acc_dtype)  # [batch 1, n], as mergekit packs it
        self.coefficients = list(w.unbind(1))
        self.denominator = w.sum(dim=1) if normalize else None
        self._buf = _Buffers()

    def __call__(self, members: Sequence[torch.Tensor], base: torch.Tensor | None,
                 out_dtype: torch.dtype) -> torch.Tensor:
        shape = (1, *members[0].shape)
        coef_shape = (1,) + (1,) * (len(shape) - 1)
        acc = self._buf.take("acc", self.acc_dtype, shape)
        acc.zero_()
        for t, c in zip(members, self.coefficients):
            acc.addcmul_(t.view(shape), c.reshape(coef_shape))
        if self.denominator is not None:
            acc.div_(self.denominator.reshape(coef_shape))
        out = acc.to(members[0].dtype) if acc.dtype != members[0].dtype else acc
        return out.to(out_dtype, copy=True)[0]


def _task_arithmetic(params: dict[str, Any], weights: Sequence[float], dtype: torch.dtype):
    return TaskArithmeticKernel(weights, bool(params["normalize"]), float(params["lambda"]), dtype)


def _linear(params: dict[str, Any], weights: Sequence[float], dtype: torch.dtype):
    return LinearKernel(weights, bool(params["normalize"]), dtype)


Kernel = Callable[[Sequence[torch.Tensor], "torch.Tensor | None", torch.dtype], torch.Tensor]
KERNELS: dict[str, Callable[[dict[str, Any], Sequence[float], torch.dtype], Kernel]] = {
    "task_arithmetic": _task_arithmetic,
    "linear": _linear,
}
VERIFY_ELEMENTS = 1 << 14  # per tensor: rows compared with mergekit before the kernel takes over


def build_kernel(method: str, shared: dict[str, Any], weights: Sequence[float], dtype: torch.dtype,
                 densities: Sequence[float | None]) -> Kernel | None:
    """The kernel for ``method`` with these (validated) shared parameters, or None (use mergekit).

    ``shared``: every shared parameter of mergekit's method spec (its defaults, updated with the recipe's).
    """
    builder = KERNELS.get(method)
    if builder is None or any(d is not None and d < 1 for d in densities):
        return None
    return builder(shared, weights, dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (unlike ``torch.equal``, tells -0.0 from 0.0 and matches NaNs)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


class KernelGuard:
    """Runs ``kernel`` instead of ``reference`` (the mergekit call) once a tensor has passed a check.

    The first call for each tensor name merges its first rows (at most ``VERIFY_ELEMENTS``
    elements) with both and compares the bits; a difference disables the kernel for the rest
    of the merge (with a warning), so what is written is always what mergekit computes.
    """

    def __init__(self, kernel: Kernel, reference: Callable[..., torch.Tensor], label: str):
        self.kernel: Kernel | None = kernel
        self.reference = reference
        self.label = label
        self._checked: set[str] = set()
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self.kernel is not None

    def _rows(self, t: torch.Tensor) -> int:
        row = math.prod(t.shape[1:]) if t.dim() > 1 else 1
        return max(1, min(t.shape[0] if t.dim() else 1, VERIFY_ELEMENTS // max(row, 1)))

    def _check(self, members: Sequence[torch.Tensor], base: torch.Tensor | None, out_dtype: torch.dtype,
               name: str) -> None:
        if members[0].dim() == 0:
            sl = list(members), base
        else:
            k = self._rows(members[0])
            sl = [m[:k] for m in members], (None if base is None else base[:k])
        ours = self.kernel(sl[0], sl[1], out_dtype)
        ref = self.reference(sl[0], sl[1], out_dtype, name)
        if not same_bits(ours, ref):
            warnings.warn(f"{self.label}: the in-place {name} merge differs from mergekit's on its first rows; "
                          "merging the remaining tensors with mergekit itself", RuntimeWarning, stacklevel=3)
            self.kernel = None

    def __call__(self, members: Sequence[torch.Tensor], base: torch.Tensor | None, out_dtype: torch.dtype,
                 name: str) -> torch.Tensor:
        if self.kernel is not None and name not in self._checked:
            with self._lock:
                if self.kernel is not None and name not in self._checked:
                    self._check(members, base, out_dtype, name)
                    self._checked.add(name)
        kernel = self.kernel
        if kernel is None:
            return self.reference(members, base, out_dtype, name)
        return kernel(members, base, out_dtype)


__all__ = ["KERNELS", "KernelGuard", "LinearKernel", "TaskArithmeticKernel", "build_kernel",
           "same_bits"]
