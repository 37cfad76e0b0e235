"""The shipped toy family: a tiny base LLM and members trained with ``train`` on the toy world.

What ``python -m fuse.toyfamily train --out DIR`` (or ``fuse toyworld train-family``) does,
deterministically for a given ``--seed``:

1. generates the toy world (:mod:`fuse.toyworld`, fixed seed) into ``DIR/work/world``;
2. pretrains a tiny base LLaMA (:data:`LLM_CONFIG`, the 256-token tokenizer of
   :func:`fuse.testing.tiny_tokenizer`) on the *text* of the training conversations (no
   images: the base learns the chat template, the questions and the answer vocabulary),
   with ``train`` (``trainable: [llm]``), then exports its LLM as a plain ``LlamaForCausalLM``;
3. fine-tunes two members from that base with ``train.api.train_comm``, fusion ``clip``
   (LLaVA-1.5: one encoder, layer -2, ``mlp2x_gelu`` projector; LLM + projector trained,
   encoder frozen at its random init; the encoders have one block, so layer -2 is the normalised
   patch embedding, and their processors use the world's dark background as the mean: with
   ImageNet/CLIP statistics the few object pixels were ~1% of a token and nothing was learnt):

   - ``colour``: a tiny CLIP at 28 px, patch 7 (4x4 grid), ordinary RGB normalisation:
     sees hue and which half an object is in, but not outlines;
   - ``spatial``: a tiny CLIP at the full 84 px, patch 12 (7x7 grid) whose patch embedding
     is the *same* for the 3 input channels and whose processor uses one mean/std for all
     channels, so its input is a function of R+G+B only: colour-blind by construction (all
     toy-world colours have the same channel sum), sharp on shape/count/orientation;

4. trains a ``comm`` model (tiny CLIP + tiny DINOv2 at 84 px, COMM fusion) on the same data;
5. writes ``DIR/{base,colour,spatial,comm}`` (float16 weights, tokenizer files) and
   ``DIR/figures.json`` (eval figures of the written weights on the toy test split).

The family shipped in ``fuse/assets/toy_family`` was made by this module with seed 0;
:func:`compare` (``fuse toyworld compare``) merges it with several methods and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ASSETS = Path(__file__).resolve().parent / "assets" / "toy_family"
MEMBERS = ("colour", "spatial")
MODELS = ("base", "colour", "spatial", "comm")
VOCAB_SIZE = 256

# the world (sizes are numbers of images; images come in pairs)
WORLD = dict(n_train=2000, n_test=300, size=84, mc_answer="text")

LLM_CONFIG = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
                  initializer_range=0.08)  # ~1/sqrt(hidden): fine-tunes then stay near the base (relative L2)

_CLIP_COMMON = dict(num_attention_heads=4, hidden_act="quick_gelu", layer_norm_eps=1e-5)
# processors normalise with the world's dark background as the mean (background pixels -> 0, so the
# few object pixels dominate a patch) and one std for every channel
_DARK = {"image_mean": [0.08, 0.08, 0.08], "image_std": [0.3, 0.3, 0.3]}
# encoders: role -> (CLIP/DINOv2 config, processor overrides)
ENCODERS: dict[str, dict[str, Any]] = {
    "colour": {"kind": "clip", "config": dict(_CLIP_COMMON, hidden_size=96, intermediate_size=96, image_size=28,
                                              patch_size=7, projection_dim=96, num_hidden_layers=1),
               "processor": _DARK, "tie_channels": False},
    "spatial": {"kind": "clip", "config": dict(_CLIP_COMMON, hidden_size=144, intermediate_size=144, image_size=84,
                                               patch_size=12, projection_dim=144, num_hidden_layers=1),
                "processor": _DARK, "tie_channels": True},
    "comm_clip": {"kind": "clip", "config": dict(_CLIP_COMMON, hidden_size=64, intermediate_size=128, image_size=84,
                                                 patch_size=12, projection_dim=64, num_hidden_layers=2),
                  "processor": _DARK, "tie_channels": False},
    "comm_dinov2": {"kind": "dinov2", "config": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                     num_attention_heads=4, patch_size=12, image_size=84,
                                                     layer_norm_eps=1e-6),
                    "processor": _DARK, "tie_channels": False},
}

# training schedules (steps at global batch 32; CPU minutes measured on 2 shared cores in figures.json)
BASE_TRAIN = dict(max_steps=300, lr=3e-3, global_batch_size=32)
MEMBER_TRAIN = dict(max_steps=1000, lr=1.5e-3, global_batch_size=32)
COMM_TRAIN = dict(max_steps=1000, lr=1.5e-3, global_batch_size=32)

# evaluation used for figures.json (and reproduced by the tests)
EVAL = dict(batch_size=32, max_new_tokens=6)
CHECK_LIMIT = 24  # questions per part of the small re-evaluation that tests reproduce exactly


# --- pieces -------------------------------------------------------------------------------------------------

def build_encoder_dir(directory: str | os.PathLike, role: str, seed: int) -> Path:
    """A frozen, randomly initialised tiny encoder saved as a transformers model dir + preprocessor config.

    ``tie_channels``: the patch embedding's 3 input-channel slices are made identical (their mean),
    so with equal per-channel mean/std the encoder sees only R+G+B.
    """
    import torch

    from .encoders import build_encoder

    spec = ENCODERS[role]
    torch.manual_seed(seed)
    enc = build_encoder(spec["kind"], config=spec["config"], processor=spec["processor"])
    if spec["tie_channels"]:
        emb = enc.model.get_input_embeddings() if hasattr(enc.model, "get_input_embeddings") else None
        conv = emb if isinstance(emb, torch.nn.Conv2d) else _patch_conv(enc.model)
        with torch.no_grad():
            w = conv.weight
            w.copy_(w.mean(dim=1, keepdim=True).expand_as(w))
    scale = spec.get("feature_scale")
    if scale is not None:  # shrink the embeddings' LayerNorm so features (and the projector's first output) are small
        with torch.no_grad():
            ln = _pre_norm(enc.model)
            ln.weight.mul_(scale)
    d = Path(directory)
    enc.model.save_pretrained(str(d))
    enc.processor.save_pretrained(str(d))
    return d


def _pre_norm(model) -> "torch.nn.LayerNorm":  # noqa: F821
    for name, m in model.named_modules():
        if name.endswith("pre_layrnorm"):
            return m
    raise RuntimeError("no pre_layrnorm in the encoder")


def _patch_conv(model) -> "torch.nn.Conv2d":  # noqa: F821
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.in_channels == 3:
            return m
    raise RuntimeError("no 3-channel patch embedding found")


def text_only_records(records: Sequence[dict]) -> list[dict]:
    """The conversations without their image (and placeholder), de-duplicated: what the base LM reads."""
    out, seen = [], set()
    for r in records:
        turns = [dict(t) for t in r["conversations"]]
        turns[0]["value"] = turns[0]["value"].replace("<image>\n", "").replace("<image>", "").strip()
        key = tuple(t["value"] for t in turns)
        if key in seen:
            continue
        seen.add(key)
        out.append({"id": r["id"], "conversations": turns})
    return out


def _train_config(llm: str | os.PathLike, encoders: dict[str, dict], fusion: dict, data: Path, image_root: Path,
                  output_dir: Path, schedule: dict, seed: int, trainable: list[str]) -> dict[str, Any]:
    return {
        "stage": 1, "preset": "comm", "llm": str(llm), "output_dir": str(output_dir), "force": True,
        "encoders": encoders, "fusion": fusion, "trainable": trainable,
        "data": {"train": str(data), "image_root": str(image_root), "num_workers": 0, "max_length": 256,
                 "template": "chat_template"},
        "per_device_batch_size": schedule["global_batch_size"], "global_batch_size": schedule["global_batch_size"],
        "lr": schedule["lr"], "max_steps": schedule["max_steps"], "warmup_ratio": 0.05, "lr_schedule": "cosine",
        "weight_decay": 0.0, "save_every": None, "progress": False, "log_every": 50, "seed": seed,
        "save_dtype": "float16", "mixed_precision": "no",
    }


def _enc_entry(directory: Path) -> dict[str, Any]:
    kind = json.loads((directory / "config.json").read_text()).get("model_type", "clip")
    kind = {"clip_vision_model": "clip", "dinov2": "dinov2"}.get(kind, kind)
    return {"kind": kind, "source": str(directory), "pad_square": False}


def _finalise_member(final: Path, dest: Path) -> Path:
    """Copy a trained ``comm`` member dir to ``dest`` with a provenance-only ``training`` block (no temp paths)."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(final, dest)
    cfg = json.loads((dest / "config.json").read_text())
    tr = cfg.get("training") or {}
    cfg["training"] = {k: tr.get(k) for k in ("stage", "preset", "steps", "global_batch_size", "lr", "trainable",
                                               "final_loss")}
    for e in cfg.get("encoders", {}).values():
        e["source"] = None  # stored in the checkpoint; the temp dir it came from is gone
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    return dest


