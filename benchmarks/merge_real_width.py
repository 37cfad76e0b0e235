"""`fuse merge` vs `mergekit-yaml` at real tensor widths: time, peak RSS, GB/s, bit-identical output.

Inputs (built once under --workdir, streamed, never a whole model in memory): a LLaMA base and two
llava-hf members fine-tuned from it, at Llama-3-8B widths by default (vocab 128256, hidden 4096,
MLP 14336, 32 heads, 8 KV heads; --layers decoder layers), in bfloat16; each member's LLM is also
written as a plain LlamaForCausalLM dir for mergekit (same bytes). Both tools then merge with
task_arithmetic (float32 math, bfloat16 out) alternately (round r: fuse first if r is even), each as
a child process whose peak RSS and CPU time are read with wait4(2), each started right after its
inputs were read once (warm page cache). Printed: per-run wall, CPU and RSS; the median time, CPU
and RSS ratios (fuse / mergekit); fuse's merge throughput (bytes it reads / wall) next to a plain
read of the same files from the page cache; whether OUT/llm is bit-identical to mergekit's output.

    python benchmarks/merge_real_width.py                        # 2 layers: 3 GB per model (15 GB of inputs)
    python benchmarks/merge_real_width.py --layers 0             # embeddings + lm_head only
    python benchmarks/merge_real_width.py --vocab 16384 --layers 1   # real hidden/MLP widths, small vocab
    python benchmarks/merge_real_width.py --hidden 1024 --intermediate 3584 --vocab 32000 --layers 2  # quick

mergekit-yaml holds about 2.2x its input bytes resident at these widths (19-20 GB for 2 layers);
the script refuses to start it when less memory is available (--force-mergekit overrides, --no-mergekit
times fuse alone).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_vs_mergekit import identical, run_measured  # noqa: E402  (sibling benchmark script)

POOL = 1 << 24            # random values reused for every tensor (generation speed, not statistics, matters)
PIECE = 1 << 22           # elements generated and written per step
MERGEKIT_RSS_PER_INPUT_BYTE = 2.2


def llama_shapes(vocab: int, hidden: int, inter: int, layers: int, heads: int, kv_heads: int) -> dict:
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
              "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden),
                       p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                       p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
                       p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter),
                       p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)})
    return dict(sorted(shapes.items()))


def build_inputs(root: Path, args: argparse.Namespace) -> dict:
    """Base + 2 llava-hf members + their LLMs as plain dirs, streamed piece by piece (reused if present)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from fuse.encoders import ClipEncoder
    from fuse.merge.writer import StreamingShardWriter
    from fuse.testing.builders import TINY_CLIP, build_tiny_clip
    from fuse.testing.tokenizer import tiny_tokenizer

    done = root / "inputs.json"
    if done.is_file():
        return json.loads(done.read_text())
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    shapes = llama_shapes(args.vocab, args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads)
    tok = tiny_tokenizer(args.vocab)
    text_cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                           num_hidden_layers=args.layers, num_attention_heads=args.heads,
                           num_key_value_heads=args.kv_heads, max_position_embeddings=8192, rms_norm_eps=1e-5,
                           rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, torch_dtype="bfloat16")
    llama = {**text_cfg.to_dict(), "architectures": ["LlamaForCausalLM"]}
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(POOL, generator=g)
    bf16, gb = torch.bfloat16, 1e9

    def piece(seed: int, n: int) -> torch.Tensor:
        off = (seed * 2654435761) % (POOL - n + 1)
        return pool[off:off + n]

    clip = build_tiny_clip(seed=1)
    vis = {"vision_tower.vision_model." + k[len("vision_model."):]: v.to(bf16) for k, v in clip.state_dict().items()}
    proj = {"multi_modal_projector.linear_1.weight": (args.hidden, TINY_CLIP["hidden_size"]),
            "multi_modal_projector.linear_1.bias": (args.hidden,),
            "multi_modal_projector.linear_2.weight": (args.hidden, args.hidden),
            "multi_modal_projector.linear_2.bias": (args.hidden,)}
    hf_name = {k: ("language_model." + k) for k in shapes}
    dirs = {"base": root / "base", "llms": [root / f"member{i}_llm" for i in range(2)],
            "members": [root / f"member{i}" for i in range(2)]}
    shard = 5 * 10**9
    w_base = StreamingShardWriter(dirs["base"], [(k, s, bf16) for k, s in shapes.items()], shard)
    w_llm = [StreamingShardWriter(d, [(k, s, bf16) for k, s in shapes.items()], shard) for d in dirs["llms"]]
    w_mem = [StreamingShardWriter(d, [(hf_name[k], s, bf16) for k, s in shapes.items()] +
                                  [(k, tuple(v.shape), bf16) for k, v in vis.items()] +
                                  [(k, s, bf16) for k, s in proj.items()], shard) for d in dirs["members"]]
    seed = 0
    for name, shape in shapes.items():
        n_total = 1
        for s in shape:
            n_total *= s
        norm = len(shape) == 1
        for start in range(0, n_total, PIECE):
            n = min(PIECE, n_total - start)
            seed += 1
            base = (1.0 + 0.1 * piece(seed, n) if norm else 0.02 * piece(seed, n)).to(bf16)
            w_base.append(name, base)
            for i in range(2):  # fine-tune: base + 5 % of the weights' scale, different per member
                m = (base.float() + 0.001 * piece(seed * 7 + i + 1, n)).to(bf16)
                w_llm[i].append(name, m)
                w_mem[i].append(hf_name[name], m)
        print(f"  {name} {list(shape)}", flush=True)
    for i in range(2):
        for k, v in vis.items():
            w_mem[i].append(k, v)
        for j, (k, s) in enumerate(proj.items()):
            n_total = s[0] * (s[1] if len(s) > 1 else 1)
            for start in range(0, n_total, PIECE):
                w_mem[i].append(k, (0.02 * piece(1000 + 10 * j + i + start, min(PIECE, n_total - start))).to(bf16))
    for w in [w_base, *w_llm, *w_mem]:
        w.close()
    vis_cfg = CLIPVisionConfig(**TINY_CLIP)
    llava = LlavaConfig(vision_config=vis_cfg, text_config=text_cfg,
                        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                        vision_feature_select_strategy="default",
                        image_seq_length=(vis_cfg.image_size // vis_cfg.patch_size) ** 2).to_dict()
    llava["architectures"] = ["LlavaForConditionalGeneration"]
    for d, cfg in [(dirs["base"], llama), *[(d, llama) for d in dirs["llms"]], *[(d, llava) for d in dirs["members"]]]:
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
        tok.save_pretrained(str(d))
        (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_token_id]}))
    for d in dirs["members"]:
        ClipEncoder.build_processor(vis_cfg).save_pretrained(str(d))
    info = {"base": str(dirs["base"]), "members": [str(d) for d in dirs["members"]],
            "llms": [str(d) for d in dirs["llms"]], "shapes": {k: list(v) for k, v in shapes.items()}}
    done.write_text(json.dumps(info))
    size = sum(f.stat().st_size for f in root.rglob("*.safetensors")) / gb
    print(f"built {size:.1f} GB of inputs in {time.perf_counter() - t0:.0f} s under {root}", flush=True)
    return info


