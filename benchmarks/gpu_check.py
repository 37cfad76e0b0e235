"""One prepared GPU check: COMM training throughput/MFU, fused prefill vs each member, `fuse merge` at real width.

Run through ``bash benchmarks/gpu_check.sh`` (one section per process, each with a time limit),
or one section directly::

    python benchmarks/gpu_check.py --section train|prefill|merge [--tiny] [--device cuda|cpu]

Sections (random weights of the real shapes; nothing is downloaded):

- ``train``: :meth:`train.loop.Trainer.train_step` of a COMM stage-1 run (fusion + LLM trained,
  AdamW) with a 0.84B LLaMA-architecture LLM (TinyLlama widths: 2048 / 5632, GQA 32/4 heads,
  16 layers, vocab 32000), CLIP-L/14-336 (all 24 layers fused) and DINOv2-L/14 at 336 px
  (layers 19-24), bf16 autocast, gradient checkpointing off and on. Prints tokens/s (all
  sequence tokens, 576 visual + text), peak memory and MFU = model FLOPs / time / peak bf16
  FLOP/s. Model FLOPs per step: 6 N_llm T + 12 n_layers d_model sum(L^2) (attention, causal
  counted in full as in the PaLM paper, App. B) + 6 N_fusion T_vis + 2 N_enc T_enc (frozen
  encoders: forward only). Recomputation under checkpointing is not counted (MFU, not HFU).
- ``prefill``: one prefill of the fused MGM-8B + SliME-8B model vs each member alone on the
  same LLM: LLaMA-3-8B widths (4096 / 14336, 32/8 heads, vocab 128256) with ``--llm-layers``
  (default 2) layers; MGM's branch (CLIP-L/336 + ConvNeXt-L at 768 px, patch-info mining,
  576 tokens) and SliME's (CLIP-L/336 global view + crops, 576 + 1 + kept local tokens) at their
  real shapes, from the config-only stand-ins (``fuse.testing.standins``) refilled with random
  values. Prints visual tokens per member, sequence length, latency and peak memory.
- ``merge``: ``fuse merge`` (task arithmetic, 2 llava-hf members on a base) where every LLM tensor
  has LLaMA-3-8B's real width (embedding and head 128256 x 4096, ``--merge-layers`` decoder
  layers). ``fuse merge`` does its math on the CPU (row chunks streamed from the safetensors
  files; no GPU path is offered), so this measures the GPU host's CPU and disk: wall time,
  GB read / written, peak RSS of the merge process.

``--tiny``: the same code at tiny widths, so the whole check runs end to end on a CPU in about a
minute (figures then only show that it runs).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuse.testing.standins import CLIP_L_336, LLAMA3_8B  # noqa: E402

DINOV2_L = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                patch_size=14, image_size=336, layer_norm_eps=1e-6)
LLM_08B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=4, max_position_embeddings=2048)
TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=14,
                image_size=56)
TINY_LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2)
PEAK_BF16 = {"H200": 989.4e12, "H100 PCIe": 756.0e12, "H100": 989.4e12, "A100": 312.0e12}  # dense, per GPU


# -- helpers ---------------------------------------------------------------------------------------
def sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def peak_reset(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(dev: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if dev.startswith("cuda") else None


def fmt_gb(x: float | None) -> str:
    return f"{x:6.1f} GiB" if x is not None else "   n/a (CPU)"


def peak_flops(dev: str, override: float | None) -> tuple[float | None, str]:
    if override:
        return override * 1e12, f"--peak-tflops {override}"
    if not dev.startswith("cuda"):
        return None, "CPU"
    name = torch.cuda.get_device_name()
    for key, v in PEAK_BF16.items():
        if key in name:
            return v, name
    return None, name


def header(title: str, args) -> None:
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "none"
    print(f"\n== {title} ({'tiny' if args.tiny else 'real shapes'}; device {args.device}, GPU {gpu}, "
          f"torch {torch.__version__})", flush=True)


# -- train -----------------------------------------------------------------------------------------
def section_train(args) -> None:
    from fuse.testing import build_base_llm
    from train.api import make_config
    from train.loop import Trainer
    from train.toy import toy_config, write_toy_dataset

    header("COMM training step", args)
    llm_cfg, vocab = (TINY_LLM, 256) if args.tiny else (LLM_08B, 32000)
    clip = {**CLIP_L_336} if not args.tiny else {**TINY_VIT, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    dino = {**DINOV2_L} if not args.tiny else {**TINY_VIT, "layer_norm_eps": 1e-6}
    image = clip["image_size"]
    batch = args.batch or (2 if args.tiny else 8)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        base = build_base_llm(Path(tmp) / "llm", seed=0, vocab_size=vocab, **llm_cfg)
        data, root = write_toy_dataset(Path(tmp) / "data", n=max(16, batch), size=image)
        print(f"built the LLM checkpoint and data in {time.perf_counter() - t0:.0f} s", flush=True)
        enc = {"clip": {"config": clip, "image_size": image}, "dinov2": {"config": dino, "image_size": image}}
        peak, peak_name = peak_flops(args.device, args.peak_tflops)
        for gc in (False, True):
            cfg = toy_config(base, data, root, Path(tmp) / f"run_{gc}", encoders=enc, fusion={"type": "comm"},
                             data={"max_length": 4096}, per_device_batch_size=batch, global_batch_size=batch,
                             max_steps=10_000, lr=1e-5, gradient_checkpointing=gc, save_every=None,
                             mixed_precision="auto")
            peak_reset(args.device)
            tr = Trainer(make_config(cfg))
            mb = next(tr._loader(0, 0))
            for _ in range(args.warmup):
                tr.train_step([mb])
            times = []
            for _ in range(args.steps):
                sync(args.device)
                t = time.perf_counter()
                tr.train_step([mb])
                sync(args.device)
                times.append(time.perf_counter() - t)
            step = statistics.median(times)
            flops = train_flops(tr, mb)
            tokens = int(mb["attention_mask"].sum())
            mfu = f"{100 * flops / step / peak:5.1f}%" if peak else "  n/a"
            print(f"grad ckpt {'on ' if gc else 'off'}: batch {batch} x {tuple(mb['input_ids'].shape)[1]} tokens "
                  f"({tr.branch.num_tokens} visual), mixed precision {tr.acc.mixed_precision}: "
                  f"{step * 1e3:8.1f} ms/step (median of {args.steps}), {tokens / step:9.0f} tokens/s, "
                  f"{flops / step / 1e12:7.2f} TFLOP/s, MFU {mfu} (peak {peak_name}), "
                  f"peak memory {fmt_gb(peak_gb(args.device))}", flush=True)
            del tr


def train_flops(tr, mb) -> float:
    """Model FLOPs of one training step on micro-batch ``mb`` (see the module doc)."""
    llm = tr.raw_model.llm
    c = llm.config
    n_llm = sum(p.numel() for n, p in llm.named_parameters() if "embed_tokens" not in n)
    lengths = mb["attention_mask"].sum(dim=1).double()
    tokens = float(lengths.sum())
    attn = 12 * c.num_hidden_layers * c.hidden_size * float((lengths ** 2).sum())
    n_fusion = sum(p.numel() for p in tr.raw_model.fusion.parameters())
    images = int(mb["image_mask"].any(dim=1).sum())
    t_vis = images * tr.branch.num_tokens
    enc = 0.0
    for role, e in tr.branch.encoders.items():
        n = sum(p.numel() for p in e.parameters())
        side = next(v for k, v in mb["pixels"].items() if k.endswith(role)).shape[-1]
        enc += 2 * n * images * (side // e.model.config.patch_size) ** 2
    return 6 * n_llm * tokens + attn + 6 * n_fusion * t_vis + enc


# -- prefill ---------------------------------------------------------------------------------------
def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Random values of the same shapes: matrices ~ N(0, 0.02), norm weights 1, biases 0."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def prefill_members(args, tmp: Path, dtype: torch.dtype):
    """(mgm member, slime member, LLM module) at real shapes (stand-ins) or tiny (test builders)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from fuse.members import load_member

    if args.tiny:
        from fuse.testing import build_base_llm
        from fuse.testing.mgm import build_mgm_member
        from fuse.testing.slime import build_slime_member

        base = build_base_llm(tmp / "base", seed=0)
        mgm = load_member(build_mgm_member(tmp / "mgm", base), dtype=dtype)
        slime = load_member(build_slime_member(tmp / "slime", base), dtype=dtype)
        llm = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    else:
        from fuse.testing.standins import write_standins

        write_standins(tmp)
        mgm = load_member(tmp / "mgm-8b", dtype=dtype)
        slime = load_member(tmp / "slime-8b", dtype=dtype)
        for i, m in enumerate((mgm, slime)):  # the stand-ins read as zeros: give them random values
            randomize_(m.vision, seed=i)
        cfg = LlamaConfig(**{**LLAMA3_8B, "vocab_size": LLAMA3_8B["vocab_size"] + 1,
                             "num_hidden_layers": args.llm_layers})
        with torch.device(args.device):
            llm = LlamaForCausalLM(cfg).to(dtype)
    return mgm, slime, llm.to(args.device).eval()


