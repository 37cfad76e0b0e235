"""`fuse merge` vs `mergekit-yaml` on the same inputs: wall time, peak RSS, bit-identical output.

Builds a LLaMA-architecture base (~0.5 GB float32) and three llava-hf members fine-tuned from it
(tiny CLIP towers, so each member is ~0.5 GB), exports the members' LLMs as plain HF checkpoints
for mergekit, then runs both tools alternately (round r: fuse first if r is even, mergekit first
otherwise), each as a child process whose peak RSS is read with wait4(2). Prints per-run figures,
the median wall-time and peak-RSS ratios (fuse / mergekit) and the memory target
(peak RSS of `fuse merge` < 2 x largest tensor + 600 MB).

    python benchmarks/merge_vs_mergekit.py                 # 5 rounds, ~0.5 GB members
    python benchmarks/merge_vs_mergekit.py --size small    # quick smoke run
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

SIZES = {
    # hidden, intermediate, layers, heads, kv heads, vocab  -> float32 LLM bytes
    "half_gb": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                    num_key_value_heads=4, vocab_size=32000),   # ~0.49 GB
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=8000),      # ~0.03 GB
}
METHOD = "task_arithmetic"
WEIGHTS = [0.4, 0.35, 0.25]


def build_inputs(root: Path, size: str) -> dict:
    """Base + 3 llava-hf members (+ their LLMs as plain HF dirs) under ``root`` (reused if present)."""
    from fuse.members import load_member
    from fuse.merge.export import export_llm
    from fuse.testing import build_base_llm, build_llava_hf_member

    cfg = dict(SIZES[size])
    vocab = cfg.pop("vocab_size")
    done = root / "inputs.json"
    if done.is_file():
        return json.loads(done.read_text())
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    t = time.perf_counter()
    base = build_base_llm(root / "base", seed=0, vocab_size=vocab, max_position_embeddings=2048, **cfg)
    members, llms = [], []
    for i in range(3):
        m, model = build_llava_hf_member(root / f"member{i}", base, seed=i + 1)
        del model
        members.append(str(m))
        llms.append(str(export_llm(load_member(m).llm, root / f"member{i}_llm", tokenizer_dir=m)))
    info = {"base": str(base), "members": members, "llms": llms}
    done.write_text(json.dumps(info))
    print(f"built inputs in {time.perf_counter() - t:.0f} s under {root}", flush=True)
    return info


def write_configs(root: Path, info: dict) -> tuple[Path, Path]:
    import yaml

    recipe = {"base_model": info["base"],
              "members": [{"model": m, "weight": w} for m, w in zip(info["members"], WEIGHTS)],
              "merge": {"method": METHOD, "dtype": "float32", "out_dtype": "float32"}}
    mk = {"merge_method": METHOD, "base_model": info["base"], "dtype": "float32", "out_dtype": "float32",
          "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(info["llms"], WEIGHTS)]}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (root / "mergekit.yml").write_text(yaml.safe_dump(mk))
    return root / "recipe.yaml", root / "mergekit.yml"


def run_measured(cmd: list[str]) -> tuple[float, float, float]:
    """(wall seconds, peak RSS MiB, CPU seconds user + system) of one child process (wait4 gives
    that child's own rusage; CPU time says more than wall time on a busy machine)."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return wall, ru.ru_maxrss / 1024, ru.ru_utime + ru.ru_stime


def largest_tensor_bytes(path: str) -> int:
    from fuse.checkpoint import LazyCheckpoint

    ck = LazyCheckpoint(path)
    return max(ck.info(k).nbytes for k in ck.keys())


def identical(a: Path, b: Path, block_bytes: int = 1 << 26) -> bool:
    """Same tensor names, dtypes, shapes and bytes (compared in row blocks: big tensors never whole)."""
    import torch

    from fuse.checkpoint import LazyCheckpoint

    x, y = LazyCheckpoint(a), LazyCheckpoint(b)
    if sorted(x.keys()) != sorted(y.keys()):
        return False
    for k in x.keys():
        ix, iy = x.info(k), y.info(k)
        if (ix.dtype, ix.shape) != (iy.dtype, iy.shape):
            return False
        if not ix.shape:
            if not torch.equal(x.get(k).view(-1).view(torch.uint8), y.get(k).view(-1).view(torch.uint8)):
                return False
            continue
        step = max(1, block_bytes // max(ix.row_bytes, 1))
        for s in range(0, ix.shape[0], step):
            e = min(ix.shape[0], s + step)
            if not torch.equal(x.get_rows(k, s, e).reshape(-1).view(torch.uint8),
                               y.get_rows(k, s, e).reshape(-1).view(torch.uint8)):
                return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "fuse_merge_bench")
    ap.add_argument("--size", choices=sorted(SIZES), default="half_gb")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clean", action="store_true", help="delete the built inputs at the end (default: reuse them)")
    ap.add_argument("--no-import-baseline", dest="import_baseline", action="store_false",
                    help="skip timing each tool's bare python start + imports")
    ap.add_argument("--mergekit-args", default="", help="extra mergekit-yaml options, e.g. '--num-threads 1'")
    args = ap.parse_args()
    root = args.workdir / args.size
    if not (root / "inputs.json").is_file():
        # Build in a child process: a child forked from a parent that just held ~2 GB of inputs
        # would report that parent's RSS as its own peak (ru_maxrss counts the pre-exec image).
        code = f"import sys; sys.argv = ['x']; import runpy; m = runpy.run_path({__file__!r}); " \
               f"m['build_inputs'](__import__('pathlib').Path({str(root)!r}), {args.size!r})"
        subprocess.run([sys.executable, "-c", code], check=True)
    info = build_inputs(root, args.size)
    recipe, mk_cfg = write_configs(root, info)
    fuse_bin = [shutil.which("fuse") or "fuse"]
    mk_bin = shutil.which("mergekit-yaml") or "mergekit-yaml"
    out_f, out_m = root / "out_fuse", root / "out_mergekit"
    # the merge itself against mergekit's: fuse's visual-token alignment check (it builds and runs every
    # vision branch; mergekit has nothing like it) is skipped, as the user can with --no-align-check
    cmds = {"fuse": fuse_bin + ["merge", str(recipe), "-o", str(out_f), "-q", "--no-align-check"],
            "mergekit": [mk_bin, str(mk_cfg), str(out_m), "--quiet", *args.mergekit_args.split()]}
    member_gb = [sum(f.stat().st_size for f in Path(m).glob("*.safetensors")) / 1e9 for m in info["members"]]
    largest = largest_tensor_bytes(info["base"])
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    print(f"inputs: base + 3 members of {', '.join(f'{g:.2f}' for g in member_gb)} GB; "
          f"largest tensor {largest / 2**20:.1f} MiB; method {METHOD}, float32", flush=True)
    for d in [info["base"], *info["members"], *info["llms"]]:  # same page-cache state for both tools
        for f in Path(d).glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
    dry_wall, dry_rss, _ = run_measured(fuse_bin + ["merge", str(recipe), "-o", str(out_f), "--dry-run",
                                                    "--no-align-check"])
    imports = {"fuse": [sys.executable, "-c", "import fuse.cli, fuse.merge.run"],
               "mergekit": [sys.executable, "-c", "import mergekit.scripts.run_yaml"]}
    results: dict[str, list[tuple[float, float]]] = {"fuse": [], "mergekit": []}
    import_s: dict[str, list[float]] = {"fuse": [], "mergekit": []}
    for r in range(args.rounds):
        order = ["fuse", "mergekit"] if r % 2 == 0 else ["mergekit", "fuse"]
        for tool in order:
            shutil.rmtree(out_f if tool == "fuse" else out_m, ignore_errors=True)
            wall, rss, _ = run_measured(cmds[tool])
            results[tool].append((wall, rss))
            imp = run_measured(imports[tool])[0] if args.import_baseline else 0.0
            import_s[tool].append(imp)
            print(f"round {r + 1}  {tool:9s} {wall:7.2f} s  peak RSS {rss:7.1f} MiB"
                  + (f"  (python start + imports alone: {imp:5.2f} s)" if args.import_baseline else ""), flush=True)
    same = identical(out_f / "llm", out_m)
    med = {t: (statistics.median(w for w, _ in v), statistics.median(m for _, m in v)) for t, v in results.items()}
    ratios = [results["fuse"][i][0] / results["mergekit"][i][0] for i in range(args.rounds)]
    rss_ratios = [results["fuse"][i][1] / results["mergekit"][i][1] for i in range(args.rounds)]
    budget = (2 * largest) / 2**20 + 600
    peak = max(m for _, m in results["fuse"])
    print()
    print(f"median wall   fuse {med['fuse'][0]:.2f} s   mergekit {med['mergekit'][0]:.2f} s   "
          f"ratio {statistics.median(ratios):.2f} (per round: {', '.join(f'{x:.2f}' for x in ratios)})")
    if args.import_baseline:
        net = {t: [w - i for (w, _), i in zip(results[t], import_s[t])] for t in results}
        print(f"median wall minus python start + each tool's own imports: "
              f"fuse {statistics.median(net['fuse']):.2f} s   mergekit {statistics.median(net['mergekit']):.2f} s   "
              f"ratio {statistics.median(a / b for a, b in zip(net['fuse'], net['mergekit'])):.2f}")
    print(f"median RSS    fuse {med['fuse'][1]:.0f} MiB   mergekit {med['mergekit'][1]:.0f} MiB   "
          f"ratio {statistics.median(rss_ratios):.2f}")
    print(f"memory target fuse peak {peak:.0f} MiB < 2 x {largest / 2**20:.1f} MiB + 600 MiB = {budget:.0f} MiB: "
          f"{'PASS' if peak < budget else 'FAIL'}  (fuse merge --dry-run alone: {dry_rss:.0f} MiB, {dry_wall:.1f} s)")
    print(f"outputs bit-identical (OUT/llm vs mergekit): {'yes' if same else 'NO'}; "
          f"load average {os.getloadavg()[0]:.1f} at end")
    shutil.rmtree(out_f, ignore_errors=True)
    shutil.rmtree(out_m, ignore_errors=True)
    if args.clean:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
