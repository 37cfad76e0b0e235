"""Prefill cost of the fused model vs its parts, measured in the same run.

For each size (tiny, mid) a two-member LLaVA family is built on disk (fuse.testing builders;
`fuse.testing.fused.build_fused_dir` writes the `fuse merge` layout), loaded with
`FusedModel.from_pretrained`, and these are timed, interleaved round by round (median):

- fused: `FusedModel.forward(images, prompts)` = preprocessing + every vision branch + token
  assembly + LLM prefill;
- (a) LLM alone: the same LLM on random `inputs_embeds` of the same shape [B, L, D] (+ mask/positions);
- (b) vision: each member's `branch(branch.preprocess(images))`, summed over members.

overhead = fused / ((a) + (b)) - 1; target <= 5%. On CPU the clock is the process CPU time by
default (other processes on a shared machine then do not distort the figures; ``--clock wall`` for
elapsed time; GPU runs use wall time with synchronisation). Rounds are interleaved; the overhead is given
from the minima (noise on a shared CPU only ever adds time, so the minimum estimates the true cost)
and from the medians. "assembly" is the fused model's own work inside the same fused call
(templating, tokenization, embedding lookup, budget, positions, concatenation), timed directly.

    python benchmarks/fused_inference.py [--sizes tiny,mid] [--batch 1] [--rounds 7] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fuse.dtypes import MODEL_DTYPES, torch_dtype
from fuse.model import FusedModel
from fuse.testing import build_base_llm, build_llava_hf_member, build_llava_member, random_image
from fuse.testing.fused import build_fused_dir

SIZES = {
    # hidden/layers of the LLM, CLIP width/depth/resolution (visual tokens per member = (image/patch)^2)
    "tiny": dict(llm=dict(), vocab=256, clip=dict()),
    "mid": dict(llm=dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12,
                         num_key_value_heads=4, max_position_embeddings=4096),
                vocab=8192, clip=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                                      num_attention_heads=6, image_size=224, patch_size=14, projection_dim=384)),
}
PROMPT = "<image>\nWhat colour is the circle at the top left of the picture, and how many objects are there?"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = CLOCKS["wall"]


def timed(fn, device: str) -> float:
    sync(device)
    t = CLOCK()
    fn()
    sync(device)
    return CLOCK() - t


def build(size: str, root: Path) -> Path:
    spec = SIZES[size]
    base = build_base_llm(root / "base", seed=0, vocab_size=spec["vocab"], **spec["llm"])
    a, _ = build_llava_hf_member(root / "member_a", base, seed=1, clip_overrides=spec["clip"])
    b = build_llava_member(root / "member_b", base, seed=2, clip_overrides=spec["clip"])
    return build_fused_dir(root / "fused", [a, b])


@torch.no_grad()
def bench(size: str, batch: int, rounds: int, device: str, dtype: torch.dtype) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = build(size, Path(tmp))
        model = FusedModel.from_pretrained(out, dtype=dtype, device=device)
    images = [random_image(i, (320, 240)) for i in range(batch)]
    prompts = [PROMPT] * batch
    shape_src = model.prepare(images, prompts)
    emb = torch.randn_like(shape_src.inputs_embeds)
    mask, pos = shape_src.attention_mask, shape_src.position_ids

    assembly = []

    def fused():
        out = model(images=images, prompts=prompts)
        assembly.append(out.fused_inputs.timings["assembly"])

    def llm_alone():
        model.llm(inputs_embeds=emb, attention_mask=mask, position_ids=pos)

    def vision():
        for br in model.branches.values():
            batch_in = br.preprocess(images)
            br({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch_in.items()})

    for fn in (fused, llm_alone, vision):  # warm-up
        fn()
    assembly.clear()
    t = {"fused": [], "llm": [], "vision": []}
    for _ in range(rounds):
        t["fused"].append(timed(fused, device))
        t["llm"].append(timed(llm_alone, device))
        t["vision"].append(timed(vision, device))
    med = {k: statistics.median(v) for k, v in t.items()}
    low = {k: min(v) for k, v in t.items()}
    return {"size": size, "batch": batch, "seq_len": int(emb.shape[1]), "visual_tokens": shape_src.tokens[0],
            "llm_params_M": sum(p.numel() for p in model.llm.parameters()) / 1e6,
            "fused_ms": low["fused"] * 1e3, "llm_alone_ms": low["llm"] * 1e3, "vision_ms": low["vision"] * 1e3,
            "overhead_pct": (low["fused"] / (low["llm"] + low["vision"]) - 1) * 100,
            "overhead_median_pct": (med["fused"] / (med["llm"] + med["vision"]) - 1) * 100,
            "assembly_ms": statistics.median(assembly) * 1e3,
            "assembly_pct": statistics.median(assembly) / (med["llm"] + med["vision"]) * 100,
            "median_ms": {k: v * 1e3 for k, v in med.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,mid")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=MODEL_DTYPES)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--clock", choices=list(CLOCKS), default=None,
                    help="cpu = process CPU time (default on CPU: unaffected by other processes sharing the "
                         "cores); wall = elapsed time (default on GPU)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    global CLOCK
    clock = args.clock or ("wall" if args.device.startswith("cuda") else "cpu")
    CLOCK = CLOCKS[clock]
    dtype = torch_dtype(args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [bench(s, args.batch, args.rounds, args.device, dtype) for s in args.sizes.split(",")]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} batch={args.batch} "
          f"rounds={args.rounds} clock={clock} (times: minima over interleaved rounds)")
    print(f"{'size':5s} {'LLM M':>6s} {'seq':>4s} {'fused ms':>9s} {'(a) LLM':>8s} {'(b) vision':>10s} "
          f"{'overhead':>8s} {'(median)':>8s} {'assembly ms':>11s}  target <= 5%")
    for r in rows:
        verdict = "ok" if r["overhead_pct"] <= 5 else "ABOVE TARGET"
        print(f"{r['size']:5s} {r['llm_params_M']:6.1f} {r['seq_len']:4d} {r['fused_ms']:9.2f} {r['llm_alone_ms']:8.2f} "
              f"{r['vision_ms']:10.2f} {r['overhead_pct']:7.1f}% {r['overhead_median_pct']:7.1f}% "
              f"{r['assembly_ms']:6.2f} ({r['assembly_pct']:.1f}%)  {verdict}")


if __name__ == "__main__":
    main()
