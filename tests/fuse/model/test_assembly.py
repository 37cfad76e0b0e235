"""Two-member fused input sequence, batching with left padding, separators, eos union, text-aware branches."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from fuse.members import VisionBranch, load_member
from fuse.model import FusedModel
from fuse.testing import build_llava_member, random_image
from fuse.testing.fused import build_fused_dir

PROMPTS = ["<image>\nWhat colour?", "How many objects are there in this picture, left or right? <image>",
           "<image>\nIs there a red circle at the top of the image, and what shape is to the left of it?"]


@pytest.fixture(scope="module")
def two(tmp_path_factory, tiny_base, tiny_llava_hf):
    d = tmp_path_factory.mktemp("two")
    b = build_llava_member(d / "memb", tiny_base, seed=2)
    out = build_fused_dir(d / "fused", [tiny_llava_hf[0], b])
    return out, load_member(tiny_llava_hf[0]), load_member(b), FusedModel.from_pretrained(out)


def embedding_table(out) -> torch.Tensor:
    sd = {}
    for f in (out / "llm").glob("*.safetensors"):
        sd.update(load_file(str(f)))
    return sd["model.embed_tokens.weight"]


def test_sequence_is_before_m1_m2_after(two):
    out, ma, mb, fused = two
    img = random_image(11, (60, 44))
    prompt = PROMPTS[0]
    inputs = fused.prepare([img], [prompt])
    # independent reconstruction: tokenizer on the two prompt halves, embedding rows from the saved LLM,
    # each member's visual tokens from its own Member object (loaded from the member checkpoint)
    tok = fused.text.tokenizer
    full = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    before, after = full.split("<image>")
    ids_b = tok(before, add_special_tokens=False)["input_ids"]
    ids_a = tok(after, add_special_tokens=False)["input_ids"]
    assert ids_b[0] == tok.bos_token_id
    E = embedding_table(out)
    ta, tb = ma.visual_tokens([img])[0], mb.visual_tokens([img])[0]
    expected = torch.cat([E[ids_b], ta, tb, E[ids_a]])
    got = inputs.inputs_embeds[0]
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-6
    n0 = len(ids_b)
    assert inputs.spans[0] == {"text_before": (0, n0), ma.name: (n0, n0 + 16), mb.name: (n0 + 16, n0 + 32),
                               "text_after": (n0 + 32, n0 + 32 + len(ids_a))}
    assert inputs.position_ids[0].tolist() == list(range(expected.shape[0]))
    assert inputs.tokens == [{ma.name: 16, mb.name: 16}]
    # the LLM really consumes that sequence
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(str(out / "llm")).eval()
    with torch.no_grad():
        ref = llm(inputs_embeds=expected[None]).logits
        assert (fused(inputs=inputs).logits - ref).abs().max().item() < 1e-5


def test_batch_left_padding_equals_one_by_one(two):
    fused = two[3]
    imgs = [random_image(20 + i, (64, 48)) for i in range(3)]
    batch = fused.generate(imgs, PROMPTS, max_new_tokens=10, return_details=True)
    assert len(set(batch.prompt_tokens)) == 3  # really different lengths -> padding is exercised
    for i in range(3):
        single = fused.generate([imgs[i]], [PROMPTS[i]], max_new_tokens=10, return_details=True)
        assert single.token_ids[0] == batch.token_ids[i]
        assert single.texts[0] == batch.texts[i]
    inputs = fused.prepare(imgs, PROMPTS)
    pad = inputs.assembled.pad
    assert min(pad) == 0 and max(pad) > 0
    for i in range(3):
        assert inputs.attention_mask[i, :pad[i]].sum() == 0 and inputs.attention_mask[i, pad[i]:].all()
        assert inputs.position_ids[i, pad[i]:].tolist() == list(range(inputs.assembled.lengths[i]))
    with torch.no_grad():
        logits = fused(inputs=inputs).logits
        for i in range(3):
            one = fused(images=[imgs[i]], prompts=[PROMPTS[i]]).logits
            assert (logits[i, pad[i]:] - one[0]).abs().max().item() < 1e-4


def test_stops_on_every_members_eos(two, tmp_path):
    out, ma, mb, fused = two
    img = random_image(30, (64, 64))
    free = fused.generate([img], [PROMPTS[2]], max_new_tokens=8, return_details=True).token_ids[0]
    assert len(free) >= 3
    cfg = json.loads((out / "fuse_config.json").read_text())
    cfg["text"]["eos_token_ids"] = cfg["text"]["eos_token_ids"] + [free[2]]  # e.g. a second member's eos
    fused.config.text = cfg["text"]
    try:
        cut = fused.generate([img], [PROMPTS[2]], max_new_tokens=8, return_details=True).token_ids[0]
    finally:
        fused.config.text = json.loads((out / "fuse_config.json").read_text())["text"]
    assert cut == free[:free.index(free[2])]


def test_member_separator_inserted_between_members(two):
    out, ma, mb, fused = two
    img = random_image(12, (64, 64))
    fused.config.members[0]["separator_token_id"] = 11
    try:
        inputs = fused.prepare([img], [PROMPTS[0]], inference={"separator": "member"})
    finally:
        fused.config.members[0]["separator_token_id"] = None
    sp = inputs.spans[0]
    assert sp[f"sep:{ma.name}"] == (sp[ma.name][1], sp[ma.name][1] + 1) == (sp[mb.name][0] - 1, sp[mb.name][0])
    E = embedding_table(out)
    s = sp[f"sep:{ma.name}"][0]
    assert torch.equal(inputs.inputs_embeds[0, s], E[11])
    fixed = fused.prepare([img], [PROMPTS[0]], inference={"separator": 7})
    assert torch.equal(fixed.inputs_embeds[0, fixed.spans[0][f"sep:{ma.name}"][0]], E[7])
    assert f"sep:{mb.name}" not in fixed.spans[0]  # nothing after the last member
    assert "sep:" not in "".join(fused.prepare([img], [PROMPTS[0]]).spans[0])  # default: none


class _TextProbe(VisionBranch):
    """A branch whose tokens are its text embeddings' mean (to check what it receives)."""

    kind = "test_text_probe"
    needs_text = True

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.seen: list[torch.Tensor] = []

    def preprocess(self, images):
        return {"n": torch.zeros(len(images))}

    def forward(self, batch: dict[str, Any], text_embeds=None):
        self.seen = [t.clone() for t in text_embeds]
        return [self.scale * t.mean(0, keepdim=True).repeat(3, 1) for t in text_embeds]

    @property
    def output_dim(self):
        return self.dim


