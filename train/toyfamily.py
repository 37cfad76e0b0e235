"""Re-train the shipped toy family: ``train toy-family -o DIR`` (deterministic for a ``--seed``).

The family is built the way real MLLM families are (LLaVA-1.5, MiniGemini, SliME: Liu et al.
2023, "Improved Baselines with Visual Instruction Tuning", section 4): one pretrained base
LLM; per member, a frozen vision encoder, then

- **stage 1** (``llava`` preset, stage 1): only the projector trains, the base LLM is frozen
  and a higher learning rate is used, so every member's visual tokens are written into the
  *base* LLM's input space;
- **stage 2** (``llava`` preset, stage 2): LLM + projector, briefly, at a small learning rate,
  so each member's LLM stays a small task vector away from the base (what task arithmetic needs).

Steps, in order:

1. the toy world of ``seed`` (:func:`fuse.toyworld.generate`, :data:`fuse.toyfamily.WORLD`);
2. the **base LLM** (:data:`LLM_CONFIG`, the 256-token tokenizer of :func:`fuse.testing.tiny_tokenizer`)
   pretrained on text only (no image ever): the training questions with their answers, once
   without context and once preceded by a text description of the scene with each attribute
   left out at random (:func:`scene_description`). That is the toy's stand-in for a real LLM's
   language competence: it can answer a question about a scene it is told about, and falls back
   to its prior for what it is not told;
3. the members, two stages each on the training split's conversations (:data:`MEMBER_SKILLS`),
   fusion ``clip`` (LLaVA-1.5: layer -2, ``mlp2x_gelu`` projector), frozen randomly initialised
   tiny encoders (:data:`ENCODERS`):

   - ``colour``: CLIP at 28 px, patch 4 (7x7 grid, 49 tokens), RGB: sees hue and which half, not outlines;
     trained on the colour, position and count questions;
   - ``spatial``: CLIP at 84 px, patch 12 (7x7 grid, 49 tokens) whose patch embedding is the same for R, G
     and B (and whose processor uses one mean/std): it sees R+G+B only, so it is colour-blind by
     construction (every toy colour has the same channel sum) and sharp on outlines; trained on the shape
     and orientation questions, stage 2 four times as long (:data:`MEMBER_STAGE2_SCALE`);

   each member records the words of its training questions (``training.question_words``), which the
   recipe's ``abstain: unseen_words`` reads;

4. a **COMM** model (tiny CLIP + DINOv2 at 84 px, COMM fusion, LLM + fusion trained from the base):
   the trained reference of ``fuse toyworld compare``;
5. ``DIR/{base,colour,spatial,comm}`` (float16 weights, tokenizer files) and ``DIR/figures.json``:
   evaluation figures on the family's test split, each member's relative L2 distance of its LLM
   to the base, the visual-token alignment verdict of :mod:`fuse.alignment`, SHA-256 of every
   weight file (the slow test re-trains and compares them) and the wall time of each step.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from fuse.toyfamily import CHECK_LIMIT, EVAL, MEMBERS, WORLD, summarize

VOCAB_SIZE = 256
LLM_CONFIG = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
                  initializer_range=0.08)  # ~1/sqrt(hidden): fine-tunes then stay near the base (relative L2)

_CLIP_COMMON = dict(num_attention_heads=4, hidden_act="quick_gelu", layer_norm_eps=1e-5)
# processors normalise with the world's dark background as the mean (background pixels -> 0, so the
# few object pixels dominate a patch) and one std for every channel
_DARK = {"image_mean": [0.08, 0.08, 0.08], "image_std": [0.3, 0.3, 0.3]}
# encoders: role -> (CLIP/DINOv2 config, processor overrides, channel tying)
ENCODERS: dict[str, dict[str, Any]] = {
    "colour": {"kind": "clip", "config": dict(_CLIP_COMMON, hidden_size=96, intermediate_size=96, image_size=28,
                                              patch_size=4, projection_dim=96, num_hidden_layers=1),
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

# training schedules (steps at global batch 32); chosen on a validation world (seed 4242), see README
BASE_TRAIN = dict(max_steps=600, lr=3e-3, global_batch_size=32)
STAGE1 = dict(max_steps=800, lr=2e-3, global_batch_size=32)   # projector only, base LLM frozen
STAGE2 = dict(max_steps=100, lr=2e-4, global_batch_size=32)   # LLM + projector, small lr, short
COMM_TRAIN = dict(max_steps=1000, lr=1.5e-3, global_batch_size=32)
DESCRIPTION_KEEP = 0.7  # probability that a scene description names a given attribute
# what each member is asked in training (None: every skill) and how much longer its stage 2 runs: each member
# only what its encoder can see. The spatial member's tokens carry shape and orientation, but trained on every
# skill its LLM answered them at the majority class; asked only about them (400 stage-2 steps) it reads them
# (shape 0.91 on validation world 4242). The colour member's 28 px thumbnail shows no outline, so it is not
# asked shape or orientation. Chosen on validation worlds 4242-4246 with inference.abstain: unseen_words (README)
MEMBER_SKILLS: dict[str, tuple[str, ...] | None] = {"colour": ("colour", "position", "count"),
                                                    "spatial": ("shape", "orientation")}
MEMBER_STAGE2_SCALE: dict[str, float] = {"colour": 1.0, "spatial": 4.0}
JOBS = 2  # training processes at once after the base (members and COMM are independent); one torch thread each,
# so the bits depend on the seed only, not on --jobs or the machine's core count


# --- pieces -------------------------------------------------------------------------------------------------

def build_encoder_dir(directory: str | os.PathLike, role: str, seed: int, spec: dict[str, Any] | None = None) -> Path:
    """A frozen, randomly initialised tiny encoder saved as a transformers model dir + preprocessor config.

    ``spec``: an entry shaped like :data:`ENCODERS` (default: ``ENCODERS[role]``), for a variant encoder.
    ``tie_channels``: the patch embedding's 3 input-channel slices are made identical (their mean),
    so with equal per-channel mean/std the encoder sees only R+G+B.
    """
    import torch

    from fuse.encoders import build_encoder

    spec = ENCODERS[role] if spec is None else spec
    torch.manual_seed(seed)
    enc = build_encoder(spec["kind"], config=spec["config"], processor=spec["processor"])
    if spec["tie_channels"]:
        conv = next(m for m in enc.model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels == 3)
        with torch.no_grad():
            w = conv.weight
            w.copy_(w.mean(dim=1, keepdim=True).expand_as(w))
    d = Path(directory)
    enc.model.save_pretrained(str(d))
    enc.processor.save_pretrained(str(d))
    return d


_COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


def scene_description(attributes: dict[str, Any], rng: random.Random, keep: float = DESCRIPTION_KEEP) -> str:
    """A one-line text description of a scene naming each attribute with probability ``keep``
    (e.g. ``two red triangles pointing up on the left``, ``objects on the right``)."""
    count = attributes["count"]
    words = [_COUNT_WORDS[count] if rng.random() < keep else None, attributes["colour"] if rng.random() < keep else None]
    shape = attributes["shape"] if rng.random() < keep else None
    noun = (shape if shape else "object") + ("s" if count != 1 else "")
    text = " ".join(w for w in words + [noun] if w)
    if shape == "triangle" and rng.random() < keep:
        text += f" pointing {attributes['orientation']}"
    if rng.random() < keep:
        text += f" on the {attributes['side']}"
    return text


def text_only_records(records: Sequence[dict]) -> list[dict]:
    """The conversations without their image (and placeholder), de-duplicated: the answer prior."""
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


def base_corpus(records: Sequence[dict], scenes: dict[str, dict], seed: int,
                keep: float = DESCRIPTION_KEEP) -> list[dict]:
    """What the base LLM reads: :func:`text_only_records` plus every conversation with its image
    placeholder replaced by a (partial) text description of the scene."""
    rng = random.Random(f"toy-family-descriptions-{seed}")
    out = text_only_records(records)
    for r in records:
        turns = [dict(t) for t in r["conversations"]]
        desc = scene_description(scenes[r["image"]]["attributes"], rng, keep)
        turns[0]["value"] = turns[0]["value"].replace("<image>", desc)
        out.append({"id": f"{r['id']}-described", "conversations": turns})
    return out


def _train_config(encoders: dict[str, dict], fusion: dict, data: Path, image_root: Path, output_dir: Path,
                  schedule: dict, seed: int, *, preset: str, stage: int, llm: Path | None = None,
                  from_dir: Path | None = None, trainable: list[str] | None = None,
                  save_dtype: str = "float16") -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "stage": stage, "preset": preset, "output_dir": str(output_dir), "force": True,
        "encoders": encoders, "fusion": fusion,
        "data": {"train": str(data), "image_root": str(image_root), "num_workers": 0, "max_length": 256,
                 "template": "chat_template"},
        "per_device_batch_size": schedule["global_batch_size"], "global_batch_size": schedule["global_batch_size"],
        "lr": schedule["lr"], "max_steps": schedule["max_steps"], "warmup_ratio": 0.05, "lr_schedule": "cosine",
        "weight_decay": 0.0, "save_every": None, "progress": False, "log_every": 50, "seed": seed,
        "save_dtype": save_dtype, "mixed_precision": "no",
    }
    if llm is not None:
        cfg["llm"] = str(llm)
    if from_dir is not None:
        cfg["from"] = str(from_dir)
    if trainable is not None:
        cfg["trainable"] = trainable
    return cfg


def _enc_entry(directory: Path) -> dict[str, Any]:
    kind = json.loads((directory / "config.json").read_text()).get("model_type", "clip")
    kind = {"clip_vision_model": "clip", "dinov2": "dinov2"}.get(kind, kind)
    return {"kind": kind, "source": str(directory), "pad_square": False}


def training_question_words(data: Path) -> list[str]:
    """The sorted words of every human turn of a LLaVA-format conversation file (:func:`question_vocabulary`):
    what a member trained on ``data`` was ever asked (``inference.abstain: unseen_words`` reads it)."""
    from fuse.members.text import question_vocabulary

    records = json.loads(Path(data).read_text())
    return question_vocabulary(t["value"] for r in records for t in r["conversations"] if t.get("from") == "human")


def _finalise_member(final: Path, dest: Path, stages: list[dict], data: Path | None = None) -> Path:
    """Copy a trained ``comm`` member dir to ``dest`` with a provenance-only ``training`` block (no temp paths);
    ``data``: the conversations it was trained on, whose question words are recorded (``question_words``)."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(final, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["training"] = {"stages": stages}
    if data is not None:
        cfg["training"]["question_words"] = training_question_words(data)
    for e in cfg.get("encoders", {}).values():
        e["source"] = None  # stored in the checkpoint; the temp dir it came from is gone
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    return dest


