"""Image loading that never fails on odd-but-valid inputs.

Grayscale, palette, RGBA/LA and 16-bit/float images are converted to 8-bit RGB. An alpha
channel is dropped, as ``Image.convert("RGB")`` drops it: that is what the original LLaVA,
MiniGemini and SliME code does to every image (``Image.open(f).convert("RGB")``), so members see
the pixels they were trained and evaluated on. Compositing over white is an explicit option
(``alpha="white"``). 16-bit and float images are scaled to 0..255 (PIL's own conversion clips
them). An unreadable or corrupt file raises :class:`~fuse.errors.DataError` naming it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DataError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


ALPHA_MODES = ("drop", "white")


def to_rgb(img: Image.Image, alpha: str = "drop") -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    ``alpha``: ``drop`` (default) keeps the colour channels as they are, exactly
    ``img.convert("RGB")`` (the members' original preprocessing); ``white`` composites a
    transparent image over a white background first.
    """
    if alpha not in ALPHA_MODES:
        raise ValueError(f"alpha must be one of {', '.join(ALPHA_MODES)}, got {alpha!r}")
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr = ((arr - lo) * scale).round().clip(0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if alpha == "white" and (img.mode in ("RGBA", "LA", "PA", "RGBa", "La")
                             or (img.mode == "P" and "transparency" in img.info)):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | os.PathLike | Image.Image, alpha: str = "drop") -> Image.Image:
    """Open an image file (or pass a PIL image through) as 8-bit RGB (``alpha``: see :func:`to_rgb`)."""
    if alpha not in ALPHA_MODES:
        raise ValueError(f"alpha must be one of {', '.join(ALPHA_MODES)}, got {alpha!r}")
    if isinstance(path, Image.Image):
        return to_rgb(path, alpha)
    if not isinstance(path, (str, os.PathLike)):
        hint = " (convert a tensor with torchvision's to_pil_image or PIL.Image.fromarray)" \
            if type(path).__name__ in ("Tensor", "ndarray") else ""
        raise DataError(f"image: expected a file path or a PIL image, got {type(path).__name__}{hint}")
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: {'a directory, not an image file' if p.is_dir() else 'image file not found'}")
    try:
        with Image.open(p) as im:
            im.load()
            return to_rgb(im, alpha)
    except Image.DecompressionBombError:  # PIL refuses > 2 x MAX_IMAGE_PIXELS before decoding
        raise DataError(f"{p}: image too large to decode safely (more than {2 * Image.MAX_IMAGE_PIXELS} "
                        "pixels; PIL's decompression-bomb limit)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{p}: unreadable image ({e.__class__.__name__})") from None


def list_images(directory: str | os.PathLike) -> list[Path]:
    """Image files under ``directory`` (recursive), sorted; DataError if none or not a dir."""
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"{d}: not an image directory")
    files = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"{d}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


def pad_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's expand2square: centre the image on a square canvas of colour ``fill``."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def mean_color(mean: tuple[float, float, float]) -> tuple[int, int, int]:
    """Image-processor mean (0..1) -> the 0..255 fill colour LLaVA pads with."""
    return tuple(int(x * 255) for x in mean)  # type: ignore[return-value]
