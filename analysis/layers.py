"""``analysis layers``: how similar are an encoder's layers? (COMM's question)

COMM feeds CLIP's patch features of *all* layers and DINOv2's deep layers to the
LLM because layers carry different information. This report measures it: the
hidden states of every layer (HF indexing: 0 = embeddings, i = block i) over a set
of images, then linear CKA between every pair of layers and to the last layer.

Samples (CKA needs matched samples across layers):

- ``--pool tokens`` (default): a fixed random subset of patch positions, the same
  positions for every image and layer; ``ceil(max_tokens / images)`` per image;
- ``--pool mean``: one mean-pooled vector per image and layer.

CKA is computed from centred Gram matrices (``[m, m]``, m = samples), so the
cost is ``L * m^2 * D`` and memory ``L * m^2`` floats.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fuse.errors import DataError, FormatError

from . import metrics as M
from .features import EncoderFeatures, ExtractStats, ImageSelection, iter_features
from .options import PipelineOptions
from .report import Report, intake_bullets, heatmap, plt

VIT_KINDS = ("clip", "siglip", "dinov2")


def load_encoder(kind: str, model: str | None = None, config: str | None = None,
                 dtype: torch.dtype | None = None):
    """A registry encoder from a checkpoint (dir / cached hub id) or a config JSON (random init)."""
    from fuse.encoders import build_encoder

    if kind not in VIT_KINDS:
        raise FormatError(f"--encoder {kind!r}: layer similarity needs a ViT encoder ({', '.join(VIT_KINDS)})")
    if (model is None) == (config is None):
        raise DataError("give exactly one of --model (checkpoint dir or hub id) and --config (config JSON)")
    if model is not None:
        from fuse.members import resolve_path

        return build_encoder(kind, resolve_path(model), dtype=dtype)
    p = Path(config)
    if not p.is_file():
        raise DataError(f"{p}: no such config file")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise DataError(f"{p}: expected a JSON object with the encoder config")
    return build_encoder(kind, config=cfg, dtype=dtype)


def layer_labels(n_states: int) -> list[str]:
    return ["emb"] + [str(i) for i in range(1, n_states)]


@dataclass
class LayersResult:
    kind: str
    labels: list[str]
    cka: np.ndarray  # [L, L]
    samples: int
    per_image: int | None
    pool: str
    stats: ExtractStats
    dims: list[int]


def token_positions(n_tokens: int, k: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_tokens, generator=g)[:k].tolist())


def run_layers(paths: Sequence[Path], encoder, pipeline: PipelineOptions = PipelineOptions(), *, pool: str = "tokens",
               max_tokens: int = 2048) -> LayersResult:
    """Hidden states of every layer over ``paths`` -> linear CKA matrix between layers (``pipeline.seed``
    picks the sampled token positions)."""
    if pool not in ("tokens", "mean"):
        raise ValueError(f"pool must be 'tokens' or 'mean', got {pool!r}")
    n_states = encoder.num_layers + 1
    layers = list(range(n_states))
    gh, gw = encoder.grid
    per_image = None
    if pool == "tokens":
        per_image = max(1, min(gh * gw, math.ceil(max_tokens / max(1, len(paths)))))
        ext = EncoderFeatures(encoder, layers, "patch", tokens=token_positions(gh * gw, per_image, pipeline.seed))
    else:
        ext = EncoderFeatures(encoder, layers, "patch", pool="mean")
    stats = ExtractStats()
    chunks: list[torch.Tensor] = []
    for fb in iter_features(paths, ext, stats=stats, desc=f"{encoder.kind} layers", **pipeline.extraction()):
        for o in fb.outputs:
            f = o["features"]  # [L, k, D] or [L, D]
            chunks.append(f if f.dim() == 3 else f[:, None])
    if not chunks:
        raise DataError(f"none of the {len(paths)} images could be read")
    feats = torch.cat(chunks, dim=1).float().numpy()  # [L, m, D]
    del chunks
    m = feats.shape[1]
    if m < 3:
        raise DataError(f"only {m} samples: layer CKA needs at least 3 (use more images or --pool tokens)")
    grams = [M.centred_gram(feats[i], np.float32) for i in range(feats.shape[0])]
    cka = M.cka_matrix(grams)
    return LayersResult(encoder.kind, layer_labels(n_states), cka, m, per_image, pool, stats,
                        [feats.shape[2]] * feats.shape[0])


def build_report(res: LayersResult, sel: ImageSelection, source: str, command: str = "") -> Report:
    rep = Report(f"Layer similarity: {res.kind}", command)
    st = res.stats
    rep.para(f"Encoder `{source}` ({res.kind}, {len(res.labels) - 1} blocks). Linear CKA between the hidden "
             "states of every pair of layers (0 = embeddings).")
    rep.heading("Samples")
    per_layer = f"{res.samples} samples per layer: " + (
        f"{res.per_image} fixed patch positions per image" if res.pool == "tokens" else "one mean-pooled vector per image")
    rep.bullets(intake_bullets(st.summary(), sel.note, st.skipped, extra=[per_layer]))
    last = res.cka[-1]
    rep.heading("CKA to the last layer")
    rep.table(["layer"] + res.labels, [["CKA to last"] + list(last)], digits=3)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.plot(range(len(last)), last, "o-")
    ax.set_xticks(range(len(last)), labels=res.labels, rotation=90 if len(last) > 16 else 0)
    ax.set_xlabel("layer")
    ax.set_ylabel("linear CKA to last layer")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title(f"{res.kind}: similarity of each layer to the last")
    rep.figure(fig, "cka_to_last", "Linear CKA of each layer to the last layer")
    rep.heading("Layer x layer")
    rep.figure(heatmap(res.cka, res.labels, f"{res.kind}: linear CKA between layers", vmin=0, vmax=1,
                       annotate=len(res.labels) <= 12), "cka_matrix", "Linear CKA between layers")
    rep.numbers = {
        "encoder": {"kind": res.kind, "source": source, "layers": res.labels, "dims": res.dims},
        "images": {**st.to_dict(), "available": sel.available, "requested_n": sel.requested},
        "pool": res.pool, "samples": res.samples, "tokens_per_image": res.per_image,
        "cka": res.cka, "cka_to_last": last,
    }
    return rep