def _stage_record(res, schedule: dict, trainable: list[str], preset: str, stage: int) -> dict[str, Any]:
    return {"preset": preset, "stage": stage, "trainable": trainable, "steps": res.step, "lr": schedule["lr"],
            "global_batch_size": schedule["global_batch_size"],
            "final_loss": res.losses[-1] if res.losses else None}


def _export_base(final: Path, dest: Path) -> Path:
    """The base LM as a plain ``LlamaForCausalLM`` dir (LLM part of the text-only run)."""
    from fuse.members import load_member
    from fuse.merge.export import export_llm

    m = load_member(final)
    if dest.exists():
        shutil.rmtree(dest)
    export_llm(m.llm, dest, tokenizer_dir=final)
    eos = m.text.eos_token_ids
    (dest / "generation_config.json").write_text(json.dumps({"eos_token_id": eos if len(eos) != 1 else eos[0]},
                                                            indent=2))
    return dest


def _member_data(train_json: Path, name: str, work: Path) -> Path:
    skills = MEMBER_SKILLS.get(name)
    if skills is None:
        return train_json
    from fuse.toyworld import select_skills

    path = work / f"{name}_train.json"
    path.write_text(json.dumps(select_skills(json.loads(train_json.read_text()), skills)))
    return path


def train_member(name: str, base: Path, encoders: dict[str, dict], data: Path, image_root: Path, work: Path,
                 seed: int, steps_scale: float = 1.0, fusion: dict | None = None, stage1_scale: float = 1.0,
                 stage2_scale: float = 1.0, stage2_lr: float | None = None) -> tuple[Path, list[dict]]:
    """Stage 1 (projector only, base frozen) then stage 2 (LLM + projector) from ``base``;
    returns (the stage-2 output dir, per-stage records). ``stage1_scale`` / ``stage2_scale`` lengthen one
    stage only (a member variant whose projector, or whose LLM, trains longer; the family itself uses 1);
    ``stage2_lr`` replaces stage 2's learning rate (None: the family's)."""
    from train.api import train as run_train

    fusion = fusion or {"type": "clip"}
    s1, s2 = _scaled(STAGE1, steps_scale * stage1_scale), _scaled(STAGE2, steps_scale * stage2_scale)
    if stage2_lr is not None:
        s2 = {**s2, "lr": stage2_lr}
    cfg = _train_config(encoders, fusion, data, image_root, work / "runs" / f"{name}_stage1", s1, seed,
                        preset="llava", stage=1, llm=base, trainable=["fusion"], save_dtype="float32")
    r1 = run_train(cfg)
    cfg = _train_config(encoders, fusion, data, image_root, work / "runs" / f"{name}_stage2", s2, seed,
                        preset="llava", stage=2, from_dir=r1.final_dir, trainable=["fusion", "llm"])
    r2 = run_train(cfg)
    return r2.final_dir, [_stage_record(r1, s1, ["fusion"], "llava", 1), _stage_record(r2, s2, ["fusion", "llm"],
                                                                                          "llava", 2)]


