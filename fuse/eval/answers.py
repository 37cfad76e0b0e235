"""Turning free-form model outputs into comparable answers.

- :func:`normalize_vqa`: the VQA evaluation's answer normalisation (lower case,
  punctuation rules, number words -> digits, articles dropped, common
  contractions restored), so ``"Two."`` and ``"2"`` compare equal.
- :func:`parse_yes_no`: POPE's yes/no reading (a reply containing "no"/"not" is a no).
- :func:`parse_options` / :func:`parse_choice` / :func:`match_option`: MMVP's
  ``(a) Open (b) Closed`` options, the ``Correct Answer`` column, and a
  prediction matched by option letter or by option text.
"""

from __future__ import annotations

import re
import string
from typing import Sequence

# --- VQA normalisation -------------------------------------------------------------------------------

_PUNCT = ";/[]\"{}()=+\\_-><@`,?!"
_DIGIT_COMMA = re.compile(r"(\d),(\d)")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit (decimals like 2.5 keep theirs)
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {w.replace("'", ""): w for w in (
    "aren't", "can't", "couldn't", "didn't", "doesn't", "don't", "hadn't", "hasn't", "haven't", "he's", "i'd",
    "i'm", "i've", "isn't", "it'd", "it's", "let's", "ma'am", "shouldn't", "she's", "that's", "there's",
    "they'd", "they're", "they've", "wasn't", "we'd", "we're", "we've", "weren't", "what's", "where's",
    "who's", "won't", "wouldn't", "you'd", "you're", "you've")}


def _strip_punctuation(text: str) -> str:
    # A punctuation mark that touches a space (or any text with a digit,digit comma) is deleted; otherwise
    # it separates words and becomes a space ("black/white" -> "black white", "yes!" -> "yes").
    delete_all = _DIGIT_COMMA.search(text) is not None
    out = text
    for p in _PUNCT:
        if p not in out:
            continue
        touches_space = (p + " ") in text or (" " + p) in text
        out = out.replace(p, "" if (touches_space or delete_all) else " ")
    return _PERIOD.sub("", out)


def normalize_vqa(text: str) -> str:
    """The VQA answer normalisation (applied to predictions and to reference answers)."""
    text = str(text).replace("\n", " ").replace("\t", " ").strip().lower()
    text = _strip_punctuation(text)
    words = []
    for w in text.split():
        w = _NUMBER_WORDS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


# --- yes / no -------------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z]+")


def parse_yes_no(text: str) -> str | None:
    """``"yes"``/``"no"`` read from a reply, ``None`` when it says neither.

    The first word decides when it is yes or no; otherwise any "no"/"not" makes
    it a no (LLaVA's POPE convention), then any "yes" a yes.
    """
    words = _WORD.findall(str(text).lower())
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return words[0]
    if "no" in words or "not" in words:
        return "no"
    if "yes" in words:
        return "yes"
    return None


# --- multiple choice ------------------------------------------------------------------------------------

_PAREN_MARK = re.compile(r"\(([A-Za-z])\)")
_LINE_MARK = re.compile(r"(?:^|\n)\s*([A-Z])[.)]\s+")


def parse_options(text: str) -> list[str]:
    """``"(a) Open (b) Closed"`` (or ``"A. Open\\nB. Closed"``) -> ``["Open", "Closed"]``.

    Returns ``[]`` unless the markers are consecutive letters starting at a.
    """
    for mark in (_PAREN_MARK, _LINE_MARK):
        parts = mark.split(str(text))
        if len(parts) < 3:
            continue
        letters = [p.lower() for p in parts[1::2]]
        if letters != list(string.ascii_lowercase[:len(letters)]) or parts[0].strip():
            continue
        opts = [p.strip() for p in parts[2::2]]
        if all(opts):
            return opts
    return []


def _norm_text(text: str) -> str:
    return " ".join(_WORD.findall(str(text).lower().replace("_", " ")))


def parse_choice(text: str, options: Sequence[str]) -> int | None:
    """Index of a ground-truth choice written as ``(a)``, ``a``, ``A``, ``A.`` or as the option's text."""
    t = str(text).strip()
    m = re.fullmatch(r"\(?([A-Za-z])[).]?", t)
    if m:
        i = ord(m.group(1).lower()) - ord("a")
        return i if 0 <= i < len(options) else None
    norm = [_norm_text(o) for o in options]
    return norm.index(_norm_text(t)) if _norm_text(t) in norm else None


def match_option(prediction: str, options: Sequence[str]) -> int | None:
    """Which option a free-form prediction chose (index), or ``None``.

    Order: the reply *is* an option's text; a leading letter in parentheses
    ``(b)``; a bare letter (``B``, ``B.``, ``B) ...``); "answer is B" / "option B";
    exactly one option's text appears as whole words; a leading single letter
    followed by text. Text before letters guards against replies such as
    ``"a circle"`` being read as option A when "circle" is an option.
    """
    p = str(prediction).strip()
    if not p or not options:
        return None
    n = len(options)
    norm_opts = [_norm_text(o) for o in options]
    norm_p = _norm_text(p)

    def letter(ch: str) -> int | None:
        i = ord(ch.lower()) - ord("a")
        return i if 0 <= i < n else None

    if norm_p in norm_opts and norm_opts.count(norm_p) == 1:
        return norm_opts.index(norm_p)
    for pattern in (r"^\(([A-Za-z])\)", r"^([A-Za-z])(?:[.):]|\s*$)",
                    r"answer\s*(?:is|:)\s*\(?([A-Za-z])\b\)?", r"option\s*\(?([A-Za-z])\b\)?"):
        m = re.search(pattern, p, flags=re.IGNORECASE)
        if m and letter(m.group(1)) is not None:
            return letter(m.group(1))
    padded = f" {norm_p} "
    found = [i for i, o in enumerate(norm_opts) if o and f" {o} " in padded]
    # prefer the longest match when one option's text contains another's ("red" vs "dark red")
    found = [i for i in found if not any(j != i and norm_opts[i] in norm_opts[j] for j in found)]
    if len(found) == 1:
        return found[0]
    m = re.match(r"^([A-Za-z])\s", p)
    if m and letter(m.group(1)) is not None:
        return letter(m.group(1))
    return None
