"""Feature-extraction throughput: the shared pipeline vs a bare forward loop.

    python benchmarks/features.py [--images 96] [--batch-size 16] [--workers N] [--size small|base|tiny]

Baseline (measured in the same run): images decoded and preprocessed up front
(not timed), then a plain loop of ``encoder.features(pixel_values, layers)`` under
``torch.no_grad``. Pipeline: :func:`analysis.features.extract` from the JPEG files,
timed end to end (DataLoader start-up, decoding + preprocessing in worker processes,
batching, forward). Target: pipeline >= 0.9x the baseline's images/s on CPU, i.e.
the workers hide the decode cost. A second pipeline run from a warm on-disk cache
shows the re-run speed.

The encoder is a randomly initialised CLIP ViT (no download) of the chosen size,
in the real ``CLIPVisionModel`` architecture.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.features import EncoderFeatures, decode_workers, extract  # noqa: E402
from fuse.encoders import build_encoder  # noqa: E402
from fuse.images import list_images, load_image  # noqa: E402

SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=112,
                 patch_size=16),
    "small": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                  image_size=224, patch_size=16),
    "base": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 image_size=224, patch_size=16),
}


def make_images(directory: Path, n: int, size: tuple[int, int] = (640, 480)) -> None:
    """Photo-like JPEGs (smooth gradients + noise), so decoding costs what real photos cost."""
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        base = np.stack([(xx * (1 + i % 3) + yy) % 256, (yy * 2 + i * 7) % 256, (xx + yy * (i % 5)) % 256], -1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(directory / f"img_{i:04d}.jpg", quality=90)


def bare_loop(encoder, pixel_values: torch.Tensor, batch_size: int, layers: list[int]) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(pixel_values), batch_size):
            encoder.features(pixel_values[i:i + batch_size], layers)
    return time.perf_counter() - t0


def pipeline(encoder, paths, batch_size: int, workers: int, layers: list[int], cache: str | None = None) -> float:
    t0 = time.perf_counter()
    idx, outs, st = extract(paths, EncoderFeatures(encoder, layers), batch_size=batch_size, workers=workers,
                            progress=False, cache_dir=cache)
    dt = time.perf_counter() - t0
    assert len(outs) == len(paths) and not st.skipped
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=None, help="decode workers (default: min(4, cores-1))")
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--target", type=float, default=0.9)
    args = ap.parse_args()
    workers = decode_workers() if args.workers is None else args.workers
    torch.manual_seed(0)
    enc = build_encoder("clip", config=SIZES[args.size])
    layers = [-2]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "images"
        d.mkdir()
        make_images(d, args.images)
        paths = list_images(d)
        t0 = time.perf_counter()
        pv = enc.preprocess([load_image(p) for p in paths])
        decode_s = time.perf_counter() - t0
        # warm up both paths (thread pools, allocator, worker start-up code paths)
        bare_loop(enc, pv[: args.batch_size], args.batch_size, layers)
        pipeline(enc, paths[: args.batch_size], args.batch_size, workers, layers)
        bare, pipe = [], []
        for _ in range(args.repeats):  # interleaved, so machine-load drift hits both alike
            bare.append(bare_loop(enc, pv, args.batch_size, layers))
            pipe.append(pipeline(enc, paths, args.batch_size, workers, layers))
        cache = str(Path(tmp) / "cache")
        pipeline(enc, paths, args.batch_size, workers, layers, cache)  # fill the cache
        cached = min(pipeline(enc, paths, args.batch_size, workers, layers, cache) for _ in range(2))
    n = args.images
    b_ips, p_ips = n / statistics.median(bare), n / statistics.median(pipe)
    ratio = p_ips / b_ips
    print(f"encoder: random-init CLIP ViT '{args.size}' ({SIZES[args.size]['num_hidden_layers']} layers, "
          f"width {SIZES[args.size]['hidden_size']}, {SIZES[args.size]['image_size']} px); {n} JPEGs 640x480; "
          f"batch {args.batch_size}; torch threads {torch.get_num_threads()}; decode workers {workers}; "
          f"cores {os.cpu_count()}")
    print(f"decode+preprocess alone (1 process): {n / decode_s:8.1f} img/s")
    print(f"bare forward loop (pre-decoded):     {b_ips:8.1f} img/s   (median of {args.repeats})")
    print(f"pipeline (files -> features):        {p_ips:8.1f} img/s   (median of {args.repeats})")
    print(f"pipeline re-run from cache:          {n / cached:8.1f} img/s")
    print(f"ratio pipeline / bare: {ratio:.3f}  (target >= {args.target}) -> {'PASS' if ratio >= args.target else 'FAIL'}")
    return 0 if ratio >= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
