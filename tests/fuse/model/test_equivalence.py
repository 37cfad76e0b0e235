"""A fused model of ONE member equals the original model (transformers' LlavaForConditionalGeneration).

Reference inputs are built independently: the full prompt string is tokenized in one go by the
tokenizer (``<image>`` is a special token), the image token is repeated N times, and pixel values
come from transformers' own CLIP image processor read from the member directory.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from fuse.members import load_member
from fuse.model import FusedModel
from fuse.testing import build_llava_member, random_image
from fuse.testing.fused import build_fused_dir

QUESTION = "What colour is the circle on the left?"


def reference_inputs(fused: FusedModel, member_dir, image: Image.Image, question: str, n_image: int):
    """(input_ids [1, L], pixel_values) for LlavaForConditionalGeneration, built without fuse code paths."""
    from transformers import CLIPImageProcessorPil

    tok = fused.text.tokenizer
    full = fused.text.prompt(f"<image>\n{question}")  # the member's chat template / llava_v1 string
    ids = tok(full, add_special_tokens=False)["input_ids"]
    if ids[0] != tok.bos_token_id:  # LLaMA tokenizers prepend BOS (the tiny one has no post-processor)
        ids = [tok.bos_token_id] + ids
    img_id = tok.convert_tokens_to_ids("<image>")
    assert ids.count(img_id) == 1
    k = ids.index(img_id)
    ids = ids[:k] + [img_id] * n_image + ids[k + 1:]
    pv = CLIPImageProcessorPil.from_pretrained(str(member_dir))(image, return_tensors="pt")["pixel_values"]
    return torch.tensor([ids]), pv


def greedy_original(model, input_ids, pixel_values, n: int, eos: list[int]) -> list[int]:
    out = model.generate(input_ids=input_ids, pixel_values=pixel_values, attention_mask=torch.ones_like(input_ids),
                         max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
    new = out[0, input_ids.shape[1]:].tolist()
    for i, t in enumerate(new):
        if t in eos:
            return new[:i]
    return new


def check_equal(fused: FusedModel, original, member_dir, image, n_image=16):
    input_ids, pv = reference_inputs(fused, member_dir, image, QUESTION, n_image)
    with torch.no_grad():
        ref = original(input_ids=input_ids, pixel_values=pv, attention_mask=torch.ones_like(input_ids)).logits
        out = fused(images=[image], prompts=[f"<image>\n{QUESTION}"])
    assert out.logits.shape == ref.shape
    assert (out.logits - ref).abs().max().item() < 1e-4
    assert out.fused_inputs.tokens == [{fused.member_names[0]: n_image}]
    eos = fused.eos_token_ids
    # force a few tokens: make sure the comparison covers several decoding steps
    ref_tokens = greedy_original(original, input_ids, pv, 12, eos)
    res = fused.generate([image], [f"<image>\n{QUESTION}"], max_new_tokens=12, return_details=True)
    assert res.token_ids[0] == ref_tokens
    assert len(ref_tokens) >= 3  # several decoding steps compared, not an immediate eos
    return ref_tokens


@pytest.fixture(scope="module")
def hf_original(tiny_llava_hf):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(str(tiny_llava_hf[0])).eval()


def test_one_member_llava_hf_in_memory_equals_original(tiny_llava_hf, hf_original):
    member = load_member(tiny_llava_hf[0])
    fused = FusedModel.from_members([member])
    check_equal(fused, hf_original, tiny_llava_hf[0], random_image(3, (72, 50)))


def test_one_member_llava_hf_from_disk_equals_original(tiny_llava_hf, hf_original, tmp_path):
    out = build_fused_dir(tmp_path / "fused", [tiny_llava_hf[0]])
    fused = FusedModel.from_pretrained(out)
    check_equal(fused, hf_original, tiny_llava_hf[0], random_image(4, (50, 80)))


def test_one_member_original_llava15_format_equals_original(tiny_llava_hf, tiny_llava_orig, hf_original, tmp_path):
    """The original LLaVA-1.5 layout (vicuna_v1 prompt style, what LLaVA-1.5 was trained with) on the same weights."""
    member = load_member(tiny_llava_orig)
    assert member.format == "llava" and member.text.prompt_style == "vicuna_v1"
    out = build_fused_dir(tmp_path / "fused", [member])
    fused = FusedModel.from_pretrained(out)
    check_equal(fused, hf_original, tiny_llava_hf[0], random_image(5, (56, 56)))


def test_original_llava15_pad_to_square(tiny_base, hf_original, tiny_llava_hf, tmp_path):
    """image_aspect_ratio=pad: LLaVA's expand2square with the CLIP mean colour, then the processor."""
    d = build_llava_member(tmp_path / "llava_pad", tiny_base, seed=1)  # same seed -> same weights as tiny_llava_hf
    fused = FusedModel.from_members([load_member(d)])
    image = random_image(6, (70, 40))
    mean = tuple(int(x * 255) for x in (0.48145466, 0.4578275, 0.40821073))
    square = Image.new("RGB", (70, 70), mean)
    square.paste(image, (0, 15))
    input_ids, pv = reference_inputs(fused, tiny_llava_hf[0], square, QUESTION, 16)
    with torch.no_grad():
        ref = hf_original(input_ids=input_ids, pixel_values=pv, attention_mask=torch.ones_like(input_ids)).logits
        out = fused(images=[image], prompts=[f"<image>\n{QUESTION}"])
    assert (out.logits - ref).abs().max().item() < 1e-4
