"""How a merge runs (not what it merges, which is the recipe): one frozen dataclass.

``fuse merge`` and ``fuse check`` generate their flags from the fields (each field's metadata, see
:mod:`fuse.flags`: flag names, help, a range or choices), and hand the
parsed values back as one :class:`MergeOptions`, so ``run_merge(recipe, out, options)`` stays short and a
new option is one field. Fields without a flag are for the Python API and tests only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..flags import flag

KERNEL_CHOICES = ("auto", "mergekit")  # auto: fuse.merge.kernels where it has the method; mergekit: always
DEFAULT_CHUNK_BYTES = 2**20  # per input, compute dtype: a piece's inputs and mergekit's temporaries stay in cache


@dataclass(frozen=True)
class MergeOptions:
    force: bool = field(default=False, metadata=flag(
        "--force", help="Replace an existing output directory (only once the new one is complete)."))
    dry_run: bool = field(default=False, metadata=flag(
        "--dry-run", help="Check the family, print the plan (tensors, bytes, peak memory); write nothing. Hub models "
                          "are checked on their configs, tokenizers and safetensors headers (no weights downloaded)."))
    allow_foreign: bool = field(default=False, metadata=flag(
        "--allow-foreign", help="Merge members whose LLM is far from the base (relative L2 distance > 0.5)."))
    checksums: bool = field(default=True, metadata=flag(
        "--no-checksums", off=True, help="Skip the SHA-256 of the source files in fuse_config.json."))
    threads: int | None = field(default=None, metadata=flag(
        "-j", "--threads", min=1,
        help="torch threads for the merge math [default: 1 for row-chunked methods, all cores otherwise]."))
    kernel: str = field(default="auto", metadata=flag(
        "--kernel", choices=KERNEL_CHOICES, show_default=True,
        help="auto: mergekit's task_arithmetic/linear formula replayed in reused buffers (bit-identical, "
             "checked against mergekit on every tensor); mergekit: call mergekit for every row chunk."))
    offline: bool = field(default=False, metadata=flag(
        "--offline", help="Use local directories and the local Hugging Face cache only (like HF_HUB_OFFLINE=1)."))
    cache_dir: str | None = field(default=None, metadata=flag(
        "--cache-dir", path="dir", help="Hugging Face cache for hub ids [default: HF_HUB_CACHE, else $HF_HOME/hub]."))
    progress: bool = field(default=True, metadata=flag("-q", "--quiet", off=True, help="No progress bars."))
    align_check: bool = field(default=True, metadata=flag(
        "--no-align-check", off=True,
        help="Skip the visual-token alignment check (it builds and runs every member's vision branch)."))
    align_images: str | None = field(default=None, metadata=flag(
        "--align-images", path="dir",
        help="Image directory for the alignment check [default: built-in synthetic probe images]."))
    align_n: int = field(default=32, metadata=flag(
        "--align-n", min=2, show_default=True, help="Images for the alignment check."))
    # Python API only:
    chunk_bytes: int = DEFAULT_CHUNK_BYTES  # rows per merge call of element-wise methods, per input (compute dtype)
    workers: int | None = None  # threads merging row chunks at once [default: fuse.merge.pipeline.merge_workers()]


__all__ = ["DEFAULT_CHUNK_BYTES", "KERNEL_CHOICES", "MergeOptions"]
