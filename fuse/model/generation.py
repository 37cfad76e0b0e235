"""Generation with a fused model: settings checked before any work, stopping on every member's eos id,
NaN/Inf logits a loud error (what :meth:`FusedModel.generate <fuse.model.FusedModel.generate>` runs around
transformers' own ``generate`` on the assembled ``inputs_embeds``)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from transformers import LogitsProcessor

from ..errors import FuseError, NumericsError
from ..members.text import words_of


@dataclass
class GenerationResult:
    """``texts`` (decoded answers), ``token_ids`` (answer ids, cut at the first eos),
    ``tokens`` (member -> visual tokens per sample), ``prompt_tokens`` (sequence length per sample),
    ``timings`` (seconds: ``vision`` per member, ``assembly``, ``generate``, ``total``)."""

    texts: list[str]
    token_ids: list[list[int]]
    tokens: list[dict[str, int]]
    prompt_tokens: list[int]
    timings: dict[str, Any]
    selected: list[list[str]] | None = None  # answer_select: the members whose tokens gave each answer
    # per sample: visual tokens the LLM read over every pass run for it (answer_select runs one pass per
    # candidate it may answer with; plain generation: its one pass)
    visual_tokens_read: list[int] | None = None


class FiniteLogits(LogitsProcessor):
    """A transformers logits processor that fails loudly on NaN/+Inf scores (or a row that is all
    -Inf), which greedy decoding would otherwise turn into an empty answer with exit code 0."""

    def __init__(self, dtype: torch.dtype):
        self.dtype, self.step = dtype, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.step += 1
        bad = torch.isnan(scores).any(-1) | torch.isposinf(scores).any(-1) | torch.isneginf(scores).all(-1)
        if bool(bad.any()):
            rows = bad.nonzero().flatten().tolist()
            raise NumericsError(f"the LLM produced NaN/Inf logits at generation step {self.step} for sample(s) "
                                f"{rows} (NaN/Inf in the weights, or overflow in {self.dtype}); no answer is possible")
        return scores


def check_generation(max_new_tokens: Any, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                     seed: int | None = None) -> None:
    """One-line errors for generation settings transformers would reject with a traceback (or take
    silently): called by :meth:`FusedModel.generate` and by the CLIs before a model is loaded."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise FuseError(f"max_new_tokens: expected a positive integer, got {max_new_tokens!r}")
    if do_sample:
        if not (isinstance(temperature, (int, float)) and temperature > 0 and temperature == temperature):
            raise FuseError(f"temperature: sampling needs a temperature > 0, got {temperature!r} "
                            "(for greedy decoding, do not sample)")
        if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise FuseError(f"top_p: expected a number in (0, 1], got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64):
        raise FuseError(f"seed: expected an integer in [0, 2^64), got {seed!r}")


def generation_config(tokenizer: Any, eos: Sequence[int], max_new_tokens: int, do_sample: bool = False,
                      temperature: float = 1.0, top_p: float = 1.0, **extra: Any):
    """transformers' ``GenerationConfig``: stop on any of ``eos``; pad with the tokenizer's pad id (else the
    first eos id); sampling settings only when sampling (``top_k`` off unless given); ``extra`` as given."""
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    cfg: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "do_sample": bool(do_sample),
                           "eos_token_id": list(eos) or None, "pad_token_id": pad}
    if do_sample:
        cfg.update(temperature=float(temperature), top_p=float(top_p), top_k=extra.pop("top_k", 0))
    cfg.update(extra)
    return GenerationConfig(**cfg)


def answer_log_probs(llm: Any, out: Any, answers: Sequence[Sequence[int]]) -> list[float]:
    """Log-probability of each greedy answer under the scores that produced it.

    ``out``: transformers' ``generate`` output with ``output_scores`` and ``return_dict_in_generate``;
    ``answers``: each row's ids cut at its first eos (:func:`cut_at_eos`). Per-step log-probabilities come
    from transformers' ``compute_transition_scores`` (log-softmax of each step's scores at the chosen id);
    the sum runs over the answer's tokens and the eos that ended it (when there was one), so "stop here"
    counts as part of the answer.
    """
    if not out.scores:
        return [0.0] * len(answers)
    steps = llm.compute_transition_scores(out.sequences, out.scores, normalize_logits=True).float()  # [B, T]
    return [float(steps[i, :min(len(ans) + 1, steps.shape[1])].sum()) for i, ans in enumerate(answers)]