def _train_family_member(name: str, base: Path, encoders: dict[str, dict], data: Path, image_root: Path, work: Path,
                         seed: int, steps_scale: float = 1.0) -> tuple[Path, list[dict]]:
    """:func:`train_member` with the family's own stage-2 length for ``name`` (:data:`MEMBER_STAGE2_SCALE`)."""
    return train_member(name, base, encoders, data, image_root, work, seed, steps_scale,
                        stage2_scale=MEMBER_STAGE2_SCALE.get(name, 1.0))


def train_comm_model(base: Path, encoders: dict[str, dict], data: Path, image_root: Path, work: Path, seed: int,
                     steps_scale: float = 1.0) -> tuple[Path, list[dict]]:
    """The COMM reference: CLIP + DINOv2, COMM fusion, LLM + fusion trained from the base in one stage."""
    from train.api import train as run_train

    cs = _scaled(COMM_TRAIN, steps_scale)
    fusion = {"type": "comm", "layers": {"clip": "all", "dinov2": "all"}, "mlp_ratio": 2}
    cfg = _train_config(encoders, fusion, data, image_root, work / "runs" / "comm", cs, seed, preset="comm",
                        stage=1, llm=base, trainable=["fusion", "llm"])
    res = run_train(cfg)
    return res.final_dir, [_stage_record(res, cs, ["fusion", "llm"], "comm", 1)]


