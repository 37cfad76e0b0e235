"""The options every report command that reads images shares, as one frozen dataclass.

``analysis align|attention|blind-pairs|layers`` generate these flags from the fields (see
:mod:`fuse.flags`) and pass one :class:`PipelineOptions` on to the ``run_*`` functions, which hand
its extraction part to the feature pipeline (:func:`analysis.features.extract`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fuse.flags import flag


@dataclass(frozen=True)
class PipelineOptions:
    images: str | None = field(default=None, metadata=flag(
        "--images", required=True, path="any", help="Directory of images (recursive)."))
    out: str = field(default="reports", metadata=flag(
        "-o", "--output", path="any", show_default=True, help="Report directory."))
    force: bool = field(default=False, metadata=flag("--force", help="Replace an existing report directory."))
    batch_size: int = field(default=8, metadata=flag(
        "--batch-size", min=1, show_default=True, help="Images per model call."))
    workers: int | None = field(default=None, metadata=flag(
        "--workers", min=0, help="Image-decoding worker processes [default: min(4, cores-1)]."))
    device: str = field(default="cpu", metadata=flag("--device", show_default=True, help="cpu, cuda, cuda:N or auto."))
    dtype: str | None = field(default=None, metadata=flag(
        "--dtype", help="Model dtype (float32, float16, bfloat16) [default: as stored]."))
    cache_dir: str | None = field(default=None, metadata=flag(
        "--cache", path="any", help="Feature cache directory (safetensors per image; re-runs are instant)."))
    seed: int = field(default=0, metadata=flag(
        "--seed", min=0, max=2**32 - 1, show_default=True, help="Seed of the image sample and of the statistics."))
    progress: bool = field(default=True, metadata=flag("-q", "--quiet", off=True, help="No progress bars."))

    def extraction(self) -> dict[str, Any]:
        """The keyword arguments of :func:`analysis.features.extract` / ``iter_features``."""
        return {"batch_size": self.batch_size, "workers": self.workers, "device": self.device,
                "cache_dir": self.cache_dir, "progress": self.progress}


__all__ = ["PipelineOptions"]
