"""Row-range reads of stored tensors with positional reads into reusable buffers.

:meth:`fuse.checkpoint.LazyCheckpoint.get_rows` opens the shard (header parse +
memory map) on every call and copies the rows out through page faults. The merge
loop reads thousands of small row ranges, so :class:`RowReader` instead keeps one
file descriptor per shard and reads a range with ``os.preadv`` straight into a
caller-owned buffer (one copy from the page cache, no mapping, and the GIL is
released while the kernel copies). :class:`Scratch` is such a buffer: it grows
to the largest request and is then reused.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path

import torch

from ..checkpoint import LazyCheckpoint, TensorInfo
from ..errors import CheckpointError

_MAX_READ = 1 << 30  # bytes per preadv call (Linux caps one read at ~2 GiB)


class Scratch:
    """A reusable contiguous byte buffer that grows on demand.

    ``take(dtype, shape)`` returns a tensor of ``shape`` and ``dtype`` over the buffer's
    first bytes; its contents are overwritten through the next ``take``.
    """

    def __init__(self) -> None:
        self._buf = torch.empty(0, dtype=torch.uint8)

    @property
    def nbytes(self) -> int:
        return self._buf.numel()

    def take(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor [*shape] of ``dtype`` over this buffer (contents undefined)."""
        n = math.prod(shape) * dtype.itemsize
        if self._buf.numel() < n:
            self._buf = torch.empty(n, dtype=torch.uint8)
        return self._buf[:n].view(dtype).view(shape)

    def owns(self, t: torch.Tensor) -> bool:
        """True if ``t`` is a view of this buffer (so the next ``take`` would overwrite it)."""
        if self._buf.numel() == 0:
            return False
        return t.untyped_storage().data_ptr() == self._buf.untyped_storage().data_ptr()


class RowReader:
    """Read rows of tensors described by :class:`TensorInfo` (one open descriptor per file).

    Thread-safe: ``preadv`` has no file position, and descriptors are opened under a lock.
    Call :meth:`close` when done (or use it as a context manager).
    """

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> RowReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def _fd(self, info: TensorInfo) -> int:
        with self._lock:
            fd = self._fds.get(info.file)
            if fd is None:
                try:
                    fd = os.open(info.file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError as e:
                    raise CheckpointError(f"{info.file}: cannot read tensor {info.key} ({e.strerror})") from None
                self._fds[info.file] = fd
            return fd

    def read_rows(self, info: TensorInfo, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Read rows ``[start, stop)`` of ``info`` into ``out`` and return ``out``.

        ``out``: contiguous [stop - start, *info.shape[1:]] tensor of ``info.dtype``.
        Errors are :class:`CheckpointError` worded like ``LazyCheckpoint.get_rows``.
        """
        _check(info, start, stop)
        fits = tuple(out.shape) == (stop - start, *info.shape[1:]) and out.dtype == info.dtype
        if not (fits and out.is_contiguous()):
            raise ValueError(f"{info.key}: buffer {out.dtype} {list(out.shape)} does not fit rows {start}:{stop}")
        n = (stop - start) * info.row_bytes
        if n:
            raw = out.view(-1).view(torch.uint8).numpy()
            self._pread_exact(info, memoryview(raw), info.offset + start * info.row_bytes)
        return out

    def _pread_exact(self, info: TensorInfo, view: memoryview, pos: int) -> None:
        fd, done, n = self._fd(info), 0, view.nbytes
        while done < n:
            try:
                got = os.preadv(fd, [view[done:done + _MAX_READ]], pos + done)
            except OSError as e:
                raise CheckpointError(f"{info.file}: cannot read tensor {info.key} ({e.strerror})") from None
            if got == 0:
                raise CheckpointError(f"{info.file}: cannot read tensor {info.key} (file ended at byte {pos + done}; "
                                      "truncated while reading?)")
            done += got


def _check(info: TensorInfo, start: int, stop: int) -> None:
    """Same checks (and messages) as ``LazyCheckpoint.get_rows``, plus a sane header."""
    if not (0 <= start <= stop <= (info.shape[0] if info.shape else 0)):
        raise CheckpointError(f"{info.file}: rows {start}:{stop} out of range for {info.key} {list(info.shape)}")
    if info.offset < 0:
        raise CheckpointError(f"{info.file}: cannot read tensor {info.key} (its file offset is unknown)")
    need = math.prod(info.shape) * info.dtype.itemsize
    if info.nbytes != need:
        raise CheckpointError(f"{info.file}: cannot read tensor {info.key} (header gives {info.nbytes} data bytes, "
                              f"{info.dtype} {list(info.shape)} needs {need})")


class RowSource:
    """Rows of one tensor of one checkpoint, read into a :class:`Scratch` and cast to the compute dtype.

    ``read(start, stop, dtype, raw, cast)`` -> [stop - start, *shape[1:]] of ``dtype``: the stored
    rows land in ``raw``; if ``dtype`` differs they are cast into ``cast`` (``Tensor.copy_``, the same
    conversion as ``Tensor.to``). Both buffers are reused by the next read, so callers must be done
    with the result (or clone it) before reading into the same buffers again.
    """

    def __init__(self, reader: RowReader, checkpoint: LazyCheckpoint, key: str):
        self.reader = reader
        self.info = checkpoint.info(key)

    def read(self, start: int, stop: int, dtype: torch.dtype | None, raw: Scratch,
             cast: Scratch | None = None) -> torch.Tensor:
        _check(self.info, start, stop)
        rows = (stop - start, *self.info.shape[1:])
        stored = self.reader.read_rows(self.info, start, stop, raw.take(self.info.dtype, rows))
        if dtype is None or dtype == stored.dtype:
            return stored
        if cast is None:
            return stored.to(dtype)
        return cast.take(dtype, rows).copy_(stored)

    def read_new(self, start: int, stop: int, dtype: torch.dtype | None) -> torch.Tensor:
        """Like :meth:`read` but into a fresh tensor the caller owns."""
        _check(self.info, start, stop)
        rows = (stop - start, *self.info.shape[1:])
        stored = self.reader.read_rows(self.info, start, stop, torch.empty(rows, dtype=self.info.dtype))
        return stored if dtype is None or dtype == stored.dtype else stored.to(dtype)


__all__ = ["RowReader", "RowSource", "Scratch"]