def _scaled(schedule: dict, steps_scale: float) -> dict:
    return {**schedule, "max_steps": max(1, int(round(schedule["max_steps"] * steps_scale)))}


def _run_job(job: tuple[str, Callable, tuple]) -> tuple[str, Path, list[dict], float]:
    """One training job in this process, on one torch thread (the same bits in a worker or in-process)."""
    import torch
    from transformers.utils import logging as hf_logging

    name, fn, args = job
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()  # stage 2 reads the LLM out of a member dir: transformers lists its other keys
    t0 = time.perf_counter()
    final, stages = fn(*args)
    return name, final, stages, time.perf_counter() - t0


def _run_jobs(jobs: list[tuple[str, Callable, tuple]], n_procs: int):
    """Yield each job's result as it finishes: in worker processes (spawned) when ``n_procs > 1``."""
    if n_procs <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield _run_job(job)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=min(n_procs, len(jobs)), mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_run_job, job) for job in jobs]
        for f in as_completed(futures):
            yield f.result()


# --- the whole run ----------------------------------------------------------------------------------------

def train_family(out: str | os.PathLike, seed: int = 0, work: str | os.PathLike | None = None,
                 steps_scale: float = 1.0, jobs: int = JOBS, world: dict | None = None,
                 echo=print) -> dict[str, Any]:
    """Generate the world, train base + members + COMM into ``out``; returns figures.json's content.

    After the base LLM, the members and COMM train in ``jobs`` processes at once. ``steps_scale`` and
    ``world`` (toy-world sizes, default :data:`fuse.toyfamily.WORLD`) are for quick trials and tests;
    the shipped family uses the defaults."""
    import torch
    from transformers.utils import logging as hf_logging

    saved_threads, verbosity = torch.get_num_threads(), hf_logging.get_verbosity()
    try:
        return _train_family(Path(out), seed, work, steps_scale, jobs, world, echo)
    finally:
        torch.set_num_threads(saved_threads)
        hf_logging.set_verbosity(verbosity)


