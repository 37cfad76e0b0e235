"""``analysis align``: are the members' projected visual tokens in the same LLM input space?

For every member, the visual tokens its own vision branch produces (the LLM
input, ``[N, D_llm]`` per image) are streamed over the images through the
shared pipeline (:mod:`analysis.features`) into running moments: no token
matrix of the whole set is ever held. Entities compared:

- each member;
- ``<member>~randproj``: the control, the same branch with every non-encoder
  parameter (projector/adapter) replaced by Gaussian noise of the same per-tensor
  mean and std (what "unaligned but same scale" looks like);
- ``text``: the LLM's own text-token embedding rows (rows with a near-zero norm,
  i.e. never-trained reserved tokens, are left out and counted).

Per pair: cosine of mean tokens, per-dimension mean/variance gaps, Gaussian KL
(both ways, covariances regularised by ``ridge * mean variance * I``) and Fréchet
distance; linear CKA between spatially matched tokens when both branches give
the same token layout on every image, and linear CKA between per-image mean
tokens always (images matched).

Verdict: the one ``fuse check`` prints (:mod:`fuse.alignment`), computed from the
per-image mean tokens gathered here: the members' shared-direction similarity against
each member vs the other member's random-projector control.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fuse.alignment import CONTROL_DRAWS, random_projector_copy  # the control of `fuse check`

from fuse.devices import resolve_device

from . import metrics as M
from .features import BranchTokens, ExtractStats, ImageSelection, iter_features
from .options import PipelineOptions
from .report import Report, intake_bullets, heatmap, plt
from .sources import Sources

CONTROL_SUFFIX = "~randproj"
TEXT = "text"


# ---------------------------------------------------------------------------
# Streaming statistics
# ---------------------------------------------------------------------------
class TokenStats:
    """Running sums of one entity's tokens ``x [N, D]``, shifted by the first batch's mean
    for numerical stability (float32 products, float64 accumulators)."""

    def __init__(self, sample_per_image: int = 32, seed: int = 0, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.n = 0
        self.shift: torch.Tensor | None = None
        self.s: torch.Tensor | None = None
        self.ss: torch.Tensor | None = None
        self.image_means: list[torch.Tensor] = []
        self.sample: list[torch.Tensor] = []
        self.sample_per_image = sample_per_image
        self.gen = torch.Generator().manual_seed(seed)

    def centred(self, x: torch.Tensor) -> torch.Tensor:
        """``x - shift`` as float32 on the accumulation device (sets the shift on first use)."""
        x = x.to(self.device, torch.float32)
        if self.shift is None:
            self.shift = x.mean(0)
            d = x.shape[1]
            self.s = torch.zeros(d, dtype=torch.float64, device=self.device)
            self.ss = torch.zeros(d, d, dtype=torch.float64, device=self.device)
        return x - self.shift

    def add(self, x: torch.Tensor, per_image: Sequence[int] | None = None) -> torch.Tensor:
        """Add tokens ``x [N, D]``; ``per_image`` splits N into images (one image if None).
        Returns the centred float32 tokens (for cross products)."""
        xc = self.centred(x)
        self.s += xc.sum(0, dtype=torch.float64)
        self.ss += (xc.T @ xc).double()
        self.n += xc.shape[0]
        parts = torch.split(xc, list(per_image)) if per_image is not None else (xc,)
        for part in parts:
            self.image_means.append((part.mean(0) + self.shift).cpu())
            if self.sample_per_image:
                k = min(self.sample_per_image, part.shape[0])
                idx = torch.randperm(part.shape[0], generator=self.gen)[:k]
                self.sample.append((part[idx.to(part.device)] + self.shift).cpu())
        return xc

    @property
    def dim(self) -> int:
        return int(self.s.shape[0])

    def gaussian(self) -> M.Gaussian:
        s, ss = self.s.cpu().numpy(), self.ss.cpu().numpy()
        m = s / self.n
        cov = ss / self.n - np.outer(m, m)
        cov = 0.5 * (cov + cov.T)
        return M.Gaussian(self.shift.double().cpu().numpy() + m, cov, self.n)

    def sample_matrix(self) -> np.ndarray:
        return torch.cat(self.sample).numpy() if self.sample else np.zeros((0, self.dim))

    def image_mean_matrix(self) -> np.ndarray:
        return torch.stack(self.image_means).double().numpy()


class CrossStats:
    """``Xc^T Yc`` of spatially matched tokens of two entities (valid while every image matched)."""

    def __init__(self):
        self.xy: torch.Tensor | None = None
        self.valid = True
        self.reason = ""

    def add(self, xc: torch.Tensor, yc: torch.Tensor) -> None:
        prod = (xc.T @ yc).double()
        self.xy = prod if self.xy is None else self.xy + prod

    def invalidate(self, reason: str) -> None:
        self.valid, self.reason, self.xy = False, reason, None

    def cka(self, a: TokenStats, b: TokenStats) -> float | None:
        if not self.valid or self.xy is None:
            return None
        return M.cka_from_moments(a.n, a.s.cpu().numpy(), b.s.cpu().numpy(), a.ss.cpu().numpy(),
                                  b.ss.cpu().numpy(), self.xy.cpu().numpy())


# ---------------------------------------------------------------------------
# Controls
# ---------------------------------------------------------------------------
# ---------------------------------------------------------------------------
# Text reference
# ---------------------------------------------------------------------------
def text_stats(table: torch.Tensor, sample: int = 2000, seed: int = 0, device: str | torch.device = "cpu",
               chunk: int = 8192, min_norm_ratio: float = 1e-3) -> tuple[TokenStats, dict[str, int]]:
    """Moments of the embedding rows ``table [V, D]`` (any dtype; processed ``chunk`` rows at a time,
    never copied whole), skipping rows whose norm is below ``min_norm_ratio`` x the median norm
    (untrained/reserved tokens)."""
    norms = torch.cat([table[i:i + chunk].float().norm(dim=1) for i in range(0, table.shape[0], chunk)])
    keep = norms >= min_norm_ratio * norms.median()
    st = TokenStats(sample_per_image=0, seed=seed, device=device)
    for i in range(0, table.shape[0], chunk):
        rows = table[i:i + chunk][keep[i:i + chunk]]
        if rows.shape[0]:
            st.add(rows)
    st.image_means = []
    kept_idx = keep.nonzero().squeeze(1)
    g = torch.Generator().manual_seed(seed)
    pick = kept_idx[torch.randperm(kept_idx.shape[0], generator=g)[:sample]]
    st.sample = [table[pick].float()]
    return st, {"rows": int(table.shape[0]), "used": int(keep.sum()), "excluded_near_zero": int((~keep).sum())}


def prompt_embeds(text_side: Any, table: torch.Tensor, prompt: str) -> torch.Tensor | None:
    """Embeddings ``[T, D]`` of ``prompt`` under a member's tokenizer (for text-conditioned branches)."""
    if text_side is None or getattr(text_side, "tokenizer_path", None) is None:
        return None
    ids = text_side.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = [i for i in ids if i < table.shape[0]]
    return table[torch.tensor(ids, dtype=torch.long)].float() if ids else None


