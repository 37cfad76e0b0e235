"""Toy-family member variants: does a different member make training-free fusion beat its members?

Issue 12 asks the fused toy family to beat its best member by 0.03 with every skill at >= 0.9x the best
member's. The shipped family reaches +0.00..+0.04 and loses count (0.83-0.94x): the fused model reads a
mixture of the two members' counts. This script re-trains one member variant at a time from the shipped
base LLM (the same two stages, schedules, seeds and training world as ``train toy-family``), merges it
with the other shipped member(s) as ``recipes/toy_family.yaml`` does (task_arithmetic, weight 1/n each,
``member_positions: parallel``) and evaluates members and fused model on a *validation* world (seed 4242
by default: never a test world of the README's tables).

    python benchmarks/toy_member_variants.py                      # every variant, ~6 min training each
    python benchmarks/toy_member_variants.py --variants colour-4-tokens -j 1
    python benchmarks/toy_member_variants.py --variants shared-colour-main --reuse --weights 0,1  # unmerged LLM
    python benchmarks/toy_member_variants.py --variants spatial-stage1x4 --select confidence:members [--seed N]

A variant may replace both members (a *family*, :data:`FAMILIES`), and a member may get a **shared main
encoder**: the same frozen encoder (same seed) in every member of the family, with the member's own encoder
as a second branch, both channel-concatenated before the projector (``channel_concat`` fusion). That is how
MGM-8B and SliME-8B are built (one frozen CLIP ViT-L/14-336 plus a private branch each), and it is what
makes their visual tokens aligned.

Prints one row per model and per variant the fused model's gain over the best member of that variant,
and its per-skill ratio to the best member (with ``--select MODE``, also for the fused model with that
``answer_select``, as ``fuse toyworld compare --select``); writes ``OUT/variants.json`` (``OUT/variants@W.json`` with
``--weights W``). Needs ``train`` (dev install).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Variant:
    """One member re-trained from the shipped base. ``replaces``: the shipped member it stands in for
    (None: a third member added to both). ``skills``: training questions restricted to these skills
    (None: all). ``encoder``: overrides of the member's encoder config (``train.toyfamily.ENCODERS``)."""

    role: str
    why: str
    replaces: str | None = None
    skills: tuple[str, ...] | None = None
    repeat: tuple[tuple[str, int], ...] = ()  # (skill, n): that skill's training conversations n times over
    encoder: dict[str, Any] = field(default_factory=dict)
    tie_channels: bool | None = None
    main: str | None = None  # a key of MAIN_ENCODERS: shared main encoder, own encoder as a second branch
    encoder_seed: int | None = None  # default: the role's index in ENCODERS (a new role: ENCODER_SEED_OF_NEW_ROLE)
    stage1_scale: float = 1.0  # stage 1 (projector only) this many times longer than the family's
    stage2_scale: float = 1.0  # stage 2 (LLM + projector) this many times longer than the family's
    stage2_lr: float | None = None  # stage 2's learning rate (None: the family's)


@dataclass(frozen=True)
class MainEncoder:
    """A shared main encoder: ``train.toyfamily.ENCODERS[base_role]`` with ``overrides`` and
    ``tie_channels``, built with encoder seed ``seed`` (the same bits in every member that uses it)."""

    base_role: str
    seed: int
    tie_channels: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)


MAIN_ENCODERS: dict[str, MainEncoder] = {
    "grey28": MainEncoder("colour", 5, tie_channels=True),  # colour-blind 28 px thumbnail: spatial stays colour-blind
    "colour28": MainEncoder("colour", 0),  # the shipped colour member's own encoder (RGB 28 px), same seed
}
ENCODER_SEED_OF_NEW_ROLE = 4  # train.toyfamily seeds encoders seed * 1000 + index; 0..3 are taken

_THIRD = dict(hidden_size=96, intermediate_size=192, image_size=84, patch_size=12, projection_dim=96,
              num_hidden_layers=2)
_SPATIAL = dict(hidden_size=144, intermediate_size=144, image_size=84, patch_size=12, projection_dim=144,
                num_hidden_layers=1)  # train.toyfamily.ENCODERS["spatial"]'s overrides of the common CLIP config
