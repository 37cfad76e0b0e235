"""`fuse eval` on a real (tiny) member checkpoint through the fused model, end to end."""

from __future__ import annotations

import json

import pytest

from fuse.errors import CheckpointError
from fuse.eval import EvalConfig, evaluate, load_for_eval
from fuse.toyworld import generate

@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_eval") / "world"
    generate(root, n_train=2, n_test=8, seed=5)
    return root


def test_load_for_eval_member_and_missing(tiny_llava_hf, tmp_path):
    model = load_for_eval(tiny_llava_hf[0])
    assert type(model).__name__ == "FusedModel" and hasattr(model, "generate")
    with pytest.raises(CheckpointError, match="no such model directory"):
        load_for_eval(tmp_path / "missing")


def test_eval_member_batched_equals_one_by_one(tiny_llava_hf, toy):
    model = load_for_eval(tiny_llava_hf[0])
    cfg = dict(limit=4, max_new_tokens=2, log_samples=True)
    one = evaluate(model, "toy", toy, EvalConfig(batch_size=1, **cfg), progress=False)
    many = evaluate(model, "toy", toy, EvalConfig(batch_size=4, **cfg), progress=False)
    assert one["n"] == many["n"] == 12
    for part in ("vqa", "pope", "mmvp"):
        assert [s["prediction"] for s in one["samples"][part]] == [s["prediction"] for s in many["samples"][part]]
        assert one["metrics"][part] == many["metrics"][part]


def test_cli_eval_member_writes_results(tiny_llava_hf, toy, tmp_path, run_fuse):
    out = tmp_path / "results.json"
    r = run_fuse("eval", tiny_llava_hf[0], "--task", "mmvp", "--data", toy / "test", "--limit", "4",
                 "--max-new-tokens", "2", "-o", out)
    assert r.exit_code == 0, r.output
    assert "samples/s" in r.output
    res = json.loads(out.read_text())
    assert res["task"] == "mmvp" and res["n"] == 4 and res["model_kind"] == "member"
    assert set(res["metrics"]) >= {"accuracy", "pair_accuracy"} and res["timing"]["samples_per_s"] > 0
