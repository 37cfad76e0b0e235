"""SliME's "anyres" image splitting: crop-grid choice, resize + pad, split into crops.

SliME (``image_aspect_ratio: anyres``) cuts an image into a grid of ``crop`` x ``crop``
squares (``crop`` = the CLIP input side, 336 px for the real model) plus one global view:

1. **Grid choice** (:func:`select_grid`): ``n = ceil(w * h / crop**2)`` clamped to
   ``[2, 6]``; the candidate grids are every factorisation ``cols x rows`` of
   ``n - 1``, ``n``, ``n + 1`` (only ``n`` and ``n + 1`` when ``n == 2``), so a grid
   always has 2 to 7 crops. The candidate that keeps most of the image's pixels
   after an aspect-preserving fit wins; ties go to the one wasting least canvas,
   then to the first one listed (factor pairs in order of increasing ``cols``).
2. **Resize then pad** (:func:`resize_and_pad`): fit the image into the grid canvas
   (``cols*crop x rows*crop``) keeping its aspect ratio (side rounded up), PIL's
   default bicubic resampling, centred on black.
3. **Split** (:func:`split_crops`): row-major crops.
4. **Global view**: the whole image resized (bicubic, aspect *not* kept) to ``crop x crop``.

Degenerate inputs are accepted, as upstream: a 1x20 px sliver or an image smaller
than one ViT patch is simply upscaled into the chosen grid (2 or 3 crops).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

from ..images import to_rgb


def _factor_pairs(n: int) -> list[tuple[int, int]]:
    """``(cols, rows)`` with ``cols * rows == n``, in order of increasing ``cols``."""
    return [(c, n // c) for c in range(1, n + 1) if n % c == 0]


def candidate_grids(width: int, height: int, crop: int, max_crops: int = 6) -> list[tuple[int, int]]:
    """The ``(cols, rows)`` grids SliME considers for an image of ``width x height``."""
    n = math.ceil(width * height / (crop * crop))
    n = min(max(n, 2), max_crops)  # 1 -> 2, >6 -> 6 (upstream clamp)
    counts = [n, n + 1] if n <= 2 else [n - 1, n, n + 1]
    return [pair for c in counts for pair in _factor_pairs(c)]


def select_grid(width: int, height: int, crop: int = 336) -> tuple[int, int]:
    """Best ``(cols, rows)`` crop grid for an image (see module docstring)."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    best, best_eff, best_waste = None, -1, math.inf
    for cols, rows in candidate_grids(width, height, crop):
        cw, ch = cols * crop, rows * crop
        scale = min(cw / width, ch / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = cw * ch - effective
        if effective > best_eff or (effective == best_eff and waste < best_waste):
            best, best_eff, best_waste = (cols, rows), effective, waste
    assert best is not None
    return best


def resize_and_pad(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Aspect-preserving fit of ``image`` into ``target = (W, H)``, centred on black."""
    w, h = image.size
    tw, th = target
    sw, sh = tw / w, th / h
    if sw < sh:
        nw, nh = tw, min(math.ceil(h * sw), th)
    else:
        nw, nh = min(math.ceil(w * sh), tw), th
    resized = image.resize((nw, nh), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(resized, ((tw - nw) // 2, (th - nh) // 2))
    return canvas


def split_crops(image: Image.Image, crop: int) -> list[Image.Image]:
    """Row-major ``crop x crop`` tiles of an image whose sides are multiples of ``crop``."""
    w, h = image.size
    return [image.crop((x, y, x + crop, y + crop)) for y in range(0, h, crop) for x in range(0, w, crop)]


@dataclass
class AnyresViews:
    """One image cut for SliME: ``[global] + crops`` (all ``crop x crop``) and the grid."""

    views: list[Image.Image]
    cols: int
    rows: int
    image_size: tuple[int, int]  # original (width, height)

    @property
    def num_crops(self) -> int:
        return self.cols * self.rows


def anyres_views(image: Image.Image, crop: int = 336) -> AnyresViews:
    """Global view (plain resize) followed by the grid crops, as SliME's preprocessing."""
    image = to_rgb(image)
    cols, rows = select_grid(*image.size, crop=crop)
    padded = resize_and_pad(image, (cols * crop, rows * crop))
    global_view = image.resize((crop, crop), Image.Resampling.BICUBIC)
    return AnyresViews([global_view] + split_crops(padded, crop), cols, rows, image.size)
