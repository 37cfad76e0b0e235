"""The fused directory's shared pieces: the eos union and the model card (used by merge, save_pretrained and
the test builder alike)."""

from __future__ import annotations

from fuse.fused_layout import fused_eos_ids, model_card, union_eos_ids


def test_eos_union_is_ordered_and_puts_the_text_member_first():
    assert union_eos_ids([2, 7], [7, 3], (2, 9)) == [2, 7, 3, 9]
    assert fused_eos_ids([[1, 2], [3, 1]], text_member=1, extra=[5, 3]) == [3, 1, 2, 5]
    assert fused_eos_ids([[4]]) == [4]


def test_model_card_of_a_merge_and_of_an_unmerged_model():
    member = {"name": "a", "format": "llava-hf", "source": "/m/a", "vocab_rows": 256}
    text = {"member": "a", "prompt_style": "chat_template", "eos_token_ids": [2]}
    merged = model_card({"members": [{**member, "weight": 0.5}], "base_model": "base", "text": text,
                         "merge": {"method": "ties", "parameters": {"normalize": True}, "dtype": "float32",
                                   "out_dtype": "bfloat16", "seed": 0}, "llm": {"tensors": 11}})
    assert "| 1 | a | llava-hf | `/m/a` | 0.5 | 256 |" in merged
    assert 'mergekit `ties` ({"normalize": true})' in merged and "11 tensors" in merged
    unmerged = model_card({"members": [{**member, "weight": None}], "base_model": None, "text": text,
                           "merge": {"method": None}})
    assert "| 1 | a | llava-hf | `/m/a` | - | 256 |" in unmerged and "not merged" in unmerged
