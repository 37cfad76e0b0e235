"""LLaVA conversation data: records, chat-template tokenisation with label masks, batching.

Input: a JSON list or a JSONL file of LLaVA records plus an image root::

    {"id": "0", "image": "coco/0001.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A red circle."}, ...]}

- Roles: ``human``/``user`` -> user, ``gpt``/``assistant`` -> assistant, ``system``.
- The prompt is rendered with the LLM tokenizer's chat template (``template: chat_template``)
  or LLaVA-v1's ``USER: ... ASSISTANT:`` format (``llava_v1``), one conversation prefix at a
  time, so every assistant answer (with its end-of-turn token) is a target and everything
  else (system, user turns, headers, visual tokens) has label -100.
- ``<image>`` (once, in a user turn) is replaced by ``n_visual`` slots whose embeddings the
  model overwrites with the visual tokens; the text around it is tokenised piecewise exactly
  like :meth:`fuse.members.text.TextSide.encode` does at inference.
- Bad records (missing image, no/multiple placeholder, empty answer, malformed turns,
  unreadable image, nothing left after truncation) are skipped and counted; loading fails
  if more than ``max_bad_share`` of the records are bad. Sequences longer than
  ``max_length`` are truncated (counted; the run reports the count).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import Dataset

from fuse.errors import DataError
from fuse.images import load_image
from fuse.members.text import IMAGE_PLACEHOLDER, LLAVA_V1_SYSTEM

IGNORE = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


# -- reading ---------------------------------------------------------------------------------------------------


@dataclass
class Record:
    data: dict
    where: str  # "file:line" (JSONL) or "file[item]" (JSON list)


def load_records(path: str | os.PathLike) -> list[Record]:
    """Read a JSON list or JSONL file; malformed JSON raises DataError with the line number."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: data file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot read ({e.__class__.__name__})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
        return [Record(it, f"{p}[{i}]") for i, it in enumerate(items)]
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append(Record(json.loads(line), f"{p}:{n}"))
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{n}: invalid JSON line ({e.msg}, column {e.colno})") from None
    if not out:
        raise DataError(f"{p}: no records")
    return out


def check_record(rec: dict, image_root: Path | None) -> tuple[str | None, list[dict] | None, Path | None]:
    """Validate one record: (bad reason or None, normalised turns, image path or None)."""
    if not isinstance(rec, dict):
        return "not an object", None, None
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        return "no conversations", None, None
    turns = []
    for t in conv:
        if not isinstance(t, dict) or not isinstance(t.get("value"), str):
            return "malformed turn", None, None
        role = ROLES.get(str(t.get("from", "")).lower())
        if role is None:
            return f"unknown role {t.get('from')!r}", None, None
        turns.append({"role": role, "content": t["value"]})
    body = turns[1:] if turns[0]["role"] == "system" else turns
    if not body or any(t["role"] != ("user" if i % 2 == 0 else "assistant") for i, t in enumerate(body)):
        return "turns do not alternate user/assistant", None, None
    if body[-1]["role"] != "assistant":
        return "no answer after the last question", None, None
    if any(t["role"] == "assistant" and not t["content"].strip() for t in body):
        return "empty answer", None, None
    n_ph = sum(t["content"].count(IMAGE_PLACEHOLDER) for t in turns)
    ph_in_user = sum(t["content"].count(IMAGE_PLACEHOLDER) for t in body if t["role"] == "user")
    image = rec.get("image")
    if isinstance(image, list):
        if len(image) != 1:
            return "several images per record are not supported", None, None
        image = image[0]
    if image is None:
        if n_ph:
            return f"{IMAGE_PLACEHOLDER} without an image", None, None
        return None, turns, None
    if n_ph == 0:
        return f"no {IMAGE_PLACEHOLDER} placeholder", None, None
    if n_ph > 1 or ph_in_user != 1:
        return f"{IMAGE_PLACEHOLDER} must appear once, in a user turn", None, None
    img = Path(str(image))
    img = img if img.is_absolute() or image_root is None else image_root / img
    if not img.is_file():
        return "missing image", None, None
    return None, turns, img


# -- tokenisation ------------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    image_mask: list[bool]
    truncated: bool = False