# ---------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------
@dataclass
class AlignResult:
    entities: list[str]
    roles: dict[str, str]  # name -> member | control | text
    stats: dict[str, TokenStats]
    gauss: dict[str, M.Gaussian]
    pairs: dict[tuple[str, str], dict[str, Any]]
    extract: ExtractStats
    text_info: dict[str, int]
    notes: list[str] = field(default_factory=list)
    grids: dict[str, Any] = field(default_factory=dict)
    verdict: Any = None  # fuse.alignment.AlignmentVerdict (None without controls or with < 2 members)


def run_align(sources: Sources, paths: Sequence[Path], pipeline: PipelineOptions = PipelineOptions(), *,
              control: str = "all", ridge: float = 1e-4, sample_per_image: int = 32,
              prompt: str = "Describe the image.") -> AlignResult:
    """Stream every member (and control) over ``paths`` and compute all pairwise figures (``pipeline``:
    batch size, workers, device, cache, seed, progress)."""
    dev = resolve_device(pipeline.device)
    seed = pipeline.seed
    notes: list[str] = []
    table = sources.embed_table()
    extractors: dict[str, BranchTokens] = {}
    controls: dict[str, BranchTokens] = {}
    roles: dict[str, str] = {}
    members = sources.members
    ctrl_of = {"all": [m.name for m in members], "first": [members[0].name], "none": []}[control]
    for i, m in enumerate(members):
        te = prompt_embeds(m.text, table, prompt) if getattr(m.branch, "needs_text", False) else None
        if getattr(m.branch, "needs_text", False):
            notes.append(f"{m.name}: text-conditioned branch, prompt {prompt!r} used for its visual tokens")
        extractors[m.name] = BranchTokens(m.branch, m.name, text_embeds=te)
        roles[m.name] = "member"
        if m.name in ctrl_of:
            ctrl, replaced = random_projector_copy(m.branch, seed=seed + 1000 + 100 * i)  # = fuse check's first draw
            if not replaced:
                notes.append(f"{m.name}: no non-encoder parameters, no random-projector control")
                continue
            controls[m.name + CONTROL_SUFFIX] = BranchTokens(ctrl, m.name + CONTROL_SUFFIX, text_embeds=te)
            roles[m.name + CONTROL_SUFFIX] = "control"
    extractors.update(controls)  # members first, then controls
    names = list(extractors)
    stats = {n: TokenStats(sample_per_image, seed=seed + k, device=dev) for k, n in enumerate(names)}
    # spatially matched pairs: member-member and member-control
    cross_pairs = [(a, b) for a, b in itertools.combinations(names, 2)
                   if roles[a] == roles[b] == "member" or (roles[b] == "control" and b == a + CONTROL_SUFFIX)]
    cross = {p: CrossStats() for p in cross_pairs}
    layouts: dict[str, Any] = {}
    ex = ExtractStats()
    for fb in iter_features(paths, extractors, **{**pipeline.extraction(), "device": dev}, stats=ex, desc="align"):
        centred: dict[str, torch.Tensor] = {}
        lay: dict[str, list] = {}
        for n in names:
            toks = [o[n]["tokens"] for o in fb.outputs]
            lay[n] = [(tuple(t.shape), tuple(map(tuple, o[n]["grid"].tolist())) if "grid" in o[n] else None)
                      for t, o in zip(toks, fb.outputs)]
            layouts.setdefault(n, lay[n][0])
            dims = {t.shape[1] for t in toks}
            if len(dims) != 1:
                raise ValueError(f"{n}: visual tokens of different widths {sorted(dims)}")
            centred[n] = stats[n].add(torch.cat(toks), [t.shape[0] for t in toks])
        for (a, b), cs in cross.items():
            if not cs.valid:
                continue
            if lay[a] != lay[b]:
                cs.invalidate(f"token layouts differ ({_layout_str(lay[a][0])} vs {_layout_str(lay[b][0])})")
                continue
            cs.add(centred[a], centred[b])
    if ex.done == 0:
        from fuse.errors import DataError

        raise DataError(f"none of the {len(paths)} images could be read")
    tstats, tinfo = text_stats(table, seed=seed, device=dev)
    del table
    entities = names + [TEXT]
    roles[TEXT] = "text"
    stats[TEXT] = tstats
    gauss = {n: stats[n].gaussian() for n in entities}
    dims = {n: g.mean.shape[0] for n, g in gauss.items()}
    pairs: dict[tuple[str, str], dict[str, Any]] = {}
    for a, b in itertools.combinations(entities, 2):
        if dims[a] != dims[b]:
            notes.append(f"{a} vs {b}: widths differ ({dims[a]} vs {dims[b]}), distribution metrics skipped")
            continue
        r = M.distribution_metrics(gauss[a], gauss[b], ridge=ridge)
        if TEXT not in (a, b):
            r["cka_image_means"] = (M.linear_cka(stats[a].image_mean_matrix(), stats[b].image_mean_matrix())
                                    if ex.done >= 2 else None)
            cs = cross.get((a, b))
            r["cka_tokens"] = cs.cka(stats[a], stats[b]) if cs is not None else None
            if cs is not None and not cs.valid:
                r["cka_tokens_note"] = cs.reason
        pairs[(a, b)] = r
    return AlignResult(entities, roles, stats, gauss, pairs, ex, tinfo, notes,
                       {n: _layout_str(layouts[n]) for n in names}, _verdict(stats, roles, ex.done))


