"""The LLM merge loop on threads: pieces read and merged by workers, written in plan order.

The merge is a list of :class:`Piece`\\ s in plan order (row ranges to merge with
mergekit, rows to carry). ``workers`` threads (the caller's thread is the first)
each claim the next piece, read its inputs into their own reusable buffers
(``os.preadv``, :class:`InputLoader`), run ``merge`` on it and hand the result
over; one writer thread appends the results to the
:class:`~fuse.merge.writer.StreamingShardWriter` strictly in plan order. Reads,
torch kernels and file writes release the GIL, so the threads really overlap, and
a piece is small (``chunk_bytes`` per input), so a worker's inputs are still in
cache when it merges them.

Bounded: a piece is claimed only while fewer than ``window`` pieces are claimed but
not yet written, so at most ``window`` results wait for the writer, next to each
worker's buffers. ``window=1`` is the sequential loop (whole-tensor merges).

Errors behave as in a sequential loop: the writer stops at the first piece (in plan
order) that failed to read, merge or write, the pieces before it are written, none
after it is started, and that error is raised, unchanged, in the caller's thread.
Ctrl-C (delivered to the caller's thread) stops the other threads and is re-raised.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .plan import MergePlan, TensorJob
from .reader import RowReader, RowSource, Scratch
from .writer import StreamingShardWriter


MAX_WORKERS = 4  # merge workers at most: element-wise math on cache-sized chunks is memory-bound


def merge_workers() -> int:
    """Merge workers for this machine: one per usable core, less one for the writer (and
    whatever else runs meanwhile, e.g. the checksum thread), between 1 and ``MAX_WORKERS``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores - 1))


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of ``job``: merged (``owner`` None) or carried from member ``owner``."""

    job: TensorJob
    start: int
    stop: int
    owner: int | None = None


def plan_pieces(plan: MergePlan) -> list[Piece]:
    """Every piece of the plan in write order (each job: its merged chunks, then its carried rows)."""
    out: list[Piece] = []
    for job in plan.jobs:
        out += [Piece(job, a, b) for a, b in job.chunks]
        out += [Piece(job, a, b, owner) for a, b, owner in job.carried]
    return out


@dataclass
class Loaded:
    """A piece with its inputs read.

    Merged piece: ``members[i]`` [rows, ...] of member i and ``base`` (or None), in the compute
    dtype. Carried piece: ``carried`` [rows, ...] in the output dtype, a tensor of its own.
    """

    piece: Piece
    members: list[torch.Tensor] = field(default_factory=list)
    base: torch.Tensor | None = None
    carried: torch.Tensor | None = None


class InputLoader:
    """Reads the inputs of pieces, for one worker.

    ``parts``: the members' ``LLMPart``\\ s, then the base's when ``with_base``.
    ``pooled``: merged rows go to this loader's reusable :class:`Scratch` buffers, overwritten by
    its next piece (row-chunked plans); otherwise to fresh tensors (whole-tensor plans, so no
    tensor-sized buffer outlives its tensor).
    """

    def __init__(self, reader: RowReader, parts: Sequence, with_base: bool, compute: torch.dtype, pooled: bool):
        self.reader = reader
        self.parts = list(parts)
        self.with_base = with_base
        self.compute = compute
        self.pooled = pooled
        self._raw = [Scratch() for _ in self.parts]
        self._cast = [Scratch() for _ in self.parts]
        self._job: TensorJob | None = None
        self._sources: list[RowSource] = []

    def _sources_for(self, job: TensorJob) -> list[RowSource]:
        if job is not self._job:
            self._sources = [RowSource(self.reader, p.reader, p.keys[job.name]) for p in self.parts]
            self._job = job
        return self._sources

    def load(self, piece: Piece) -> Loaded:
        srcs = self._sources_for(piece.job)
        a, b = piece.start, piece.stop
        if piece.owner is not None:
            return Loaded(piece, carried=srcs[piece.owner].read_new(a, b, piece.job.out_dtype))
        if self.pooled:
            ins = [s.read(a, b, self.compute, raw, cast) for s, raw, cast in zip(srcs, self._raw, self._cast)]
        else:
            ins = [s.read_new(a, b, self.compute) for s in srcs]
        base = ins.pop() if self.with_base else None
        return Loaded(piece, ins, base)

    def owns(self, t: torch.Tensor) -> bool:
        """True if ``t`` lives in this loader's reusable buffers."""
        return self.pooled and any(s.owns(t) for s in self._raw + self._cast)


