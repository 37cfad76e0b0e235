"""Is what the toy members fail to answer in their visual tokens? Probes on the tokens the LLM reads.

Every shipped toy model (both members and COMM) answers shape and orientation questions near chance
(README: shape 0.42-0.45 of 3 shapes, orientation 0.47-0.52 of 2), while colour, position and count are
learned. Two causes are possible: the frozen encoder (or the projector) does not carry the attribute, or
it does and the LLM does not learn to read it within the family's schedules. This script tells them
apart. For each model it computes the visual tokens its LLM receives (the member's own vision branch:
encoder + projector, ``[N, D_llm]`` per image) for the training world's 2000 training images (seed 0, the
family's own) and for a *validation* world's 300 test images (seed 4242 by default: never a test world of
the README's tables), and fits two probes per attribute on the training images (labels from the world's
``scenes.jsonl``), scored on the validation images:

* ``mean``: a linear classifier on the image-mean token ``[D_llm]``, a reader that only sees the average;
* ``tokens``: a per-token MLP (``D_llm -> 64 -> 64``, GELU, shared by the attributes) pooled by mean and max
  over the ``N`` tokens, then linear: a reader that can find a local pattern anywhere in the image (what
  attention can do).

``--raw-depths 1,2,3`` also probes the spatial member's *raw* frozen encoder (its last hidden state, before
any projector), rebuilt from the family's encoder spec and seed at each depth: is an average over a deeper
random encoder's tokens any more telling? (Needs ``train``, dev install.)

Orientation is probed on triangle scenes only (the world asks it of triangles only). With ``--members``
the models themselves are also evaluated on the same validation images (VQA exact match per skill), so
each row shows what the tokens carry next to what the model answers.

    python benchmarks/toy_token_probe.py [--seed 4242] [--members] [--raw-depths 1,2,3] [--out out/token_probe]

Writes ``OUT/probe.json``. With ``--members --raw-depths 1,2,3``: 338 s on 2 CPU cores (about 1 min per
model or encoder, after the worlds are generated).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.features import BranchTokens, extract  # noqa: E402
from fuse.members import load_member  # noqa: E402
from fuse.toyfamily import ASSETS  # noqa: E402
from fuse.toyworld import DOMAINS, SKILLS  # noqa: E402

MODELS = ("colour", "spatial", "comm")
PROBES = ("mean", "tokens")
STEPS, LR, HIDDEN = 400, 3e-3, 64


def labels(split: Path) -> tuple[list[Path], dict[str, torch.Tensor]]:
    """Image paths and, per skill, the class index of each image's attribute (-1 where the skill does not
    apply: orientation of a non-triangle)."""
    scenes = [json.loads(line) for line in (split / "scenes.jsonl").read_text().splitlines() if line.strip()]
    paths = [split / s["image"] for s in scenes]
    out = {}
    for name, skill in SKILLS.items():
        dom = list(DOMAINS[skill.attribute])
        ys = []
        for s in scenes:
            a = s["attributes"]
            applies = name != "orientation" or a["shape"] == "triangle"
            ys.append(dom.index(a[skill.attribute]) if applies else -1)
        out[name] = torch.tensor(ys)
    return paths, out


def tokens_of(model: Path, paths_by_split: list[list[Path]]) -> list[torch.Tensor]:
    """The visual tokens ``[I, N, D_llm]`` that ``model``'s LLM reads for each image, per list of images
    (the member is loaded once for all of them)."""
    extractor = BranchTokens(load_member(model).vision, model.name)
    out = []
    for paths in paths_by_split:
        _, outs, stats = extract(paths, extractor, batch_size=64, workers=0, progress=False)
        if stats.skipped:
            raise SystemExit(f"{model}: {len(stats.skipped)} unreadable images, first {stats.skipped[0]}")
        out.append(torch.stack([o["tokens"] for o in outs]))
    return out


class TokenReader(nn.Module):
    """Per-token MLP, mean+max pooled over tokens, then one linear head per attribute:
    ``[B, N, D] -> {attribute: [B, C]}``. The MLP is shared by the attributes (one fit for all five)."""

    def __init__(self, dim: int, n_classes: dict[str, int]):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU())
        self.heads = nn.ModuleDict({k: nn.Linear(2 * HIDDEN, c) for k, c in n_classes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.mlp(x)
        h = torch.cat([h.mean(1), h.amax(1)], -1)
        return {k: head(h) for k, head in self.heads.items()}


class MeanReader(nn.Module):
    """A linear classifier of the image-mean token per attribute: ``[B, N, D] -> {attribute: [B, C]}``
    (independent heads: fitting them together is fitting each alone)."""

    def __init__(self, dim: int, n_classes: dict[str, int]):
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(dim, c) for k, c in n_classes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        m = x.mean(1)
        return {k: head(m) for k, head in self.heads.items()}


READERS = {"mean": MeanReader, "tokens": TokenReader}


def probe(kind: str, xtr: torch.Tensor, ytr: dict[str, torch.Tensor], xva: torch.Tensor,
          yva: dict[str, torch.Tensor], n_classes: dict[str, int], seed: int = 0) -> dict[str, float]:
    """Fit ``READERS[kind]`` on the training tokens ``[I, N, D]`` (full batch, AdamW, features standardised
    with the training statistics; labels -1 are left out) and return its accuracy per attribute on the
    validation tokens."""
    mu, sd = xtr.mean((0, 1)), xtr.std((0, 1)) + 1e-6
    xtr, xva = (xtr - mu) / sd, (xva - mu) / sd
    torch.manual_seed(seed)
    model = READERS[kind](xtr.shape[-1], n_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-2)
    for _ in range(STEPS):
        opt.zero_grad()
        out = model(xtr)
        sum(nn.functional.cross_entropy(out[k], ytr[k], ignore_index=-1) for k in n_classes).backward()
        opt.step()
    with torch.no_grad():
        out = model(xva)
    return {k: float((out[k].argmax(-1) == yva[k])[yva[k] >= 0].float().mean()) for k in n_classes}


def raw_encoder_tokens(depth: int, paths_by_split: list[list[Path]], work: Path) -> list[torch.Tensor]:
    """The spatial role's frozen encoder (``train.toyfamily.ENCODERS``, same seed as the family's) at ``depth``
    layers: its last hidden state ``[I, N, D_enc]`` for each list of images."""
    import train.toyfamily as tf
    from analysis.features import EncoderFeatures
    from fuse.encoders import build_encoder
    from toy_member_variants import _encoder_spec

    spec = _encoder_spec("spatial", {"num_hidden_layers": depth}, None)
    d = tf.build_encoder_dir(work / f"spatial_encoder_{depth}", "spatial", list(tf.ENCODERS).index("spatial"), spec)
    ex = EncoderFeatures(build_encoder("clip", str(d)), [-1])
    return [torch.stack([o["features"][0] for o in extract(p, ex, batch_size=64, workers=0, progress=False)[1]])
            for p in paths_by_split]


def model_answers(model: Path, val: Path) -> dict[str, float]:
    """The model's own VQA exact match per skill on the validation split (the family's eval settings)."""
    from fuse.toyfamily import evaluate_model

    row, _ = evaluate_model(model, val, model.name)
    return {s: row[s] for s in SKILLS}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=4242, help="validation world (default 4242)")
    ap.add_argument("--family", type=Path, default=ASSETS, help="the toy family (default: the shipped one)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list (default {','.join(MODELS)})")
    ap.add_argument("--members", action="store_true", help="also evaluate the models on the validation split")
    ap.add_argument("--raw-depths", default="", help="comma list of depths: also probe the spatial member's raw "
                    "encoder rebuilt at each depth (e.g. 1,2,3; 1 is the shipped one)")
    ap.add_argument("--out", type=Path, default=Path("out/token_probe"))
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    missing = [m for m in models if not (args.family / m / "config.json").is_file()]
    if missing:
        ap.error(f"--models: no model dir {args.family / missing[0]} (config.json); the family has "
                 + ", ".join(sorted(p.name for p in args.family.iterdir() if (p / "config.json").is_file())))
    try:
        depths = [int(d) for d in args.raw_depths.split(",") if d.strip()]
    except ValueError:
        ap.error(f"--raw-depths {args.raw_depths!r}: expected a comma list of layer counts, e.g. 1,2,3")
    if any(d < 1 for d in depths):
        ap.error(f"--raw-depths {args.raw_depths!r}: every depth must be at least 1")
    if args.seed in (0, 101, 202):
        print(f"warning: seed {args.seed} is a test world of the README's tables", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    from toy_member_variants import prepare_worlds  # the variant benchmark's worlds: same layout, shareable

    world, val = prepare_worlds(args.out, args.seed)
    train_split = world / "train"
    ptr, ytr = labels(train_split)
    pva, yva = labels(val)
    n_cls = {s: len(DOMAINS[k.attribute]) for s, k in SKILLS.items()}
    chance = {s: float(torch.bincount(yva[s][yva[s] >= 0]).max() / (yva[s] >= 0).sum()) for s in SKILLS}
    doc: dict[str, Any] = {"validation_seed": args.seed, "train_images": len(ptr), "val_images": len(pva),
                           "steps": STEPS, "lr": LR, "hidden": HIDDEN, "majority_class": chance, "models": {}}
    print(f"probes fit on {len(ptr)} training images (world seed 0), scored on {len(pva)} validation images "
          f"(world seed {args.seed}); majority class: " + ", ".join(f"{s} {v:.2f}" for s, v in chance.items()))
    header = f"{'model':<9} {'reader':<8}" + "".join(f"{s:>12}" for s in SKILLS)
    print(header)
    def report(label: str, xtr: torch.Tensor, xva: torch.Tensor, extra: dict[str, dict[str, float]],
               t0: float) -> dict[str, Any]:
        rows = {kind: probe(kind, xtr, ytr, xva, yva, n_cls) for kind in PROBES} | extra
        for kind, r in rows.items():
            print(f"{label:<9} {kind:<8}" + "".join(f"{r[s]:>12.3f}" for s in SKILLS))
        return {"tokens_shape": list(xtr.shape[1:]), **rows, "seconds": round(time.perf_counter() - t0, 1)}

    for name in models:
        t0 = time.perf_counter()
        path = args.family / name
        extra = {"answers": model_answers(path, val)} if args.members else {}
        doc["models"][name] = report(name, *tokens_of(path, [ptr, pva]), extra, t0)
    for depth in depths:
        t0 = time.perf_counter()
        xtr, xva = raw_encoder_tokens(depth, [ptr, pva], args.out)
        doc.setdefault("raw_encoders", {})[str(depth)] = report(f"enc x{depth}", xtr, xva, {}, t0)
    (args.out / "probe.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out / 'probe.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