def _export_base(final: Path, dest: Path) -> Path:
    """The base LM as a plain ``LlamaForCausalLM`` dir (LLM part of the text-only run)."""
    from .members import load_member
    from .merge.export import export_llm

    m = load_member(final)
    if dest.exists():
        shutil.rmtree(dest)
    export_llm(m.llm, dest, tokenizer_dir=final)
    eos = m.text.eos_token_ids
    (dest / "generation_config.json").write_text(json.dumps({"eos_token_id": eos if len(eos) != 1 else eos[0]},
                                                            indent=2))
    return dest


# --- the whole run ----------------------------------------------------------------------------------------

def train_family(out: str | os.PathLike, seed: int = 0, work: str | os.PathLike | None = None,
                 steps_scale: float = 1.0, echo=print, force: bool = False, keep_work: bool = True) -> dict[str, Any]:
    """Generate the world, train base + members + comm into ``out`` (atomically: a temp dir renamed at
    the end; an existing ``out`` needs ``force``); returns figures.json's content.
    ``work``: scratch dir (default ``out/work``, dropped before the rename unless ``keep_work``)."""
    from .output_dir import atomic_output_dir

    with atomic_output_dir(out, force=force) as tmp:
        scratch = Path(work) if work is not None else tmp / "work"
        figures = _train_family(tmp, seed, scratch, steps_scale, echo)
        if work is None and not keep_work:
            shutil.rmtree(scratch)
    return figures


