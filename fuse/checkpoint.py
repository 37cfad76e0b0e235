"""Lazy safetensors reading and atomic sharded writing.

Reading: :class:`LazyCheckpoint` indexes a directory (``model.safetensors``,
``model.safetensors.index.json`` + shards, or any ``*.safetensors``) by reading
headers only. ``get(key)`` memory-maps one tensor and returns a copy of exactly
that tensor, so an 8B member (16 GB) is never resident: callers hold one tensor
at a time.

Writing: :class:`ShardedWriter` appends tensors into shards of at most
``max_shard_bytes``; shards are flushed as they fill, so at most one shard's
worth of tensors is buffered. Callers write into the temporary directory of
:func:`fuse.output_dir.atomic_output_dir`, renamed into place when complete, so a
crash or Ctrl-C never leaves a half-written output.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CheckpointError
from .units import parse_size  # noqa: F401  (re-exported: fuse.checkpoint.parse_size)
from .output_dir import atomic_output_dir  # noqa: F401  (its former home: old imports keep working)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

SAFETENSORS_DTYPES = {  # header code -> torch dtype (None: not in this torch build)
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
}


@dataclass(frozen=True)
class TensorInfo:
    """Header facts of one stored tensor (no data read).

    ``offset``: absolute byte position of the tensor's data in ``file``
    (8 + header length + ``data_offsets[0]``); -1 when unknown.
    """

    key: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    offset: int = -1

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (first axis) of the stored tensor; 0 for a scalar or empty first axis."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else 0


def _read_header_and_start(path: Path) -> tuple[dict, int]:
    """(validated header, file offset where the tensor data starts = 8 + header length)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (hlen,) = struct.unpack("<Q", raw)
            if hlen > min(size - 8, 100_000_000):
                raise CheckpointError(f"{path}: corrupt safetensors header (declares {hlen} bytes)")
            header = json.loads(fh.read(hlen))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    data_len = size - 8 - hlen
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if end > data_len:
        raise CheckpointError(
            f"{path}: truncated safetensors file ({data_len} data bytes, header needs {end})"
        )
    return header, 8 + hlen