@torch.no_grad()
def section_prefill(args) -> None:
    from fuse.model import FusedModel
    from fuse.testing import random_image

    header("fused prefill: MGM-8B + SliME-8B vs each member", args)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    with tempfile.TemporaryDirectory() as tmp:  # tokenizers are read lazily from the member dirs
        mgm, slime, llm = prefill_members(args, Path(tmp), dtype)
        models = {"fused mgm+slime": FusedModel.from_members([mgm, slime], llm=llm, dtype=dtype),
                  "mgm alone": FusedModel.from_members([mgm], llm=llm, dtype=dtype),
                  "slime alone": FusedModel.from_members([slime], llm=llm, dtype=dtype)}
        for m in models.values():
            m.to(args.device)
        images = [random_image(i, (672, 448) if not args.tiny else (96, 64)) for i in range(args.batch or 1)]
        prompts = ["<image>\nDescribe the picture in detail, then say what colour the largest object is."] * len(images)
        print(f"LLM: {llm.config.num_hidden_layers} layers of width {llm.config.hidden_size}, vocab "
              f"{llm.config.vocab_size}, {sum(p.numel() for p in llm.parameters()) / 1e9:.2f}B parameters, {dtype}; "
              f"batch {len(images)}, image {images[0].size}", flush=True)
        for m in models.values():  # warm-up
            m(images=images, prompts=prompts)
        times: dict[str, list[float]] = {k: [] for k in models}
        peaks: dict[str, float | None] = {}
        shapes = {}
        for r in range(args.rounds):
            for k in (list(models) if r % 2 == 0 else list(reversed(models))):
                peak_reset(args.device)
                base = torch.cuda.memory_allocated() if args.device.startswith("cuda") else 0
                sync(args.device)
                t = time.perf_counter()
                out = models[k](images=images, prompts=prompts)
                sync(args.device)
                times[k].append(time.perf_counter() - t)
                p = peak_gb(args.device)
                peaks[k] = None if p is None else max(peaks.get(k) or 0.0, p - base / 2**30)
                shapes[k] = (out.fused_inputs.tokens[0], int(out.fused_inputs.inputs_embeds.shape[1]))
                del out
        for k in models:
            tokens, seq = shapes[k]
            print(f"{k:16s} visual tokens {tokens}, sequence {seq}: {statistics.median(times[k]) * 1e3:8.1f} ms "
                  f"(median of {args.rounds}), peak memory above the weights {fmt_gb(peaks[k])}", flush=True)
        fused = statistics.median(times["fused mgm+slime"])
        alone = statistics.median(times["mgm alone"]) + statistics.median(times["slime alone"])
        print(f"fused / (mgm alone + slime alone) latency: {fused / alone:.2f}", flush=True)


