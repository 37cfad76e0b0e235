"""LLaVA data: tokenisation + label masks (vs the inference-time TextSide), bad inputs, batching."""

from __future__ import annotations

import json

import pytest

from fuse.errors import DataError
from fuse.members.text import TextSide
from fuse.testing import tiny_tokenizer
from train.data import (IGNORE, Collator, ConversationDataset, ConversationEncoder, load_records, rank_micro_batches,
                        step_batches)

NV = 5  # visual tokens per image in these tests


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(256)


def _conv(q="<image>\nWhat is it?", a="a red circle", more=()):
    turns = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    for q2, a2 in more:
        turns += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
    return turns


def test_prompt_matches_inference_textside_and_labels_cover_answers_only(tok, tmp_path):
    enc = ConversationEncoder(tok, NV, 512, "chat_template")
    e = enc.encode(_conv(more=[("and the shape?", "a circle")]), has_image=True)
    tok.save_pretrained(str(tmp_path))
    side = TextSide(str(tmp_path), "chat_template")
    before, after = side.encode(side.prompt("<image>\nWhat is it?"))
    n_prompt = len(before) + NV + len(after)
    assert e.input_ids[: len(before)] == before  # BOS + headers exactly as at inference
    assert e.input_ids[len(before) + NV: n_prompt] == after
    assert e.image_mask == [False] * len(before) + [True] * NV + [False] * (len(e.input_ids) - len(before) - NV)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    answer1 = tok("a red circle", add_special_tokens=False)["input_ids"] + [eot]
    assert e.labels[:n_prompt] == [IGNORE] * n_prompt
    assert e.labels[n_prompt: n_prompt + len(answer1)] == answer1
    targets = [t for t in e.labels if t != IGNORE]
    answer2 = tok("a circle", add_special_tokens=False)["input_ids"] + [eot]
    assert targets == answer1 + answer2  # second user turn and headers are masked
    text = tok.decode([i for i, m in zip(e.input_ids, e.image_mask) if not m])
    assert "and the shape?" in text and text.startswith("<|begin_of_text|><|start_header_id|>user")


def test_llava_v1_template(tok):
    enc = ConversationEncoder(tok, NV, 512, "llava_v1")
    e = enc.encode(_conv(), has_image=True)
    text = tok.decode([i for i, m in zip(e.input_ids, e.image_mask) if not m])
    assert "USER: " in text and text.endswith("ASSISTANT: a red circle<|eot_id|>")
    assert tok.decode([t for t in e.labels if t != IGNORE]) == " a red circle<|eot_id|>"


def test_truncation_is_counted_and_too_short_is_bad(tok, tmp_path):
    (tmp_path / "im.png").write_bytes(b"")
    from fuse.testing import random_image

    random_image(0).save(tmp_path / "im.png")
    rec = {"image": "im.png", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                {"from": "gpt", "value": "the " * 60}]}
    (tmp_path / "d.json").write_text(json.dumps([rec]))
    long_ok = ConversationDataset(tmp_path / "d.json", tmp_path, ConversationEncoder(tok, NV, 40, "chat_template"))
    item = long_ok[0]
    assert item["truncated"] and item["bad"] is None and len(item["input_ids"]) == 40
    cut = ConversationDataset(tmp_path / "d.json", tmp_path, ConversationEncoder(tok, NV, 12, "chat_template"))
    assert cut[0]["bad"] is not None and all(x == IGNORE for x in cut[0]["labels"])


def test_malformed_jsonl_line_reports_line_number(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"image": "a.png", "conversations": []}\n\n{"image": oops}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:3: invalid JSON line"):
        load_records(p)
    q = tmp_path / "d.json"
    q.write_text('[\n {"a": 1},\n {"b": }\n]')
    with pytest.raises(DataError, match=r"d\.json:3: invalid JSON"):
        load_records(q)


def test_missing_image_root_and_bad_share(tok, tmp_path, toy_data):
    js, root = toy_data
    enc = ConversationEncoder(tok, NV, 256, "chat_template")
    with pytest.raises(DataError, match="image root .*nope is not a directory"):
        ConversationDataset(js, tmp_path / "nope", enc)
    recs = json.loads(js.read_text())
    recs[1]["image"] = "missing.png"
    recs[2]["conversations"][0]["value"] = "no placeholder"
    recs[3]["conversations"][1]["value"] = "  "
    del recs[4]["conversations"][1]
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(recs))
    ds = ConversationDataset(p, root, enc, max_bad_share=0.5)
    assert len(ds) == 12 and ds.bad.total == 4
    assert set(ds.bad.counts) == {"missing image", "no <image> placeholder", "empty answer",
                                  "no answer after the last question"}
    assert ds.bad.first["missing image"].endswith("bad.json[1]")
    with pytest.raises(DataError, match=r"4 of 16 records are bad \(25.0% > max_bad_share 10%\).*missing image"):
        ConversationDataset(p, root, enc, max_bad_share=0.1)


def test_collator_pads_and_keeps_image_slots(tok, toy_data):
    js, root = toy_data
    enc = ConversationEncoder(tok, NV, 256, "chat_template")
    ds = ConversationDataset(js, root, enc)
    seen = []
    col = Collator(enc.pad_id, lambda ims: seen.append(len(ims)) or {"pixel_values_x": len(ims)})
    b = col([ds[0], ds[5], ds[-1]])  # -1: padding item (no targets)
    assert b["input_ids"].shape == b["labels"].shape == b["image_mask"].shape
    assert b["image_mask"].sum(1).tolist() == [NV, NV, NV] and seen == [3]
    assert (b["labels"][2] == IGNORE).all()
    assert b["attention_mask"].sum(1).tolist() == [len(ds[0]["input_ids"]), len(ds[5]["input_ids"]),
                                                   len(ds[0]["input_ids"])]


def test_step_batches_deterministic_grouped_and_rank_split():
    lengths = [i % 7 for i in range(50)]
    a = step_batches(lengths, 8, seed=1, epoch=0)
    assert a == step_batches(lengths, 8, seed=1, epoch=0)
    assert a != step_batches(lengths, 8, seed=1, epoch=1)
    assert len(a) == 6 and all(len(s) == 8 for s in a) and len({i for s in a for i in s}) == 48
    flat = [i for s in a for i in s]
    assert [lengths[i] for i in flat] == sorted((lengths[i] for i in flat), reverse=True)  # one megabatch, sorted
    one = rank_micro_batches(a, 2, 1, 4, 0)
    two = [rank_micro_batches(a, 1, 2, 4, r) for r in (0, 1)]
    assert one[0] + one[1] == a[0] == two[0][0] + two[1][0]
