"""Training-step cost: COMM vs the CLIP (LLaVA-1.5) baseline, and our loop vs a bare HF step.

All variants share one LLM architecture and the same batch (same sequence lengths: text +
visual tokens, same images) and are timed interleaved, round by round (median per step):

- (a) ``bare_llm``:  ``LlamaForCausalLM`` forward/backward/AdamW on ``inputs_embeds`` of the batch's shape;
- (b) ``bare_clip``: a hand-written LLaVA step: CLIP layer -2 (no grad) -> mlp2x_gelu -> splice into the
  token embeddings -> HF loss -> backward -> AdamW (no accelerate, no trainer);
- (c) ``loop_clip``: :meth:`train.loop.Trainer.train_step` with fusion ``clip`` (same computation as b);
- (d) ``loop_comm``: :meth:`train.loop.Trainer.train_step` with fusion ``comm`` (CLIP all layers + DINOv2).

Targets: ``comm / clip = d / c <= 1.3``; loop overhead ``c / b - 1 <= 5%``.

    python benchmarks/train_step.py [--size small|mid|tiny] [--batch 4] [--steps 5] [--rounds 5] [--threads N]

Models are randomly initialised (no download) in the real transformers architectures. The
``small``/``mid`` sizes keep the real model's rough proportions (each encoder ~1/10 of the LLM, 256
visual tokens). Ratios use the best of ``--rounds`` (least disturbed by other load); medians are printed too.
On a GPU (``--device cuda``) the trainer uses bf16 autocast and the report adds tokens/s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuse.testing import build_base_llm  # noqa: E402
from train.api import make_config  # noqa: E402
from train.data import IGNORE  # noqa: E402
from train.loop import Trainer  # noqa: E402
from train.toy import toy_config, write_toy_dataset  # noqa: E402

SIZES = {
    # LLM overrides of fuse.testing.TINY_LLAMA; one ViT config for both encoders; image side; vocab
    "tiny": dict(llm=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2),
                 vit=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4),
                 image=56, vocab=512),
    "small": dict(llm=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2),
                  vit=dict(hidden_size=96, intermediate_size=384, num_hidden_layers=6, num_attention_heads=3),
                  image=224, vocab=4096),
    "mid": dict(llm=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4),
                vit=dict(hidden_size=192, intermediate_size=768, num_hidden_layers=6, num_attention_heads=3),
                image=224, vocab=8192),
    "large": dict(llm=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                           num_key_value_heads=8),
                  vit=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6),
                  image=224, vocab=16384),
}


def build(size: str, tmp: Path, batch: int, device: str):
    s = SIZES[size]
    base = build_base_llm(tmp / "llm", seed=0, vocab_size=s["vocab"], **s["llm"])
    data, root = write_toy_dataset(tmp / "data", n=max(16, batch), size=s["image"])
    vit = {**s["vit"], "patch_size": 14, "image_size": s["image"]}
    enc = {"clip": {"config": {**vit, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}, "image_size": s["image"]},
           "dinov2": {"config": {**vit, "layer_norm_eps": 1e-6}, "image_size": s["image"]}}
    trainers = {}
    for fusion in ("clip", "comm"):
        cfg = toy_config(base, data, root, tmp / f"run_{fusion}", encoders=enc, fusion={"type": fusion},
                         data={"max_length": 4096},
                         per_device_batch_size=batch, global_batch_size=batch, max_steps=10_000, lr=1e-5,
                         mixed_precision="auto" if device == "cuda" else "no", max_grad_norm=None)
        trainers[fusion] = Trainer(make_config(cfg))
    return trainers


def bare_clip_step_fn(tr: Trainer, batch: dict):
    """A plain LLaVA-1.5 step written with torch + transformers only (the baseline for loop overhead)."""
    model = tr.raw_model
    llm, proj = model.llm, model.fusion.proj
    clip = tr.branch.encoders["clip"]
    dev = tr.acc.device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids, labels = batch["input_ids"].to(dev), batch["labels"].to(dev)
    mask, imask = batch["attention_mask"].to(dev), batch["image_mask"].to(dev)
    pv = batch["pixels"]["pixel_values_clip"].to(dev)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with torch.no_grad():
            feats = clip.features(pv, [-2])[:, 0]
        with amp:
            vis = proj(feats.to(next(proj.parameters()).dtype))
            emb = llm.get_input_embeddings()(ids).masked_scatter(imask.unsqueeze(-1), vis.to(llm.dtype))
            loss = llm(inputs_embeds=emb, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bare_llm_step_fn(tr: Trainer, batch: dict):
    llm = tr.raw_model.llm
    dev = tr.acc.device
    opt = torch.optim.AdamW([p for p in llm.parameters() if p.requires_grad], lr=1e-5)
    b, t = batch["input_ids"].shape
    emb = torch.randn(b, t, llm.config.hidden_size, device=dev) * 0.02
    labels, mask = batch["labels"].to(dev), batch["attention_mask"].to(dev)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with amp:
            loss = llm(inputs_embeds=emb, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def timed(fn, steps: int, device: str, clock) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = clock()
    for _ in range(steps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (clock() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5, help="steps per timing (per round)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--clock", choices=["wall", "cpu"], default=None,
                    help="wall (perf_counter) or cpu (process CPU time: robust to other load on a shared CPU "
                         "machine; use with --threads 1). Default: cpu on CPU, wall on GPU")
    args = ap.parse_args()
    clock_name = args.clock or ("wall" if args.device == "cuda" else "cpu")
    clock = time.perf_counter if clock_name == "wall" else time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        trainers = build(args.size, Path(d), args.batch, args.device)
        batches = {}
        for k, tr in trainers.items():
            batches[k] = next(tr._loader(0, 0))
        assert batches["clip"]["input_ids"].shape == batches["comm"]["input_ids"].shape
        assert not batches["clip"]["bad"] and batches["clip"]["pixels"] is not None
        fns = {
            "bare_llm": bare_llm_step_fn(trainers["clip"], batches["clip"]),
            "bare_clip": bare_clip_step_fn(trainers["clip"], batches["clip"]),
            "loop_clip": lambda: trainers["clip"].train_step([batches["clip"]]),
            "loop_comm": lambda: trainers["comm"].train_step([batches["comm"]]),
        }
        for fn in fns.values():  # warm-up (allocations, AdamW state)
            fn()
        times: dict[str, list[float]] = {k: [] for k in fns}
        for r in range(args.rounds):
            order = list(fns) if r % 2 == 0 else list(reversed(fns))  # cancel order effects
            for k in order:
                fn = fns[k]
                times[k].append(timed(fn, args.steps, args.device, clock))
        # best of rounds (timeit practice: the minimum is the least disturbed by other load); medians shown too
        med = {k: min(v) for k, v in times.items()}
        mid = {k: statistics.median(v) for k, v in times.items()}
        b = batches["clip"]
        tokens = int(b["attention_mask"].sum())
        llm = trainers["clip"].raw_model.llm
        n_llm = sum(p.numel() for p in llm.parameters())
        n_enc = {r: sum(p.numel() for p in e.parameters()) for r, e in trainers["comm"].branch.encoders.items()}
        n_fus = {k: sum(p.numel() for p in tr.raw_model.fusion.parameters()) for k, tr in trainers.items()}
        print(f"device {args.device}, clock {clock_name}, threads {torch.get_num_threads()}, size {args.size}, "
              f"batch {args.batch}, "
              f"sequence {tuple(b['input_ids'].shape)} ({trainers['clip'].branch.num_tokens} visual tokens), "
              f"{int((b['labels'][:, 1:] != IGNORE).sum())} targets")
        print(f"params: LLM {n_llm / 1e6:.1f}M, encoders {', '.join(f'{r} {n / 1e6:.1f}M' for r, n in n_enc.items())}, "
              f"fusion clip {n_fus['clip'] / 1e6:.2f}M / comm {n_fus['comm'] / 1e6:.2f}M")
        for k in fns:
            print(f"  {k:10s} {med[k] * 1000:9.1f} ms/step (median {mid[k] * 1000:9.1f})   {tokens / med[k]:10.0f} tokens/s")
        r_comm = med["loop_comm"] / med["loop_clip"]
        overhead = med["loop_clip"] / med["bare_clip"] - 1
        print(f"comm / clip step time      {r_comm:.3f}x   (target <= 1.3)   {'OK' if r_comm <= 1.3 else 'MISS'}")
        print(f"loop overhead vs bare step {100 * overhead:+.1f}%   (target <= 5%)    {'OK' if overhead <= 0.05 else 'MISS'}")
        print(f"vision share of the clip step: {100 * (1 - med['bare_llm'] / med['bare_clip']):.1f}%")


if __name__ == "__main__":
    main()