def test_text_aware_branch_gets_prompt_text_embeddings(two):
    """Like SliME's get_pure_text_embedding: every prompt token (template included) but the image."""
    fused = two[3]
    probe = _TextProbe(64)
    model = FusedModel(fused.config.__class__(members=[{"name": "probe"}], text=fused.config.text),
                       llm=fused.llm, branches={"probe": probe}, text=fused.text)
    q = "What colour is the square?"
    inputs = model.prepare([random_image(1)], [f"<image>\n{q}"])
    tok = fused.text.tokenizer
    full = tok.apply_chat_template([{"role": "user", "content": f"<image>\n{q}"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = [i for i in tok(full, add_special_tokens=False)["input_ids"] if i != tok.convert_tokens_to_ids("<image>")]
    E = fused.llm.get_input_embeddings().weight
    assert len(probe.seen) == 1 and torch.equal(probe.seen[0], E[ids])
    assert inputs.tokens == [{"probe": 3}]


def test_parallel_member_positions(two):
    """member_positions: parallel -- both members' spans end where the text after the image starts, so the
    text after the image has the position ids it has with one member; the sequence (and its order) is unchanged.
    Checked against the LLM run on the same embeddings with hand-built position ids."""
    out, ma, mb, fused = two
    img = random_image(12, (52, 52))
    seq = fused.prepare([img], [PROMPTS[0]])
    par = fused.prepare([img], [PROMPTS[0]], inference={"member_positions": "parallel"})
    assert torch.equal(par.inputs_embeds, seq.inputs_embeds) and par.spans == seq.spans
    n0 = seq.spans[0]["text_before"][1]
    n_after = seq.spans[0]["text_after"][1] - seq.spans[0]["text_after"][0]
    # hand-built: text before 0..n0-1; each 16-token member n0..n0+15; text after from n0+16
    expected = list(range(n0)) + list(range(n0, n0 + 16)) * 2 + list(range(n0 + 16, n0 + 16 + n_after))
    assert par.position_ids[0].tolist() == expected
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(str(out / "llm")).eval()
    with torch.no_grad():
        ref = llm(inputs_embeds=seq.inputs_embeds, position_ids=torch.tensor([expected])).logits
        assert (fused(inputs=par).logits - ref).abs().max().item() < 1e-5
    # generation continues after the last used position, with the same answer as batch-of-one
    a = fused.generate([img, img], [PROMPTS[0], PROMPTS[2]], max_new_tokens=4,
                       inference={"member_positions": "parallel"}, return_details=True)
    b = fused.generate([img], [PROMPTS[0]], max_new_tokens=4, inference={"member_positions": "parallel"},
                       return_details=True)
    assert a.token_ids[0] == b.token_ids[0]


def test_parallel_member_positions_right_align_unequal_spans(two):
    """With a pool:2 budget on one member (4 tokens vs 16), the short span is right-aligned."""
    ma, mb, fused = two[1], two[2], two[3]
    img = random_image(13, (52, 52))
    par = fused.prepare([img], [PROMPTS[0]], inference={"member_positions": "parallel",
                                                        "token_budget": {mb.name: "pool:2"}})
    s = par.spans[0]
    n0 = s["text_before"][1]
    pos = par.position_ids[0].tolist()
    assert pos[slice(*s[ma.name])] == list(range(n0, n0 + 16))
    assert pos[slice(*s[mb.name])][-1] == n0 + 15 and len(pos[slice(*s[mb.name])]) == 4
    assert pos[s["text_after"][0]] == n0 + 16


@pytest.mark.parametrize("inference, match", [({"member_positions": "diagonal"}, "sequential, parallel"),
                                              ({"member_positions": "parallel", "separator": 7}, "separator")])
def test_parallel_member_positions_bad_values(two, inference, match):
    from fuse.errors import RecipeError

    with pytest.raises(RecipeError, match=match):
        two[3].prepare([random_image(1)], [PROMPTS[0]], inference=inference)


def _greedy_by_hand(fused, inputs, max_new_tokens: int, forced: list[int] | None = None
                    ) -> tuple[list[int], float, list[int]]:
    """Reference for answer_select: one sample, no cache, no transformers generate: argmax step by step
    (or the ``forced`` ids, teacher forcing), summing log-softmax of each chosen token up to and including
    the first eos. Returns (answer ids, that sum, [the eos it stopped on] or [])."""
    emb, pos = inputs.inputs_embeds, inputs.position_ids
    E = fused.llm.get_input_embeddings()
    ids, total = [], 0.0
    with torch.no_grad():
        for step in range(max_new_tokens if forced is None else len(forced)):
            logp = torch.log_softmax(fused.llm(inputs_embeds=emb, position_ids=pos).logits[0, -1].float(), -1)
            t = int(logp.argmax()) if forced is None else forced[step]
            total += float(logp[t])
            if t in fused.eos_token_ids:
                return ids, total, [t]
            ids.append(t)
            emb = torch.cat([emb, E(torch.tensor([[t]]))], dim=1)
            pos = torch.cat([pos, pos[:, -1:] + 1], dim=1)
    return ids, total, []


@pytest.mark.parametrize("select, subsets", [("confidence", "all+alone"), ("confidence:members", "alone")])
def test_answer_select_keeps_the_most_confident_answer(two, select, subsets):
    """answer_select: each sample's answer is the greedy answer (of all members' tokens, or of one member's
    alone) with the highest log-probability, checked against a step-by-step greedy loop on prepare(members=...)."""
    _, ma, mb, fused = two
    alone = [[ma.name], [mb.name]]
    cands = ([[ma.name, mb.name]] if subsets == "all+alone" else []) + alone
    imgs = [random_image(20 + i, (52, 52)) for i in range(3)]
    got = fused.generate(imgs, PROMPTS, max_new_tokens=5, inference={"answer_select": select}, return_details=True)
    for i, (img, prompt) in enumerate(zip(imgs, PROMPTS)):
        ref = [_greedy_by_hand(fused, fused.prepare([img], [prompt], members=c), 5) for c in cands]
        k = max(range(len(cands)), key=lambda j: (ref[j][1], -j))
        assert got.token_ids[i] == ref[k][0] and got.selected[i] == cands[k]
        assert got.tokens[i] == {n: 16 for n in cands[k]}
    plain = fused.generate(imgs, PROMPTS, max_new_tokens=5, return_details=True)
    assert plain.selected is None


@pytest.mark.parametrize("select, null", [("pmi", "#000000"), ("pmi:members", "#80ff10")])
def test_answer_select_pmi_subtracts_the_null_image_score(two, select, null):
    """answer_select pmi: each candidate's greedy log-probability minus the log-probability of the same ids
    (eos included) given the same members' tokens of a flat null_image of the sample's size; the answer of
    highest difference is kept. Checked against step-by-step loops (greedy, then teacher-forced) on
    prepare(members=...), for 3 prompts of different lengths in one batch."""
    from PIL import Image

    _, ma, mb, fused = two
    cands = ([[ma.name, mb.name]] if select == "pmi" else []) + [[ma.name], [mb.name]]
    imgs = [random_image(40 + i, (52 + 4 * i, 52)) for i in range(3)]
    got = fused.generate(imgs, PROMPTS, max_new_tokens=5, inference={"answer_select": select, "null_image": null},
                         return_details=True)
    colour = tuple(int(null[k:k + 2], 16) for k in (1, 3, 5))
    margins = []
    for i, (img, prompt) in enumerate(zip(imgs, PROMPTS)):
        blank = Image.new("RGB", img.size, colour)
        score = []
        for c in cands:
            ids, lp, stop = _greedy_by_hand(fused, fused.prepare([img], [prompt], members=c), 5)
            _, lp0, _ = _greedy_by_hand(fused, fused.prepare([blank], [prompt], members=c), 5, forced=ids + stop)
            score.append((ids, lp - lp0))
        k = max(range(len(cands)), key=lambda j: (score[j][1], -j))
        assert got.token_ids[i] == score[k][0] and got.selected[i] == cands[k]
        margins.append(sorted(v for _, v in score)[-1] - sorted(v for _, v in score)[-2])
    assert max(margins) > 1e-3  # the choice was not a tie everywhere


def test_abstain_unseen_words_leaves_out_members_not_trained_on_the_question(two):
    """abstain: unseen_words: a member whose recorded training questions lack a word of the question gives no
    candidate (nor does any subset holding it); the answer is then the best of the others, checked against
    step-by-step greedy loops on prepare(members=...). Members recording no words never abstain, and a
    question every candidate abstains on keeps them all (same answer as without abstain)."""
    _, ma, mb, fused = two
    imgs = [random_image(60 + i, (52, 52)) for i in range(3)]
    kept = [dict(m) for m in fused.config.members]
    try:  # b was trained on PROMPTS[0]'s words only; a records none
        for m in fused.config.members:
            m["question_words"] = ["colour", "what"] if m["name"] == mb.name else None
        got = fused.generate(imgs, PROMPTS, max_new_tokens=5, return_details=True,
                             inference={"answer_select": "confidence", "abstain": "unseen_words"})
        plain = fused.generate(imgs, PROMPTS, max_new_tokens=5, return_details=True,
                               inference={"answer_select": "confidence"})
        assert got.token_ids[0] == plain.token_ids[0] and got.selected[0] == plain.selected[0]
        for i in (1, 2):
            ref = _greedy_by_hand(fused, fused.prepare([imgs[i]], [PROMPTS[i]], members=[ma.name]), 5)
            assert got.selected[i] == [ma.name] and got.token_ids[i] == ref[0]
        assert [s for s in plain.selected[1:]] != [[ma.name], [ma.name]]  # without abstain b (or both) won one
        # passes run: all + a + b for the first question (16 tokens per member), a alone for the others
        assert got.visual_tokens_read == [64, 16, 16] and plain.visual_tokens_read == [64, 64, 64]
        for m in fused.config.members:  # everyone abstains on PROMPTS[1:]: all candidates are kept
            m["question_words"] = ["colour", "what"]
        again = fused.generate(imgs, PROMPTS, max_new_tokens=5, return_details=True,
                               inference={"answer_select": "confidence", "abstain": "unseen_words"})
        assert again.token_ids == plain.token_ids and again.selected == plain.selected
    finally:
        fused.config.members = kept


def test_eligible_candidates_per_question():
    from fuse.model.generation import eligible_candidates

    cands = [["a", "b"], ["a"], ["b"]]
    words = {"a": ["how", "many", "objects"], "b": None}
    prompts = ["<image>\nHow many objects?", "What colour? <image>", "<image>"]
    assert eligible_candidates(cands, words, prompts, "<image>") == [[True, False, True], [True, False, True],
                                                                     [True, True, True]]
    words = {"a": ["what"], "b": ["what"]}
    assert eligible_candidates(cands, words, prompts[1:2], "<image>") == [[True], [True], [True]]  # all abstain


def test_abstain_option_is_checked_and_recorded():
    from fuse.errors import RecipeError
    from fuse.model.options import InferenceOptions

    opts = InferenceOptions.parse({"answer_select": "confidence:members", "abstain": "unseen_words"}, ["a", "b"])
    assert opts.abstain == "unseen_words" and InferenceOptions.parse(opts.to_dict(), ["a", "b"]) == opts
    assert InferenceOptions.parse({}, ["a"]).abstain == "none"
    assert opts.override(["a", "b"], {"abstain": "none"}).abstain == "none"
    with pytest.raises(RecipeError, match="inference.abstain: expected one of none, unseen_words"):
        InferenceOptions.parse({"abstain": "yes"}, ["a"])


def test_continuation_log_probs_equals_teacher_forcing_by_hand(two):
    """continuation_log_probs on a left-padded batch (3 prompt lengths) with continuations of 3 lengths (one
    ending on eos, one not, one empty) equals a step-by-step teacher-forced loop on each sample alone."""
    from fuse.model.generation import continuation_log_probs

    fused = two[3]
    eos = fused.eos_token_ids[0]
    imgs = [random_image(50 + i, (52, 52)) for i in range(3)]
    conts = [[5, 7, 11, eos], [9, 3], []]
    inputs = fused.prepare(imgs, PROMPTS)
    got = continuation_log_probs(fused.llm, inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids, conts)
    for i, (img, prompt) in enumerate(zip(imgs, PROMPTS)):
        ref = _greedy_by_hand(fused, fused.prepare([img], [prompt]), 0, forced=conts[i])[1]
        assert got[i] == pytest.approx(ref, abs=1e-4)
    assert got[2] == 0.0 and max(got[:2]) < 0


def test_null_image_option_is_checked_and_recorded(two):
    from fuse.errors import RecipeError
    from fuse.model.options import InferenceOptions

    fused, img = two[3], random_image(1)
    with pytest.raises(RecipeError, match="null_image.*#rrggbb"):
        fused.generate([img], [PROMPTS[0]], max_new_tokens=2, inference={"answer_select": "pmi", "null_image": "black"})
    opts = InferenceOptions.parse({"answer_select": "pmi:members", "null_image": "#141414"}, ["a", "b"])
    assert opts.null_image == (20, 20, 20) and opts.to_dict()["null_image"] == "#141414"
    assert InferenceOptions.parse(opts.to_dict(), ["a", "b"]) == opts


def test_prepare_members_subset_is_that_member_alone(two):
    """prepare(members=[a]) builds what a fused model of the text member a alone (same LLM) builds."""
    _, ma, mb, fused = two
    img = random_image(30, (52, 52))
    solo = FusedModel.from_members([ma], llm=fused.llm)
    a, b = fused.prepare([img], [PROMPTS[1]], members=[ma.name]), solo.prepare([img], [PROMPTS[1]])
    assert torch.equal(a.inputs_embeds, b.inputs_embeds) and torch.equal(a.position_ids, b.position_ids)
    assert a.tokens == [{ma.name: 16}] and a.spans[0].keys() == b.spans[0].keys()


def test_answer_select_bad_values(two):
    from fuse.errors import FuseError, RecipeError

    fused, img = two[3], random_image(1)
    with pytest.raises(RecipeError, match="confidence"):
        fused.generate([img], [PROMPTS[0]], max_new_tokens=2, inference={"answer_select": "vote"})
    with pytest.raises(FuseError, match="do_sample"):
        fused.generate([img], [PROMPTS[0]], max_new_tokens=2, do_sample=True, inference={"answer_select": "confidence"})
    with pytest.raises(FuseError, match="subset"):
        fused.prepare([img], [PROMPTS[0]], members=["nobody"])
