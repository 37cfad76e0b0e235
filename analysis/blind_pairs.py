"""``analysis blind-pairs``: MMVP's CLIP-blind pairs.

A pair of images is *CLIP-blind* when CLIP sees them as near-identical while a
vision-only self-supervised model (DINOv2) sees them as different:
``cos_clip > clip_min`` (0.95) and ``cos_dino < dino_max`` (0.6) (MMVP, "Eyes Wide Shut").

Embeddings (our choice, following MMVP which compares CLIP-L/14 and DINOv2-L/14 image
embeddings):

- ``clip``: CLIP's image embedding, i.e. ``visual_projection(post_layernorm(CLS))``, the vector
  CLIP matches against text. The projection is read from the checkpoint's
  ``visual_projection.weight`` (full ``CLIPModel`` / ``CLIPVisionModelWithProjection`` weights);
  a vision-only checkpoint without it falls back to the pooled output and the report says so.
- ``dinov2``: the final-LayerNorm CLS token (``Dinov2Model`` ``pooler_output``), DINOv2's global
  image descriptor.
- ``siglip``: SigLIP's attention-pooled output (``pooler_output``).

All encoders come from the :mod:`fuse.encoders` registry; images go through the shared
pipeline (:mod:`analysis.features`). Mining is blockwise: cosine matrices are computed
``block x block`` at a time over the upper triangle (no N^2 Python loop, memory bounded by
one block), CLIP candidates are filtered first and DINO similarities computed only for them.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from fuse.devices import resolve_device
from fuse.errors import CheckpointError, DataError

from .features import ExtractStats, Extractor, ImageSelection, extract, module_fingerprint, tensor_digest
from .options import PipelineOptions
from .report import Report, intake_bullets, plt


# ---------------------------------------------------------------------------
# Embedders (registry)
# ---------------------------------------------------------------------------
class PooledEmbedding(Extractor):
    """One global vector per image from a registry encoder: ``{"embedding": [P]}``.

    ``pooler_output`` of the transformers vision model (CLIP: post-LN CLS; DINOv2: final-LN CLS;
    SigLIP: attention pool), optionally followed by ``projection [P, D]`` (CLIP's visual projection).
    """

    def __init__(self, encoder, projection: torch.Tensor | None = None, what: str = ""):
        self.encoder = encoder
        self.projection = projection
        self.what = what or f"{encoder.kind} pooled output"
        self.label = f"{encoder.kind} embeddings"
        self._key: str | None = None

    @property
    def key(self) -> str:
        if self._key is None:
            extra = {"spec": self.encoder.spec(),
                     "proj": None if self.projection is None else tensor_digest(self.projection)}
            self._key = module_fingerprint(self.encoder, extra)
        return f"{self.encoder.kind}-{self._key}/embedding"

    def to_input(self, image: Image.Image) -> torch.Tensor:
        return self.encoder.preprocess([image])[0]

    def run(self, batch: torch.Tensor, device: torch.device) -> list[dict[str, torch.Tensor]]:
        enc = self.encoder
        out = enc.model(pixel_values=batch.to(device, enc.dtype))
        emb = out.pooler_output.float()
        if self.projection is not None:
            emb = emb @ self.projection.to(device, torch.float32).T
        return [{"embedding": e} for e in emb.cpu()]

    def modules(self) -> list[torch.nn.Module]:
        return [self.encoder]


def _checkpoint_dir(source: str) -> Path:
    from fuse.members import resolve_path

    return resolve_path(source)


def build_clip_embedder(source: str, dtype: torch.dtype | None = None) -> PooledEmbedding:
    from fuse.checkpoint import LazyCheckpoint
    from fuse.encoders import build_encoder

    path = _checkpoint_dir(source)
    enc = build_encoder("clip", path, dtype=dtype)
    proj = None
    try:
        reader = LazyCheckpoint(path)
        key = next((k for k in reader.keys() if k.endswith("visual_projection.weight")), None)
        if key is not None:
            proj = reader.get(key, torch.float32)
    except CheckpointError:
        proj = None
    what = ("CLIP image embedding (visual projection of the post-LN CLS)" if proj is not None else
            "CLIP post-LN CLS (no visual_projection.weight in the checkpoint: unprojected)")
    return PooledEmbedding(enc, proj, what)


def _pooled_builder(kind: str, what: str) -> Callable[..., PooledEmbedding]:
    def build(source: str, dtype: torch.dtype | None = None) -> PooledEmbedding:
        from fuse.encoders import build_encoder

        return PooledEmbedding(build_encoder(kind, _checkpoint_dir(source), dtype=dtype), None, what)

    return build


EMBEDDERS: dict[str, Callable[..., Extractor]] = {
    "clip": build_clip_embedder,
    "dinov2": _pooled_builder("dinov2", "DINOv2 final-LN CLS token"),
    "siglip": _pooled_builder("siglip", "SigLIP attention-pooled embedding"),
}


def build_embedder(kind: str, source: str, dtype: torch.dtype | None = None) -> Extractor:
    if kind not in EMBEDDERS:
        raise DataError(f"embedder {kind!r} unknown; known: {', '.join(sorted(EMBEDDERS))}")
    return EMBEDDERS[kind](source, dtype=dtype)


# ---------------------------------------------------------------------------
# Mining
# ---------------------------------------------------------------------------
@dataclass
class Pairs:
    """Mined pairs, sorted by ``gap = sim_a - sim_b`` (most CLIP-blind first)."""

    i: np.ndarray
    j: np.ndarray
    sim_a: np.ndarray
    sim_b: np.ndarray
    found: int  # pairs meeting both thresholds (may exceed len(i) when truncated)

    @property
    def gap(self) -> np.ndarray:
        return self.sim_a - self.sim_b

    def __len__(self) -> int:
        return len(self.i)

    @property
    def truncated(self) -> bool:
        return self.found > len(self.i)


def mine_pairs(emb_a: torch.Tensor, emb_b: torch.Tensor, a_min: float = 0.95, b_max: float = 0.6,
               block: int = 4096, max_pairs: int = 1_000_000, device: str | torch.device = "cpu",
               progress: bool = False) -> Pairs:
    """All pairs ``i < j`` with ``cos_a(i, j) > a_min`` and ``cos_b(i, j) < b_max``.

    ``emb_a [N, Da]``, ``emb_b [N, Db]`` (rows matched). Cosine blocks ``[block, block]`` are
    computed over the upper triangle only; memory is O(N*D + block^2). At most ``max_pairs``
    pairs are kept (largest ``cos_a - cos_b``); ``found`` counts all.
    """
    if emb_a.shape[0] != emb_b.shape[0]:
        raise ValueError(f"embeddings must be matched: {emb_a.shape[0]} vs {emb_b.shape[0]} rows")
    from tqdm.auto import tqdm

    dev = torch.device(device)
    a = F.normalize(emb_a.to(dev, torch.float32), dim=1)
    b = F.normalize(emb_b.to(dev, torch.float32), dim=1)
    n = a.shape[0]
    starts = list(range(0, n, block))
    keep: list[tuple[torch.Tensor, ...]] = []
    kept, found = 0, 0
    todo = len(starts) * (len(starts) + 1) // 2
    bar = tqdm(total=todo, desc="mining pairs", unit="block", disable=not progress, leave=False)
    for bi in starts:
        ai = a[bi:bi + block]
        for bj in starts[starts.index(bi):]:
            s = ai @ a[bj:bj + block].T  # [bs_i, bs_j]
            mask = s > a_min
            if bi == bj:
                mask &= torch.ones_like(mask).triu(1)
            ii, jj = mask.nonzero(as_tuple=True)
            bar.update(1)
            if ii.numel() == 0:
                continue
            sa = s[ii, jj]
            gi, gj = ii + bi, jj + bj
            sb = (b[gi] * b[gj]).sum(1)
            ok = sb < b_max
            if not ok.any():
                continue
            found += int(ok.sum())
            keep.append((gi[ok].cpu(), gj[ok].cpu(), sa[ok].cpu(), sb[ok].cpu()))
            kept += int(ok.sum())
            if kept > 2 * max_pairs:
                keep = [_top(*map(torch.cat, zip(*keep)), max_pairs)]
                kept = len(keep[0][0])
    bar.close()
    if not keep:
        e = np.zeros(0, dtype=np.int64)
        return Pairs(e, e, np.zeros(0), np.zeros(0), 0)
    gi, gj, sa, sb = _top(*map(torch.cat, zip(*keep)), max_pairs)
    return Pairs(gi.numpy(), gj.numpy(), sa.double().numpy(), sb.double().numpy(), found)


def _top(gi: torch.Tensor, gj: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """The ``k`` pairs with the largest gap, sorted by gap (desc), then (i, j) for ties."""
    gap = (sa - sb).double()
    # stable order: by (i, j) first, then by gap descending
    order = torch.from_numpy(np.lexsort((gj.numpy(), gi.numpy(), -gap.numpy())))[:k]
    return gi[order], gj[order], sa[order], sb[order]


def random_pair_sims(emb_a: torch.Tensor, emb_b: torch.Tensor, n_pairs: int = 20000,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cosines of uniformly sampled pairs ``i != j`` (for the background of the scatter plot)."""
    n = emb_a.shape[0]
    if n < 2:
        return np.zeros(0), np.zeros(0)
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(0, n, (n_pairs,), generator=g)
    j = (i + torch.randint(1, n, (n_pairs,), generator=g)) % n
    a, b = F.normalize(emb_a.float(), dim=1), F.normalize(emb_b.float(), dim=1)
    return (a[i] * a[j]).sum(1).numpy(), (b[i] * b[j]).sum(1).numpy()


# ---------------------------------------------------------------------------
# Run + report
# ---------------------------------------------------------------------------
@dataclass
class BlindResult:
    paths: list[Path]  # images with embeddings (row order of the embeddings)
    emb_clip: torch.Tensor
    emb_dino: torch.Tensor
    pairs: Pairs
    stats: ExtractStats
    clip_what: str
    dino_what: str


def run_blind_pairs(paths: Sequence[Path], clip: Extractor, dino: Extractor,
                    pipeline: PipelineOptions = PipelineOptions(batch_size=32), *, clip_min: float = 0.95,
                    dino_max: float = 0.6, block: int = 4096, max_pairs: int = 1_000_000) -> BlindResult:
    """Embed ``paths`` with both extractors (one decode per image) and mine the pairs."""
    idx, outs, stats = extract(paths, {"clip": clip, "dino": dino}, **pipeline.extraction())
    if len(idx) < 2:
        raise DataError(f"need at least 2 readable images to form pairs, got {len(idx)}")
    ec = torch.stack([o["clip"]["embedding"] for o in outs])
    ed = torch.stack([o["dino"]["embedding"] for o in outs])
    pairs = mine_pairs(ec, ed, clip_min, dino_max, block=block, max_pairs=max_pairs,
                       device=resolve_device(pipeline.device), progress=pipeline.progress)
    return BlindResult([Path(paths[i]) for i in idx], ec, ed, pairs, stats,
                       getattr(clip, "what", clip.label), getattr(dino, "what", dino.label))


def pairs_csv(res: BlindResult, root: Path | None = None) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["rank", "image_a", "image_b", "clip_cos", "dino_cos", "gap"])
    p = res.pairs
    for r in range(len(p)):
        w.writerow([r + 1, _rel(res.paths[p.i[r]], root), _rel(res.paths[p.j[r]], root),
                    f"{p.sim_a[r]:.6f}", f"{p.sim_b[r]:.6f}", f"{p.gap[r]:.6f}"])
    return buf.getvalue()


