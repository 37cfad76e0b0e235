"""``accelerate launch -m fuse eval``: questions split across processes, one results JSON.

Each process answers whole batches of the single-process schedule, so every prediction must
be the single-process one exactly (not within a tolerance), and so must every metric.
"""

from __future__ import annotations

import json

import pytest

from fuse.eval.distributed import Shard
from fuse.eval.runner import batch_schedule
from fuse.toyfamily import ASSETS, write_test_split


def test_shards_split_the_single_process_batches():
    batches = [[i, i + 1] for i in range(0, 14, 2)]
    shards = [Shard(r, 3).take(batches) for r in range(3)]
    assert sorted(b for s in shards for b in s) == batches  # every batch once, unchanged
    assert [len(s) for s in shards] == [3, 2, 2]


@pytest.mark.slow
def test_two_processes_give_the_single_process_results(tmp_path, launch, run_fuse):
    data = write_test_split(tmp_path / "test", seed=0)
    args = ["eval", str(ASSETS / "colour"), "--task", "toy", "--data", str(data), "--limit", "12",
            "--batch-size", "4", "--log-samples"]
    res = run_fuse(*args, "-o", tmp_path / "one.json", catch_exceptions=False)
    assert res.exit_code == 0, res.output
    proc = launch("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no", "-m", "fuse", *args, "-o", str(tmp_path / "two.json"), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("results:") == 1  # only process 0 reports and writes

    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert two["n"] == one["n"] == 36
    assert two["samples"] == one["samples"]  # every prompt, prediction and score
    assert two["metrics"] == one["metrics"] and two["breakdown"] == one["breakdown"]
    assert {k: v for k, v in two.items() if k not in ("timing", "date")} == \
        {k: v for k, v in one.items() if k not in ("timing", "date")}
    per = two["timing"]["samples_per_process"]
    assert two["timing"]["processes"] == 2 and sum(per) == 36 and min(per) > 0
    assert one["timing"]["samples_per_process"] == [36]


def test_schedule_is_longest_first_and_batch_sized():
    from types import SimpleNamespace

    samples = [SimpleNamespace(prompt="x" * n) for n in (3, 9, 1, 7, 5)]
    assert batch_schedule(samples, 2) == [[1, 3], [4, 0], [2]]
    assert batch_schedule(samples, 2, sort_by_length=False) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError):
        batch_schedule(samples, 0)