class _Schedule:
    """Claims, results and the write position of ``n`` pieces, under one condition variable."""

    def __init__(self, n: int, window: int):
        self.window = max(window, 1)
        self.cond = threading.Condition()
        self.next_claim = 0
        self.next_write = 0
        self.stop_at = n                     # pieces from here on are not started
        self.results: dict[int, object] = {}  # piece index -> tensor to write, or the exception it raised
        self.error: BaseException | None = None

    def claim(self) -> int | None:
        """The next piece to merge, once the window allows it; None when there is nothing left."""
        with self.cond:
            while self.next_claim < self.stop_at and self.next_claim - self.next_write >= self.window:
                self.cond.wait()
            if self.next_claim >= self.stop_at:
                return None
            self.next_claim += 1
            return self.next_claim - 1

    def put(self, i: int, result: object) -> None:
        """Piece ``i``'s tensor, or its exception (then no later piece is started)."""
        with self.cond:
            if i < self.stop_at:
                self.results[i] = result
                if isinstance(result, BaseException):
                    self.stop_at = i + 1
            self.cond.notify_all()

    def next_result(self) -> tuple[int, object] | None:
        """(index, result) of the next piece to write, once there; None when nothing is left to write."""
        with self.cond:
            while self.next_write < self.stop_at and self.next_write not in self.results:
                self.cond.wait()
            if self.next_write >= self.stop_at:
                return None
            return self.next_write, self.results.pop(self.next_write)

    def written(self) -> None:
        with self.cond:
            self.next_write += 1
            self.cond.notify_all()

    def stop(self, error: BaseException | None) -> None:
        """End the merge at the write position: ``error`` (if any) is what the caller raises."""
        with self.cond:
            if self.error is None:
                self.error = error
            self.stop_at = min(self.stop_at, self.next_write)
            self.results.clear()
            self.cond.notify_all()


def _work(schedule: _Schedule, pieces: Sequence[Piece], loader: InputLoader,
          merge: Callable[[Loaded], torch.Tensor]) -> None:
    """Claim pieces until none is left; hand each result (or the piece's exception) to ``schedule``."""
    with torch.no_grad():
        while (i := schedule.claim()) is not None:
            try:
                out = merge(loader.load(pieces[i]))
                if loader.owns(out):
                    out = out.clone()  # the method returned (a view of) an input: keep it past buffer reuse
                result: object = out
                del out
            except Exception as e:
                result = e
            schedule.put(i, result)
            del result


def _write(schedule: _Schedule, pieces: Sequence[Piece], writer: StreamingShardWriter,
           done: Callable[[TensorJob], None]) -> None:
    """Append results in plan order; at the first failed piece, stop with its error."""
    while (item := schedule.next_result()) is not None:
        i, result = item
        del item
        try:
            if isinstance(result, BaseException):
                raise result
            writer.append(pieces[i].job.name, result)
            del result
            if i + 1 == len(pieces) or pieces[i + 1].job is not pieces[i].job:
                done(pieces[i].job)
        except BaseException as e:
            schedule.stop(e)
            return
        schedule.written()


def _start(schedule: _Schedule, name: str, target: Callable[..., None], *args) -> threading.Thread:
    """Run ``target(schedule, *args)`` in a daemon thread; an unexpected error stops the merge."""
    def run() -> None:
        try:
            target(schedule, *args)
        except BaseException as e:
            schedule.stop(e)

    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    return t


def merge_pieces(pieces: Sequence[Piece], loaders: Sequence[InputLoader], merge: Callable[[Loaded], torch.Tensor],
                 writer: StreamingShardWriter, done: Callable[[TensorJob], None], window: int) -> None:
    """Merge ``pieces`` with one worker per loader (``loaders[0]`` in this thread) and write them in
    order. ``done(job)`` is called from the writer thread once a job is fully written. Raises the
    first failure in plan order; every thread has ended when this returns or raises."""
    schedule = _Schedule(len(pieces), window)
    threads = [_start(schedule, "fuse-merge-writer", _write, pieces, writer, done)]
    threads += [_start(schedule, f"fuse-merge-{k}", _work, pieces, loader, merge)
                for k, loader in enumerate(loaders[1:], 1)]
    try:
        _work(schedule, pieces, loaders[0], merge)
        threads[0].join()
    except BaseException:
        schedule.stop(None)  # Ctrl-C: drop what is queued, stop the other threads
        raise
    finally:
        for t in threads:
            t.join()
    if schedule.error is not None:
        raise schedule.error


__all__ = ["MAX_WORKERS", "InputLoader", "Loaded", "Piece", "merge_workers", "merge_pieces", "plan_pieces"]
