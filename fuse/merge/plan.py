"""The tensor plan of a merge: what is read, merged, carried and written, and what it costs.

Built from headers only. Each LLM tensor becomes a :class:`TensorJob`:

- ``merge_rows``: rows merged with the mergekit method. For embeddings/lm_head it
  is the rows every input has (the shared vocabulary); rows beyond it are
  *carried* verbatim from the first member that has them (``carried``), e.g.
  SliME's pad row 128256. For other tensors it is all rows.
- ``chunks``: row ranges merged per call. Element-wise methods (task arithmetic,
  linear, TIES/DARE at density 1) are merged in chunks of about
  ``chunk_bytes`` per input, which gives the same bits as merging the whole
  tensor; whole-tensor methods (TIES top-k, DARE's rescale) get one chunk.

Jobs are ordered by tensor name, the order ``mergekit-yaml`` executes them in,
so DARE's random stream matches ``mergekit-yaml --random-seed`` for the same seed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..checkpoint import parse_size
from ..dtypes import dtype_name, torch_dtype
from .family import VOCAB_TENSORS
from .methods import method_info
from .options import DEFAULT_CHUNK_BYTES
from .sources import BaseInput, MemberInput

@dataclass
class TensorJob:
    name: str
    shape: tuple[int, ...]            # output shape
    out_dtype: torch.dtype
    merge_rows: int                   # rows [0, merge_rows) are merged
    chunks: list[tuple[int, int]]     # row ranges of the merged part, one mergekit call each
    carried: list[tuple[int, int, int]] = field(default_factory=list)  # (start, stop, member index)
    read_bytes: int = 0
    unit_bytes: int = 0               # compute-dtype bytes of the largest chunk of one input

    @property
    def out_bytes(self) -> int:
        return math.prod(self.shape) * self.out_dtype.itemsize


@dataclass
class MergePlan:
    method: str
    jobs: list[TensorJob]
    compute_dtype: torch.dtype
    n_members: int
    with_base: bool
    vision_bytes: int                 # written: every member's vision branch
    chunked: bool
    max_shard_bytes: int
    vision_load_bytes: int = 0        # the biggest single member's branch while it is loaded
    dtype_note: str | None = None     # set when members store different dtypes and the recipe names none

    @property
    def read_bytes(self) -> int:
        return sum(j.read_bytes for j in self.jobs)

    @property
    def llm_bytes(self) -> int:
        return sum(j.out_bytes for j in self.jobs)

    @property
    def write_bytes(self) -> int:
        return self.llm_bytes + self.vision_bytes

    @property
    def largest_tensor_bytes(self) -> int:
        return max((j.out_bytes for j in self.jobs), default=0)

    def working_set_bytes(self) -> int:
        """Scratch of the biggest mergekit call: inputs in compute dtype + method temporaries + output."""
        k = self.n_members + int(self.with_base)
        factor = method_info(self.method).scratch(k, self.n_members)
        worst = 0
        for j in self.jobs:
            unit = j.unit_bytes
            out = unit // self.compute_dtype.itemsize * j.out_dtype.itemsize
            worst = max(worst, factor * unit + out)
        return worst

    def peak_memory_estimate(self, baseline: int | None = None) -> tuple[int, int]:
        """(estimated peak RSS, baseline RSS used). Baseline = this process now (libraries, configs).

        Peak = baseline + the larger of the merge working set and one member's vision branch
        (members are loaded one at a time; the adapters materialise the branch, ~1.25x transiently)."""
        if baseline is None:
            import psutil

            baseline = psutil.Process(os.getpid()).memory_info().rss
        return baseline + max(self.working_set_bytes() + 16 * 2**20, int(1.25 * self.vision_load_bytes)), baseline

    def describe(self, out: str | Path | None = None) -> str:
        gb = 1e9
        peak, base = self.peak_memory_estimate()
        carried = sum(stop - start for j in self.jobs for start, stop, _ in j.carried)
        n_chunks = sum(len(j.chunks) for j in self.jobs)
        lines = [
            f"plan: {self.method} of {self.n_members} member(s){' + base' if self.with_base else ''}, "
            f"compute {dtype_name(self.compute_dtype)}",
            f"  LLM tensors      {len(self.jobs)} ({n_chunks} merge calls"
            f"{', row-chunked' if self.chunked else ', whole tensors'})",
            f"  carried rows     {carried} (appended vocabulary rows copied from the member that has them)",
            f"  bytes to read    {self.read_bytes / gb:.3f} GB",
            f"  bytes to write   {self.write_bytes / gb:.3f} GB (LLM {self.llm_bytes / gb:.3f} GB, "
            f"vision branches {self.vision_bytes / gb:.3f} GB)",
            f"  largest tensor   {self.largest_tensor_bytes / 2**20:.1f} MiB",
            f"  peak memory      ~{peak / 2**20:.0f} MiB (process now {base / 2**20:.0f} MiB + max of merge "
            f"working set {self.working_set_bytes() / 2**20:.0f} MiB, one member's vision branch while loaded "
            f"{self.vision_load_bytes / 2**20:.0f} MiB)",
        ]
        if out is not None:
            lines.append(f"  output           {out}")
        if self.dtype_note:
            lines.append(f"  note             {self.dtype_note}")
        return "\n".join(lines)


def _row_chunks(rows: int, row_bytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    if rows == 0:
        return [(0, 0)]
    step = max(1, chunk_bytes // max(row_bytes, 1))
    return [(s, min(rows, s + step)) for s in range(0, rows, step)]


def build_plan(recipe, base: BaseInput | None, members: Sequence[MemberInput], names: Sequence[str],
               chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> MergePlan:
    """Plan every tensor of ``names`` (already family-checked; sorted = execution order)."""
    method = recipe.merge.method
    info = method_info(method)
    compute = torch_dtype(recipe.merge.dtype)
    with_base = info.needs_base
    out_fixed = torch_dtype(recipe.merge.out_dtype) if recipe.merge.out_dtype else None
    elementwise = info.elementwise([m.spec.density for m in members])
    inputs = [m.llm for m in members] + ([base.llm] if with_base else [])
    jobs = []
    for name in names:
        first = members[0].llm
        shape0 = tuple(first.shape(name))
        out_dtype = out_fixed or first.dtype(name)
        if name in VOCAB_TENSORS:
            rows = [p.shape(name)[0] for p in inputs]
            merge_rows, total = min(rows), max(m.llm.shape(name)[0] for m in members)
            total = max(total, merge_rows)
            carried, r = [], merge_rows
            while r < total:  # rows past the shared vocabulary: from the first member that has them
                owner = next(m.index for m in members if m.llm.shape(name)[0] > r)
                stop = min(total, members[owner].llm.shape(name)[0])
                carried.append((r, stop, owner))
                r = stop
            shape = (total, *shape0[1:])
        else:
            merge_rows, carried, shape = shape0[0] if shape0 else 1, [], shape0
        row_elems = math.prod(shape[1:]) if len(shape) > 1 else 1
        row_compute = row_elems * compute.itemsize
        if elementwise and len(shape) >= 1:
            chunks = _row_chunks(merge_rows, row_compute, chunk_bytes)
        else:
            chunks = [(0, merge_rows)]
        unit_rows = max(b - a for a, b in chunks)
        read = sum(merge_rows * row_elems * p.dtype(name).itemsize for p in inputs)
        read += sum((b - a) * row_elems * members[o].llm.dtype(name).itemsize for a, b, o in carried)
        jobs.append(TensorJob(name, tuple(shape), out_dtype, merge_rows, chunks, carried, read,
                              unit_rows * row_compute))
    return MergePlan(method, jobs, compute, len(members), with_base, sum(m.vision_save_bytes for m in members),
                     elementwise, parse_size(recipe.output.max_shard_size),
                     max((m.vision_bytes for m in members), default=0),
                     None if out_fixed else _mixed_dtypes_note(members, names))


def _mixed_dtypes_note(members: Sequence[MemberInput], names: Sequence[str]) -> str | None:
    """Say so when the members store their LLM tensors in different dtypes: the output then follows
    the first member (as mergekit-yaml does), which the recipe can override with merge.out_dtype."""
    stored = [sorted({dtype_name(m.llm.dtype(n)) for n in names}) for m in members]
    if len({tuple(s) for s in stored}) <= 1:
        return None
    desc = ", ".join(f"{m.name}: {'/'.join(s)}" for m, s in zip(members, stored))
    return (f"members store different dtypes ({desc}); the merged LLM is written in {members[0].name}'s "
            f"({'/'.join(stored[0])}); set merge.out_dtype in the recipe to choose")


__all__ = ["MergePlan", "TensorJob", "build_plan"]