_RGB56 = dict(hidden_size=96, intermediate_size=96, image_size=56, patch_size=8, projection_dim=96,
              num_hidden_layers=1)
VARIANTS: dict[str, Variant] = {
    "colour-coarse-skills": Variant("colour", "colour member trained on colour + position questions only "
                                    "(what a 7x7 thumbnail can see): is its count readout the conflict?",
                                    replaces="colour", skills=("colour", "position")),
    "colour-seen-skills": Variant("colour", "colour member trained on colour, position and count questions only "
                                  "(not shape or orientation, which its 28 px thumbnail cannot see: 0.44-0.53 on "
                                  "validation, the majority class): with abstain unseen_words it then gives no answer "
                                  "there", replaces="colour", skills=("colour", "position", "count")),
    "colour-no-count": Variant("colour", "colour member trained on every skill but count",
                               replaces="colour", skills=("colour", "position", "shape", "orientation")),
    "colour-16-tokens": Variant("colour", "colour member with 4x4 patches of 7 px (16 tokens): is it dilution "
                                "of the spatial member's 49 tokens?", replaces="colour", encoder={"patch_size": 7}),
    "colour-4-tokens": Variant("colour", "colour member with 2x2 patches of 14 px (4 tokens)",
                               replaces="colour", encoder={"patch_size": 14}),
    "third-colour-blind": Variant("shape", "a third member: 2-layer colour-blind CLIP at 84 px (two sharp count "
                                  "readers against one thumbnail)", encoder=_THIRD, tie_channels=True),
    "third-rgb": Variant("detail", "a third member: 2-layer RGB CLIP at 84 px (sees colour and outlines)",
                         encoder=_THIRD, tie_channels=False),
    "colour+grey-main": Variant("colour", "colour member: shared colour-blind 28 px main encoder + its RGB encoder",
                                replaces="colour", main="grey28"),
    "spatial+grey-main": Variant("spatial", "spatial member: shared colour-blind 28 px main encoder + its sharp "
                                 "colour-blind encoder", replaces="spatial", main="grey28"),
    "spatial+colour-main": Variant("spatial", "spatial member: shared RGB 28 px main encoder (the colour member's) + "
                                   "its sharp colour-blind encoder (MGM-like high-resolution branch)",
                                   replaces="spatial", main="colour28"),
    "spatial-stage1x4": Variant("spatial", "spatial member whose stage 1 (projector only) trains 4x longer (3200 "
                                "steps): a stronger spatial member gives fusion more to gain", replaces="spatial",
                                stage1_scale=4.0),
    "spatial-stage2x4": Variant("spatial", "spatial member whose stage 2 (LLM + projector) trains 4x longer (400 "
                                "steps): its tokens carry shape and orientation (benchmarks/toy_token_probe.py), "
                                "does its LLM learn to read them?", replaces="spatial", stage2_scale=4.0),
    "spatial-stage2x4-lr1e-3": Variant("spatial", "spatial-stage2x4 with stage 2 at lr 1e-3 (5x the family's): can "
                                       "this LLM learn to read shape at all when its task vector may grow?",
                                       replaces="spatial", stage2_scale=4.0, stage2_lr=1e-3),
    "spatial-shape-only": Variant("spatial", "spatial member trained on shape and orientation questions only, stage 2 "
                                  "4x longer: can this LLM learn to read shape at all when nothing else is asked?",
                                  replaces="spatial", skills=("shape", "orientation"), stage2_scale=4.0),
    "third-shape-only": Variant("shape", "a third member: spatial-shape-only (same encoder, seed, data and schedule) "
                                "added to both shipped members instead of replacing the spatial one",
                                skills=("shape", "orientation"), stage2_scale=4.0, encoder=_SPATIAL, tie_channels=True,
                                encoder_seed=1),
    "spatial-shape-colour": Variant("spatial", "spatial-shape-only also asked the colour questions (which, colour-"
                                    "blind, it cannot answer): does it then stay unsure about colour?",
                                    replaces="spatial", skills=("shape", "orientation", "colour"), stage2_scale=4.0),
    "spatial-shape-x3": Variant("spatial", "spatial member trained on every skill with shape and orientation "
                                "questions 3 times over, stage 2 4x longer: reads shape like spatial-shape-only "
                                "while staying unsure where it cannot see (colour)?", replaces="spatial",
                                repeat=(("shape", 3), ("orientation", 3)), stage2_scale=4.0),
    "rgb56+colour-main": Variant("rgb56", "colour member: shared RGB 28 px main encoder + an RGB 56 px branch "
                                 "(SliME-like higher-resolution view)", replaces="colour", main="colour28",
                                 encoder=_RGB56, tie_channels=False, encoder_seed=6),
}
# families: name -> the variants fused together (the shipped members fill the roles none of them replaces);
# every variant is also a family of one under its own name
FAMILIES: dict[str, tuple[str, ...]] = {
    "shared-grey-main": ("colour+grey-main", "spatial+grey-main"),
    "shared-colour-main": ("rgb56+colour-main", "spatial+colour-main"),
    "seen-skills": ("colour-seen-skills", "spatial-shape-only"),  # each member asked only what its encoder sees
}


