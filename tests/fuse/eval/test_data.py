"""Benchmark loaders on miniature files in the public layouts, and one-line CLI errors on bad data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from fuse.errors import DataError
from fuse.eval.prompts import OPTION_LETTER, SHORT_ANSWER
from fuse.eval.tasks import load_mmvp, load_pope, load_vqa, task_parts

HEADER = "Index,Question,Options,Correct Answer\n"


def write_mmvp(root: Path, rows: list[str], header: str = HEADER, images: list[int] | None = None,
               folder: str = "MMVP Images") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "Questions.csv").write_text(header + "".join(r + "\n" for r in rows), encoding="utf-8")
    (root / folder).mkdir(exist_ok=True)
    for i in images if images is not None else range(1, len(rows) + 1):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(root / folder / f"{i}.jpg")
    return root


def write_jsonl(path: Path, rows: list[dict], image_names: list[str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for name in image_names if image_names is not None else sorted({r["image"] for r in rows if "image" in r}):
        Image.new("RGB", (8, 8), "white").save(path.parent / name)
    return path


def test_mmvp_loader_reads_the_public_layout(tmp_path):
    root = write_mmvp(tmp_path / "MMVP", ["1,Are the wings open or closed?,(a) Open (b) Closed,(a)",
                                          "2,Are the wings open or closed?,(a) Open (b) Closed,(b)"])
    s = load_mmvp(root)
    assert [x.target["answer"] for x in s] == [0, 1]
    assert s[1].image == root / "MMVP Images" / "2.jpg"
    assert s[0].prompt == f"Are the wings open or closed?\nA. Open\nB. Closed\n{OPTION_LETTER}"
    assert s[0].category is None
    # Index column optional, pattern column optional, CSV path accepted directly, png images accepted
    root2 = tmp_path / "toy"
    root2.mkdir()
    (root2 / "Questions.csv").write_text("Question,Options,Correct Answer,Pattern\nq?,(a) x (b) y,(b),colour\n")
    (root2 / "images").mkdir()
    Image.new("RGB", (4, 4)).save(root2 / "images" / "1.png")
    (s2,) = load_mmvp(root2 / "Questions.csv")
    assert s2.category == "colour" and s2.image.name == "1.png" and s2.target["answer_text"] == "y"


def test_pope_and_vqa_loaders(tmp_path):
    p = write_jsonl(tmp_path / "pope" / "pope.jsonl", [
        {"question_id": 7, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "Yes", "category": "random"},
        {"image": "a.jpg", "question": "Is there a cat?", "label": "no"}])
    s = load_pope(p)
    assert [x.target["label"] for x in s] == ["yes", "no"] and s[0].id == "7" and s[1].id == "2"
    assert s[0].prompt == f"Is there a dog in the image?\n{SHORT_ANSWER}"
    v = write_jsonl(tmp_path / "vqa" / "v.jsonl", [
        {"image": "b.jpg", "question": "What colour?", "answers": [{"answer": "red"}, {"answer": "red"}],
         "answer_type": "other"}])
    (sv,) = load_vqa(v)
    assert sv.target["answers"] == ["red", "red"] and sv.category == "other"
    assert len(load_vqa(v, limit=1)) == 1


def _run_eval(run_fuse, args: list, monkeypatch):
    """``fuse eval ARGS``; the data must be rejected before any model is loaded."""
    def no_model(*a, **k):
        raise AssertionError("the model must not be loaded when the data is bad")

    monkeypatch.setattr("fuse.commands.eval._load_for_eval", no_model)
    return run_fuse("eval", *args)


def _assert_one_line_error(res, *fragments: str) -> None:
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in res.output, err
    for f in fragments:
        assert f in err, err


BAD_CASES = {
    "mmvp_missing_column": ("mmvp", lambda d: write_mmvp(d / "m", ["1,q?,(a) x (b) y"], header="Index,Question,Options\n"),
                            ["Questions.csv", "missing column(s) 'Correct Answer'"]),
    "mmvp_missing_image": ("mmvp", lambda d: write_mmvp(d / "m", ["1,q,(a) x (b) y,(a)", "2,q,(a) x (b) y,(b)",
                                                                   "3,q,(a) x (b) y,(a)"], images=[1, 3]),
                           ["2.jpg", "image of question 2 not found"]),
    "mmvp_bad_answer": ("mmvp", lambda d: write_mmvp(d / "m", ["1,q,(a) x (b) y,(c)"]),
                        ["line 2", "Correct Answer '(c)'"]),
    "mmvp_empty": ("mmvp", lambda d: (d / "m").mkdir() or (d / "m" / "Questions.csv").write_text("") or d / "m",
                   ["Questions.csv", "empty file"]),
    "mmvp_header_only": ("mmvp", lambda d: write_mmvp(d / "m", []), ["no questions"]),
    "pope_bad_label": ("pope", lambda d: write_jsonl(d / "p.jsonl", [
        {"image": "a.jpg", "question": "q", "label": "yes"}, {"image": "a.jpg", "question": "q", "label": "maybe"}]),
                       ["p.jsonl", "line 2", "label 'maybe' is not 'yes' or 'no'"]),
    "pope_empty": ("pope", lambda d: write_jsonl(d / "p.jsonl", []), ["p.jsonl", "empty data file"]),
    "pope_missing_image": ("pope", lambda d: write_jsonl(d / "p.jsonl", [{"image": "gone.jpg", "question": "q",
                                                                         "label": "no"}], image_names=[]),
                           ["gone.jpg", "not found"]),
    "vqa_empty": ("vqa", lambda d: (d / "v.jsonl").write_text("\n\n") and d / "v.jsonl", ["v.jsonl", "empty data file"]),
    "vqa_no_answers": ("vqa", lambda d: write_jsonl(d / "v.jsonl", [{"image": "a.jpg", "question": "q"}]),
                       ["line 1", "missing field 'answers'"]),
    "vqa_bad_json": ("vqa", lambda d: (d / "v.jsonl").write_text('{"a": 1}\n{oops\n') and d / "v.jsonl",
                     ["line 2", "not valid JSON"]),
    "toy_not_a_split": ("toy", lambda d: (d / "t").mkdir() or d / "t", ["not a toy-world split"]),
    "unknown_task": ("bogus", lambda d: d, ["unknown task 'bogus'"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_data_is_a_one_line_cli_error(case, tmp_path, monkeypatch, run_fuse):
    task, make, fragments = BAD_CASES[case]
    data = make(tmp_path)
    res = _run_eval(run_fuse, [tmp_path, "--task", task, "--data", data], monkeypatch)
    _assert_one_line_error(res, *fragments)


def test_missing_model_dir_is_a_one_line_error(tmp_path, monkeypatch, run_fuse):
    data = write_mmvp(tmp_path / "m", ["1,q,(a) x (b) y,(a)"])
    res = _run_eval(run_fuse, [tmp_path / "nope", "--task", "mmvp", "--data", data], monkeypatch)
    _assert_one_line_error(res, "nope", "no such model directory")


def test_task_parts_and_limit(tmp_path):
    root = write_mmvp(tmp_path / "m", [f"{i},q,(a) x (b) y,(a)" for i in range(1, 5)], images=[1, 2])
    with pytest.raises(DataError, match="3.jpg"):
        load_mmvp(root)
    assert len(load_mmvp(root, limit=2)) == 2  # only the questions evaluated need images
    [(name, task, path)] = task_parts("mmvp", root)
    assert name == "mmvp" and task.primary == "pair_accuracy" and path == root
