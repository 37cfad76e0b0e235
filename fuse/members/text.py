"""The text side of a member: tokenizer, prompt style, image placeholder, stop ids.

A *prompt style* turns a user question (which contains the image placeholder
``<image>`` once) into the full prompt string up to where the assistant's
answer starts. Styles are a registry so MGM/SliME/LLaVA quirks are one entry
each. The image placeholder is never tokenized: the prompt is split on it and
the pieces are tokenized separately (as LLaVA's ``tokenizer_image_token`` does),
so visual tokens can be spliced in between.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from ..errors import CheckpointError

IMAGE_PLACEHOLDER = "<image>"

LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
# conv_vicuna_v1 of LLaVA / MGM / SliME (what LLaVA-1.5, MGM-7B/13B and SliME-7B/13B were trained and
# evaluated with: `--version v1`, `--conv-mode vicuna_v1`); llava_v1 above is LLaVA's conv_llava_v1.
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
MGM_LLAMA3_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                     "content that the user provides, and assist the user with a variety of tasks using "
                     "natural language.")


def _llava_v1(q: str, tok) -> str:
    return f"{LLAVA_V1_SYSTEM} USER: {q} ASSISTANT:"


def _vicuna_v1(q: str, tok) -> str:
    return f"{VICUNA_V1_SYSTEM} USER: {q} ASSISTANT:"


def _chat_template(q: str, tok) -> str:
    if not getattr(tok, "chat_template", None):
        raise CheckpointError("prompt style 'chat_template': the tokenizer has no chat_template")
    return tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)


def _mgm_llama_3(q: str, tok) -> str:
    # MGM's conv_llama_3: the assistant role is literally "system" (upstream quirk, kept on purpose).
    return ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + MGM_LLAMA3_SYSTEM + "<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n" + q + "<|eot_id|>"
            "<|start_header_id|>system<|end_header_id|>\n\n")


def _slime_llama3(q: str, tok) -> str:
    # SliME's llama3 conversation: no system prompt, plain user/assistant headers.
    return ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + q + "<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")


def _plain(q: str, tok) -> str:
    return q


PROMPT_STYLES: dict[str, Callable[[str, object], str]] = {
    "llava_v1": _llava_v1,
    "vicuna_v1": _vicuna_v1,
    "chat_template": _chat_template,
    "mgm_llama_3": _mgm_llama_3,
    "slime_llama3": _slime_llama3,
    "plain": _plain,
}


@dataclass
class TextSide:
    """How a member talks: where its tokenizer is, its prompt style and its stop ids."""

    tokenizer_path: str | None
    prompt_style: str = "chat_template"
    placeholder: str = IMAGE_PLACEHOLDER
    eos_token_ids: list[int] = field(default_factory=list)
    separator_token_id: int | None = None  # e.g. SliME's token 11 between global and local tokens
    # the words of every question the member was trained on (sorted; recorded by `train toy-family`), or None
    # (unknown: the member never abstains under inference.abstain: unseen_words)
    question_words: list[str] | None = None
    _tokenizer: object = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("_tokenizer")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TextSide":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__ and not k.startswith("_")})

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def prompt(self, question: str) -> str:
        """Full prompt for one question; prepends the placeholder (with a warning) if absent."""
        if self.placeholder not in question:
            warnings.warn(f"prompt has no {self.placeholder}: the image is put before the text", stacklevel=2)
            question = f"{self.placeholder}\n{question}"
        if question.count(self.placeholder) > 1:
            raise CheckpointError(f"prompt has {question.count(self.placeholder)} {self.placeholder} placeholders; one image per prompt is supported")
        try:
            style = PROMPT_STYLES[self.prompt_style]
        except KeyError:
            raise CheckpointError(f"unknown prompt style {self.prompt_style!r}; known: {', '.join(PROMPT_STYLES)}") from None
        return style(question, self.tokenizer)

    def encode(self, prompt: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the (single) placeholder of a full prompt.

        The first piece gets the tokenizer's BOS unless the text already starts with it.
        """
        tok = self.tokenizer
        before, _, after = prompt.partition(self.placeholder)
        bos = getattr(tok, "bos_token", None)
        add_bos = not (bos and before.startswith(bos))
        ids_before = tok(before, add_special_tokens=False)["input_ids"]
        if add_bos and tok.bos_token_id is not None:
            ids_before = [tok.bos_token_id] + ids_before
        ids_after = tok(after, add_special_tokens=False)["input_ids"] if after else []
        return ids_before, ids_after


_WORD = re.compile(r"[a-z]+")


def words_of(text: str, placeholder: str = IMAGE_PLACEHOLDER) -> set[str]:
    """The lower-case words (runs of a-z) of a question, its image placeholder left out:
    ``"<image>\nWhat colour are the objects?"`` -> ``{"what", "colour", "are", "the", "objects"}``."""
    return set(_WORD.findall(text.replace(placeholder, " ").lower()))


def question_vocabulary(questions: Iterable[str], placeholder: str = IMAGE_PLACEHOLDER) -> list[str]:
    """Every word of ``questions`` (:func:`words_of`), sorted: a member's ``question_words``."""
    out: set[str] = set()
    for q in questions:
        out |= words_of(q, placeholder)
    return sorted(out)


def tokenizer_vocab(path: str | Path | None) -> dict[str, int]:
    """token -> id (added tokens included) of the tokenizer in ``path``.

    Read from ``tokenizer.json`` with the ``tokenizers`` library when the dir has one (what
    a fast tokenizer's ``get_vocab()`` returns, without importing transformers); otherwise
    through :func:`load_tokenizer` (e.g. a sentencepiece-only ``tokenizer.model``).
    """
    if path is None:
        raise CheckpointError("this member has no tokenizer (tokenizer_path is unset)")
    f = Path(path) / "tokenizer.json"
    if f.is_file():
        from tokenizers import Tokenizer

        try:
            vocab = Tokenizer.from_file(str(f)).get_vocab(with_added_tokens=True)
        except Exception as e:  # tokenizers raises its own exception type
            raise CheckpointError(f"{f}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
        cfg = Path(path) / "tokenizer_config.json"
        if cfg.is_file():  # added tokens declared only in tokenizer_config.json
            try:
                added = json.loads(cfg.read_text()).get("added_tokens_decoder") or {}
            except (json.JSONDecodeError, OSError):
                added = {}
            for i, t in added.items():
                content = t.get("content") if isinstance(t, dict) else None
                if content is not None and content not in vocab and str(i).isdigit():
                    vocab[content] = int(i)
        return vocab
    return dict(load_tokenizer(path).get_vocab())


def has_chat_template(path: str | Path | None) -> bool:
    """Whether the tokenizer in ``path`` ships a chat template (tokenizer_config.json's
    ``chat_template``, or ``chat_template.jinja`` / ``chat_template.json``), files only."""
    if path is None:
        return False
    d = Path(path)
    if (d / "chat_template.jinja").is_file() or (d / "chat_template.json").is_file():
        return True
    cfg = d / "tokenizer_config.json"
    if cfg.is_file():
        try:
            return bool(json.loads(cfg.read_text()).get("chat_template"))
        except (json.JSONDecodeError, OSError):
            return False
    return False


def load_tokenizer(path: str | Path | None):
    """AutoTokenizer from a local dir or hub id (never remote code)."""
    if path is None:
        raise CheckpointError("this member has no tokenizer (tokenizer_path is unset)")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # AutoTokenizer also parses config.json; MLLM model types (mgm, llava_llama) that
    # transformers does not know only cause a harmless warning there: keep it quiet.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
    finally:
        hf_logging.set_verbosity(level)
