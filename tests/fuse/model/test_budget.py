"""Token budgets (counts and values against hand computations) and MouSi-style position sharing."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from fuse.errors import FuseError, RecipeError
from fuse.model import FusedModel
from fuse.model.budget import apply_budget, expected_count, select_total
from fuse.model.options import InferenceOptions, parse_budget, parse_positions
from fuse.model.positions import span_offsets
from fuse.testing import build_llava_member, random_image
from fuse.testing.fused import build_fused_dir


def hand_pool(x: torch.Tensor, h: int, w: int, s: int) -> torch.Tensor:
    """Plain loops: the mean of each s x s window (clipped at the border), row-major."""
    grid = x.view(h, w, -1)
    rows = []
    for i in range(0, h, s):
        for j in range(0, w, s):
            rows.append(grid[i:i + s, j:j + s].reshape(-1, x.shape[1]).mean(0))
    return torch.stack(rows)


@pytest.mark.parametrize("h,w,s", [(4, 4, 2), (5, 5, 2), (24, 24, 2), (7, 3, 3)])
def test_pool_matches_hand_loop(h, w, s):
    x = torch.randn(h * w + 1, 8)  # + one trailing non-grid token (e.g. a separator)
    res = apply_budget(x, parse_budget(f"pool:{s}"), [("image", h, w)])
    hh, ww = -(-h // s), -(-w // s)
    assert res.count == hh * ww + 1 == expected_count(parse_budget(f"pool:{s}"), h * w + 1, [("image", h, w)])
    assert res.grids == [("image", hh, ww)]
    assert torch.allclose(res.tokens[:-1], hand_pool(x[:-1], h, w, s), atol=1e-6)
    assert torch.equal(res.tokens[-1], x[-1])


def test_pool_to_size_and_1d_fallback():
    x = torch.randn(36, 4)
    res = apply_budget(x, parse_budget("pool:3x3"), [("image", 6, 6)])
    assert res.count == 9 and torch.allclose(res.tokens, hand_pool(x, 6, 6, 2), atol=1e-6)
    res = apply_budget(x, parse_budget({"kind": "pool", "stride": 2}), None)  # no grid: windows of 4 tokens
    assert res.count == 9 and torch.allclose(res.tokens, x.view(9, 4, 4).mean(1), atol=1e-6)
    assert expected_count(parse_budget("pool"), 37, None) == 10


def test_topk_keeps_most_text_similar_tokens_in_order():
    torch.manual_seed(0)
    x, text = torch.randn(20, 16), torch.randn(3, 16)
    res = apply_budget(x, parse_budget("topk:5"), [("image", 4, 5)], text)
    scores = [max(float(F.cosine_similarity(x[i], text[t], dim=0)) for t in range(3)) for i in range(20)]
    best = sorted(sorted(range(20), key=lambda i: -scores[i])[:5])
    assert res.kept.tolist() == best and torch.equal(res.tokens, x[best]) and res.count == 5
    assert apply_budget(x, parse_budget("topk:50"), None, text).count == 20


def test_position_schemes():
    grid = [("image", 4, 4)]
    assert span_offsets(16, parse_positions("sequential")).tolist() == list(range(16))
    assert span_offsets(16, parse_positions("share")).tolist() == [0] * 16
    assert span_offsets(16, parse_positions("groups:4")).tolist() == [i // 4 for i in range(16)]
    assert span_offsets(10, parse_positions("groups:3")).tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert span_offsets(17, parse_positions("rows"), grid).tolist() == [i // 4 for i in range(16)] + [4]
    with pytest.raises(RecipeError, match="rows"):
        span_offsets(16, parse_positions("rows"), None)


@pytest.mark.parametrize("bad", ["pool:0", "topk", "topk:x", "crop", {"kind": "pool", "bogus": 1}])
def test_bad_budget_specs_name_the_field(bad):
    with pytest.raises(RecipeError, match="inference.token_budget"):
        InferenceOptions.parse({"token_budget": bad}, ["a"])


def test_bad_inference_sections():
    with pytest.raises(RecipeError, match="unknown member"):
        InferenceOptions.parse({"positions": {"zzz": "share"}}, ["a", "b"])
    with pytest.raises(RecipeError, match="inference.positions"):
        InferenceOptions.parse({"positions": "groups"}, ["a"])
    with pytest.raises(RecipeError, match="unknown key"):
        InferenceOptions.parse({"budget": "all"}, ["a"])


@pytest.fixture(scope="module")
def fused(tmp_path_factory, tiny_base, tiny_llava_hf):
    d = tmp_path_factory.mktemp("budget")
    b = build_llava_member(d / "memb", tiny_base, seed=3)
    out = build_fused_dir(d / "fused", [tiny_llava_hf[0], b], inference={"token_budget": {"memb": "pool:2"}})
    return FusedModel.from_pretrained(out)


def test_inference_overrides_are_one_argument(fused):
    """token_budget / positions / separator are passed together (the keys of the recipe's inference
    section); the old separate keywords are refused instead of reaching GenerationConfig unseen."""
    img = random_image(7, (64, 64))
    for call in (lambda: fused.generate([img], ["<image>\nhi"], max_new_tokens=2, token_budget="all"),
                 lambda: fused(images=[img], prompts=["<image>\nhi"], separator="none")):
        with pytest.raises(FuseError, match=r"=\.\.\.: inference options are passed together, as inference="):
            call()
    with pytest.raises(RecipeError, match=r"inference: unknown key\(s\) \['budget'\]"):
        fused.prepare([img], ["<image>\nhi"], inference={"budget": "all"})


def test_recipe_budget_and_overrides_report_counts(fused):
    a, b = fused.member_names
    img = random_image(7, (64, 64))
    assert fused.prepare([img], ["<image>\nhi"]).tokens == [{a: 16, b: 4}]  # from fuse_config inference
    assert fused.prepare([img], ["<image>\nhi"], inference={"token_budget": "all"}).tokens == [{a: 16, b: 16}]
    res = fused.generate([img, img], ["<image>\nWhat colour is the circle?", "<image>\nhow many?"],
                         inference={"token_budget": {a: "topk:5", b: "pool:2"}}, max_new_tokens=3,
                         return_details=True)
    assert res.tokens == [{a: 5, b: 4}] * 2
    # pooled member tokens are the 2x2 means of its full tokens
    full = fused.prepare([img], ["<image>\nhi"], inference={"token_budget": "all"})
    pooled = fused.prepare([img], ["<image>\nhi"])
    s, e = full.spans[0][b]
    ps, pe = pooled.spans[0][b]
    assert torch.allclose(pooled.inputs_embeds[0, ps:pe], hand_pool(full.inputs_embeds[0, s:e], 4, 4, 2), atol=1e-6)
    assert pooled.grids[0][b] == [("image", 2, 2)] and pooled.raw_grids[0][b] == [("image", 4, 4)]


def test_position_sharing_ids_and_generation(fused):
    a, b = fused.member_names
    img = random_image(8, (64, 64))
    prompts = ["<image>\nWhat colour is the circle?", "<image>\nhi"]
    inputs = fused.prepare([img, img], prompts,
                           inference={"token_budget": "all", "positions": {b: "share", a: "groups:4"}})
    for i in range(2):
        sp, pad = inputs.spans[i], inputs.assembled.pad[i]
        n0 = sp["text_before"][1] - sp["text_before"][0]
        pos = inputs.position_ids[i]
        assert pos[:pad].tolist() == [0] * pad
        assert pos[slice(*sp["text_before"])].tolist() == list(range(n0))
        assert pos[slice(*sp[a])].tolist() == [n0 + k // 4 for k in range(16)]  # 16 tokens -> 4 positions
        assert pos[slice(*sp[b])].tolist() == [n0 + 4] * 16  # one position for the whole member
        n_after = sp["text_after"][1] - sp["text_after"][0]
        assert pos[slice(*sp["text_after"])].tolist() == list(range(n0 + 5, n0 + 5 + n_after))
        assert inputs.assembled.n_positions[i] == n0 + 5 + n_after
    # generation continues positions after the last prompt position: compare with a hand-written KV-cache loop
    res = fused.generate([img, img], prompts, max_new_tokens=6, return_details=True,
                         inference={"token_budget": "all", "positions": {b: "share", a: "groups:4"}})
    eos = set(fused.eos_token_ids)
    llm = fused.llm
    # transformers renamed the KV cache argument and output (past_key_values -> cache; the old name warns)
    cache = "cache" if "cache" in inspect.signature(type(llm).forward).parameters else "past_key_values"
    for i in range(2):
        pad = inputs.assembled.pad[i]
        emb, pos = inputs.inputs_embeds[i:i + 1, pad:], inputs.position_ids[i:i + 1, pad:]
        toks, nxt_pos = [], int(pos.max()) + 1
        with torch.no_grad():
            out = llm(inputs_embeds=emb, position_ids=pos, use_cache=True)
            for _ in range(6):
                t = int(out.logits[0, -1].argmax())
                if t in eos:
                    break
                toks.append(t)
                out = llm(input_ids=torch.tensor([[t]]), position_ids=torch.tensor([[nxt_pos]]),
                          use_cache=True, **{cache: getattr(out, cache)})
                nxt_pos += 1
        assert res.token_ids[i] == toks
    plain = fused.generate([img], prompts[:1], max_new_tokens=6, inference={"token_budget": "all"},
                           return_details=True)
    with torch.no_grad():
        l_shared = fused(images=[img], prompts=prompts[:1],
                         inference={"token_budget": "all", "positions": {b: "share"}}).logits
        l_plain = fused(images=[img], prompts=prompts[:1], inference={"token_budget": "all"}).logits
    assert (l_shared[0, -1] - l_plain[0, -1]).abs().max() > 1e-4  # positions really reach the LLM
    assert plain.token_ids  # sanity


def test_select_total_keeps_the_best_scores_across_members():
    a, b = torch.tensor([0.1, 0.9, 0.3, 0.5]), torch.tensor([0.8, 0.2, 0.7])
    keep = select_total([a, b], 4)
    assert [k.tolist() for k in keep] == [[1, 3], [0, 2]]  # 0.9, 0.8, 0.7, 0.5
    assert [k.tolist() for k in select_total([a, b], 10)] == [[0, 1, 2, 3], [0, 1, 2]]
    assert [k.tolist() for k in select_total([torch.ones(3), torch.ones(2)], 2)] == [[0, 1], []]  # ties: earlier


@pytest.mark.parametrize("spec,tokens,layer", [(24, 24, 1), ("24", 24, 1), ("24@0", 24, 0),
                                               ({"tokens": 8, "layer": 2}, 8, 2)])
def test_parse_total(spec, tokens, layer):
    t = InferenceOptions.parse({"max_visual_tokens": spec}, ["a"]).total
    assert (t.tokens, t.layer) == (tokens, layer)


@pytest.mark.parametrize("bad", ["0", "x", "8@-1", {"layer": 1}, {"tokens": 4, "bogus": 1}])
def test_bad_total_names_the_field(bad):
    with pytest.raises(RecipeError, match="max_visual_tokens"):
        InferenceOptions.parse({"max_visual_tokens": bad}, ["a"])


def test_total_budget_keeps_the_most_attended_tokens_at_their_positions(fused):
    """The kept tokens are the top-N by the last prompt position's attention in the chosen layer, computed
    independently here with capture_attention (eager attention hooks on the full sequence)."""
    a, b = fused.member_names
    imgs = [random_image(9, (64, 64)), random_image(10, (64, 64))]
    prompts = ["<image>\nWhat colour is the circle?", "<image>\nhow many?"]
    full = fused.prepare(imgs, prompts, inference={"token_budget": "all"})
    cap = fused.capture_attention(imgs, prompts, layers=[1], query="last", inference={"token_budget": "all"})
    cut = fused.prepare(imgs, prompts, inference={"token_budget": "all", "max_visual_tokens": "12@1"})
    for i in range(2):
        assert sum(cut.tokens[i].values()) == 12 and cut.raw_tokens[i] == {a: 16, b: 16}
        w = cap.samples[i].weights[1]
        scores = torch.cat([w[a].mean(dim=(0, 1)), w[b].mean(dim=(0, 1))])
        best = set(torch.argsort(-scores, stable=True)[:12].tolist())
        kept = set(cut.kept[i][a].tolist()) | {16 + k for k in cut.kept[i][b].tolist()}
        assert kept == best
        for m in (a, b):  # kept tokens are the member's own tokens, at their original position ids
            fs, pad_f = full.spans[i][m][0], full.assembled.pad[i]
            cs, ce = cut.spans[i][m]
            idx = cut.kept[i][m]
            assert torch.equal(cut.inputs_embeds[i, cs:ce], full.inputs_embeds[i, fs + idx])
            assert torch.equal(cut.position_ids[i, cs:ce], full.position_ids[i, fs + idx])
        # the text after the image keeps its positions too
        assert torch.equal(cut.position_ids[i, slice(*cut.spans[i]["text_after"])],
                           full.position_ids[i, slice(*full.spans[i]["text_after"])])
    res = fused.generate(imgs, prompts, max_new_tokens=3, inference={"token_budget": "all", "max_visual_tokens": 12},
                         return_details=True)
    assert [sum(t.values()) for t in res.tokens] == [12, 12] and "select" in res.timings
    assert fused.prepare(imgs, prompts, inference={"token_budget": "all", "max_visual_tokens": 40}).tokens == [{a: 16, b: 16}] * 2