class LazyCheckpoint:
    """Tensor-by-tensor view of the safetensors weights in one directory.

    Args:
        path: a checkpoint directory, or a single ``.safetensors`` file.
        files: restrict to these file names inside ``path`` (optional).

    Only headers are read at construction. ``get`` opens the shard lazily
    (memory map) and returns an owned copy of one tensor.
    """

    def __init__(self, path: str | os.PathLike, files: list[str] | None = None):
        self.path = Path(path)
        self._info: dict[str, TensorInfo] = {}
        self._metadata: dict[str, str] = {}
        self.has_data = True
        for f in self._resolve_files(files):
            self._add_header(f, *_read_header_and_start(f))

    @classmethod
    def from_headers(cls, path: str | os.PathLike, headers: dict[str, dict]) -> "LazyCheckpoint":
        """A checkpoint known by its safetensors headers only (``{file name in path: header}``,
        e.g. fetched from the Hugging Face Hub): every header fact, no tensor data
        (``has_data`` False; reading a tensor raises CheckpointError)."""
        self = cls.__new__(cls)
        self.path = Path(path)
        self._info, self._metadata, self.has_data = {}, {}, False
        for name in sorted(headers):
            self._add_header(self.path / name, headers[name], -1)
        return self

    def _add_header(self, f: Path, header: dict, data_start: int) -> None:
        self._metadata.update(header.get("__metadata__") or {})
        for key, v in header.items():
            if key == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES.get(v["dtype"])
            if dtype is None:
                raise CheckpointError(f"{f}: tensor {key} has unsupported dtype {v['dtype']}")
            start, stop = v["data_offsets"]
            if key in self._info:
                raise CheckpointError(f"{f}: tensor {key} also stored in {self._info[key].file}")
            self._info[key] = TensorInfo(key, f, dtype, tuple(v["shape"]), stop - start,
                                         data_start + start if data_start >= 0 else -1)

    def _require_data(self, key: str) -> TensorInfo:
        info = self.info(key)
        if not self.has_data:
            raise CheckpointError(f"{info.file}: tensor {key} is not downloaded (only the safetensors headers "
                                  "were fetched)")
        return info

    def _resolve_files(self, files: list[str] | None) -> list[Path]:
        p = self.path
        if p.is_file():
            return [p]
        if not p.is_dir():
            raise CheckpointError(f"{p}: no such checkpoint directory or file")
        if files is not None:
            out = [p / f for f in files]
        elif (p / INDEX_NAME).exists():
            try:
                index = json.loads((p / INDEX_NAME).read_text())
                names = sorted(set(index["weight_map"].values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError, TypeError):
                raise CheckpointError(f"{p / INDEX_NAME}: not a valid index (needs a 'weight_map' object)") from None
            for n in names:  # a file name inside this folder (HF cache symlinks may point elsewhere: fine)
                if not isinstance(n, str) or Path(n).is_absolute() or ".." in Path(n).parts or not n:
                    raise CheckpointError(f"{p / INDEX_NAME}: shard {n!r} is not a file name inside {p}")
            out = [p / n for n in names]
        elif (p / SINGLE_NAME).exists():
            out = [p / SINGLE_NAME]
        else:
            out = sorted(p.glob("*.safetensors"))
            if not out:
                raise CheckpointError(f"{p}: no *.safetensors weights found")
        for f in out:
            if not f.is_file():
                raise CheckpointError(f"{f}: shard named in the index is missing")
        return out

    # -- header facts -------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._info)

    def __contains__(self, key: str) -> bool:
        return key in self._info

    def __len__(self) -> int:
        return len(self._info)

    def info(self, key: str) -> TensorInfo:
        try:
            return self._info[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {key!r} not found") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self.info(key).shape

    def dtype(self, key: str) -> torch.dtype:
        return self.info(key).dtype

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    @property
    def files(self) -> list[Path]:
        return sorted({i.file for i in self._info.values()})

    def total_bytes(self, keys: list[str] | None = None) -> int:
        return sum(self._info[k].nbytes for k in (keys if keys is not None else self._info))

    # -- data ---------------------------------------------------------------
    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor (an owned copy), optionally cast to ``dtype``."""
        info = self._require_data(key)
        try:
            with safe_open(str(info.file), framework="pt", device="cpu") as fh:
                t = fh.get_tensor(key)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{info.file}: cannot read tensor {key} ({e})") from None
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        return t

    def get_rows(self, key: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read rows ``[start, stop)`` of one tensor (first axis) without touching the others."""
        info = self._require_data(key)
        if not (0 <= start <= stop <= (info.shape[0] if info.shape else 0)):
            raise CheckpointError(f"{info.file}: rows {start}:{stop} out of range for {key} {list(info.shape)}")
        try:
            with safe_open(str(info.file), framework="pt", device="cpu") as fh:
                t = fh.get_slice(key)[start:stop]
        except Exception as e:
            raise CheckpointError(f"{info.file}: cannot read tensor {key} ({e})") from None
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        return t

    def iter_tensors(self, keys: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, tensor)`` one at a time, grouped by file to keep the mmap warm."""
        keys = list(self._info) if keys is None else keys
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self._require_data(k).file, []).append(k)
        for f, ks in by_file.items():
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                for k in ks:
                    yield k, fh.get_tensor(k)

    def state_dict(self, keys: list[str] | None = None, prefix_strip: str = "") -> dict[str, torch.Tensor]:
        """Load a (small) subset fully, e.g. a vision branch. Never call on a whole LLM."""
        out = {}
        for k, t in self.iter_tensors(keys):
            out[k[len(prefix_strip):] if prefix_strip and k.startswith(prefix_strip) else k] = t
        return out




class ShardedWriter:
    """Write tensors into ``model-0000i-of-0000n.safetensors`` shards + index json.

    Tensors are buffered until the shard would exceed ``max_shard_bytes`` and
    then written, so memory stays bounded by one shard (choose the shard size
    accordingly; a tensor bigger than the limit gets a shard of its own).
    """

    def __init__(self, directory: str | os.PathLike, max_shard_bytes: int | str = "5GB",
                 metadata: dict[str, str] | None = None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max = parse_size(max_shard_bytes)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self._total = 0
        self._closed = False

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if any(key in ks for _, ks in self._shards) or key in self._buf:
            raise ValueError(f"tensor {key} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._buf and self._buf_bytes + nbytes > self.max:
            self._flush()
        self._buf[key] = tensor.detach().contiguous().cpu()
        self._buf_bytes += nbytes
        self._total += nbytes

    def _flush(self) -> None:
        if not self._buf:
            return
        name = f"shard-{len(self._shards):05d}.safetensors"
        try:
            save_file(self._buf, str(self.dir / name), metadata=self.metadata)
        except OSError as e:
            raise CheckpointError(f"{self.dir / name}: write failed ({e.strerror or e})") from None
        self._shards.append((name, list(self._buf)))
        self._buf, self._buf_bytes = {}, 0

    def close(self) -> list[str]:
        """Flush, give shards their final names, write the index. Returns file names."""
        if self._closed:
            raise RuntimeError("writer already closed")
        self._flush()
        self._closed = True
        n = len(self._shards)
        if n == 0:
            save_file({}, str(self.dir / SINGLE_NAME), metadata=self.metadata)
            return [SINGLE_NAME]
        if n == 1:
            os.replace(self.dir / self._shards[0][0], self.dir / SINGLE_NAME)
            return [SINGLE_NAME]
        weight_map, names = {}, []
        for i, (tmp_name, keys) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / tmp_name, self.dir / final)
            names.append(final)
            weight_map.update({k: final for k in keys})
        index = {"metadata": {"total_size": self._total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2))
        return names


def read_json(path: str | os.PathLike, what: str = "JSON file") -> dict:
    """Read a JSON object, raising CheckpointError naming the file on any problem."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: missing {what}")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{p}: expected a JSON object")
    return data