def _verdict(stats: dict[str, TokenStats], roles: dict[str, str], n_images: int):
    """``fuse check``'s verdict (:mod:`fuse.alignment`) from the image-mean tokens gathered here."""
    from fuse.alignment import verdict_from_statistics

    members = [n for n, r in roles.items() if r == "member"]
    if len(members) < 2 or n_images < 2:
        return None
    means = {n: torch.from_numpy(stats[n].image_mean_matrix()) for n in members}
    ctrl = {n: ([torch.from_numpy(stats[n + CONTROL_SUFFIX].image_mean_matrix())] if n + CONTROL_SUFFIX in stats
                else []) for n in members}
    if not any(ctrl.values()):
        return None
    return verdict_from_statistics({n: (means[n], ctrl[n]) for n in members}, n_images)


def _layout_str(layout: Any) -> str:
    shape, grid = layout
    g = "+".join(f"{h}x{w}" for h, w in grid) if grid else "?"
    return f"{shape[0]} tokens ({g}) x {shape[1]}"


def pair(result: AlignResult, a: str, b: str) -> dict[str, Any] | None:
    return result.pairs.get((a, b)) or result.pairs.get((b, a))


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------
PAIR_COLUMNS = [("cos_mean", "cos(means)"), ("mean_gap_rel", "mean gap / spread"), ("log_var_ratio", "|ln var ratio|"),
                ("kl_sym_per_dim", "sym. KL / dim"), ("frechet", "Fréchet"), ("cka_tokens", "CKA tokens"),
                ("cka_image_means", "CKA image means")]