# -- merge -----------------------------------------------------------------------------------------
def section_merge(args) -> None:
    import yaml

    from fuse.testing import build_base_llm, build_llava_hf_member

    header("fuse merge on real-width LLM tensors (math on CPU: no GPU path is offered)", args)
    over = TINY_LLM if args.tiny else {k: LLAMA3_8B[k] for k in ("hidden_size", "intermediate_size",
                                                                  "num_attention_heads", "num_key_value_heads")}
    vocab = 256 if args.tiny else LLAMA3_8B["vocab_size"]
    layers = over.get("num_hidden_layers", args.merge_layers)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        base = build_base_llm(tmp / "base", seed=0, vocab_size=vocab, **{**over, "num_hidden_layers": layers})
        members = [build_llava_hf_member(tmp / f"m{i}", base, seed=i + 1)[0] for i in range(2)]
        print(f"built base + 2 members ({layers} layers, vocab {vocab}) in {time.perf_counter() - t0:.0f} s",
              flush=True)
        recipe = {"base_model": str(base), "members": [{"model": str(m), "weight": 0.5} for m in members],
                  "merge": {"method": "task_arithmetic", "dtype": "float32"}, "output": {"dir": str(tmp / "out")}}
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        read = sum(f.stat().st_size for d in [base, *members] for f in Path(d).glob("*.safetensors"))
        cmd = [sys.executable, "-m", "fuse", "merge", str(tmp / "recipe.yaml"), "-q", "--no-checksums"]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"fuse merge failed: {proc.stderr[-2000:]}")
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
        written = sum(f.stat().st_size for f in (tmp / "out").rglob("*.safetensors"))
        print(f"fuse merge: {wall:.1f} s wall (incl. ~2 s start-up), inputs {read / 1e9:.2f} GB, "
              f"written {written / 1e9:.2f} GB, {read / 1e9 / wall:.2f} GB/s read, peak RSS {rss:.2f} GiB "
              f"(largest tensor {vocab * over['hidden_size'] * 4 / 2**30:.2f} GiB in float32)", flush=True)


SECTIONS = {"train": section_train, "prefill": section_prefill, "merge": section_merge}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--section", choices=list(SECTIONS), required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny widths: runs end to end on a CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="train: per-step batch (8); prefill: images (1)")
    ap.add_argument("--steps", type=int, default=None, help="train: timed steps (10; tiny 2)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=None, help="prefill: timed rounds per model (5; tiny 2)")
    ap.add_argument("--llm-layers", type=int, default=2, help="prefill: LLaMA-3-8B-width decoder layers")
    ap.add_argument("--merge-layers", type=int, default=2, help="merge: decoder layers of real width")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s for MFU (default: by GPU name)")
    args = ap.parse_args()
    args.steps = args.steps or (2 if args.tiny else 10)
    args.rounds = args.rounds or (2 if args.tiny else 5)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu --tiny)")
    t = time.perf_counter()
    SECTIONS[args.section](args)
    print(f"section {args.section}: done in {time.perf_counter() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
