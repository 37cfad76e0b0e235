"""Attention capture: values equal transformers' own eager `output_attentions`, only requested layers kept."""

from __future__ import annotations

import pytest
import torch

from fuse.errors import FuseError
from fuse.model import FusedModel
from fuse.testing import build_llava_member, random_image
from fuse.testing.fused import build_fused_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_base, tiny_llava_hf):
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("attn")
    b = build_llava_member(d / "memb", tiny_base, seed=4)
    out = build_fused_dir(d / "fused", [tiny_llava_hf[0], b])
    eager = AutoModelForCausalLM.from_pretrained(str(out / "llm"), attn_implementation="eager").eval()
    return FusedModel.from_pretrained(out), eager


def reference(eager, inputs, b):
    pad = inputs.assembled.pad[b]
    with torch.no_grad():
        out = eager(inputs_embeds=inputs.inputs_embeds[b:b + 1, pad:], position_ids=inputs.position_ids[b:b + 1, pad:],
                    output_attentions=True)
    return out.attentions, pad


def test_last_position_attention_matches_output_attentions(setup):
    fused, eager = setup
    imgs = [random_image(1, (64, 64)), random_image(2, (50, 70))]
    prompts = ["<image>\nWhat colour is the circle?", "<image>\nhi"]
    cap = fused.capture_attention(imgs, prompts, layers=[-1])
    assert cap.layers == [1] and cap.members == fused.member_names
    assert fused.llm.config._attn_implementation != "eager"  # switched back
    inputs = fused.prepare(imgs, prompts)
    for b, s in enumerate(cap.samples):
        att, pad = reference(eager, inputs, b)
        n = inputs.assembled.lengths[b]
        assert s.query_positions == [n - 1]
        assert set(s.weights) == {1}
        for m in cap.members:
            st, en = s.spans[m]
            assert (st + pad, en + pad) == inputs.spans[b][m]
            w = s.weights[1][m]
            assert w.shape == (fused.llm.config.num_attention_heads, 1, 16)
            assert torch.allclose(w, att[1][0, :, [n - 1], st:en], atol=1e-6)
        share = s.member_share()
        assert 0 < sum(share.values()) < 1
        assert s.member_map(cap.members[0]).shape == (16,)
        assert s.grids[cap.members[0]] == [("image", 4, 4)]


def test_answer_and_explicit_queries(setup):
    fused, eager = setup
    img = random_image(3, (64, 64))
    prompt = "<image>\nHow many objects are there?"
    cap = fused.capture_attention([img], [prompt], layers=None, query="answer", max_new_tokens=5)
    s = cap.samples[0]
    assert cap.layers == [0, 1]
    answer = fused.generate([img], [prompt], max_new_tokens=5, return_details=True).token_ids[0]
    assert s.answer_ids == answer and len(answer) > 1
    n = s.spans["answer"][0]
    assert s.query_positions == [n - 1] + list(range(n, n + len(answer) - 1))
    assert s.weights[0][cap.members[1]].shape[1] == len(answer)
    cap2 = fused.capture_attention([img], [prompt], layers=0, query=[-1, -2])
    inputs = fused.prepare([img], [prompt])
    att, _ = reference(eager, inputs, 0)
    L = inputs.assembled.lengths[0]
    st, en = cap2.samples[0].spans[cap2.members[1]]
    assert torch.allclose(cap2.samples[0].weights[0][cap2.members[1]], att[0][0, :, [L - 1, L - 2], st:en], atol=1e-6)
    with pytest.raises(FuseError, match="out of range"):
        fused.capture_attention([img], [prompt], layers=[5])
    with pytest.raises(FuseError, match="query"):
        fused.capture_attention([img], [prompt], query="middle")