def _rel(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return str(path.relative_to(root))
        except ValueError:
            pass
    return str(path)


def contact_sheet(res: BlindResult, top: int = 12, thumb: int = 160) -> bytes | None:
    """PNG: one row per pair (two thumbnails + the two cosines), most CLIP-blind first."""
    from fuse.images import load_image

    p = res.pairs
    k = min(top, len(p))
    if k == 0:
        return None
    pad, text_w = 8, 230
    row_h = thumb + 2 * pad
    sheet = Image.new("RGB", (2 * thumb + 3 * pad + text_w, k * row_h), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for r in range(k):
        y = r * row_h + pad
        for c, idx in enumerate((p.i[r], p.j[r])):
            try:
                im = load_image(res.paths[idx])
            except DataError:
                im = Image.new("RGB", (thumb, thumb), "grey")
            im.thumbnail((thumb, thumb))
            sheet.paste(im, (pad + c * (thumb + pad) + (thumb - im.width) // 2, y + (thumb - im.height) // 2))
        x = 2 * thumb + 3 * pad
        lines = [f"#{r + 1}", f"CLIP cos {p.sim_a[r]:.3f}", f"DINO cos {p.sim_b[r]:.3f}",
                 res.paths[p.i[r]].name[:32], res.paths[p.j[r]].name[:32]]
        for li, line in enumerate(lines):
            draw.text((x, y + 4 + 16 * li), line, fill="black", font=font)
        draw.line([(0, (r + 1) * row_h - 1), (sheet.width, (r + 1) * row_h - 1)], fill=(200, 200, 200))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def build_report(res: BlindResult, sel: ImageSelection, clip_min: float, dino_max: float, top: int = 12,
                 command: str = "", root: Path | None = None, json_limit: int = 1000) -> Report:
    rep = Report("CLIP-blind pairs", command)
    p, st = res.pairs, res.stats
    rep.para(f"A pair is CLIP-blind when CLIP cosine > {clip_min} and DINO cosine < {dino_max} (MMVP).")
    rep.bullets([f"CLIP side: {res.clip_what}.", f"DINO side: {res.dino_what}."])
    rep.heading("Images")
    rep.bullets(intake_bullets(st.summary(), sel.note, st.skipped))
    n = len(res.paths)
    rep.heading("Pairs")
    msg = f"{p.found} CLIP-blind pair(s) among {n * (n - 1) // 2} pairs of {n} images."
    if p.truncated:
        msg += f" Only the {len(p)} with the largest gap are kept."
    rep.para(msg)
    rows = [[r + 1, _rel(res.paths[p.i[r]], root), _rel(res.paths[p.j[r]], root), p.sim_a[r], p.sim_b[r]]
            for r in range(min(top, len(p)))]
    if rows:
        rep.table(["rank", "image A", "image B", "CLIP cos", "DINO cos"], rows)
    rep.attach("pairs.csv", pairs_csv(res, root), "All pairs (CSV)")
    sheet = contact_sheet(res, top)
    if sheet is not None:
        rep.image(sheet, "contact_sheet", f"Top {min(top, len(p))} CLIP-blind pairs")
    sa, sb = random_pair_sims(res.emb_clip, res.emb_dino)
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.scatter(sa, sb, s=3, alpha=0.3, color="grey", label="random pairs")
    if len(p):
        ax.scatter(p.sim_a[:5000], p.sim_b[:5000], s=10, color="crimson", label="CLIP-blind pairs")
    ax.axvline(clip_min, color="k", ls="--", lw=0.8)
    ax.axhline(dino_max, color="k", ls="--", lw=0.8)
    ax.set_xlabel("CLIP cosine")
    ax.set_ylabel("DINO cosine")
    ax.legend(fontsize=8)
    ax.set_title("Pair similarities")
    rep.figure(fig, "similarities", "CLIP vs DINO cosine of random pairs and of the mined pairs (thresholds dashed)")
    k = min(json_limit, len(p))
    rep.numbers = {
        "thresholds": {"clip_min": clip_min, "dino_max": dino_max},
        "embeddings": {"clip": res.clip_what, "dino": res.dino_what, "clip_dim": int(res.emb_clip.shape[1]),
                       "dino_dim": int(res.emb_dino.shape[1])},
        "images": {**st.to_dict(), "available": sel.available, "requested_n": sel.requested, "embedded": n},
        "pairs_found": p.found, "pairs_kept": len(p), "pairs_in_json": k,
        "pairs": [{"image_a": _rel(res.paths[p.i[r]], root), "image_b": _rel(res.paths[p.j[r]], root),
                   "clip_cos": p.sim_a[r], "dino_cos": p.sim_b[r]} for r in range(k)],
        "random_pairs": {"clip_cos_mean": float(sa.mean()) if len(sa) else None,
                         "dino_cos_mean": float(sb.mean()) if len(sb) else None, "n": int(len(sa))},
    }
    return rep


__all__ = ["EMBEDDERS", "PooledEmbedding", "Pairs", "build_embedder", "mine_pairs", "run_blind_pairs",
           "build_report", "contact_sheet", "pairs_csv"]