class ConversationEncoder:
    """Turns normalised turns into ``input_ids``/``labels``/``image_mask`` with ``n_visual`` image slots."""

    def __init__(self, tokenizer, n_visual: int, max_length: int = 2048, template: str = "chat_template",
                 placeholder: str = IMAGE_PLACEHOLDER):
        self.tok = tokenizer
        self.n_visual = n_visual
        self.max_length = max_length
        self.template = template
        self.placeholder = placeholder
        if template == "chat_template" and not getattr(tokenizer, "chat_template", None):
            raise DataError("data.template 'chat_template': the LLM tokenizer has no chat template "
                            "(use data.template: llava_v1)")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    # segments: list of (text, is_target)
    def segments(self, turns: list[dict]) -> list[tuple[str, bool]]:
        return self._chat_segments(turns) if self.template == "chat_template" else self._llava_segments(turns)

    def _render(self, msgs: list[dict], gen: bool) -> str:
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    def _chat_segments(self, turns: list[dict]) -> list[tuple[str, bool]]:
        segs: list[tuple[str, bool]] = []
        prev = ""
        for j, t in enumerate(turns):
            if t["role"] != "assistant":
                continue
            prompt = self._render(turns[:j], True)
            full = self._render(turns[: j + 1], False)
            if not prompt.startswith(prev) or not full.startswith(prompt):
                raise DataError("the chat template is not prefix-stable (rendering a longer conversation changes "
                                "its beginning); use data.template: llava_v1")
            segs += [(prompt[len(prev):], False), (full[len(prompt):], True)]
            prev = full
        return segs

    def _llava_segments(self, turns: list[dict]) -> list[tuple[str, bool]]:
        system = LLAVA_V1_SYSTEM
        if turns[0]["role"] == "system":
            system, turns = turns[0]["content"], turns[1:]
        eos = self.tok.eos_token or ""
        segs: list[tuple[str, bool]] = []
        text = system + " "
        for t in turns:
            if t["role"] == "user":
                text += f"USER: {t['content']} ASSISTANT:"
            else:
                segs += [(text, False), (f" {t['content']}{eos}", True)]
                text = ""
        return segs

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def encode(self, turns: list[dict], has_image: bool) -> Encoded:
        ids: list[int] = []
        labels: list[int] = []
        mask: list[bool] = []
        segs = self.segments(turns)
        bos = getattr(self.tok, "bos_token", None)
        if bos and self.tok.bos_token_id is not None and segs and not segs[0][0].startswith(bos):
            ids.append(self.tok.bos_token_id)
            labels.append(IGNORE)
            mask.append(False)
        for text, target in segs:
            if not target and has_image and self.placeholder in text:
                before, _, after = text.partition(self.placeholder)
                pieces = [(self._ids(before), False), (None, True), (self._ids(after), False)]
            else:
                pieces = [(self._ids(text), False)]
            for piece, is_image in pieces:
                if is_image:
                    ids += [self.pad_id] * self.n_visual
                    labels += [IGNORE] * self.n_visual
                    mask += [True] * self.n_visual
                else:
                    ids += piece
                    labels += list(piece) if target else [IGNORE] * len(piece)
                    mask += [False] * len(piece)
        truncated = len(ids) > self.max_length
        if truncated:
            ids, labels, mask = ids[: self.max_length], labels[: self.max_length], mask[: self.max_length]
        return Encoded(ids, labels, mask, truncated)


# -- dataset -----------------------------------------------------------------------------------------------------