def _train_family(out: Path, seed: int, work: str | os.PathLike | None, steps_scale: float, jobs: int,
                  world: dict | None, echo) -> dict[str, Any]:
    from fuse.toyworld import generate

    work = Path(work) if work is not None else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t_start = time.perf_counter()

    t0 = time.perf_counter()
    world_spec = {**WORLD, **(world or {})}
    world = work / "world"
    generate(world, seed=seed, force=True, **world_spec)
    train_json, image_root = world / "train" / "llava.json", world / "train"
    enc_dirs = build_encoder_dirs(work, seed)
    times["world_s"] = time.perf_counter() - t0

    base_sched = _scaled(BASE_TRAIN, steps_scale)
    base, base_stages, times["base_s"] = pretrain_base(world, work, out / "base", seed, base_sched, enc_dirs["colour"])
    losses: dict[str, Any] = {"base": base_stages[0]["final_loss"]}
    echo(f"base LLM: {base_stages[0]['conversations']} text conversations, {base_stages[0]['steps']} steps, loss "
         f"{base_stages[0]['final_loss']:.3f} ({times['base_s']:.0f} s)")

    data = {name: _member_data(train_json, name, work) for name in MEMBERS}
    data["comm"] = train_json
    todo = [(name, _train_family_member, (name, base, {"clip": _enc_entry(enc_dirs[name])}, data[name], image_root,
                                          work, seed, steps_scale))
            for name in MEMBERS]
    todo.append(("comm", train_comm_model, (base, {"clip": _enc_entry(enc_dirs["comm_clip"]),
                                                   "dinov2": _enc_entry(enc_dirs["comm_dinov2"])},
                                            train_json, image_root, work, seed, steps_scale)))
    t0 = time.perf_counter()
    provenance: dict[str, Any] = {}
    for name, final, stages, secs in _run_jobs(todo, jobs):
        _finalise_member(final, out / name, stages, data[name])
        times[f"{name}_s"] = secs
        losses[name] = [st["final_loss"] for st in stages]
        provenance[name] = stages
        if name == "comm":
            echo(f"comm: {stages[0]['steps']} steps, loss {stages[0]['final_loss']:.3f} ({secs:.0f} s)")
        else:
            echo(f"{name}: stage 1 (projector, base frozen) {stages[0]['steps']} steps loss "
                 f"{stages[0]['final_loss']:.3f}, stage 2 (LLM + projector) {stages[1]['steps']} steps loss "
                 f"{stages[1]['final_loss']:.3f} ({secs:.0f} s)")
    times["members_and_comm_wall_s"] = time.perf_counter() - t0

    figures: dict[str, Any] = {
        "seed": seed, "world": {**world_spec, "seed": seed}, "llm_config": LLM_CONFIG,
        "schedules": {"base": base_sched, "stage1": _scaled(STAGE1, steps_scale),
                      "stage2": _scaled(STAGE2, steps_scale), "comm": _scaled(COMM_TRAIN, steps_scale)},
        "description_keep": DESCRIPTION_KEEP, "member_skills": MEMBER_SKILLS,
        "member_stage2_scale": MEMBER_STAGE2_SCALE, "jobs": jobs,
        "final_loss": losses, "train_seconds": {k: round(v, 1) for k, v in times.items()},
        "train_seconds_wall": round(time.perf_counter() - t_start, 1), "load_average": _load_average(),
    }
    t0 = time.perf_counter()
    figures.update(measure_figures(out, world / "test"))
    figures["premise"] = premise_figures(out, world / "test", echo=echo)
    figures["eval_seconds"] = round(time.perf_counter() - t0, 1)
    figures["sha256"] = weight_digests(out)
    (out / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def build_encoder_dirs(work: Path, seed: int, roles: Sequence[str] | None = None) -> dict[str, Path]:
    """The frozen encoders of ``roles`` (default: every role of :data:`ENCODERS`) under ``work/encoders``,
    each seeded ``seed * 1000 + its index in ENCODERS`` (so a role's encoder does not depend on which
    other roles are built)."""
    index = {r: i for i, r in enumerate(ENCODERS)}
    return {r: build_encoder_dir(work / "encoders" / r, r, seed * 1000 + index[r]) for r in (roles or ENCODERS)}


def pretrain_base(world: Path, work: Path, dest: Path, seed: int, schedule: dict, encoder: Path,
                  llm_config: dict[str, Any] | None = None) -> tuple[Path, list[dict], float]:
    """The base LLM (``llm_config``, default :data:`LLM_CONFIG`) pretrained on text only, questions alone and
    after a partial scene description (:func:`base_corpus` of ``world``'s training split), exported to ``dest``
    as a plain LLaMA dir; returns (``dest``, the stage records with the corpus size, seconds). ``encoder``:
    configured for the run but never used, since no record has an image."""
    from fuse.testing import build_base_llm

    train_json, image_root = world / "train" / "llava.json", world / "train"
    records = json.loads(train_json.read_text())
    scenes = {s["image"]: s for s in map(json.loads, (image_root / "scenes.jsonl").read_text().splitlines())}
    init = build_base_llm(work / "base_init", seed=seed, vocab_size=VOCAB_SIZE, **(llm_config or LLM_CONFIG))
    corpus = base_corpus(records, scenes, seed)
    text_json = work / "base_text.json"
    text_json.write_text(json.dumps(corpus))
    _, final, stages, secs = _run_job(("base", _train_base, (init, {"clip": _enc_entry(encoder)}, text_json,
                                                             image_root, work, seed, schedule)))
    stages[0]["conversations"] = len(corpus)
    return _export_base(final, dest), stages, secs


def _train_base(init: Path, encoders: dict[str, dict], data: Path, image_root: Path, work: Path, seed: int,
                schedule: dict) -> tuple[Path, list[dict]]:
    """The base LLM on text records (an encoder is configured but no record has an image)."""
    from train.api import train as run_train

    cfg = _train_config(encoders, {"type": "clip"}, data, image_root, work / "runs" / "base", schedule, seed,
                        preset="comm", stage=1, llm=init, trainable=["llm"])
    res = run_train(cfg)
    return res.final_dir, [_stage_record(res, schedule, ["llm"], "comm", 1)]


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


def weight_digests(family: Path) -> dict[str, str]:
    """SHA-256 of every model's weight file (what a re-training with the same seed must reproduce)."""
    return {f"{name}/model.safetensors": hashlib.sha256((family / name / "model.safetensors").read_bytes()).hexdigest()
            for name in ("base",) + tuple(MEMBERS) + ("comm",)}


# --- evidence and evaluation figures ----------------------------------------------------------------------

def relative_distance(base: Path, member: Path) -> float:
    """Relative L2 distance ``|theta_m - theta_base| / |theta_base|`` over every LLM tensor."""
    import torch

    from fuse.checkpoint import LazyCheckpoint
    from fuse.members import load_member

    b = LazyCheckpoint(base)
    m = load_member(member, vision=False)
    num = den = 0.0
    for k in b.keys():
        t = b.get(k).double()
        num += float((m.llm.get(k, torch.float64) - t).pow(2).sum())
        den += float(t.pow(2).sum())
    return (num / den) ** 0.5


def premise_figures(family: Path, test_dir: Path, n_images: int = 64, echo=print) -> dict[str, Any]:
    """The two facts VisionFuse relies on: each member's LLM is close to the base (relative L2), and the
    members' visual tokens share the base LLM's input space (:func:`fuse.alignment.alignment_verdict`)."""
    import torch

    from fuse.alignment import alignment_verdict
    from fuse.images import load_image
    from fuse.members import load_member

    dist = {name: relative_distance(family / "base", family / name) for name in MEMBERS}
    for name, d in dist.items():
        echo(f"{name}: relative L2 distance of its LLM to the base {d:.4f}")
    images = [load_image(p) for p in sorted((test_dir / "images").glob("*.png"), key=lambda p: int(p.stem))[:n_images]]
    branches = {name: load_member(family / name, dtype=torch.float32).vision for name in MEMBERS}
    verdict = alignment_verdict(branches, images)
    for line in verdict.lines():
        echo(line)
    return {"relative_l2_to_base": dist, "alignment": verdict.to_dict()}


def _eval(model_dir: Path, test_dir: Path, limit: int | None) -> dict[str, Any]:
    import torch

    from fuse.eval import EvalConfig, evaluate
    from fuse.eval.loader import load_for_eval

    m = load_for_eval(model_dir, dtype=torch.float32)
    return evaluate(m, "toy", test_dir, EvalConfig(limit=limit, **EVAL), model_name=model_dir.name, progress=False)


def measure_figures(family: Path, test_dir: Path) -> dict[str, Any]:
    """Full-test figures of every trained model, plus the small exact check the tests reproduce."""
    full, check = {}, {}
    for name in tuple(MEMBERS) + ("comm",):
        full[name] = summarize(_eval(family / name, test_dir, None))
        r = _eval(family / name, test_dir, CHECK_LIMIT)
        check[name] = {"metrics": r["metrics"], "breakdown": r["breakdown"]}
    return {"eval": {"config": EVAL, "test": "toy world test split (all questions)", "rows": full},
            "check": {"limit": CHECK_LIMIT, "config": EVAL, "rows": check}}


__all__ = ["BASE_TRAIN", "COMM_TRAIN", "ENCODERS", "JOBS", "LLM_CONFIG", "STAGE1", "STAGE2", "base_corpus",
           "build_encoder_dir", "build_encoder_dirs", "premise_figures", "pretrain_base", "relative_distance",
           "scene_description", "train_comm_model", "train_family", "train_member", "weight_digests"]