def _encoder_spec(role: str, overrides: dict[str, Any], tie_channels: bool | None) -> dict[str, Any]:
    import train.toyfamily as tf

    spec = copy.deepcopy(tf.ENCODERS.get(role, {"kind": "clip", "config": dict(tf._CLIP_COMMON),
                                                "processor": tf._DARK, "tie_channels": False}))
    spec["config"].update(overrides)
    if tie_channels is not None:
        spec["tie_channels"] = tie_channels
    return spec


def train_variant(name: str, out: Path, world: Path) -> tuple[Path, list[dict]]:
    """Train ``name``'s member from the shipped base into ``out/members/<name>``; returns (its dir, the
    per-stage records), the job contract of ``train.toyfamily._run_jobs``."""
    import train.toyfamily as tf
    from fuse.toyfamily import ASSETS
    from fuse.toyworld import select_skills

    v = VARIANTS[name]
    work = out / "work" / name
    work.mkdir(parents=True, exist_ok=True)
    seed = v.encoder_seed if v.encoder_seed is not None else (
        list(tf.ENCODERS).index(v.role) if v.role in tf.ENCODERS else ENCODER_SEED_OF_NEW_ROLE)
    own = tf.build_encoder_dir(work / "encoder", v.role, seed, _encoder_spec(v.role, v.encoder, v.tie_channels))
    encoders, fusion = {"clip": tf._enc_entry(own)}, None  # family seed 0: encoder seed = seed * 1000 + index
    if v.main is not None:
        m = MAIN_ENCODERS[v.main]
        main = tf.build_encoder_dir(work / "main", v.main, m.seed, _encoder_spec(m.base_role, m.overrides,
                                                                                 m.tie_channels))
        encoders, fusion = {"clip": tf._enc_entry(main), "dinov2": tf._enc_entry(own)}, {"type": "channel_concat"}
    data = world / "train" / "llava.json"
    if v.skills is not None or v.repeat:
        records = json.loads(data.read_text())
        if v.skills is not None:
            records = select_skills(records, v.skills)
        times = dict(v.repeat)
        records = [r for r in records for _ in range(times.get(r.get("skill"), 1))]  # the loader shuffles
        sub = work / "train.json"
        sub.write_text(json.dumps(records))
        data = sub
    final, stages = tf.train_member(v.role, ASSETS / "base", encoders, data, world / "train", work, 0, 1.0,
                                    fusion=fusion, stage1_scale=v.stage1_scale,
                                    stage2_scale=v.stage2_scale, stage2_lr=v.stage2_lr)
    return tf._finalise_member(final, out / "members" / name, stages, data), stages


def fused_dir(members: dict[str, Path], out: Path, weights: list[float] | None = None, base: Path | None = None,
              inference: dict[str, Any] | None = None) -> Path:
    """Merge ``members`` as the shipped recipe does: task_arithmetic, weight 1/n (or ``weights``, in
    ``members``' order), parallel positions; ``base``: their base LLM (default: the shipped one);
    ``inference``: added to the recipe's inference section (e.g. an ``answer_select`` mode). Without it the
    fused model answers once from every member's tokens (``answer_select: none``, plain concatenation, the
    paper's method), whatever the recipe's default: the variant figures in the README were measured so."""
    from fuse.merge import run_merge
    from fuse.recipe import parse_recipe
    from fuse.toyfamily import ASSETS, RECIPE

    data = copy.deepcopy(RECIPE)
    data["base_model"] = str(base or ASSETS / "base")
    weights = weights or [1 / len(members)] * len(members)
    data["members"] = [{"model": str(p), "name": n, "weight": w} for (n, p), w in zip(members.items(), weights)]
    data["output"] = {"dir": str(out)}
    data["inference"] = {**data["inference"], "answer_select": "none", **(inference or {})}
    if out.exists():
        shutil.rmtree(out)
    run_merge(parse_recipe(data, source="variant", root=out.parent), progress=False, checksums=False,
              align_check=False, echo=lambda *a, **k: None)
    return out