def write_configs(root: Path, info: dict, method: str) -> tuple[Path, Path]:
    import yaml

    weights = [0.5, 0.5]
    recipe = {"base_model": info["base"],
              "members": [{"model": m, "weight": w} for m, w in zip(info["members"], weights)],
              "merge": {"method": method, "dtype": "float32", "out_dtype": "bfloat16"}}
    mk = {"merge_method": method, "base_model": info["base"], "dtype": "float32", "out_dtype": "bfloat16",
          "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(info["llms"], weights)]}
    if method == "linear":
        del recipe["base_model"], mk["base_model"]
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (root / "mergekit.yml").write_text(yaml.safe_dump(mk))
    return root / "recipe.yaml", root / "mergekit.yml"


def weight_files(dirs: list[str]) -> list[Path]:
    return [f for d in dirs for f in sorted(Path(d).glob("*.safetensors"))]


def read_files(files: list[Path], block: int = 1 << 24) -> tuple[float, int]:
    """(seconds, bytes) to read ``files`` once into one reused buffer (page-cache read speed when warm)."""
    buf = bytearray(block)
    view = memoryview(buf)
    total, t = 0, time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return time.perf_counter() - t, total


def available_gb() -> float:
    import psutil

    return psutil.virtual_memory().available / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "fuse_real_width")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--method", default="task_arithmetic", choices=["task_arithmetic", "linear", "ties"],
                    help="(ties runs at density 1 here: element-wise)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--fuse-args", default="", help="extra `fuse merge` options, e.g. '--kernel mergekit'")
    ap.add_argument("--mergekit-args", default="", help="extra mergekit-yaml options")
    ap.add_argument("--no-mergekit", action="store_true", help="time fuse only")
    ap.add_argument("--force-mergekit", action="store_true", help="run mergekit even when memory looks short")
    ap.add_argument("--clean", action="store_true", help="delete the inputs at the end (default: keep for reuse)")
    args = ap.parse_args()
    tag = f"v{args.vocab}_h{args.hidden}_i{args.intermediate}_l{args.layers}"
    root = args.workdir / tag
    if not (root / "inputs.json").is_file():
        # built in a child process: ru_maxrss of later children must not inherit this process's peak
        dims = {k: getattr(args, k) for k in ("vocab", "hidden", "intermediate", "layers", "heads", "kv_heads")}
        code = (f"import sys, runpy, argparse, pathlib; sys.argv = ['x']; m = runpy.run_path({__file__!r}); "
                f"m['build_inputs'](pathlib.Path({str(root)!r}), argparse.Namespace(**{dims!r}))")
        subprocess.run([sys.executable, "-c", code], check=True)
    info = json.loads((root / "inputs.json").read_text())
    recipe, mk_cfg = write_configs(root, info, args.method)
    fuse_inputs = weight_files(info["members"] + ([info["base"]] if args.method != "linear" else []))
    mk_inputs = weight_files(info["llms"] + ([info["base"]] if args.method != "linear" else []))
    in_gb = sum(f.stat().st_size for f in fuse_inputs) / 1e9
    mk_gb = sum(f.stat().st_size for f in mk_inputs) / 1e9
    fuse_bin = shutil.which("fuse") or "fuse"
    mk_bin = shutil.which("mergekit-yaml") or "mergekit-yaml"
    out_f, out_m = root / "out_fuse", root / "out_mergekit"
    cmds = {"fuse": [fuse_bin, "merge", str(recipe), "-o", str(out_f), "-q", *args.fuse_args.split()],
            "mergekit": [mk_bin, str(mk_cfg), str(out_m), "--quiet", *args.mergekit_args.split()]}
    tools = ["fuse"]
    need = MERGEKIT_RSS_PER_INPUT_BYTE * mk_gb + 1.0
    if not args.no_mergekit:
        if available_gb() >= need or args.force_mergekit:
            tools.append("mergekit")
        else:
            print(f"NOT running mergekit-yaml: it needs ~{need:.1f} GB ({MERGEKIT_RSS_PER_INPUT_BYTE} x {mk_gb:.1f} GB "
                  f"of inputs + 1 GB) and {available_gb():.1f} GB are available (--force-mergekit to run anyway)")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, {available_gb():.1f} GB available")
    print(f"sizes: vocab {args.vocab}, hidden {args.hidden}, MLP {args.intermediate}, {args.layers} layers, "
          f"{args.heads}/{args.kv_heads} heads; {len(info['shapes'])} LLM tensors; {args.method}, float32 math, "
          f"bfloat16 out; fuse reads {in_gb:.2f} GB, mergekit {mk_gb:.2f} GB", flush=True)
    inputs = {"fuse": fuse_inputs, "mergekit": mk_inputs}
    results: dict[str, list[tuple[float, float, float]]] = {t: [] for t in tools}
    reads: list[float] = []
    for r in range(args.rounds):
        order = tools if r % 2 == 0 else tools[::-1]
        for tool in order:
            shutil.rmtree(out_f if tool == "fuse" else out_m, ignore_errors=True)
            read_files(inputs[tool])  # each tool starts on a warm page cache (mergekit's RSS can evict it)
            if tool == "fuse":
                sec, n = read_files(fuse_inputs)
                reads.append(n / sec / 1e9)
                print(f"round {r + 1}  page-cache read of fuse's {n / 1e9:.2f} GB: {sec:.2f} s "
                      f"({n / sec / 1e9:.1f} GB/s)", flush=True)
            wall, rss, cpu = run_measured(cmds[tool])
            results[tool].append((wall, rss, cpu))
            print(f"round {r + 1}  {tool:9s} {wall:7.2f} s  CPU {cpu:7.2f} s  peak RSS {rss / 1024:6.2f} GiB",
                  flush=True)
    print()
    fw = [w for w, _, _ in results["fuse"]]
    fc = [c for _, _, c in results["fuse"]]
    f_rss = statistics.median(m for _, m, _ in results["fuse"]) / 1024
    print(f"fuse merge     wall {statistics.median(fw):.2f} s (runs {', '.join(f'{w:.2f}' for w in fw)}), "
          f"CPU {statistics.median(fc):.2f} s, peak RSS {f_rss:.2f} GiB")
    print(f"throughput     fuse merge {in_gb / statistics.median(fw):.2f} GB/s of input (whole process) vs "
          f"page-cache read {statistics.median(reads):.1f} GB/s")
    if "mergekit" in results:
        mw = [w for w, _, _ in results["mergekit"]]
        mc = [c for _, _, c in results["mergekit"]]
        ratios = [a / b for a, b in zip(fw, mw)]
        rss = [a[1] / b[1] for a, b in zip(results["fuse"], results["mergekit"])]
        print(f"mergekit-yaml  wall {statistics.median(mw):.2f} s (runs {', '.join(f'{w:.2f}' for w in mw)}), "
              f"CPU {statistics.median(mc):.2f} s, "
              f"peak RSS {statistics.median(m for _, m, _ in results['mergekit']) / 1024:.2f} GiB, "
              f"{mk_gb / statistics.median(mw):.2f} GB/s")
        per_round = ", ".join(f"{x:.3f}" for x in ratios)
        print(f"ratio          time {statistics.median(ratios):.3f} (per round {per_round}), "
              f"CPU {statistics.median(a / b for a, b in zip(fc, mc)):.3f}, RSS {statistics.median(rss):.4f}")
        same = identical(out_f / "llm", out_m)
        print(f"OUT/llm bit-identical to mergekit-yaml: {'yes' if same else 'NO'}")
    print(f"load average {os.getloadavg()[0]:.1f} at end")
    shutil.rmtree(out_f, ignore_errors=True)
    shutil.rmtree(out_m, ignore_errors=True)
    if args.clean:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
