"""``analysis attention``: where in the image does each member's share of attention go?

VisionFuse's second observation: for the same image and question, different
members attend to different regions. With the fused model
(:meth:`fuse.model.FusedModel.capture_attention`), for each (image, question):

1. attention from the answer-generating positions (``query="answer"``: the last prompt
   position and every answer token but the last, after greedy generation; or ``"last"``)
   to each member's visual tokens, kept per LLM layer, averaged over heads and query
   positions -> ``[L, N_member]``;
2. each member's token attention is placed on its own spatial grid
   (``token_grids``; the first grid segment, i.e. the global view; ``topk`` budgets are
   scattered back onto the original grid) and resampled onto a common canvas over the image,
   honouring the member's view of the image (pad-to-square, centre crop, plain resize); each token
   owns its patch, so members with different grid resolutions compare area for area;
3. per member pair: Jensen-Shannon divergence (nats, <= ln 2) and top-k% IoU of the two
   canvas maps, per layer and for the layer-averaged map; per member: the share of attention
   mass its tokens receive (absolute, and relative to all members' visual tokens).

Overall figures are means over (image, question) samples.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from fuse.errors import DataError

from . import metrics as M
from .features import ExtractStats, Extractor, extract
from .options import PipelineOptions
from .report import Report, intake_bullets, plt

CANVAS = 48  # canvas cells along the image's long side


# ---------------------------------------------------------------------------
# Questions
# ---------------------------------------------------------------------------
@dataclass
class Sample:
    image: Path
    question: str


def read_questions(path: str | Path, images_dir: str | Path, n: int | None = None,
                   seed: int = 0) -> tuple[list[Sample], str | None]:
    """Samples from ``--questions``:

    - ``.jsonl`` (one object per line) or ``.json`` (a list): ``{"image": path relative to --images
      (or absolute), "question": text}``;
    - anything else: plain text, one question per line (blank lines and ``#`` comments skipped), each
      asked about every image of ``--images``.

    ``n``: a seeded random sample of ``n`` samples (order kept). Returns (samples, note).
    """
    from fuse.images import list_images

    p, root = Path(path), Path(images_dir)
    if not p.is_file():
        raise DataError(f"{p}: no such questions file")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot read ({e})") from None
    samples: list[Sample] = []
    if p.suffix.lower() in (".jsonl", ".json"):
        if p.suffix.lower() == ".json":
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}: invalid JSON ({e})") from None
            if not isinstance(rows, list):
                raise DataError(f"{p}: expected a JSON list of {{\"image\", \"question\"}} objects")
            where = [f"{p}: entry {i}" for i in range(len(rows))]
        else:
            rows, where = [], []
            for ln, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}: line {ln}: invalid JSON ({e.msg})") from None
                where.append(f"{p}: line {ln}")
        if not root.is_dir():
            raise DataError(f"{root}: not an image directory")
        for w, row in zip(where, rows):
            if not (isinstance(row, dict) and isinstance(row.get("image"), str)
                    and isinstance(row.get("question"), str)):
                raise DataError(f"{w}: expected an object with string fields 'image' and 'question'")
            img = Path(row["image"])
            img = img if img.is_absolute() else root / img
            if not img.is_file():
                raise DataError(f"{w}: image {row['image']!r} not found under {root}")
            samples.append(Sample(img, row["question"]))
    else:
        questions = [q.strip() for q in text.splitlines() if q.strip() and not q.strip().startswith("#")]
        if not questions:
            raise DataError(f"{p}: no questions (expected one question per line)")
        samples = [Sample(img, q) for img in list_images(root) for q in questions]
    if not samples:
        raise DataError(f"{p}: no questions")
    note = None
    if n is not None:
        if n < 1:
            raise DataError(f"--n {n}: expected a positive number of samples")
        if n < len(samples):
            keep = sorted(random.Random(seed).sample(range(len(samples)), n))
            samples = [samples[i] for i in keep]
        elif n > len(samples):
            note = f"asked for {n} samples, {p} gives {len(samples)}: using all {len(samples)}"
    return samples, note


# ---------------------------------------------------------------------------
# Maps
# ---------------------------------------------------------------------------
def token_grid(values: torch.Tensor, grids: list | None, kept: torch.Tensor | None,
               raw_grids: list | None) -> np.ndarray | None:
    """Token values ``[..., N]`` -> ``[..., h, w]`` on the member's first grid segment (None if unknown).

    Kept-token grids (``all``/``pool`` budgets) are used as they are; ``topk`` results are
    scattered back onto the original grid (dropped tokens get 0)."""
    v = values.detach().float().cpu()
    if grids:
        _, h, w = grids[0]
        return v[..., :h * w].reshape(*v.shape[:-1], h, w).numpy()
    if kept is not None and raw_grids:
        total = sum(h * w for _, h, w in raw_grids)
        full = torch.zeros(*v.shape[:-1], max(total, int(kept.max()) + 1))
        full[..., kept.long().cpu()] = v
        _, h, w = raw_grids[0]
        return full[..., :h * w].reshape(*v.shape[:-1], h, w).numpy()
    return None


def view_box(branch: Any, width: int, height: int) -> tuple[float, float, float, float]:
    """``(x0, y0, w, h)`` in image pixels of the region the member's grid covers.

    Pad-to-square encoders see a square of side max(w, h) centred on the image; CLIP-style
    processors (resize shortest edge + centre crop) see the centred square of side min(w, h);
    otherwise the whole image (plain resize)."""
    enc = getattr(branch, "encoder", None)
    if enc is not None and getattr(enc, "pad_square", False):
        s = max(width, height)
        return ((width - s) / 2, (height - s) / 2, s, s)
    proc = getattr(enc, "processor", None)
    size = getattr(proc, "size", None) or {}
    if proc is not None and getattr(proc, "do_center_crop", False) and "shortest_edge" in size:
        s = min(width, height)
        return ((width - s) / 2, (height - s) / 2, s, s)
    return (0.0, 0.0, float(width), float(height))


def canvas_shape(width: int, height: int, cells: int = CANVAS) -> tuple[int, int]:
    if width >= height:
        return max(1, round(cells * height / width)), cells
    return cells, max(1, round(cells * width / height))


def to_canvas(grid: np.ndarray, box: tuple[float, float, float, float], width: int, height: int,
              shape: tuple[int, int]) -> np.ndarray:
    """Place ``grid [..., gh, gw]`` (token attention over ``box``) on a canvas ``[..., ch, cw]`` covering
    the image. Each token owns its patch (piecewise constant: attention mass stays where its token
    looked, whatever the grid resolution); canvas cells outside the box get 0. Each map is normalised
    to sum 1, i.e. a distribution over the image area. (Figures smooth it for display only.)"""
    ch, cw = shape
    gh, gw = grid.shape[-2:]
    x0, y0, bw, bh = box
    xs = (np.arange(cw) + 0.5) * width / cw  # canvas cell centres, image pixels
    ys = (np.arange(ch) + 0.5) * height / ch
    iu = np.floor((xs - x0) / bw * gw).astype(np.int64)
    iv = np.floor((ys - y0) / bh * gh).astype(np.int64)
    inside = ((iv >= 0) & (iv < gh))[:, None] & ((iu >= 0) & (iu < gw))[None, :]
    out = grid[..., np.clip(iv, 0, gh - 1)[:, None], np.clip(iu, 0, gw - 1)[None, :]] * inside
    out = np.clip(out.astype(np.float64), 0, None)
    s = out.sum(axis=(-2, -1), keepdims=True)
    return np.divide(out, s, out=np.full_like(out, 1.0 / (ch * cw)), where=s > 0)


# ---------------------------------------------------------------------------
# Extraction through the shared pipeline
# ---------------------------------------------------------------------------
class AttentionMaps(Extractor):
    """Per (image, question): the fused model's attention to each member's tokens.

    Outputs per sample: ``"<member>/layers"`` ``[L, N_m]`` (mean over heads and query positions),
    ``"<member>/share"`` ``[L]`` (attention mass on the member's tokens), and the non-tensor
    ``"meta"`` (grids, kept indices, answer, image size)."""

    def __init__(self, model: Any, questions: Sequence[str], layers: Any = None, query: str = "answer",
                 max_new_tokens: int = 16):
        self.model = model
        self.questions = list(questions)
        self.layers = layers
        self.query = query
        self.max_new_tokens = max_new_tokens
        self.label = "attention"

    @property
    def key(self) -> str:  # never cached: outputs depend on the question, not only the image
        raise RuntimeError("attention maps are not cached")

    def to_input_at(self, image: Image.Image, index: int) -> tuple[Image.Image, int]:
        return image, index

    def collate(self, items: list) -> list:
        return items

    def prompt(self, question: str) -> str:
        ph = self.model.text.placeholder
        return question if ph in question else f"{ph}\n{question}"

    def run(self, batch: list, device: torch.device) -> list[dict[str, Any]]:
        images = [im for im, _ in batch]
        prompts = [self.prompt(self.questions[i]) for _, i in batch]
        cap = self.model.capture_attention(images, prompts, layers=self.layers, query=self.query,
                                           max_new_tokens=self.max_new_tokens)
        outs = []
        for (im, _), s in zip(batch, cap.samples):
            o: dict[str, Any] = {}
            for m in cap.members:
                per_layer = torch.stack([s.weights[l][m].mean(dim=(0, 1)) for l in cap.layers])  # [L, N]
                o[f"{m}/layers"] = per_layer
                o[f"{m}/share"] = torch.stack([s.weights[l][m].sum(-1).mean() for l in cap.layers])
            o["meta"] = {"grids": s.grids, "kept": s.kept, "raw_grids": s.raw_grids, "answer": s.answer,
                         "size": im.size, "layers": list(cap.layers), "members": list(cap.members),
                         "image": im.copy() if im.width * im.height <= 1024 * 1024 else _small(im)}
            outs.append(o)
        return outs

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]


def _small(im: Image.Image, side: int = 1024) -> Image.Image:
    im = im.copy()
    im.thumbnail((side, side))
    return im


# ---------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------
@dataclass
class SampleResult:
    image: Path
    question: str
    answer: str | None
    size: tuple[int, int]
    shares: dict[str, np.ndarray]  # member -> [L]
    canvas: dict[str, np.ndarray]  # member -> layer-averaged canvas map [ch, cw]
    canvas_layers: dict[str, np.ndarray]  # member -> [L, ch, cw]
    pairs: dict[str, dict[str, Any]]  # "a|b" -> {"js", "iou", "js_layers", "iou_layers"}
    thumb: Image.Image | None = None
    boxes: dict[str, tuple] = field(default_factory=dict)


@dataclass
class AttentionResult:
    members: list[str]
    layers: list[int]
    samples: list[SampleResult]
    stats: ExtractStats
    unmapped: dict[str, str]  # member -> reason its map could not be placed
    topk: float
    query: str


def run_attention(model: Any, samples: Sequence[Sample], pipeline: PipelineOptions = PipelineOptions(batch_size=4),
                  *, layers: Any = None, query: str = "answer", max_new_tokens: int = 16,
                  topk: float = 10.0) -> AttentionResult:
    """Attention maps of every (image, question) sample; ``pipeline``: batch size, workers, device, progress
    (maps depend on the question, so there is no feature cache)."""
    ext = AttentionMaps(model, [s.question for s in samples], layers, query, max_new_tokens)
    idx, outs, stats = extract([s.image for s in samples], ext, **{**pipeline.extraction(), "cache_dir": None},
                               desc="attention")
    if not idx:
        raise DataError(f"none of the {len(samples)} images could be read")
    members = model.member_names
    results: list[SampleResult] = []
    unmapped: dict[str, str] = {}
    layer_ids: list[int] = outs[0]["meta"]["layers"]
    for i, o in zip(idx, outs):
        meta = o["meta"]
        w, h = meta["size"]
        shape = canvas_shape(w, h)
        canvas, canvas_l, boxes = {}, {}, {}
        for m in members:
            grid = token_grid(o[f"{m}/layers"], meta["grids"].get(m), meta["kept"].get(m), meta["raw_grids"].get(m))
            if grid is None:
                unmapped[m] = "no spatial token layout (token_grids unknown)"
                continue
            box = view_box(model.branches[m], w, h)
            boxes[m] = box
            canvas_l[m] = to_canvas(grid, box, w, h, shape)  # [L, ch, cw]
            canvas[m] = to_canvas(grid.mean(0), box, w, h, shape)
        pairs = {}
        for a, b in itertools.combinations([m for m in members if m in canvas], 2):
            pairs[f"{a}|{b}"] = {
                "js": M.js_divergence(canvas[a].ravel(), canvas[b].ravel()),
                "iou": M.topk_iou(canvas[a], canvas[b], topk),
                "js_layers": M.js_divergence(canvas_l[a].reshape(len(layer_ids), -1),
                                             canvas_l[b].reshape(len(layer_ids), -1)),
                "iou_layers": np.array([M.topk_iou(canvas_l[a][k], canvas_l[b][k], topk) for k in range(len(layer_ids))]),
            }
        shares = {m: o[f"{m}/share"].double().numpy() for m in members}
        results.append(SampleResult(samples[i].image, samples[i].question, meta["answer"], (w, h), shares, canvas,
                                    canvas_l, pairs, meta["image"], boxes))
    return AttentionResult(members, layer_ids, results, stats, unmapped, topk, query)


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------
def _relative(shares: dict[str, float]) -> dict[str, float]:
    tot = sum(shares.values())
    return {m: (v / tot if tot > 0 else float("nan")) for m, v in shares.items()}


def summarise(res: AttentionResult) -> dict[str, Any]:
    """Means over samples: per member share (per layer, averaged, relative); per pair JS/IoU."""
    L = len(res.layers)
    share_l = {m: np.mean([s.shares[m] for s in res.samples], axis=0) for m in res.members}
    share = {m: float(share_l[m].mean()) for m in res.members}
    pair_names = sorted({p for s in res.samples for p in s.pairs},
                        key=lambda p: [res.members.index(x) for x in p.split("|")])
    pairs = {}
    for p in pair_names:
        rows = [s.pairs[p] for s in res.samples if p in s.pairs]
        js, iou = [r["js"] for r in rows], [r["iou"] for r in rows]
        pairs[p] = {"js_mean": float(np.mean(js)), "js_std": float(np.std(js)),
                    "iou_mean": float(np.mean(iou)), "iou_std": float(np.std(iou)),
                    "js_layers": np.mean([r["js_layers"] for r in rows], axis=0),
                    "iou_layers": np.mean([r["iou_layers"] for r in rows], axis=0), "samples": len(rows)}
    return {"layers": res.layers, "share_layers": share_l, "share": share, "share_relative": _relative(share),
            "pairs": pairs, "n_layers": L}


def build_report(res: AttentionResult, source: str, note: str | None = None, command: str = "",
                 max_figures: int = 8, root: Path | None = None) -> Report:
    rep = Report("Attention-region divergence between members", command)
    summ = summarise(res)
    st = res.stats
    rep.para(f"Fused model `{source}`; members (visual-token order): {', '.join(res.members)}. Attention from "
             + ("the answer-generating positions (last prompt position + answer tokens)" if res.query == "answer"
                else "the last prompt position") +
             f" to each member's visual tokens, averaged over heads and query positions; LLM layers "
             f"{_layers_str(res.layers)}. Maps are compared on a common canvas over the image: Jensen-Shannon "
             f"divergence (nats, 0 = same map, ln 2 = {np.log(2):.3f} = disjoint) and IoU of the top {res.topk:g}% cells.")
    rep.heading("Samples")
    items = intake_bullets(st.summary().replace("images", "samples", 1), note, st.skipped)
    items += [f"{m}: {r}; left out of the maps" for m, r in res.unmapped.items()]
    rep.bullets(items)
    rep.heading("Overall")
    rep.table(["member", "attention share (mean)", "share of visual attention"],
              [[m, summ["share"][m], summ["share_relative"][m]] for m in res.members])
    if summ["pairs"]:
        rep.table(["pair", "JS divergence", "JS std", f"top-{res.topk:g}% IoU", "IoU std", "samples"],
                  [[p.replace("|", " vs "), r["js_mean"], r["js_std"], r["iou_mean"], r["iou_std"], r["samples"]]
                   for p, r in summ["pairs"].items()])
    _layer_figures(rep, res, summ)
    rep.heading("Per sample")
    heads = ["image", "question", "answer"] + [f"share {m}" for m in res.members] + \
        [f"JS {p.replace('|', '/')}" for p in summ["pairs"]] + [f"IoU {p.replace('|', '/')}" for p in summ["pairs"]]
    rows = []
    for s in res.samples:
        rows.append([_rel(s.image, root), s.question, s.answer if s.answer is not None else "-"]
                    + [float(s.shares[m].mean()) for m in res.members]
                    + [s.pairs[p]["js"] if p in s.pairs else None for p in summ["pairs"]]
                    + [s.pairs[p]["iou"] if p in s.pairs else None for p in summ["pairs"]])
    rep.table(heads, rows, digits=3)
    for k, s in enumerate(res.samples[:max_figures]):
        rep.figure(_overlay(s, res.members), f"overlay_{k:03d}",
                   f"{_rel(s.image, root)}: \"{s.question}\" (answer: {s.answer!r}); attention per member")
    if len(res.samples) > max_figures:
        rep.para(f"Overlays shown for the first {max_figures} of {len(res.samples)} samples (--figures).")
    rep.numbers = {
        "source": source, "members": res.members, "layers": res.layers, "query": res.query, "topk_percent": res.topk,
        "samples_info": st.to_dict(), "unmapped": res.unmapped, "overall": summ,
        "samples": [{"image": _rel(s.image, root), "question": s.question, "answer": s.answer,
                     "share_layers": s.shares, "share": {m: float(s.shares[m].mean()) for m in res.members},
                     "share_relative": _relative({m: float(s.shares[m].mean()) for m in res.members}),
                     "pairs": s.pairs} for s in res.samples],
    }
    return rep


def _rel(p: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return str(Path(p).relative_to(root))
        except ValueError:
            pass
    return str(p)


def _layers_str(layers: list[int]) -> str:
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}-{layers[-1]}"
    return ", ".join(map(str, layers))


def _layer_figures(rep: Report, res: AttentionResult, summ: dict[str, Any]) -> None:
    colors = plt.get_cmap("tab10")
    x = np.arange(len(res.layers))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for k, m in enumerate(res.members):
        axes[0].plot(x, summ["share_layers"][m], "o-", ms=3, color=colors(k % 10), label=m)
    axes[0].set_title("attention share per layer")
    axes[0].set_xlabel("LLM layer")
    axes[0].legend(fontsize=8)
    for k, (p, r) in enumerate(summ["pairs"].items()):
        axes[1].plot(x, r["js_layers"], "o-", ms=3, color=colors(k % 10), label=f"JS {p.replace('|', '/')}")
        axes[1].plot(x, r["iou_layers"], "s--", ms=3, color=colors(k % 10), alpha=0.7, label=f"IoU {p.replace('|', '/')}")
    axes[1].set_title("map divergence per layer")
    axes[1].set_xlabel("LLM layer")
    if summ["pairs"]:
        axes[1].legend(fontsize=7)
    for ax in axes:
        ax.set_xticks(x, labels=[str(l) for l in res.layers], fontsize=7)
        ax.grid(alpha=0.3)
    rep.figure(fig, "per_layer", "Per LLM layer: attention share of each member (left); Jensen-Shannon divergence "
               f"and top-{res.topk:g}% IoU between members' maps (right), means over samples")


def _overlay(s: SampleResult, members: list[str]) -> "plt.Figure":
    shown = [m for m in members if m in s.canvas]
    n = 1 + len(shown)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 0.6, 3.6), layout="constrained")
    axes = np.atleast_1d(axes)
    img = s.thumb
    w, h = s.size
    for ax in axes:
        ax.imshow(img, extent=(0, w, h, 0))
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.axis("off")
    axes[0].set_title("image", fontsize=9)
    vmax = max((float(s.canvas[m].max()) for m in shown), default=1.0)  # one scale for all members
    im = None
    for ax, m in zip(axes[1:], shown):
        im = ax.imshow(s.canvas[m], extent=(0, w, h, 0), cmap="jet", alpha=0.5, interpolation="bilinear",
                       vmin=0.0, vmax=vmax)
        ax.set_title(f"{m} (share {float(s.shares[m].mean()):.3f})", fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=list(axes[1:]), fraction=0.025, pad=0.02, label="attention density")
    q = s.question if len(s.question) <= 80 else s.question[:77] + "..."
    fig.suptitle(q, fontsize=9)
    return fig
