"""A tiny LLaMA-3-style byte-level BPE tokenizer built without any download.

Vocabulary (``vocab_size`` ids, default 256): printable ASCII + ``\\n`` + ``\\t`` as
byte-level symbols, then fixed merges of common English pieces, then the
LLaMA-3 special tokens at the end (``<|begin_of_text|>`` ... ``<image>``), like
the real tokenizer keeps specials above the BPE range.
"""

from __future__ import annotations

import functools

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<unk>", "<image>"]

_WORDS = ("the a an is are of and to in on at it this that what which how many colour color shape red green "
          "blue yellow left right top bottom circle square triangle one two three four yes no image object "
          "objects there picture count answer question user assistant system").split()

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    byte_map = dict(zip(range(256), _bytes_to_unicode()))
    base = [byte_map[b] for b in list(range(32, 127)) + [9, 10]]
    vocab: dict[str, int] = {s: i for i, s in enumerate(base)}
    merges: list[tuple[str, str]] = []
    budget = vocab_size - len(SPECIALS)
    if budget < len(base):
        raise ValueError(f"vocab_size must be >= {len(base) + len(SPECIALS)}")
    # deterministic merges: grow each word (with and without a leading space) left to right
    for word in _WORDS:
        for text in (byte_map[32] + word, word):
            cur = text[0]
            for ch in text[1:]:
                new = cur + ch
                if new not in vocab:
                    if len(vocab) >= budget:
                        break
                    vocab[new] = len(vocab)
                    merges.append((cur, ch))
                cur = new
    filler = 0
    while len(vocab) < budget:  # pad the BPE range to the exact size with unreachable symbols
        vocab[f"<|reserved_{filler}|>"] = len(vocab)
        filler += 1
    for s in SPECIALS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok.to_str()


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def tiny_tokenizer(vocab_size: int = 256):
    """A ``PreTrainedTokenizerFast`` with LLaMA-3 specials and a chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
                                  bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    return tok