def _train_family(out: Path, seed: int, work: Path, steps_scale: float, echo) -> dict[str, Any]:
    from train.api import train as run_train

    from .testing import build_base_llm
    from .toyworld import generate

    work.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    def sched(s: dict) -> dict:
        return {**s, "max_steps": max(1, int(round(s["max_steps"] * steps_scale)))}

    t0 = time.perf_counter()
    world = work / "world"
    generate(world, seed=seed, force=True, **WORLD)
    train_json, image_root = world / "train" / "llava.json", world / "train"
    records = json.loads(train_json.read_text())
    times["world_s"] = time.perf_counter() - t0

    enc_dirs = {r: build_encoder_dir(work / "encoders" / r, r, seed * 1000 + i) for i, r in enumerate(ENCODERS)}

    # base LM: text only
    t0 = time.perf_counter()
    init = build_base_llm(work / "base_init", seed=seed, vocab_size=VOCAB_SIZE, **LLM_CONFIG)
    text_json = work / "text_only.json"
    text_json.write_text(json.dumps(text_only_records(records)))
    cfg = _train_config(init, {"clip": _enc_entry(enc_dirs["colour"])}, {"type": "clip"}, text_json, image_root,
                        work / "runs" / "base", sched(BASE_TRAIN), seed, ["llm"])
    res = run_train(cfg)
    base = _export_base(res.final_dir, out / "base")
    times["base_s"] = time.perf_counter() - t0
    echo(f"base: {res.step} steps, loss {res.losses[-1]:.3f} ({times['base_s']:.0f} s)")
    losses = {"base": res.losses[-1]}

    runs = {
        "colour": ({"clip": _enc_entry(enc_dirs["colour"])}, {"type": "clip"}, MEMBER_TRAIN),
        "spatial": ({"clip": _enc_entry(enc_dirs["spatial"])}, {"type": "clip"}, MEMBER_TRAIN),
        "comm": ({"clip": _enc_entry(enc_dirs["comm_clip"]), "dinov2": _enc_entry(enc_dirs["comm_dinov2"])},
                 {"type": "comm", "layers": {"clip": "all", "dinov2": "all"}, "mlp_ratio": 2}, COMM_TRAIN),
    }
    for name, (encs, fusion, schedule) in runs.items():
        t0 = time.perf_counter()
        cfg = _train_config(base, encs, fusion, train_json, image_root, work / "runs" / name, sched(schedule), seed,
                            ["fusion", "llm"])
        res = run_train(cfg)
        _finalise_member(res.final_dir, out / name)
        times[f"{name}_s"] = time.perf_counter() - t0
        losses[name] = res.losses[-1]
        echo(f"{name}: {res.step} steps, loss {res.losses[-1]:.3f} ({times[name + '_s']:.0f} s)")

    figures = {"seed": seed, "world": {**WORLD, "seed": seed}, "llm_config": LLM_CONFIG,
               "schedules": {"base": sched(BASE_TRAIN), "members": sched(MEMBER_TRAIN), "comm": sched(COMM_TRAIN)},
               "final_loss": losses, "train_seconds": {k: round(v, 1) for k, v in times.items()},
               "train_seconds_total": round(sum(times.values()), 1)}
    t0 = time.perf_counter()
    figures.update(measure_figures(out, world / "test"))
    figures["eval_seconds"] = round(time.perf_counter() - t0, 1)
    (out / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures


# --- evaluation figures -----------------------------------------------------------------------------------

def _eval(model_dir: Path, test_dir: Path, limit: int | None) -> dict[str, Any]:
    import torch

    from .eval import EvalConfig, evaluate
    from .eval.loader import load_for_eval

    m = load_for_eval(model_dir, dtype=torch.float32)
    return evaluate(m, "toy", test_dir, EvalConfig(limit=limit, **EVAL), model_name=model_dir.name, progress=False)


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Table row of a toy-task result: per-skill accuracy, overall VQA, POPE, MMVP (question / pair)."""
    from .toyworld import SKILLS

    m, b = results["metrics"], results["breakdown"]
    row: dict[str, Any] = {}
    for s in SKILLS:
        cm = (b.get("vqa") or {}).get(s) or {}
        row[s] = cm.get("exact_match", cm.get(results["primary"]["vqa"]))
    row["vqa"] = m["vqa"].get("exact_match")
    row["pope_acc"] = m["pope"].get("accuracy")
    row["mmvp_q"] = m["mmvp"].get("accuracy")
    row["mmvp_pair"] = m["mmvp"].get("pair_accuracy")
    row["n"] = results["n"]
    row["samples_per_s"] = results["timing"]["samples_per_s"]
    return row


def measure_figures(family: Path, test_dir: Path) -> dict[str, Any]:
    """Full-test figures of every trained model, plus the small exact check the tests reproduce."""
    full, check = {}, {}
    for name in ("colour", "spatial", "comm"):
        full[name] = summarize(_eval(family / name, test_dir, None))
        check[name] = _check_record(_eval(family / name, test_dir, CHECK_LIMIT))
    return {"eval": {"config": EVAL, "test": "toy world test split (all questions)", "rows": full},
            "check": {"limit": CHECK_LIMIT, "config": EVAL, "rows": check}}


def _check_record(results: dict[str, Any]) -> dict[str, Any]:
    """Deterministic part of a result (metrics + breakdown, no timing)."""
    return {"metrics": results["metrics"], "breakdown": results["breakdown"]}


# --- merge + compare (the README's main-job command) ------------------------------------------------------

# recipes/toy_family.yaml holds the same (tests check they agree)
RECIPE: dict[str, Any] = {
    "base_model": "base",
    "members": [{"model": "colour", "weight": 0.5, "name": "colour"},
                {"model": "spatial", "weight": 0.5, "name": "spatial"}],
    "merge": {"method": "task_arithmetic", "dtype": "float32"},
    "text": {"member": "colour"},
    "inference": {},
}
METHODS = ("task_arithmetic", "ties", "linear")
TIES_DENSITY = 0.5
BUDGET = "pool:2"
COLUMNS = ("colour", "position", "count", "shape", "orientation", "vqa", "pope_acc", "mmvp_pair", "samples_per_s")
DEFAULT_LIMIT = 160  # questions per part (vqa, pope, mmvp) in `fuse toyworld compare`


def family_recipe(family: str | os.PathLike = ASSETS, method: str = "task_arithmetic", out: str | os.PathLike = "fused",
                  inference: dict | None = None):
    """The toy-family recipe (:data:`RECIPE`) with ``method`` / ``inference``, paths under ``family``."""
    from .recipe import parse_recipe

    data = copy.deepcopy(RECIPE)
    data["merge"]["method"] = method
    if method == "ties":
        for m in data["members"]:
            m["density"] = TIES_DENSITY
    if inference:
        data["inference"] = dict(inference)
    data["output"] = {"dir": str(Path(out).resolve())}
    return parse_recipe(data, source=f"toy_family[{method}]", root=Path(family))


def write_test_split(directory: str | os.PathLike, seed: int = 0) -> Path:
    """The toy world's test split exactly as :func:`fuse.toyworld.generate` writes it (same exclusions),
    without writing the training split. Returns the split dir."""
    import hashlib

    from .output_dir import atomic_output_dir
    from .toyworld import build_split, write_split

    size, mc = WORLD["size"], WORLD["mc_answer"]
    train = build_split("train", WORLD["n_train"] // 2, seed, size, mc)
    seen = {hashlib.sha256(b).hexdigest() for b in train.images}
    test = build_split("test", WORLD["n_test"] // 2, seed, size, mc, exclude=seen)
    with atomic_output_dir(directory) as tmp:
        write_split(test, tmp)
    return Path(directory)


def compare(out: str | os.PathLike = "out/toy_compare", family: str | os.PathLike = ASSETS,
            limit: int | None = DEFAULT_LIMIT, methods: Sequence[str] = METHODS, budget: str | None = BUDGET,
            models: Sequence[str] | None = None, batch_size: int = EVAL["batch_size"], echo=print,
            progress: bool = False, force: bool = False) -> dict[str, Any]:
    """Merge the toy family (each method), evaluate members, fused models and COMM on the test split.

    Writes ``out/test`` (the split), ``out/fused-<method>`` (merge outputs) and ``out/compare.json``,
    atomically: everything goes to a temp dir renamed to ``out`` at the end; an existing ``out`` needs
    ``force`` (and is replaced only if an earlier run of this toolkit wrote it). Returns the JSON
    document (``rows``: model -> :data:`COLUMNS` figures; paths name ``out``, not the temp dir).
    """
    from .output_dir import atomic_output_dir

    with atomic_output_dir(out, force=force) as tmp:
        doc = _compare(tmp, Path(family), limit, methods, budget, models, batch_size, echo, progress)
        doc["test"] = str(Path(out) / "test")
        from .eval.runner import write_results

        write_results(doc, tmp / "compare.json")
    return doc


def _compare(out: Path, family: Path, limit: int | None, methods: Sequence[str], budget: str | None,
             models: Sequence[str] | None, batch_size: int, echo, progress: bool) -> dict[str, Any]:
    import torch

    from .eval import EvalConfig, evaluate
    from .eval.loader import load_for_eval
    from .merge import run_merge

    t_all = time.perf_counter()
    figures = json.loads((family / "figures.json").read_text()) if (family / "figures.json").is_file() else {}
    seed = int(figures.get("seed", 0))
    test = write_test_split(out / "test", seed)
    jobs: list[tuple[str, Path]] = []
    for name in MEMBERS:
        jobs.append((name, family / name))
    merge_s = 0.0
    fused_specs = [(f"fused:{m}", m, None) for m in methods]
    if budget and "task_arithmetic" in methods:
        fused_specs.append((f"fused:task_arithmetic+{budget}", "task_arithmetic", {"token_budget": budget}))
    for label, method, inference in fused_specs:
        if models is not None and label not in models:
            continue
        tag = label.split(":", 1)[1].replace("+", "_").replace(":", "")
        recipe = family_recipe(family, method, out / f"fused-{tag}", inference)
        t0 = time.perf_counter()
        run_merge(recipe, progress=False, checksums=False, echo=lambda *a, **k: None)
        merge_s += time.perf_counter() - t0
        jobs.append((label, Path(recipe.output.dir)))
    jobs.append(("comm", family / "comm"))
    if models is not None:
        jobs = [j for j in jobs if j[0] in models]
    cfg = EvalConfig(limit=limit, batch_size=batch_size, max_new_tokens=EVAL["max_new_tokens"])
    rows: dict[str, dict[str, Any]] = {}
    echo(format_header())
    for label, path in jobs:
        m = load_for_eval(path, dtype=torch.float32)
        res = evaluate(m, "toy", test, cfg, model_name=label, progress=progress)
        rows[label] = summarize(res)
        echo(format_row(label, rows[label]))
    doc = {"family": str(family), "test": str(test), "limit_per_part": limit, "eval": {**EVAL, "batch_size": batch_size},
           "ties_density": TIES_DENSITY, "columns": list(COLUMNS), "rows": rows,
           "merge_seconds": round(merge_s, 2), "total_seconds": round(time.perf_counter() - t_all, 1)}
    return doc


def format_header() -> str:
    return f"{'model':34s} " + " ".join(f"{c[:11]:>11s}" for c in COLUMNS)


def format_row(label: str, row: dict[str, Any]) -> str:
    cells = []
    for c in COLUMNS:
        v = row.get(c)
        cells.append(f"{v:11.1f}" if c == "samples_per_s" and v is not None else
                     f"{v:11.3f}" if isinstance(v, float) else f"{str(v):>11s}")
    return f"{label:34s} " + " ".join(cells)


def format_table(doc: dict[str, Any]) -> str:
    return "\n".join([format_header()] + [format_row(k, r) for k, r in doc["rows"].items()])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fuse.toyfamily", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="Generate the toy world and train base, members and COMM into --out.")
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--work", default=None, help="Scratch dir (default OUT/work, removed at the end unless --keep).")
    t.add_argument("--keep", action="store_true", help="Keep OUT/work.")
    t.add_argument("--force", action="store_true", help="Replace an earlier output of this command.")
    t.add_argument("--steps-scale", type=float, default=1.0, help="Scale every schedule (quick trials).")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    figures = train_family(args.out, seed=args.seed, work=args.work, steps_scale=args.steps_scale,
                           force=args.force, keep_work=args.keep)
    print(json.dumps(figures["eval"]["rows"], indent=1))
    print(f"done in {time.perf_counter() - t0:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
