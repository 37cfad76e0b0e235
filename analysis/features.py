"""The one feature-extraction pipeline every report uses.

Images are decoded and preprocessed in DataLoader worker processes
(:func:`fuse.images.load_image` + the model's own preprocessing), batched, and
run through the model under ``torch.no_grad`` on ``device``. An unreadable image
is skipped and recorded in :class:`ExtractStats` (never silently). With a cache
directory, each image's outputs are stored as one safetensors file keyed by
``(model fingerprint, layer spec)`` and the SHA-256 of the image file, so a
re-run decodes nothing and runs no model for cached images.

What is computed is an :class:`Extractor`:

- :class:`EncoderFeatures`: hidden states of chosen encoder layers ``[L, N, D]`` per image;
- :class:`BranchTokens`: a member's projected visual tokens ``[N_i, D_llm]`` per image, via the
  member's own :class:`~fuse.members.VisionBranch` (exactly what ``Member.visual_tokens`` returns);
- image embeddings for CLIP-blind-pair mining (:mod:`analysis.blind_pairs`).

>>> ext = EncoderFeatures(encoder, layers=[-2])
>>> for batch in iter_features(paths, ext, batch_size=16, workers=2, cache_dir="cache"):
...     batch.indices, batch.outputs[0]["features"].shape     # [L, N, D]
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fuse.devices import resolve_device
from fuse.errors import DataError
from fuse.images import list_images, load_image

Outputs = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------
# Identity of a model (for cache keys)
# ---------------------------------------------------------------------------
def module_fingerprint(module: nn.Module, extra: Any = None, sample: int = 4096) -> str:
    """A short hash identifying a module's weights: names, shapes, dtypes, a strided sample of
    values and each tensor's sum (float64), plus ``extra`` (JSON-able). Cheap for big models."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for name, t in module.state_dict().items():
        t = t.detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        if t.numel() == 0 or not (t.is_floating_point() or t.dtype in (torch.int64, torch.int32)):
            continue
        flat = t.reshape(-1)
        step = max(1, flat.numel() // sample)
        h.update(flat[::step][:sample].to(torch.float64).cpu().numpy().tobytes())
        h.update(repr(float(flat.sum(dtype=torch.float64))).encode())  # no float64 copy of the tensor
    return h.hexdigest()[:20]


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 (first 20 hex digits) of a (small) tensor's shape and float32 values."""
    t = t.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(f"{tuple(t.shape)}".encode() + t.numpy().tobytes()).hexdigest()[:20]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while b := fh.read(chunk):
            h.update(b)
    return h.hexdigest()


# ---------------------------------------------------------------------------
# Extractors
# ---------------------------------------------------------------------------
class Extractor:
    """What to compute per image. ``to_input`` runs in worker processes (PIL -> tensors, no
    batch dim); ``collate`` batches those inputs; ``run`` maps a batch to one
    :data:`Outputs` dict per image (CPU tensors). ``key`` names the computation for the cache."""

    label: str = "features"

    @property
    def key(self) -> str:
        raise NotImplementedError

    def to_input(self, image: Image.Image) -> Any:
        raise NotImplementedError

    def to_input_at(self, image: Image.Image, index: int) -> Any:
        """``to_input`` for the ``index``-th input (override when the item matters, e.g. its question)."""
        return self.to_input(image)

    def collate(self, items: list[Any]) -> Any:
        return torch.stack(items)

    def run(self, batch: Any, device: torch.device) -> list[Outputs]:
        raise NotImplementedError

    def to(self, device: torch.device | str) -> "Extractor":
        for m in self.modules():
            m.to(device)
        return self

    def modules(self) -> list[nn.Module]:
        return []


class EncoderFeatures(Extractor):
    """Hidden states of ``layers`` of a registry :class:`~fuse.encoders.Encoder`.

    Per image: ``{"features": [L, N, D]}`` (``select="patch"`` drops CLS/registers), or
    ``[L, D]`` with ``pool="mean"`` (mean over tokens). ``tokens``: keep only these token
    positions (``[L, len(tokens), D]``), e.g. a fixed random subset for layer-similarity studies.
    """

    def __init__(self, encoder, layers: Sequence[int], select: str = "patch", pool: str = "none",
                 tokens: Sequence[int] | None = None, out_dtype: torch.dtype = torch.float32):
        if pool not in ("none", "mean"):
            raise ValueError(f"pool must be 'none' or 'mean', got {pool!r}")
        self.encoder = encoder
        self.layers = list(layers)
        self.select = select
        self.pool = pool
        self.tokens = None if tokens is None else torch.as_tensor(list(tokens), dtype=torch.long)
        self.out_dtype = out_dtype
        self.label = f"{encoder.kind} layers {self.layers}"
        self._key: str | None = None

    @property
    def key(self) -> str:
        if self._key is None:
            self._key = module_fingerprint(self.encoder, {"kind": self.encoder.kind, "spec": self.encoder.spec()})
        tok = "" if self.tokens is None else "-tok" + hashlib.sha256(self.tokens.numpy().tobytes()).hexdigest()[:12]
        return f"{self.encoder.kind}-{self._key}/layers{'_'.join(map(str, self.layers))}-{self.select}-{self.pool}{tok}"

    def to_input(self, image: Image.Image) -> torch.Tensor:
        return self.encoder.preprocess([image])[0]

    def run(self, batch: torch.Tensor, device: torch.device) -> list[Outputs]:
        feats = self.encoder.features(batch.to(device), self.layers, self.select)  # [B, L, N, D]
        if self.tokens is not None:
            feats = feats[:, :, self.tokens.to(feats.device)]
        if self.pool == "mean":
            feats = feats.float().mean(2)
        feats = feats.to("cpu", self.out_dtype)
        return [{"features": f} for f in feats]

    def modules(self) -> list[nn.Module]:
        return [self.encoder]


def merge_inputs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch per-image ``VisionBranch.preprocess`` outputs (each computed for one image).

    Tensors are concatenated on dim 0 (their batch dim), lists concatenated, other values
    (shared settings) must be equal and are kept once.
    """
    out: dict[str, Any] = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        if isinstance(vals[0], torch.Tensor):
            out[k] = torch.cat(vals)
        elif isinstance(vals[0], list):
            out[k] = [x for v in vals for x in v]
        elif all(v == vals[0] for v in vals):
            out[k] = vals[0]
        else:
            raise TypeError(f"cannot batch preprocess output {k!r} of type {type(vals[0]).__name__}")
    return out


def _batch_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _batch_to(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [_batch_to(v, device) for v in batch]
    return batch


class BranchTokens(Extractor):
    """A member's projected visual tokens, computed by its own :class:`~fuse.members.VisionBranch`.

    Per image: ``{"tokens": [N_i, D_llm]}`` and, when the branch knows it,
    ``{"grid": [S, 2]}`` (h, w of each spatial segment, in token order).
    ``text_embeds`` (one ``[T, D_llm]`` per image, or a single one shared by all) is passed to
    branches that need the prompt (``needs_text``).
    """

    def __init__(self, branch, name: str, text_embeds: torch.Tensor | None = None,
                 out_dtype: torch.dtype = torch.float32):
        self.branch = branch.eval()
        self.name = name
        self.label = f"{name} visual tokens"
        self.text_embeds = text_embeds
        self.out_dtype = out_dtype
        self._key: str | None = None

    @property
    def key(self) -> str:
        if self._key is None:
            te = None if self.text_embeds is None else tensor_digest(self.text_embeds)
            self._key = module_fingerprint(self.branch, {"kind": self.branch.kind, "text": te})
        return f"{self.branch.kind}-{self._key}/tokens"

    def to_input(self, image: Image.Image) -> dict[str, Any]:
        return self.branch.preprocess([image])

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return merge_inputs(items)

    def run(self, batch: dict[str, Any], device: torch.device) -> list[Outputs]:
        batch = _batch_to(batch, device)
        n = _batch_size(batch)
        text = None
        if self.branch.needs_text and self.text_embeds is not None:
            text = [self.text_embeds.to(device)] * n
        tokens = self.branch(batch, text_embeds=text)
        grids = self.branch.token_grids(batch)
        out = []
        for i, t in enumerate(tokens):
            o = {"tokens": t.detach().to("cpu", self.out_dtype)}
            if grids is not None:
                o["grid"] = torch.tensor([[h, w] for _, h, w in grids[i]], dtype=torch.int64).reshape(-1, 2)
            out.append(o)
        return out

    def modules(self) -> list[nn.Module]:
        return [self.branch]


def _batch_size(batch: dict[str, Any]) -> int:
    for v in batch.values():
        if isinstance(v, (torch.Tensor, list)):
            return len(v)
    raise TypeError("cannot tell the batch size of a preprocess output without tensors or lists")


# ---------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------
class FeatureCache:
    """``root/<extractor key>/<sha[:2]>/<sha>.safetensors``: one file per image."""

    def __init__(self, root: str | os.PathLike, key: str):
        self.dir = Path(root) / key
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.dir / digest[:2] / f"{digest}.safetensors"

    def load(self, digest: str) -> Outputs | None:
        p = self.path(digest)
        if not p.is_file():
            return None
        try:
            return load_file(str(p))
        except Exception:  # a damaged cache entry is recomputed, not fatal
            return None

    def save(self, digest: str, outputs: Outputs) -> None:
        p = self.path(digest)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in outputs.items()}, str(tmp))
        os.replace(tmp, p)


# ---------------------------------------------------------------------------
# Dataset / loader
# ---------------------------------------------------------------------------
@dataclass
class _Item:
    index: int
    bad: str | None = None  # reason when the image could not be read
    cached: dict[str, Outputs] = field(default_factory=dict)  # extractor name -> cached outputs
    new: dict[str, Any] = field(default_factory=dict)  # extractor name -> its input (to_input)
    digest: str | None = None


class _ImageFiles(Dataset):
    """Runs in the workers: hash, cache look-up, decode (once per image), per-extractor to_input."""

    def __init__(self, paths: Sequence[Path], extractors: dict[str, Extractor], caches: dict[str, FeatureCache]):
        self.paths, self.extractors, self.caches = list(paths), extractors, caches

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> _Item:
        p = self.paths[i]
        item = _Item(i)
        if self.caches:
            try:
                item.digest = file_sha256(p)
            except OSError as e:
                item.bad = f"{p}: cannot read ({e.strerror})"
                return item
            for name, cache in self.caches.items():
                hit = cache.load(item.digest)
                if hit is not None:
                    item.cached[name] = hit
        missing = [n for n in self.extractors if n not in item.cached]
        if missing:
            try:
                img = load_image(p)
            except DataError as e:
                item.bad, item.cached = str(e), {}
                return item
            item.new = {n: self.extractors[n].to_input_at(img, i) for n in missing}
        return item


@dataclass
class _Loaded:
    items: list[_Item]  # readable images, input order
    bad: list[_Item]
    batches: dict[str, tuple[list[int], Any]]  # extractor name -> (positions in items, collated input)


class _Collate:
    def __init__(self, extractors: dict[str, Extractor]):
        self.extractors = extractors

    def __call__(self, items: list[_Item]) -> _Loaded:
        good = [it for it in items if it.bad is None]
        batches = {}
        for name, ext in self.extractors.items():
            pos = [k for k, it in enumerate(good) if name in it.new]
            if pos:
                batches[name] = (pos, ext.collate([good[k].new.pop(name) for k in pos]))
        return _Loaded(good, [it for it in items if it.bad is not None], batches)


@dataclass
class ExtractStats:
    """What happened to the requested images."""

    requested: int = 0
    done: int = 0
    cache_hits: int = 0  # (image, extractor) outputs read from the cache
    computed: int = 0  # (image, extractor) outputs computed
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def to_dict(self) -> dict[str, Any]:
        return {"requested": self.requested, "done": self.done, "cache_hits": self.cache_hits,
                "computed": self.computed, "skipped": len(self.skipped),
                "skipped_files": [{"path": p, "reason": r} for p, r in self.skipped]}

    def summary(self) -> str:
        s = f"{self.done} of {self.requested} images processed"
        if self.skipped:
            s += f"; {len(self.skipped)} unreadable image(s) skipped"
        if self.cache_hits:
            s += f"; {self.cache_hits} result(s) read from the cache"
        return s


@dataclass
class FeatureBatch:
    """``indices``: positions in the input path list; ``outputs``: one per index, an
    :data:`Outputs` dict (single extractor) or ``{extractor name: Outputs}`` (several)."""

    indices: list[int]
    outputs: list[Any]


def decode_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def iter_features(paths: Sequence[str | os.PathLike], extractor: Extractor | dict[str, Extractor], *,
                  batch_size: int = 16, workers: int | None = None, device: str | torch.device | None = "cpu",
                  cache_dir: str | os.PathLike | None = None, progress: bool = True,
                  stats: ExtractStats | None = None, desc: str | None = None) -> Iterator[FeatureBatch]:
    """Stream per-image outputs of one extractor (or several sharing one decode) in input order.

    Unreadable images are skipped and appended to ``stats.skipped``; batches may
    therefore be shorter than ``batch_size``. ``workers=0`` decodes in this process.
    """
    from tqdm.auto import tqdm

    single = isinstance(extractor, Extractor)
    extractors = {"_": extractor} if single else dict(extractor)
    if not extractors:
        raise ValueError("no extractor given")
    dev = resolve_device(device)
    for ext in extractors.values():
        ext.to(dev)
    stats = stats if stats is not None else ExtractStats()
    stats.requested += len(paths)
    caches = {n: FeatureCache(cache_dir, e.key) for n, e in extractors.items()} if cache_dir is not None else {}
    workers = decode_workers() if workers is None else workers
    ds = _ImageFiles([Path(p) for p in paths], extractors, caches)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=_Collate(extractors), prefetch_factor=4 if workers > 0 else None)
    label = desc or (extractor.label if single else ", ".join(extractors))
    bar = tqdm(total=len(ds), unit="img", desc=label, disable=not progress, leave=False)
    try:
        with torch.no_grad():
            for loaded in loader:
                for it in loaded.bad:
                    stats.skipped.append((str(ds.paths[it.index]), it.bad))
                for name, (pos, batch) in loaded.batches.items():
                    outs = extractors[name].run(batch, dev)
                    stats.computed += len(outs)
                    for k, o in zip(pos, outs):
                        it = loaded.items[k]
                        it.cached[name] = o
                        if name in caches and it.digest is not None:
                            caches[name].save(it.digest, o)
                stats.cache_hits += sum(len(it.cached) for it in loaded.items) - sum(
                    len(p) for p, _ in loaded.batches.values())
                stats.done += len(loaded.items)
                bar.update(len(loaded.items) + len(loaded.bad))
                if loaded.items:
                    outs = [it.cached["_"] if single else {n: it.cached[n] for n in extractors} for it in loaded.items]
                    yield FeatureBatch([it.index for it in loaded.items], outs)
    finally:
        bar.close()


def extract(paths: Sequence[str | os.PathLike], extractor: Extractor | dict[str, Extractor],
            **kw: Any) -> tuple[list[int], list[Any], ExtractStats]:
    """Collect everything :func:`iter_features` yields: (kept indices, outputs, stats)."""
    stats = kw.pop("stats", None) or ExtractStats()
    idx: list[int] = []
    outs: list[Any] = []
    for b in iter_features(paths, extractor, stats=stats, **kw):
        idx += b.indices
        outs += b.outputs
    return idx, outs, stats


# ---------------------------------------------------------------------------
# Choosing images
# ---------------------------------------------------------------------------
@dataclass
class ImageSelection:
    paths: list[Path]
    available: int
    requested: int | None
    note: str | None = None  # e.g. "asked for 500 images, DIR has 12: using all 12"


def select_images(directory: str | os.PathLike, n: int | None = None, seed: int = 0) -> ImageSelection:
    """Image files of ``directory`` (recursive, sorted); with ``n``, a seeded random sample of ``n``
    kept in sorted order. Fewer files than ``n``: all are used and ``note`` says so.
    DataError for a missing/empty directory or ``n < 1``."""
    if n is not None and n < 1:
        raise DataError(f"--n {n}: expected a positive number of images")
    files = list_images(directory)
    available = len(files)
    note = None
    if n is not None and n < available:
        keep = sorted(random.Random(seed).sample(range(available), n))
        files = [files[i] for i in keep]
    elif n is not None and n > available:
        note = f"asked for {n} images, {directory} has {available}: using all {available}"
    return ImageSelection(files, available, n, note)
