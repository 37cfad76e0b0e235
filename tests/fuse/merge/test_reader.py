"""The merge loop's I/O: positional row reads (fuse.merge.reader) and the threaded loop (fuse.merge.pipeline)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fuse.checkpoint import LazyCheckpoint, ShardedWriter
from fuse.errors import CheckpointError
from fuse.merge.pipeline import InputLoader, Piece, merge_pieces, plan_pieces
from fuse.merge.plan import TensorJob
from fuse.merge.reader import RowReader, RowSource, Scratch
from fuse.merge.writer import StreamingShardWriter
from fuse.testing import rewrite_weights


def _stored(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """Two shards with tensors of several dtypes and shapes (odd sizes, so offsets are unaligned)."""
    g = torch.Generator().manual_seed(0)
    a = {"f32": torch.randn(37, 5, generator=g), "bf16": torch.randn(11, 3, 7, generator=g).bfloat16(),
         "i64": torch.randint(-9, 9, (13,), generator=g), "empty": torch.zeros(0, 4)}
    b = {"f16": torch.randn(9, 6, generator=g).half(), "u8": torch.randint(0, 255, (7, 3), dtype=torch.uint8),
         "bool": torch.rand(5, 3, generator=g) > 0.5, "scalar": torch.tensor(3.0)}
    d = tmp_path / "ck"
    d.mkdir()
    save_file(a, str(d / "a.safetensors"))
    save_file(b, str(d / "b.safetensors"))
    return d, {**a, **b}


def _slice(path: Path, key: str, start: int, stop: int) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as fh:
        return fh.get_slice(key)[start:stop]


def test_row_ranges_of_every_dtype_equal_safe_open_slices(tmp_path):
    d, ref = _stored(tmp_path)
    ck = LazyCheckpoint(d)
    with RowReader() as rr:
        for key, t in ref.items():
            info = ck.info(key)
            assert info.offset > 8 and info.nbytes == t.numel() * t.element_size()
            if t.dim() == 0:
                continue
            n = t.shape[0]
            for start, stop in {(0, n), (0, min(1, n)), (n // 3, n), (n // 2, n // 2), (max(n - 2, 0), n)}:
                out = torch.empty((stop - start, *t.shape[1:]), dtype=t.dtype)
                got = rr.read_rows(info, start, stop, out)
                want = _slice(info.file, key, start, stop)
                assert got.dtype == want.dtype and got.shape == want.shape, key
                assert torch.equal(got, want), (key, start, stop)


def test_out_of_range_and_scalar_rows_fail_like_get_rows(tmp_path):
    d, _ = _stored(tmp_path)
    ck = LazyCheckpoint(d)
    with RowReader() as rr:
        for key, (start, stop) in {"f32": (30, 38), "scalar": (0, 1), "i64": (5, 4)}.items():
            with pytest.raises(CheckpointError) as ours:
                RowSource(rr, ck, key).read_new(start, stop, None)
            with pytest.raises(CheckpointError) as theirs:
                ck.get_rows(key, start, stop)
            assert str(ours.value) == str(theirs.value)


def test_cast_to_compute_dtype_matches_get_rows_and_buffers_are_reused(tmp_path):
    d, _ = _stored(tmp_path)
    ck = LazyCheckpoint(d)
    raw, cast = Scratch(), Scratch()
    with RowReader() as rr:
        src = RowSource(rr, ck, "bf16")
        first = src.read(2, 9, torch.float32, raw, cast)
        assert first.dtype == torch.float32 and first.shape == (7, 3, 7)
        assert torch.equal(first, ck.get_rows("bf16", 2, 9, torch.float32))
        assert raw.owns(first) is False and cast.owns(first)
        size = cast.nbytes
        second = src.read(0, 4, torch.float32, raw, cast)  # smaller: same memory, no new buffer
        assert cast.nbytes == size and second.data_ptr() == first.data_ptr()
        assert torch.equal(second, ck.get_rows("bf16", 0, 4, torch.float32))
        same = RowSource(rr, ck, "f32").read(3, 8, torch.float32, raw, cast)  # no cast: straight into raw
        assert raw.owns(same) and torch.equal(same, ck.get_rows("f32", 3, 8))
        half = RowSource(rr, ck, "f16").read_new(1, 5, torch.float64)
        assert torch.equal(half, ck.get_rows("f16", 1, 5, torch.float64))


def test_file_truncated_after_indexing_is_a_checkpoint_error(tmp_path):
    d, _ = _stored(tmp_path)
    ck = LazyCheckpoint(d)
    info = ck.info("f32")
    os.truncate(info.file, info.offset + 10 * info.row_bytes)
    with RowReader() as rr, pytest.raises(CheckpointError, match="cannot read tensor f32 .*file ended"):
        RowSource(rr, ck, "f32").read_new(0, 37, None)


# -- the threaded loop -------------------------------------------------------


def _inputs(tmp_path: Path, n: int = 3) -> list[SimpleNamespace]:
    """``n`` checkpoints with the same tensors (LLMPart-like: ``reader`` + ``keys``)."""
    parts = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        d = tmp_path / f"in{i}"
        w = ShardedWriter(d, max_shard_bytes=3000)  # several shards
        for name, shape in (("a", (40, 6)), ("b", (17, 9)), ("c", (5, 3))):
            w.add(name, torch.randn(shape, generator=g))
        w.close()
        ck = LazyCheckpoint(d)
        parts.append(SimpleNamespace(reader=ck, keys={k: k for k in ck.keys()}))
    return parts


def _jobs(step: int) -> list[TensorJob]:
    jobs = []
    for name, rows, cols in (("a", 40, 6), ("b", 17, 9), ("c", 5, 3)):
        chunks = [(s, min(rows, s + step)) for s in range(0, rows, step)]
        jobs.append(TensorJob(name, (rows, cols), torch.float32, rows, chunks))
    return jobs


def _run(tmp_path: Path, parts, jobs, merge, workers: int, window: int, out: str = "out") -> dict:
    pieces = [p for job in jobs for p in [Piece(job, a, b) for a, b in job.chunks]]
    writer = StreamingShardWriter(tmp_path / out, [(j.name, j.shape, j.out_dtype) for j in jobs], 2000)
    done = []
    try:
        with RowReader() as rr:
            loaders = [InputLoader(rr, parts, True, torch.float64, pooled=True) for _ in range(workers)]
            merge_pieces(pieces, loaders, merge, writer, done.append, window)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    assert [j.name for j in done] == [j.name for j in jobs]
    return LazyCheckpoint(tmp_path / out).state_dict()


def _weighted(loaded) -> torch.Tensor:
    return (loaded.members[0] * 0.25 + loaded.members[1] * 0.5 - loaded.base).float()


@pytest.mark.parametrize("workers,window", [(1, 1), (1, 3), (2, 4), (3, 2)])
def test_any_number_of_workers_writes_the_same_bytes(tmp_path, workers, window):
    parts = _inputs(tmp_path)
    got = _run(tmp_path, parts, _jobs(step=3), _weighted, workers, window)
    for name in ("a", "b", "c"):
        full = [p.reader.get(name, torch.float64) for p in parts]
        want = (full[0] * 0.25 + full[1] * 0.5 - full[2]).float()
        assert torch.equal(got[name], want), name


def test_a_result_that_is_an_input_buffer_is_copied_before_reuse(tmp_path):
    parts = _inputs(tmp_path)
    jobs = _jobs(step=2)

    def same_buffer(loaded):  # float32 compute = stored dtype: the input itself, in the worker's scratch
        return loaded.members[0]

    writer = StreamingShardWriter(tmp_path / "alias", [(j.name, j.shape, j.out_dtype) for j in jobs], 10**6)
    with RowReader() as rr:
        loaders = [InputLoader(rr, parts, True, torch.float32, pooled=True) for _ in range(2)]
        merge_pieces([Piece(j, a, b) for j in jobs for a, b in j.chunks], loaders, same_buffer, writer,
                     lambda job: None, window=5)
    writer.close()
    out = LazyCheckpoint(tmp_path / "alias").state_dict()
    for name in ("a", "b", "c"):
        assert torch.equal(out[name], parts[0].reader.get(name))


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_first_failure_in_plan_order_wins_and_nothing_after_it_is_written(tmp_path, workers, monkeypatch):
    import fuse.merge.writer as writer_mod

    parts = _inputs(tmp_path)
    jobs = _jobs(step=1)  # 62 pieces
    pieces = [Piece(j, a, b) for j in jobs for a, b in j.chunks]
    bad = {20: ValueError("piece 20 is bad"), 35: KeyError("piece 35")}

    def merge(loaded):
        i = pieces.index(loaded.piece)
        if i in bad:
            raise bad[i]
        return _weighted(loaded)

    with pytest.raises(ValueError, match="piece 20 is bad"):
        _run(tmp_path, parts, jobs, merge, workers, 4, out="o1")

    calls = {"n": 0}
    real = writer_mod._write

    def full(fh, data):  # header + pieces 0..9, then the disk is full at piece 10 (before the bad piece)
        calls["n"] += 1
        if calls["n"] > 11:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fh, data)

    monkeypatch.setattr(writer_mod, "_write", full)
    with pytest.raises(CheckpointError, match="disk full"):
        _run(tmp_path, parts, jobs, merge, workers, 4, out="o2")
    assert calls["n"] == 12  # no write after the failed one


def test_ctrl_c_in_the_callers_thread_stops_the_workers(tmp_path):
    import threading

    parts = _inputs(tmp_path)
    jobs = _jobs(step=1)
    main = threading.current_thread()
    seen = []

    def merge(loaded):
        seen.append(loaded.piece)
        if threading.current_thread() is main and len(seen) > 10:
            raise KeyboardInterrupt
        return _weighted(loaded)

    before = threading.active_count()
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, parts, jobs, merge, 2, 4)
    assert threading.active_count() == before  # writer and worker threads have ended
    assert len(seen) < sum(len(j.chunks) for j in jobs)


def test_plan_pieces_are_chunks_then_carried_rows_in_job_order():
    jobs = [TensorJob("x", (10, 2), torch.float32, 8, [(0, 4), (4, 8)], [(8, 9, 1), (9, 10, 0)]),
            TensorJob("y", (3,), torch.float32, 3, [(0, 3)])]
    plan = SimpleNamespace(jobs=jobs)
    got = [(p.job.name, p.start, p.stop, p.owner) for p in plan_pieces(plan)]
    assert got == [("x", 0, 4, None), ("x", 4, 8, None), ("x", 8, 9, 1), ("x", 9, 10, 0), ("y", 0, 3, None)]


# -- merge_llm with several workers (this machine may default to one) --------------


@pytest.fixture(scope="module")
def two_members(tmp_path_factory, tiny_base):
    from fuse.testing import build_llava_hf_member

    root = tmp_path_factory.mktemp("workers")
    return [build_llava_hf_member(root / f"m{i}", tiny_base, seed=i + 1)[0] for i in range(2)]


def _merge(tmp_path: Path, base: Path, members: list[Path], workers: int, out: str, method: str = "task_arithmetic"):
    from fuse.merge.options import MergeOptions
    from fuse.merge.plan import build_plan
    from fuse.merge.run import merge_llm, open_family
    from fuse.recipe import parse_recipe

    recipe = parse_recipe({"base_model": str(base), "merge": {"method": method, "dtype": "float32"},
                           "members": [{"model": str(m), "weight": w} for m, w in zip(members, (0.7, 0.45))]})
    prep = open_family(recipe)
    plan = build_plan(recipe, prep.base, prep.members, prep.report.tensor_names, chunk_bytes=512)
    merge_llm(recipe, plan, prep.base, prep.members, tmp_path / out,
              options=MergeOptions(progress=False, workers=workers))
    return LazyCheckpoint(tmp_path / out).state_dict()


@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "ties"])
def test_merge_llm_with_several_workers_is_bit_identical(tmp_path, tiny_base, two_members, method):
    one = _merge(tmp_path, tiny_base, two_members, 1, "one", method)
    for workers in (2, 3):
        many = _merge(tmp_path, tiny_base, two_members, workers, f"w{workers}", method)
        assert sorted(many) == sorted(one)
        for k in one:
            assert torch.equal(many[k], one[k]), (workers, k)


def test_nan_with_several_workers_names_the_first_bad_rows(tmp_path, tiny_base, two_members):
    from fuse.merge.methods import MergeError

    def nan_rows(sd):  # every chunk from row 5 on is bad; the first one must be reported
        sd[next(k for k in sd if k.endswith("layers.1.mlp.up_proj.weight"))][5:, :] = float("nan")

    bad = rewrite_weights(two_members[1], tmp_path / "bad", nan_rows)
    for workers in (1, 2):
        # 512-byte chunks of 64 float32 columns: 2 rows per piece, so row 5 is in piece 4:6
        with pytest.raises(MergeError, match=r"up_proj.weight \(rows 4:6\) contains NaN/Inf; input bad already"):
            _merge(tmp_path, tiny_base, [two_members[0], bad], workers, f"nan{workers}")
