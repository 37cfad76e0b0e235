"""Streaming safetensors writer for a tensor list known in advance.

Because the merge plan knows every output name, shape and dtype before the
first tensor is merged, each shard's header can be written up front and the
tensor bytes appended as they are produced (whole tensors or row chunks, in
plan order). Nothing is buffered: memory stays at one chunk, whatever the shard
size. Shards follow the Hugging Face naming (``model.safetensors``, or
``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``).
"""

from __future__ import annotations

import errno
import json
import math
import struct
from pathlib import Path
from typing import BinaryIO, Sequence

import torch

from ..checkpoint import INDEX_NAME, SAFETENSORS_DTYPES, SINGLE_NAME
from ..errors import CheckpointError

ST_DTYPES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items() if dtype is not None}  # torch -> header code


def _write(fh: BinaryIO, data) -> None:
    """The one place bytes hit the disk (tests monkeypatch it to simulate a full disk)."""
    fh.write(data)


class StreamingShardWriter:
    """Write ``entries`` = [(name, shape, dtype)] in order into size-capped safetensors shards.

    Call :meth:`append` with consecutive pieces (row ranges) of the current tensor;
    :meth:`close` checks everything arrived and writes the index. ``display_dir``
    is the path named in error messages (the final output, not the temp dir).
    """

    def __init__(self, directory: str | Path, entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int, metadata: dict[str, str] | None = None, display_dir: str | Path | None = None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.display = Path(display_dir) if display_dir is not None else self.dir
        self.metadata = {"format": "pt", **(metadata or {})}
        self.entries = [(n, tuple(s), d, math.prod(s) * d.itemsize) for n, s, d in entries]
        shards: list[list[int]] = [[]]
        size = 0
        for i, (_, _, _, nbytes) in enumerate(self.entries):
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(i)
            size += nbytes
        n = len(shards)
        self.shards = [(SINGLE_NAME if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors", idx)
                       for k, idx in enumerate(shards)]
        self._shard_of = {i: k for k, (_, idx) in enumerate(self.shards) for i in idx}
        self._cur = 0          # index of the tensor being written
        self._cur_done = 0     # bytes of it written so far
        self._fh: BinaryIO | None = None
        self._open_shard = -1
        self.bytes_written = 0

    # -- helpers -------------------------------------------------------------
    def _fail(self, what: str, e: OSError) -> CheckpointError:
        if e.errno == errno.ENOSPC:
            return CheckpointError(f"{self.display}: disk full while writing {what} (no space left on device); "
                                   "nothing was written")
        return CheckpointError(f"{self.display}: cannot write {what} ({e.strerror or e})")

    def _header(self, k: int) -> bytes:
        header: dict = {"__metadata__": self.metadata}
        off = 0
        for i in self.shards[k][1]:
            name, shape, dtype, nbytes = self.entries[i]
            header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [off, off + nbytes]}
            off += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw

    def _switch_to(self, k: int) -> None:
        self._close_file()
        name = self.shards[k][0]
        try:
            self._fh = open(self.dir / name, "wb")
            _write(self._fh, self._header(k))
        except OSError as e:
            raise self._fail(name, e) from None
        self._open_shard = k

    def _close_file(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError as e:
                raise self._fail(self.shards[self._open_shard][0], e) from None
            self._fh = None

    # -- API -----------------------------------------------------------------
    @property
    def current(self) -> str | None:
        return self.entries[self._cur][0] if self._cur < len(self.entries) else None

    def append(self, name: str, piece: torch.Tensor) -> None:
        """Append the next bytes of tensor ``name`` (a row range, in order)."""
        if self._cur >= len(self.entries) or self.entries[self._cur][0] != name:
            raise RuntimeError(f"writer expected {self.current!r}, got {name!r}")
        _, shape, dtype, nbytes = self.entries[self._cur]
        if piece.dtype != dtype:
            raise RuntimeError(f"{name}: dtype {piece.dtype} but the plan says {dtype}")
        data = piece.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        if self._cur_done + data.nbytes > nbytes:
            raise RuntimeError(f"{name}: more bytes than its shape {list(shape)} holds")
        k = self._shard_of[self._cur]
        if k != self._open_shard:
            self._switch_to(k)
        try:
            _write(self._fh, memoryview(data))
        except OSError as e:
            raise self._fail(self.shards[k][0], e) from None
        self._cur_done += data.nbytes
        self.bytes_written += data.nbytes
        if self._cur_done == nbytes:
            self._cur, self._cur_done = self._cur + 1, 0
            while self._cur < len(self.entries) and self.entries[self._cur][3] == 0:  # empty tensors
                self._cur += 1

    def close(self) -> list[str]:
        """Finish: verify completeness, close the last shard, write the index if sharded."""
        if self._cur < len(self.entries):
            raise RuntimeError(f"writer closed before {self.entries[self._cur][0]!r} was complete")
        for k in range(len(self.shards)):  # shards whose tensors are all empty were never opened
            if not (self.dir / self.shards[k][0]).exists():
                self._switch_to(k)
        self._close_file()
        names = [n for n, _ in self.shards]
        if len(self.shards) > 1:
            weight_map = {self.entries[i][0]: fname for fname, idx in self.shards for i in idx}
            index = {"metadata": {"total_size": sum(e[3] for e in self.entries)},
                     "weight_map": dict(sorted(weight_map.items()))}
            try:
                _write_text(self.dir / INDEX_NAME, json.dumps(index, indent=2))
            except OSError as e:
                raise self._fail(INDEX_NAME, e) from None
        return names

    def abort(self) -> None:
        try:
            if self._fh is not None:
                self._fh.close()
        except OSError:
            pass
        self._fh = None


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as fh:
        _write(fh, text)


__all__ = ["ST_DTYPES", "StreamingShardWriter"]
