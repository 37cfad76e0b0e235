"""The batched runner with stub models: metrics, batching, results JSON, samples/s, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from fuse.eval import EvalConfig, evaluate, write_results
from fuse.eval.runner import generate_all
from fuse.eval.tasks import load_mmvp

# 3 pairs; the stub answers by image: pair 1 both right, pair 2 one right, pair 3 both wrong
ROWS = ["1,Open or closed?,(a) Open (b) Closed,(a)", "2,Open or closed?,(a) Open (b) Closed,(b)",
        "3,Which colour?,(a) red (b) blue,(b)", "4,Which colour?,(a) red (b) blue,(a)",
        "5,Up or down?,(a) up (b) down,(a)", "6,Up or down?,(a) up (b) down,(b)"]
PATTERNS = ["state", "state", "colour", "colour", "orientation", "orientation"]
REPLIES = {1: "Open", 2: "(b)", 3: "blue", 4: "B", 5: "down", 6: "A. up"}


def make_mmvp(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = ["Index,Question,Options,Correct Answer,Type"] + [f"{r},{p}" for r, p in zip(ROWS, PATTERNS)]
    (root / "Questions.csv").write_text("\n".join(lines) + "\n")
    (root / "MMVP Images").mkdir(exist_ok=True)
    for i in range(1, 7):
        Image.new("RGB", (16, 16), (i * 30, 0, 0)).save(root / "MMVP Images" / f"{i}.png")
    return root


class LookupModel:
    """Answers from the image content (red channel encodes the question index)."""

    def __init__(self, replies: dict[int, str]):
        self.replies, self.batches, self.prompts, self.kwargs = replies, [], [], []

    def generate(self, images, prompts, max_new_tokens, **kw):
        self.batches.append(len(images))
        self.prompts += prompts
        self.kwargs.append({"max_new_tokens": max_new_tokens, **kw})
        return [self.replies[round(im.getpixel((3, 3))[0] / 30)] for im in images]


@pytest.fixture()
def mmvp_dir(tmp_path):
    return make_mmvp(tmp_path / "mmvp")


def test_evaluate_mmvp_with_stub(mmvp_dir):
    model = LookupModel(REPLIES)
    res = evaluate(model, "mmvp", mmvp_dir, EvalConfig(batch_size=4, max_new_tokens=5, log_samples=True),
                   model_name="stub", progress=False)
    assert res["task"] == "mmvp" and res["n"] == 6 and res["model"] == "stub"
    assert res["metrics"]["accuracy"] == pytest.approx(3 / 6)
    assert res["metrics"]["pair_accuracy"] == pytest.approx(1 / 3)
    assert res["breakdown"]["state"]["pair_accuracy"] == 1.0
    assert res["breakdown"]["orientation"]["accuracy"] == 0.0
    assert model.batches == [4, 2]
    assert all(p.startswith("<image>\n") and p.count("<image>") == 1 for p in model.prompts)
    assert model.kwargs[0] == {"max_new_tokens": 5}
    assert res["timing"]["samples_per_s"] > 0 and res["timing"]["generate_s"] >= 0
    assert res["config"]["batch_size"] == 4 and res["config"]["max_new_tokens"] == 5
    by_id = {s["id"]: s for s in res["samples"]}
    assert by_id["4"]["prediction"] == "B" and by_id["4"]["parsed"] == "b" and by_id["4"]["correct"] is False
    assert by_id["1"]["category"] == "state" and by_id["1"]["target"]["answer_text"] == "Open"


def test_batching_keeps_order(mmvp_dir):
    samples = load_mmvp(mmvp_dir)
    ref, _ = generate_all(LookupModel(REPLIES), samples, batch_size=1, progress=False)
    for bs in (2, 3, 7):
        out, _ = generate_all(LookupModel(REPLIES), samples, batch_size=bs, progress=False)
        assert out == ref == [REPLIES[i] for i in range(1, 7)]

    class Broken:
        def generate(self, images, prompts, max_new_tokens, **kw):
            return ["x"]

    with pytest.raises(RuntimeError, match="returned 1 answers for a batch of 3"):
        generate_all(Broken(), samples, batch_size=3, progress=False)


def test_visual_tokens_per_answer_from_models_that_report_them(mmvp_dir):
    """A model whose generate takes return_details (a fused model) reports the visual tokens its LLM read
    per answer; evaluate averages them over every sample, whatever the batching. Others report None."""
    from types import SimpleNamespace

    class Detailed(LookupModel):
        def generate(self, images, prompts, max_new_tokens, return_details=False, **kw):
            texts = super().generate(images, prompts, max_new_tokens, **kw)
            if not return_details:
                return texts
            idx = [round(im.getpixel((3, 3))[0] / 30) for im in images]
            return SimpleNamespace(texts=texts, visual_tokens_read=[10 * i for i in idx])

    for bs in (1, 4):
        res = evaluate(Detailed(REPLIES), "mmvp", mmvp_dir, EvalConfig(batch_size=bs), progress=False)
        assert res["visual_tokens_per_answer"] == pytest.approx(10 * sum(range(1, 7)) / 6)
        assert res["metrics"]["accuracy"] == pytest.approx(3 / 6)
    assert evaluate(LookupModel(REPLIES), "mmvp", mmvp_dir, EvalConfig(), progress=False)[
        "visual_tokens_per_answer"] is None


def test_results_json_round_trip(mmvp_dir, tmp_path):
    res = evaluate(LookupModel(REPLIES), "mmvp", mmvp_dir, EvalConfig(), progress=False)
    assert "samples" not in res  # only with log_samples
    path = write_results(res, tmp_path / "out" / "results.json")
    back = json.loads(path.read_text())
    assert back["metrics"] == res["metrics"] and back["n"] == 6
    assert {"task", "metrics", "n", "config", "timing", "versions", "breakdown"} <= set(back)
    assert not list(path.parent.glob(".*tmp*"))


def test_cli_eval_with_stub_model(mmvp_dir, tmp_path, monkeypatch, run_fuse):
    model = LookupModel(REPLIES)
    monkeypatch.setattr("fuse.commands.eval._load_for_eval", lambda *a, **k: model)
    out = tmp_path / "res.json"
    res = run_fuse("eval", tmp_path, "--task", "mmvp", "--data", mmvp_dir, "-o", out, "--batch-size", "2",
                   "--max-new-tokens", "4", "--log-samples", "--gen", "temperature=0.5", "--gen", "do_sample=true")
    assert res.exit_code == 0, res.output
    assert "samples/s" in res.output and "pair_accuracy=0.3333" in res.output
    data = json.loads(out.read_text())
    assert len(data["samples"]) == 6 and data["timing"]["load_model_s"] >= 0
    assert model.batches == [2, 2, 2]
    assert model.kwargs[0] == {"max_new_tokens": 4, "temperature": 0.5, "do_sample": True}
    # --limit keeps the first N questions
    res = run_fuse("eval", tmp_path, "--task", "mmvp", "--data", mmvp_dir, "--limit", "4", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["n"] == 4 and data["metrics"]["n_pairs"] == 2