@dataclass
class BadSamples:
    """Counts of skipped records by reason, with the first location of each."""

    counts: Counter = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        self.first.setdefault(reason, where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return "; ".join(f"{r}: {n} (first at {self.first[r]})" for r, n in self.counts.most_common())


class ConversationDataset(Dataset):
    """Validated LLaVA records; ``__getitem__`` tokenises and loads the image (in workers).

    Items: ``{"input_ids", "labels", "image_mask", "image" (PIL or None), "bad" (reason or None),
    "truncated", "where"}``. A record that turns out bad at load time (unreadable image,
    no target left after truncation) comes back as a 1-token item with no targets and its
    reason, so batch shapes across processes stay aligned; the trainer counts it.
    """

    def __init__(self, path: str | os.PathLike, image_root: str | os.PathLike | None, encoder: ConversationEncoder,
                 max_bad_share: float = 0.01, what: str = "data.train"):
        if image_root is not None:
            root = Path(image_root)
            if not root.is_dir():
                raise DataError(f"{what}: image root {root} is not a directory")
        else:
            root = None
        self.path = Path(path)
        self.encoder = encoder
        self.bad = BadSamples()
        self.items: list[tuple[list[dict], Path | None, str]] = []
        records = load_records(path)
        self.total_records = len(records)
        for r in records:
            reason, turns, img = check_record(r.data, root)
            if reason:
                self.bad.add(reason, r.where)
            else:
                self.items.append((turns, img, r.where))
        self.max_bad_share = max_bad_share
        self.check_bad_share(self.bad.total, what)
        self.lengths = [self._estimate(t, img) for t, img, _ in self.items]

    def check_bad_share(self, n_bad: int, what: str = "data.train") -> None:
        """Raise DataError when more than ``max_bad_share`` of all records are bad."""
        if self.total_records and n_bad > self.max_bad_share * self.total_records:
            raise DataError(f"{what}: {n_bad} of {self.total_records} records are bad "
                            f"({100.0 * n_bad / self.total_records:.1f}% > max_bad_share "
                            f"{100.0 * self.max_bad_share:g}%): {self.bad.summary()}")

    def _estimate(self, turns: list[dict], img: Path | None) -> int:
        chars = sum(len(t["content"]) for t in turns)
        return chars // 4 + (self.encoder.n_visual if img is not None else 0)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i < 0:  # padding item for an uneven last eval batch: item -i-1 with no targets
            item = self[-i - 1]
            return {**item, "labels": [IGNORE] * len(item["labels"]), "bad": None, "truncated": False}
        turns, img, where = self.items[i]
        enc = self.encoder.encode(turns, img is not None)
        image = None
        bad = None
        if img is not None:
            try:
                image = load_image(img)
            except DataError:
                bad = "unreadable image"
        if bad is None and not any(lbl != IGNORE for lbl in enc.labels[1:]):
            bad = "no answer left after truncation to max_length"
        if bad is None and img is not None and sum(enc.image_mask) != self.encoder.n_visual:
            bad = "image tokens cut by truncation to max_length"
        if bad is not None:
            return {"input_ids": [self.encoder.pad_id], "labels": [IGNORE], "image_mask": [False], "image": None,
                    "bad": bad, "truncated": False, "where": where}
        return {"input_ids": enc.input_ids, "labels": enc.labels, "image_mask": enc.image_mask, "image": image,
                "bad": None, "truncated": enc.truncated, "where": where}


class Collator:
    """Pads a list of items (right padding) and preprocesses their images.

    Returns ``input_ids``/``labels``/``attention_mask``/``image_mask`` ``[B, T]``, ``pixels``
    (the vision branch's preprocess output for the images present, or None), ``bad``
    (list of ``(reason, where)``) and ``n_truncated``.
    """

    def __init__(self, pad_id: int, preprocess: Callable[[list], dict]):
        self.pad_id = pad_id
        self.preprocess = preprocess

    def __call__(self, items: list[dict]) -> dict[str, Any]:
        t = max(len(it["input_ids"]) for it in items)
        b = len(items)
        ids = torch.full((b, t), self.pad_id, dtype=torch.long)
        labels = torch.full((b, t), IGNORE, dtype=torch.long)
        attn = torch.zeros((b, t), dtype=torch.long)
        imask = torch.zeros((b, t), dtype=torch.bool)
        for i, it in enumerate(items):
            n = len(it["input_ids"])
            ids[i, :n] = torch.tensor(it["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.tensor(it["labels"], dtype=torch.long)
            attn[i, :n] = 1
            imask[i, :n] = torch.tensor(it["image_mask"], dtype=torch.bool)
        images = [it["image"] for it in items if it["image"] is not None]
        return {"input_ids": ids, "labels": labels, "attention_mask": attn, "image_mask": imask,
                "pixels": self.preprocess(images) if images else None,
                "bad": [(it["bad"], it["where"]) for it in items if it["bad"]],
                "n_truncated": sum(1 for it in items if it["truncated"])}


# -- batching ----------------------------------------------------------------------------------------------------


def step_batches(lengths: Sequence[int], global_batch: int, seed: int, epoch: int, group_by_length: bool = True,
                 megabatch_factor: int = 16) -> list[list[int]]:
    """Index lists of one epoch, one per optimizer step (``global_batch`` samples each).

    A seeded permutation (seed + epoch); with ``group_by_length`` it is cut into megabatches
    of ``megabatch_factor`` steps whose samples are sorted by length (longest first), so
    micro-batches hold similar lengths (less padding). The tail that does not fill a step
    is left out of this epoch (a different tail every epoch).
    """
    n = len(lengths)
    g = torch.Generator().manual_seed(int(seed) * 1000003 + int(epoch))
    perm = torch.randperm(n, generator=g).tolist()
    perm = perm[: n // global_batch * global_batch]
    if group_by_length:
        mega = global_batch * megabatch_factor
        grouped = []
        for s in range(0, len(perm), mega):
            chunk = perm[s: s + mega]
            grouped += sorted(chunk, key=lambda i: -lengths[i])
        perm = grouped
    return [perm[s: s + global_batch] for s in range(0, len(perm), global_batch)]


def rank_micro_batches(steps: list[list[int]], accumulation: int, num_processes: int, per_device: int,
                       rank: int) -> list[list[int]]:
    """This process's micro-batches, in order: step 0 micro 0..A-1, step 1 ...

    Micro-batch ``m`` of a step is ``step[m*P*b + r*b : m*P*b + (r+1)*b]`` (P processes, b per device),
    so a step covers the same samples whatever the number of processes.
    """
    out = []
    for s in steps:
        for m in range(accumulation):
            base = m * num_processes * per_device + rank * per_device
            out.append(s[base: base + per_device])
    return out


class ListBatchSampler:
    """A batch sampler over precomputed index lists."""

    def __init__(self, batches: list[list[int]]):
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def eval_micro_batches(n: int, per_device: int, num_processes: int, rank: int) -> list[list[int]]:
    """Eval batches for this process; every process gets the same count.

    Where the last batch has nothing left for this process it gets ``[-1]``: item 0 with no
    targets (see :meth:`ConversationDataset.__getitem__`), so collective calls stay aligned.
    """
    out = []
    step = per_device * num_processes
    for s in range(0, n, step):
        idx = list(range(s + rank * per_device, min(s + (rank + 1) * per_device, n)))
        out.append(idx or [-1])
    return out


__all__ = ["BadSamples", "Collator", "ConversationDataset", "ConversationEncoder", "Encoded", "IGNORE",
           "ListBatchSampler", "Record", "check_record", "eval_micro_batches", "load_records", "rank_micro_batches",
           "step_batches"]