def prepare_worlds(out: Path, seed: int) -> tuple[Path, Path]:
    """``out/train_world`` (the shipped family's training world, seed 0) and ``out/val_<seed>`` (a
    validation split), generated once and kept for later runs."""
    from fuse.toyfamily import WORLD, write_test_split
    from fuse.toyworld import generate

    out.mkdir(parents=True, exist_ok=True)
    world = out / "train_world"
    if not (world / "train" / "llava.json").is_file():
        generate(world, seed=0, force=True, **WORLD)
    test = out / f"val_{seed}"
    if not test.is_dir():
        write_test_split(test, seed)
    return world, test


def family(name: str) -> tuple[str, ...]:
    """The variants fused together under ``name`` (a :data:`FAMILIES` key, or one variant)."""
    return FAMILIES.get(name, (name,))


DEFAULT = [n for n in VARIANTS if VARIANTS[n].main is None] + ["spatial+colour-main", *FAMILIES]


def main() -> None:
    known = list(VARIANTS) + list(FAMILIES)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(DEFAULT),
                    help=f"comma-separated variants or families, of: {', '.join(known)}")
    ap.add_argument("--seed", type=int, default=4242, help="validation world (never a test world)")
    ap.add_argument("-o", "--output", type=Path, default=Path("out/member_variants"))
    ap.add_argument("-j", "--jobs", type=int, default=2, help="training processes at once")
    ap.add_argument("--weights", default=None,
                    help="merge weights, comma-separated in member order (colour first; default 1/n each): "
                         "e.g. 0,1 fuses with the second member's own LLM, unmerged")
    ap.add_argument("--reuse", action="store_true",
                    help="use members already trained into OUT/members by an earlier run of this script")
    ap.add_argument("--select", default="none",
                    help="also evaluate each fused model with this answer_select mode (as `fuse toyworld compare "
                         "--select`), e.g. confidence:members")
    ap.add_argument("--abstain", default="none",
                    help="with --select: inference.abstain of that row (none | unseen_words: a member gives no "
                         "answer to a question with a word its training questions never had)")
    args = ap.parse_args()
    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    tag = "" if weights is None else "@" + ",".join(f"{w:g}" for w in weights)  # in labels and file names
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"error: --variants: unknown {', '.join(unknown)}; known: {', '.join(known)}")

    from fuse.model.options import parse_abstain, parse_answer_select
    from fuse.toyfamily import (ASSETS, MEMBERS, evaluate_model, format_ceiling, format_header, format_ratios,
                                format_row, select_inference, summary)
    from train.toyfamily import _run_jobs, relative_distance

    select = parse_answer_select(args.select, "--select")
    abstain = parse_abstain(args.abstain, "--abstain")
    # the --select row's inference section and its label / directory suffix
    select_inf = {**select_inference(select), **({"abstain": abstain} if abstain != "none" else {})}
    select_tag = select + (f"+{abstain}" if abstain != "none" else "")

    out = args.output.resolve()
    world, test = prepare_worlds(out, args.seed)

    t0 = time.perf_counter()
    trained: dict[str, Path] = {}
    to_train = list(dict.fromkeys(v for n in names for v in family(n)))
    if args.reuse:
        trained = {v: out / "members" / v for v in to_train if (out / "members" / v / "config.json").is_file()}
        to_train = [v for v in to_train if v not in trained]
    for name, dest, _, secs in _run_jobs([(n, train_variant, (n, out, world)) for n in to_train], args.jobs):
        trained[name] = dest  # one torch thread per job: the bits depend on the seed only
        print(f"trained {name} in {secs:.0f} s", flush=True)
    train_s = time.perf_counter() - t0

    rows: dict[str, dict[str, Any]] = {}
    units: dict[str, dict[str, list[float]]] = {}

    def evaluate(label: str, path: Path) -> None:
        if label not in rows:
            rows[label], units[label] = evaluate_model(path, test, label)
            print(format_row(label, rows[label]), flush=True)

    print(format_header())
    for m in MEMBERS:
        evaluate(m, ASSETS / m)
    report: dict[str, Any] = {"validation_seed": args.seed, "train_seconds": round(train_s, 1), "weights": weights,
                              "variants": {}}
    for name in names:
        parts = family(name)
        replaced = {VARIANTS[v].replaces for v in parts}
        # merge name -> (row label, dir); a replacing variant takes the shipped member's name (the recipe's
        # text.member is "colour"), a third member keeps its role
        members = {m: (m, ASSETS / m) for m in MEMBERS if m not in replaced}
        members.update({VARIANTS[v].replaces or VARIANTS[v].role: (v, trained[v]) for v in parts})
        members = {k: members[k] for k in sorted(members, key=lambda k: (k != "colour", k))}  # colour first
        for label, path in members.values():
            evaluate(label, path)
        if weights is not None and len(weights) != len(members):
            raise SystemExit(f"error: --weights: {len(weights)} given, {name} has {len(members)} members")
        fused_label = f"fused[{name}{tag}]"
        evaluate(fused_label, fused_dir({k: p for k, (_, p) in members.items()}, out / "fused" / f"{name}{tag}",
                                        weights))
        labels = [label for label, _ in members.values()]
        if select != "none":
            evaluate(f"{fused_label}+{select_tag}",
                     fused_dir({k: p for k, (_, p) in members.items()},
                               out / "fused" / f"{name}{tag}+{select_tag.replace(':', '_')}", weights,
                               inference=select_inf))
        sm = summary(rows, None, units, members=labels, fused_label=fused_label, select=select_tag)
        ci = sm["gain_interval"]
        # the task vector's size: what a longer or faster stage 2 costs the merge (issue 12: members must stay
        # a small task vector from the base)
        distance = {v: relative_distance(ASSETS / "base", trained[v]) for v in parts}
        report["variants"][name] = {"why": [VARIANTS[v].why for v in parts], "members": labels,
                                    "relative_distance_to_base": distance,
                                    "best_member": sm["best_member"],
                                    "gain": sm["gain"], "gain_interval": [ci["low"], ci["high"]],
                                    "skill_ratio": sm["skill_ratio"],
                                    "routing_ceiling": sm.get("routing_ceiling"),
                                    "rows": {k: rows[k] for k in labels + [fused_label]}}
        print(f"  {name}: fused {sm['fused_mean']:.3f} vs best member {sm['best_member']} "
              f"{sm['best_member_mean']:.3f}: gain {sm['gain']:+.3f} ({ci['low']:+.3f} .. {ci['high']:+.3f}); "
              "per skill " + format_ratios(sm["skill_ratio"]),
              flush=True)
        print(f"  {name}: relative L2 distance of the LLM to the base: "
              + ", ".join(f"{v} {d:.4f}" for v, d in distance.items()), flush=True)
        if sm.get("routing_ceiling"):
            print(f"  {name}: {format_ceiling(sm['routing_ceiling'])}", flush=True)
        if "select" in sm:
            sel, ci = sm["select"], sm["select"]["gain_interval"]
            report["variants"][name]["select"] = {"mode": select, "abstain": abstain, "gain": sel["gain"],
                                                  "gain_interval": [ci["low"], ci["high"]],
                                                  "skill_ratio": sel["skill_ratio"],
                                                  "row": rows[f"{fused_label}+{select_tag}"]}
            print(f"  {name} with answer_select {select_tag}: fused {sel['fused_mean']:.3f}: gain {sel['gain']:+.3f} "
                  f"({ci['low']:+.3f} .. {ci['high']:+.3f}); per skill "
                  + format_ratios(sel["skill_ratio"]), flush=True)
    (out / f"variants{tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / f'variants{tag}.json'} (training {train_s:.0f} s)")


if __name__ == "__main__":
    main()