def build_report(result: AlignResult, sources: Sources, selection: ImageSelection, command: str = "") -> Report:
    rep = Report("Visual-token alignment", command)
    members = [e for e in result.entities if result.roles[e] == "member"]
    ex = result.extract
    rep.para(f"Source: {sources.kind} `{sources.path}`; text reference: embedding table of `{sources.embed_from}`.")
    rep.heading("Images")
    rep.bullets(intake_bullets(ex.summary(), selection.note, ex.skipped))
    rep.heading("Entities")
    rows = []
    for e in result.entities:
        g = result.gauss[e]
        rows.append([e, result.roles[e], result.grids.get(e, f"{result.text_info['used']} rows"), g.n,
                     float(np.linalg.norm(g.mean)), float(np.sqrt(g.var.mean()))])
    rep.table(["entity", "role", "token layout (first image)", "vectors", "|mean|", "rms std"], rows)
    if result.text_info.get("excluded_near_zero"):
        rep.para(f"{result.text_info['excluded_near_zero']} embedding rows with a near-zero norm were left out of "
                 "the text reference.")
    rep.heading("Verdict")
    if result.verdict is None:
        rep.para("No verdict: it needs at least two members, two images and random-projector controls "
                 "(`--control all` or `first`).")
    else:
        v = result.verdict
        rep.para(v.lines()[-1].replace("alignment verdict: ", "**Verdict:** "))
        rep.para(f"Shared-direction similarity (cosine of the members' centred per-image mean tokens, coordinates "
                 f"not rotated) against the same figure between each member and the other member's random-projector "
                 f"control (RMS); a pair is aligned when it is at least {v.ratio:g} x the control and at least "
                 f"{v.floor:g}, the rule of `fuse check` (which draws {CONTROL_DRAWS} controls per member; this report "
                 "draws one, so its control level is noisier).")
        rep.table(["pair", "similarity", "control", "ratio", "aligned"],
                  [[f"{p.a} vs {p.b}", p.similarity, p.control, p.ratio, "yes" if p.aligned else "no"]
                   for p in v.pairs])
    rep.heading("Member pairs")
    mp = [(a, b) for a, b in itertools.combinations(members, 2)]
    _pair_table(rep, result, mp)
    rep.heading("References")
    rep.para("Each member against the LLM's text-token embeddings and against its random-projector control. "
             "Member-pair figures near the self-identity (cos 1, gaps 0, KL/Fréchet 0, CKA 1) and much closer "
             "than a member is to its own control mean the members share one LLM input space.")
    refs = [(m, TEXT) for m in members] + [(m, m + CONTROL_SUFFIX) for m in members
                                           if m + CONTROL_SUFFIX in result.roles]
    _pair_table(rep, result, refs)
    if result.notes:
        rep.heading("Notes")
        rep.bullets(result.notes)
    _figures(rep, result)
    rep.numbers = {
        "source": {"kind": sources.kind, "path": str(sources.path), "text_reference": sources.embed_from},
        "images": {**ex.to_dict(), "available": selection.available, "requested_n": selection.requested},
        "text_reference": result.text_info,
        "entities": {e: {"role": result.roles[e], "layout": result.grids.get(e), "vectors": result.gauss[e].n,
                         "dim": int(result.gauss[e].mean.shape[0]),
                         "mean": result.gauss[e].mean, "std": np.sqrt(np.clip(result.gauss[e].var, 0, None))}
                     for e in result.entities},
        "pairs": {f"{a}|{b}": r for (a, b), r in result.pairs.items()},
        "verdict": result.verdict.to_dict() if result.verdict is not None else None,
        "notes": result.notes,
    }
    return rep


