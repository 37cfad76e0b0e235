"""Lazy safetensors reading, sharded atomic writing, and one-line errors on bad input."""

from __future__ import annotations

import gc
import json
import os

import psutil
import pytest
import torch
from safetensors.torch import save_file

from fuse.checkpoint import LazyCheckpoint, ShardedWriter, parse_size
from fuse.errors import CheckpointError
from fuse.output_dir import MARKER, atomic_output_dir


def _write_sharded(d, n_tensors=6, numel=2_500_000, shard="25MB"):
    w = ShardedWriter(d, shard)
    ref = {}
    for i in range(n_tensors):
        t = torch.full((numel,), float(i))
        ref[f"t{i}"] = float(i)
        w.add(f"t{i}", t)
    return w.close(), ref


def test_writer_shards_and_index(tmp_path):
    files, _ = _write_sharded(tmp_path / "ck")
    assert len(files) == 3 and files[0] == "model-00001-of-00003.safetensors"
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {f"t{i}" for i in range(6)}
    assert index["metadata"]["total_size"] == 6 * 2_500_000 * 4
    for f in files:
        assert (tmp_path / "ck" / f).stat().st_size <= 25_000_000 + 10_000


def test_reading_3_shards_holds_one_tensor_at_a_time(tmp_path, monkeypatch):
    _write_sharded(tmp_path / "ck")
    ck = LazyCheckpoint(tmp_path / "ck")
    assert len(ck.files) == 3 and ck.shape("t0") == (2_500_000,)
    import fuse.checkpoint as cp

    live, peak = [0], [0]
    real_open = cp.safe_open

    class Counting:
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *a):
            return self.f.__exit__(*a)

        def get_tensor(self, key):
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            return self.f.get_tensor(key)

    monkeypatch.setattr(cp, "safe_open", Counting)
    proc = psutil.Process()
    gc.collect()
    rss0 = proc.memory_info().rss
    worst = 0
    for i, key in enumerate(ck.keys()):
        t = ck.get(key)
        assert float(t[0]) == float(key[1:])
        worst = max(worst, proc.memory_info().rss - rss0)
        del t
        live[0] -= 1
        gc.collect()
    assert peak[0] == 1
    # 6 tensors x 10 MB = 60 MB in total; one at a time must stay well under that.
    assert worst < 35_000_000, worst


def test_truncated_and_missing_shards_name_the_file(tmp_path):
    _write_sharded(tmp_path / "ck")
    shard = tmp_path / "ck" / "model-00002-of-00003.safetensors"
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size - 100)
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors: truncated"):
        LazyCheckpoint(tmp_path / "ck")
    shard.unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors: shard named in the index is missing"):
        LazyCheckpoint(tmp_path / "ck")


def test_garbage_file_is_reported(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        LazyCheckpoint(tmp_path)


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(out) as tmp:
            (tmp / "half").write_text("x")
            raise KeyboardInterrupt
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_output_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(CheckpointError, match="exists"):
        with atomic_output_dir(out):
            pass
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b"]


def test_parse_size():
    assert parse_size("5GB") == 5_000_000_000 and parse_size("2GiB") == 2 * 1024 ** 3 and parse_size(7) == 7
    with pytest.raises(CheckpointError):
        parse_size("lots")


def test_cli_bad_inputs_give_one_line_errors(tmp_path, tiny_llava_hf, run_fuse):
    (tmp_path / "noconf").mkdir()
    r = run_fuse("inspect", str(tmp_path / "noconf"))
    assert r.exit_code != 0 and "noconf/config.json: missing config.json" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1

    (tmp_path / "weird").mkdir()
    (tmp_path / "weird" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    save_file({"x": torch.zeros(2)}, str(tmp_path / "weird" / "model.safetensors"))
    r = run_fuse("inspect", str(tmp_path / "weird"))
    assert r.exit_code != 0 and "unknown architecture 'GPT2LMHeadModel'" in r.output
    assert "weird/config.json" in r.output

    import shutil

    bad = tmp_path / "trunc"
    shutil.copytree(tiny_llava_hf[0], bad)
    f = bad / "model.safetensors"
    os.truncate(f, f.stat().st_size // 2)
    r = run_fuse("inspect", str(bad))
    assert r.exit_code != 0 and "trunc/model.safetensors: truncated" in r.output
    assert len(r.output.strip().splitlines()) == 1

    r = run_fuse("inspect", str(tmp_path / "does-not-exist"))
    assert r.exit_code != 0 and "does-not-exist" in r.output


def test_cli_inspect_reports_parts(tiny_llava_hf, run_fuse):
    r = run_fuse("inspect", str(tiny_llava_hf[0]), "--json")
    assert r.exit_code == 0
    info = json.loads(r.output)
    assert info["format"] == "llava-hf" and info["tensors_by_part"]["encoder"] > 0 and info["vocab_rows"] == 256
