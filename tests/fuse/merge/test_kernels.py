"""The in-place replays of mergekit's element-wise formulas (fuse.merge.kernels): bit-identical to
``mergekit.merge_methods.merge_tensors`` for every dtype pairing, weight set and method parameter;
a kernel that disagrees with mergekit is caught on a tensor's first rows and mergekit takes over."""

from __future__ import annotations

import pytest
import torch

from fuse.checkpoint import LazyCheckpoint
from fuse.merge.kernels import KernelGuard, build_kernel, same_bits
from fuse.merge.methods import TensorMerger

DTYPES = [(torch.float32, torch.bfloat16), (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
          (torch.float16, torch.float32), (torch.float64, torch.float16)]
PARAMS = {"task_arithmetic": [{}, {"normalize": True}, {"lambda": 0.7}, {"normalize": True, "lambda": 1.3}],
          "linear": [{}, {"normalize": False}]}


def inputs(n: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    base.view(-1)[:3] = torch.tensor([0.0, -0.0, 3e38])  # signed zeros and a value near the float32 limit
    members = [(base + 0.05 * torch.randn(shape, generator=g)).to(dtype) for _ in range(n)]
    return members, base.to(dtype)


@pytest.mark.parametrize("method", list(PARAMS))
@pytest.mark.parametrize("dtype, out_dtype", DTYPES)
def test_kernel_is_bit_identical_to_mergekit(method, dtype, out_dtype):
    weights = [0.35, 0.5, 0.15, 0.61]
    for n in (1, 2, 3, 4):
        for params in PARAMS[method]:
            for shape in [(37, 129), (5,), (3, 4, 6)]:
                tm = TensorMerger(method, [f"m{i}" for i in range(n)], weights[:n], [None] * n, params, dtype,
                                  with_base=method != "linear")
                assert tm.uses_kernel
                members, base = inputs(n, shape, dtype, seed=n * 100 + len(shape))
                b = None if method == "linear" else base
                with torch.no_grad():
                    ours = tm.guard.kernel(members, b, out_dtype)
                    ref = tm.mergekit(members, b, out_dtype, "t")
                assert same_bits(ours, ref), (method, dtype, out_dtype, n, params, shape)


def test_whole_tensor_methods_stay_on_mergekit():
    assert build_kernel("ties", {"normalize": True, "lambda": 1.0, "int8_mask": False, "rescale": False},
                        [0.5, 0.5], torch.float32, [None, None]) is None
    assert build_kernel("task_arithmetic", {"normalize": False, "lambda": 1.0}, [0.5, 0.5], torch.float32,
                        [0.5, None]) is None  # a density < 1 is never element-wise
    assert not TensorMerger("task_arithmetic", ["a"], [1.0], [None], {}, torch.float32, True,
                            kernel="mergekit").uses_kernel


def test_a_kernel_that_differs_from_mergekit_is_replaced_by_it():
    tm = TensorMerger("task_arithmetic", ["a", "b"], [0.5, 0.5], [None, None], {}, torch.float32, True)
    right = tm.guard.kernel

    def wrong(members, base, out_dtype):
        out = right(members, base, out_dtype)
        out.view(-1)[-1] += 1  # one element off
        return out

    tm.guard = KernelGuard(wrong, tm.mergekit, "test")
    members, base = inputs(2, (4, 8), torch.float32, 0)
    with pytest.warns(RuntimeWarning, match="differs from mergekit"):
        got = tm(members, base, torch.float32, "w")
    assert not tm.uses_kernel
    assert same_bits(got, tm.mergekit(members, base, torch.float32, "w"))

    tm.guard = KernelGuard(right, tm.mergekit, "test")  # an agreeing kernel is checked once per tensor name
    calls = []
    tm.guard.reference = lambda *a: calls.append(a[3]) or tm.mergekit(*a)
    for _ in range(3):
        tm(members, base, torch.float32, "x")
    assert calls == ["x"] and tm.uses_kernel


def test_kernel_choice_gives_the_same_bytes(tmp_path, write_recipe):
    from fuse.merge.options import MergeOptions
    from fuse.merge.run import run_merge
    from fuse.recipe import load_recipe

    recipe = load_recipe(write_recipe(tmp_path, merge={"method": "task_arithmetic", "out_dtype": "bfloat16"}))
    outs = {}
    for kernel in ("auto", "mergekit"):  # tiny chunks: many pieces through the kernel (or mergekit)
        run_merge(recipe, tmp_path / kernel, MergeOptions(kernel=kernel, chunk_bytes=1024, progress=False),
                  echo=lambda *a: None)
        outs[kernel] = LazyCheckpoint(tmp_path / kernel / "llm")
    a, b = outs["auto"], outs["mergekit"]
    assert sorted(a.keys()) == sorted(b.keys())
    assert all(same_bits(a.get(k), b.get(k)) for k in a.keys())
