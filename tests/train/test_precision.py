"""bf16 mixed precision (CPU autocast) and gradient checkpointing over a short run.

bf16 keeps 8 significant bits: one rounding of a value is off by at most 2^-8 = 0.39%
relative. Matmuls run in bf16 under autocast while the weights, the optimizer and the loss
reduction stay float32, so over 10 steps each step's loss stays within 2^-8 relative of the
float32 run (measured: at most 2.4e-4 on this toy run). Gradient checkpointing recomputes
each decoder layer in the backward pass: with the non-reentrant implementation on CPU the
recomputation is exactly the forward, so the curve is the same.
"""

from __future__ import annotations

import torch

from train.api import make_config
from train.loop import Trainer

BF16_RTOL = 2.0**-8


def _run(toy_cfg, out, **over):
    """Train 10 steps; returns (losses, dtypes of a decoder projection output, its forward calls per step, the LLM).

    Checkpointing wraps a layer's ``forward``, so a module inside the layer runs again when
    the backward pass recomputes it (the layer's first projection: torch's non-reentrant
    recomputation stops after the last tensor backward needs, which can skip the last one).
    """
    t = Trainer(make_config(toy_cfg(out, max_steps=10, lr=3e-3, **over)))
    llm = t.raw_model.llm
    dtypes, calls = set(), []

    def seen(module, inputs, output):
        dtypes.add(output.dtype)
        calls.append(1)

    llm.model.layers[0].self_attn.q_proj.register_forward_hook(seen)
    res = t.train()
    return res.losses, dtypes, len(calls) / 10, llm


def test_bf16_autocast_with_gradient_checkpointing_tracks_float32(tmp_path, toy_cfg):
    ref, ref_dtypes, ref_calls, _ = _run(toy_cfg, tmp_path / "fp32", mixed_precision="no")
    got, dtypes, calls, llm = _run(toy_cfg, tmp_path / "bf16", mixed_precision="bf16", gradient_checkpointing=True)
    assert ref_dtypes == {torch.float32} and dtypes == {torch.bfloat16}  # autocast really ran in bf16
    assert (ref_calls, calls) == (1, 2)  # checkpointing on: the layer ran again in the backward pass
    assert all(p.dtype == torch.float32 for p in llm.parameters())  # master weights stay float32
    assert got != ref
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=BF16_RTOL, atol=0)
    assert got[-1] < 0.8 * got[0]