@torch.no_grad()
def continuation_log_probs(llm: Any, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                           position_ids: torch.Tensor, continuations: Sequence[Sequence[int]]) -> list[float]:
    """Log-probability of given token continuations (teacher forcing), one per row of a left-padded input.

    ``inputs_embeds [B, L, D]`` / ``attention_mask [B, L]`` / ``position_ids [B, L]``: an assembled prompt
    (as :meth:`FusedModel.prepare <fuse.model.FusedModel.prepare>` builds it); ``continuations``: B lists of
    ids, each scored right after its prompt (the eos that ended an answer included, as
    :func:`answer_log_probs` counts it). The continuations are appended on the right (shorter ones padded
    and masked), their positions continue each row's last position id, and one forward pass gives
    ``sum_t log p(c_t | prompt, c_<t)`` per row: the same figure greedy generation would have scored for
    that answer, under any other prompt.
    """
    B, L = attention_mask.shape
    T = max((len(c) for c in continuations), default=0)
    if T == 0:
        return [0.0] * B
    target = torch.full((B, T), -1, dtype=torch.long, device=attention_mask.device)
    for i, c in enumerate(continuations):
        target[i, :len(c)] = torch.tensor(list(c), dtype=torch.long)
    feed = target[:, :T - 1].clamp(min=0)  # the last target is predicted, never fed
    embeds = torch.cat([inputs_embeds, llm.get_input_embeddings()(feed).to(inputs_embeds.dtype)], 1)
    mask = torch.cat([attention_mask, (target[:, :T - 1] >= 0).to(attention_mask.dtype)], 1)
    steps = torch.arange(1, T, dtype=position_ids.dtype, device=position_ids.device)
    positions = torch.cat([position_ids, position_ids[:, -1:] + steps[None]], 1)
    # logits of the last T positions only (prompt position L-1 predicts c_1): at an 8B model's vocab the whole
    # prompt's [B, L, V] logits would dwarf the pass itself
    logits = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                 logits_to_keep=T).logits[:, -T:].float()
    scores = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)  # [B, T]
    return scores.masked_fill(target < 0, 0.0).sum(-1).tolist()


def with_stop(row: Sequence[int], answer: Sequence[int]) -> list[int]:
    """``answer`` (``row`` cut at its first eos) plus that eos id when generation ended on one."""
    return list(answer) + ([int(row[len(answer)])] if len(row) > len(answer) else [])


def eligible_candidates(candidates: Sequence[Sequence[str]], question_words: Mapping[str, Sequence[str] | None],
                        prompts: Sequence[str], placeholder: str) -> list[list[bool]]:
    """``[C][B]``: may candidate ``c`` (a member subset) answer prompt ``b`` under ``abstain: unseen_words``?

    A member abstains on a question with a word its training questions never had (``question_words``:
    member -> its sorted training words, None when unknown, then it never abstains); a subset is eligible
    when none of its members abstains. A prompt every candidate abstains on keeps them all, so every
    question still gets an answer. Why: a member fine-tuned only on some kinds of question (a shape
    specialist) still answers the others confidently, from the merged LLM's prior, and would out-score the
    member that sees the answer (the confidence comparison assumes each candidate was trained on the task).
    """
    asked = [words_of(p, placeholder) for p in prompts]
    known = {n: (set(w) if w is not None else None) for n, w in question_words.items()}
    ok = [[all(known.get(n) is None or q <= known[n] for n in cand) for q in asked] for cand in candidates]
    for b in range(len(asked)):
        if not any(row[b] for row in ok):
            for row in ok:
                row[b] = True
    return ok


def cut_at_eos(ids: Sequence[int], eos: Sequence[int]) -> list[int]:
    """``ids`` up to (not including) the first eos id."""
    stop = set(eos)
    for k, i in enumerate(ids):
        if i in stop:
            return list(ids[:k])
    return list(ids)


__all__ = ["FiniteLogits", "GenerationResult", "answer_log_probs", "check_generation", "continuation_log_probs",
           "cut_at_eos", "generation_config", "with_stop"]
