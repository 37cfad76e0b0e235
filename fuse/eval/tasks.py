"""Evaluation tasks: a registry ``name -> Task`` of loaders and scorers.

Data layouts (the public ones, read as-is):

- ``mmvp``: ``Questions.csv`` with columns ``Question``, ``Options``
  (``"(a) Open (b) Closed"``), ``Correct Answer`` (``"(a)"``), optional ``Index``
  (else the row number) and an optional pattern column (``Pattern``, ``Type`` or
  ``Category``); images ``<Index>.jpg`` (``.jpeg``/``.png`` accepted) in
  ``MMVP Images/`` beside the CSV (or ``images/``, or the CSV's folder). Questions
  ``2k-1`` and ``2k`` form a pair.
- ``pope``: JSONL, one ``{"question" (or "text"), "image", "label": "yes"|"no"}``
  per line, optional ``question_id`` and ``category``.
- ``vqa``: JSONL, one ``{"question", "image", "answers": [str | {"answer": str}]}``
  per line, optional ``question_id`` and ``category`` (or ``answer_type``).
- ``toy``: a toy-world directory (``fuse toyworld generate``): its test split's
  ``vqa.jsonl``, ``pope.jsonl`` and ``Questions.csv`` (+ ``images/``) evaluated together.

Image paths in JSONL files are relative to ``images`` (default: the file's folder).
Every problem with the data is a :class:`~fuse.errors.DataError` naming the file,
line/column and what was expected, raised before any model runs.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import DataError
from . import metrics as M
from .answers import match_option, normalize_vqa, parse_choice, parse_options, parse_yes_no
from .prompts import multiple_choice_prompt, short_answer_prompt

MMVP_IMAGE_DIRS = ("MMVP Images", "images", ".")
MMVP_IMAGE_EXTS = (".jpg", ".jpeg", ".png")


@dataclass
class Sample:
    """One question: the image file, the user text (without the image placeholder) and the task's target."""

    id: str
    image: Path
    question: str
    prompt: str
    target: dict[str, Any]
    category: str | None = None


@dataclass
class Scored:
    """A task's figures: overall ``metrics``, ``breakdown`` per category, one ``records`` entry per sample."""

    metrics: dict[str, Any]
    breakdown: dict[str, dict[str, Any]] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Task:
    """``load(path, images, limit) -> samples`` and ``score(samples, outputs) -> Scored``.

    A composite task (``toy``) has ``parts(path) -> [(part name, Task, path)]`` instead.
    """

    name: str
    description: str
    primary: str = ""  # the headline metric
    load: Callable[..., list[Sample]] | None = None
    score: Callable[[list[Sample], list[str]], Scored] | None = None
    parts: Callable[[Path], list[tuple[str, "Task", Path]]] | None = None


# --- shared helpers ---------------------------------------------------------------------------------------

