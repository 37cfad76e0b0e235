"""SHA-256 of the source checkpoints' files, for ``fuse_config.json["sources"]``.

Hashing reads every weight file once more; :class:`BackgroundChecksums` does it
in a worker thread (``hashlib`` releases the GIL on large updates) from the
start of the merge, with a fixed 8 MiB read buffer, so it costs neither memory nor,
on a machine with a spare core, wall time. Files of a Hugging Face cache snapshot
are links to ``blobs/<sha256>`` (git-lfs files, i.e. the weights): that name is
their SHA-256, so they are not read again.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from ..errors import CheckpointError

CHECKSUM_SUFFIXES = (".safetensors", ".json", ".model", ".txt", ".jinja", ".tiktoken")
BUFFER = 8 * 2**20


class Cancelled(Exception):
    pass


def sha256_file(path: str | os.PathLike, buffer: int = BUFFER, stop: threading.Event | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(buffer):
            if stop is not None and stop.is_set():
                raise Cancelled(str(path))
            h.update(chunk)
    return h.hexdigest()


_SHA256_NAME = re.compile(r"[0-9a-f]{64}")


def cached_sha256(path: Path) -> str | None:
    """The SHA-256 of a Hugging Face cache snapshot file whose link names its ``blobs/<sha256>``
    (git-lfs files); None for any other file."""
    if not path.is_symlink():
        return None
    target = Path(os.path.realpath(path))
    if target.parent.name == "blobs" and _SHA256_NAME.fullmatch(target.name):
        return target.name
    return None


def source_files(directory: str | os.PathLike) -> list[Path]:
    """The files of a checkpoint dir that define it (weights, configs, tokenizer), top level only."""
    d = Path(directory)
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix in CHECKSUM_SUFFIXES)


def checksum_dir(directory: str | os.PathLike, stop: threading.Event | None = None) -> dict:
    """``{"files": {name: {"size", "sha256"}}}`` for one source directory."""
    out = {}
    for p in source_files(directory):
        try:
            out[p.name] = {"size": p.stat().st_size, "sha256": cached_sha256(p) or sha256_file(p, stop=stop)}
        except OSError as e:
            raise CheckpointError(f"{p}: cannot read to checksum it ({e.strerror or e})") from None
    return {"files": out}


class BackgroundChecksums:
    """Hash several source dirs in one worker thread; ``result()`` waits and returns ``{path: {...}}``."""

    def __init__(self, directories: Iterable[str | os.PathLike]):
        self._dirs = list(dict.fromkeys(str(d) for d in directories))
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fuse-sha256")
        self._futures: dict[str, Future] = {d: self._pool.submit(checksum_dir, d, self._stop) for d in self._dirs}

    def result(self) -> dict[str, dict]:
        try:
            return {d: f.result() for d, f in self._futures.items()}
        finally:
            self._pool.shutdown(wait=True)

    def cancel(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)


def start_checksums(models: dict) -> BackgroundChecksums | None:
    """Hash the directories of ``models`` (``{recipe value: fuse.hub.ModelFiles}``) in the background;
    None while one is a headers-only view (its weights are not on disk yet)."""
    if not all(m.complete and m.path.is_dir() for m in models.values()):
        return None
    return BackgroundChecksums([m.path for m in models.values()])


__all__ = ["BackgroundChecksums", "cached_sha256", "checksum_dir", "sha256_file", "source_files", "start_checksums"]