def _pair_table(rep: Report, result: AlignResult, pairs: list[tuple[str, str]]) -> None:
    rows = []
    for a, b in pairs:
        r = pair(result, a, b)
        if r is None:
            continue
        rows.append([f"{a} vs {b}"] + [r.get(k) for k, _ in PAIR_COLUMNS])
    if rows:
        rep.table(["pair"] + [h for _, h in PAIR_COLUMNS], rows)
    else:
        rep.para("(none)")


def _figures(rep: Report, result: AlignResult) -> None:
    ents = result.entities
    colors = plt.get_cmap("tab10")
    # PCA of token samples
    samples = {e: result.stats[e].sample_matrix() for e in ents}
    dims = {s.shape[1] for s in samples.values() if len(s)}
    rep.heading("Figures")
    if len(dims) == 1:
        allx = np.concatenate([s for s in samples.values() if len(s)])
        mu = allx.mean(0)
        _, _, vt = np.linalg.svd(allx - mu, full_matrices=False)
        fig, ax = plt.subplots(figsize=(6.5, 5.5))
        for k, e in enumerate(ents):
            if not len(samples[e]):
                continue
            p = (samples[e] - mu) @ vt[:2].T
            marker = {"member": "o", "control": "x", "text": "."}[result.roles[e]]
            ax.scatter(p[:, 0], p[:, 1], s=8, alpha=0.5, marker=marker, color=colors(k % 10), label=e)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.legend(markerscale=2, fontsize=8)
        ax.set_title("Tokens, 2-D PCA (shared basis)")
        rep.figure(fig, "pca", "2-D PCA of sampled visual tokens (per member and control) and text embeddings")
    # per-dimension mean / std
    fig, axes = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    for k, e in enumerate(ents):
        g = result.gauss[e]
        style = {"member": "-", "control": ":", "text": "--"}[result.roles[e]]
        axes[0].plot(g.mean, style, lw=0.8, color=colors(k % 10), label=e)
        axes[1].plot(np.sqrt(np.clip(g.var, 0, None)), style, lw=0.8, color=colors(k % 10), label=e)
    axes[0].set_ylabel("mean")
    axes[1].set_ylabel("std")
    axes[1].set_xlabel("dimension")
    axes[0].legend(fontsize=7, ncol=3)
    axes[0].set_title("Per-dimension mean and std")
    fig.tight_layout()
    rep.figure(fig, "per_dim", "Per-dimension mean (top) and standard deviation (bottom) of each entity")
    # pairwise heat maps
    for key, title, cmap in (("cos_mean", "cosine of mean tokens", "viridis"),
                             ("frechet", "Fréchet distance", "magma_r"),
                             ("kl_sym_per_dim", "symmetric Gaussian KL per dimension", "magma_r"),
                             ("cka_image_means", "linear CKA of per-image mean tokens", "viridis")):
        mat = np.full((len(ents), len(ents)), np.nan)
        for i, a in enumerate(ents):
            for j, b in enumerate(ents):
                if i == j:
                    mat[i, j] = {"cos_mean": 1.0, "cka_image_means": 1.0}.get(key, 0.0)
                    if key == "cka_image_means" and a == TEXT:
                        mat[i, j] = np.nan
                    continue
                r = pair(result, a, b)
                v = r.get(key) if r else None
                mat[i, j] = np.nan if v is None else v
        rep.figure(heatmap(mat, ents, title, cmap=cmap), f"heat_{key}", f"Pairwise {title}")
