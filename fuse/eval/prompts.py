"""Prompt templates shared by the evaluation tasks and the toy world's training data.

The user-side text of one question, *before* the model's own chat template is
applied (the model wraps it with its prompt style). The image placeholder is
added by the runner, so these functions never include it.

The short-answer suffix and the multiple-choice layout are the conventions of
LLaVA-1.5 / lmms-eval, so real checkpoints see the prompts they were tuned on,
and the toy world trains its tiny models on exactly these strings.
"""

from __future__ import annotations

import string
from typing import Sequence

SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
LETTERS = string.ascii_uppercase


def short_answer_prompt(question: str) -> str:
    """Open question with a one-word answer (VQA, POPE)."""
    return f"{question.strip()}\n{SHORT_ANSWER}"


def multiple_choice_prompt(question: str, options: Sequence[str]) -> str:
    """``question`` + one ``A. option`` line per option + the letter instruction (lmms-eval's MMVP layout)."""
    if len(options) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} options are supported, got {len(options)}")
    lines = [f"{LETTERS[i]}. {opt.strip()}" for i, opt in enumerate(options)]
    return "\n".join([question.strip(), *lines, OPTION_LETTER])


def with_placeholder(prompt: str, placeholder: str = "<image>") -> str:
    """Put the image placeholder on its own line before the text (LLaVA's layout) unless already present."""
    return prompt if placeholder in prompt else f"{placeholder}\n{prompt}"