def _record(s: Sample, output: str, parsed: Any, **score: Any) -> dict[str, Any]:
    return {"id": s.id, "image": str(s.image), "category": s.category, "question": s.question, "prompt": s.prompt,
            "target": s.target, "prediction": output, "parsed": parsed, **score}


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a JSON array file is accepted too."""
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e.__class__.__name__})") from None
    if not text.strip():
        raise DataError(f"{path}: empty data file (expected one JSON object per line)")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        rows = list(enumerate(items, start=1))
    else:
        rows = []
        for no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((no, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {no}: not valid JSON ({e.msg})") from None
    if not rows:
        raise DataError(f"{path}: empty data file (no records)")
    for no, obj in rows:
        if not isinstance(obj, dict):
            raise DataError(f"{path}: line {no}: expected a JSON object, got {type(obj).__name__}")
    return rows


def _field(path: Path, no: int, obj: dict, *names: str) -> Any:
    for n in names:
        if n in obj and obj[n] not in (None, ""):
            return obj[n]
    alts = " or ".join(repr(n) for n in names)
    raise DataError(f"{path}: line {no}: missing field {alts}")


def _image_path(path: Path, no: int, name: Any, root: Path) -> Path:
    if not isinstance(name, str):
        raise DataError(f"{path}: line {no}: field 'image' must be a file name, got {type(name).__name__}")
    p = Path(name)
    return p if p.is_absolute() else root / p


def _check_images(samples: list[Sample], what: str) -> None:
    missing = [s for s in samples if not s.image.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise DataError(f"{missing[0].image}: image of {what} {missing[0].id} not found{more}")


# --- MMVP ---------------------------------------------------------------------------------------------------

def _find_mmvp_image(image_dir: Path, index: int) -> Path:
    for ext in MMVP_IMAGE_EXTS:
        p = image_dir / f"{index}{ext}"
        if p.is_file():
            return p
    return image_dir / f"{index}.jpg"


def load_mmvp(path: str | Path, images: str | Path | None = None, limit: int | None = None) -> list[Sample]:
    path = Path(path)
    csv_path = path if path.is_file() or path.suffix.lower() == ".csv" else path / "Questions.csv"
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: MMVP questions file not found")
    if images is not None:
        image_dir = Path(images)
    else:
        image_dir = next((csv_path.parent / d for d in MMVP_IMAGE_DIRS if (csv_path.parent / d).is_dir()),
                         csv_path.parent)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{csv_path}: cannot read as CSV ({e.__class__.__name__}: {e})") from None
    if not header:
        raise DataError(f"{csv_path}: empty file (expected a header with Question, Options, Correct Answer)")
    cols = {h.lower(): h for h in header}
    missing = [c for c in ("Question", "Options", "Correct Answer") if c.lower() not in cols]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {', '.join(repr(c) for c in missing)} "
                        f"(found: {', '.join(header)})")
    if not rows:
        raise DataError(f"{csv_path}: no questions (the file has a header only)")
    raw_cols = {h.strip().lower(): h for h in (reader.fieldnames or [])}

    def get(row: dict, name: str) -> str:
        return (row.get(raw_cols[name.lower()]) or "").strip()

    pattern_col = next((c for c in ("pattern", "type", "category") if c in cols), None)
    samples, seen = [], set()
    for pos, row in enumerate(rows, start=1):
        line = pos + 1  # the header is line 1
        if "index" in cols:
            try:
                index = int(float(get(row, "index")))
            except ValueError:
                raise DataError(f"{csv_path}: line {line}: Index {get(row, 'index')!r} is not an integer") from None
        else:
            index = pos
        if index in seen:
            raise DataError(f"{csv_path}: line {line}: duplicate Index {index}")
        seen.add(index)
        question, opt_text, correct = get(row, "question"), get(row, "options"), get(row, "correct answer")
        if not question:
            raise DataError(f"{csv_path}: line {line}: empty Question")
        options = parse_options(opt_text)
        if len(options) < 2:
            raise DataError(f"{csv_path}: line {line}: Options {opt_text!r}: expected '(a) ... (b) ...'")
        answer = parse_choice(correct, options)
        if answer is None:
            letters = f"(a)-({chr(ord('a') + len(options) - 1)})"
            raise DataError(f"{csv_path}: line {line}: Correct Answer {correct!r} is not one of the options {letters}")
        samples.append(Sample(
            id=str(index), image=_find_mmvp_image(image_dir, index), question=question,
            prompt=multiple_choice_prompt(question, options),
            target={"index": index, "options": options, "answer": answer, "answer_text": options[answer]},
            category=(get(row, pattern_col) or None) if pattern_col else None))
    if limit is not None:
        samples = samples[:limit]
    _check_images(samples, "question")
    return samples


def score_mmvp(samples: list[Sample], outputs: list[str],
               judge: Callable[[Sample, str], int | None] | None = None) -> Scored:
    """Options matched by letter or text (:func:`match_option`); ``judge`` (optional) decides unmatched replies."""
    records, correct = [], []
    for s, out in zip(samples, outputs):
        choice = match_option(out, s.target["options"])
        if choice is None and judge is not None:
            choice = judge(s, out)
        ok = choice == s.target["answer"]
        correct.append(ok)
        records.append(_record(s, out, None if choice is None else chr(ord("a") + choice), correct=ok))
    idx = [s.target["index"] for s in samples]
    breakdown = M.by_category([s.category for s in samples],
                              lambda ii: M.mmvp_scores([idx[i] for i in ii], [correct[i] for i in ii]))
    return Scored(M.mmvp_scores(idx, correct), breakdown, records)


# --- POPE ---------------------------------------------------------------------------------------------------

def load_pope(path: str | Path, images: str | Path | None = None, limit: int | None = None) -> list[Sample]:
    path = Path(path)
    root = Path(images) if images is not None else path.parent
    rows = _read_jsonl(path)
    samples = []
    for no, obj in rows[:limit] if limit is not None else rows:
        q = str(_field(path, no, obj, "question", "text")).strip()
        label = str(_field(path, no, obj, "label", "answer")).strip().lower()
        if label not in ("yes", "no"):
            raise DataError(f"{path}: line {no}: label {label!r} is not 'yes' or 'no'")
        image = _image_path(path, no, _field(path, no, obj, "image"), root)
        samples.append(Sample(id=str(obj.get("question_id", no)), image=image, question=q,
                              prompt=short_answer_prompt(q), target={"label": label}, category=obj.get("category")))
    _check_images(samples, "question")
    return samples


def score_pope(samples: list[Sample], outputs: list[str]) -> Scored:
    parsed = [parse_yes_no(o) for o in outputs]
    labels = [s.target["label"] for s in samples]
    records = [_record(s, o, p, correct=p == y) for s, o, p, y in zip(samples, outputs, parsed, labels)]
    breakdown = M.by_category([s.category for s in samples],
                              lambda ii: M.pope_scores([parsed[i] for i in ii], [labels[i] for i in ii]))
    return Scored(M.pope_scores(parsed, labels), breakdown, records)


# --- VQA ----------------------------------------------------------------------------------------------------

def _answers(path: Path, no: int, obj: dict) -> list[str]:
    raw = _field(path, no, obj, "answers")
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{path}: line {no}: field 'answers' must be a non-empty list")
    out = []
    for a in raw:
        a = a.get("answer") if isinstance(a, dict) else a
        if not isinstance(a, (str, int, float)) or str(a).strip() == "":
            raise DataError(f"{path}: line {no}: field 'answers' must hold strings or {{'answer': str}} objects")
        out.append(str(a))
    return out


def load_vqa(path: str | Path, images: str | Path | None = None, limit: int | None = None) -> list[Sample]:
    path = Path(path)
    root = Path(images) if images is not None else path.parent
    rows = _read_jsonl(path)
    samples = []
    for no, obj in rows[:limit] if limit is not None else rows:
        q = str(_field(path, no, obj, "question")).strip()
        image = _image_path(path, no, _field(path, no, obj, "image"), root)
        samples.append(Sample(id=str(obj.get("question_id", no)), image=image, question=q,
                              prompt=short_answer_prompt(q), target={"answers": _answers(path, no, obj)},
                              category=obj.get("category") or obj.get("answer_type")))
    _check_images(samples, "question")
    return samples


def score_vqa(samples: list[Sample], outputs: list[str]) -> Scored:
    answers = [s.target["answers"] for s in samples]
    records = [_record(s, o, normalize_vqa(o), exact_match=M.vqa_exact_match(o, a),
                       soft_accuracy=M.vqa_soft_accuracy(o, a))
               for s, o, a in zip(samples, outputs, answers)]
    breakdown = M.by_category([s.category for s in samples],
                              lambda ii: M.vqa_scores([outputs[i] for i in ii], [answers[i] for i in ii]))
    return Scored(M.vqa_scores(outputs, answers), breakdown, records)


# --- toy world (composite) ----------------------------------------------------------------------------------

TOY_PARTS = (("vqa", "vqa.jsonl"), ("pope", "pope.jsonl"), ("mmvp", "Questions.csv"))


def toy_parts(path: str | Path) -> list[tuple[str, Task, Path]]:
    """A toy-world root (uses its ``test`` split) or a split directory -> its three parts."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: toy-world directory not found (create one with `fuse toyworld generate`)")
    split = path / "test" if (path / "toyworld.json").is_file() and (path / "test").is_dir() else path
    missing = [f for _, f in TOY_PARTS if not (split / f).exists()]
    if missing:
        raise DataError(f"{split}: not a toy-world split (missing {', '.join(missing)})")
    return [(name, TASKS[name], split / f) for name, f in TOY_PARTS]


TASKS: dict[str, Task] = {
    "mmvp": Task("mmvp", "MMVP multiple choice: accuracy and pair accuracy", "pair_accuracy", load_mmvp, score_mmvp),
    "pope": Task("pope", "POPE yes/no: accuracy, precision, recall, F1, yes-ratio", "f1", load_pope, score_pope),
    "vqa": Task("vqa", "open VQA: exact match and VQA soft accuracy", "soft_accuracy", load_vqa, score_vqa),
    "toy": Task("toy", "toy world test split: vqa + pope + mmvp parts", "", parts=toy_parts),
}


def task_parts(name: str, path: str | Path) -> list[tuple[str, Task, Path]]:
    """``[(part name, Task, data path)]``: one entry for a plain task, several for a composite one."""
    try:
        task = TASKS[name]
    except KeyError:
        raise DataError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None
    return task.parts(Path(path)) if task.parts else [(name, task, Path(path))]


def load_samples(parts: Sequence[tuple[str, Task, Path]], images: str | Path | None = None,
                 limit: int | None = None) -> list[list[Sample]]:
    """Load (and fully validate) every part's samples before anything runs."""
    return [task.load(p, images=images, limit=limit) for _, task, p in parts]
