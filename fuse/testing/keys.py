"""Key-category checks shared by the member tests (each key must fall in exactly one category)."""

from __future__ import annotations

import re
from typing import Iterable, Mapping


def categorize_keys(keys: Iterable[str], patterns: Mapping[str, str]) -> dict[str, list[str]]:
    """Group ``keys`` by the one regex of ``patterns`` each fully matches; AssertionError otherwise."""
    hits: dict[str, list[str]] = {name: [] for name in patterns}
    for k in keys:
        matched = [n for n, rx in patterns.items() if re.fullmatch(rx, k)]
        assert len(matched) == 1, f"{k} matches {matched}"
        hits[matched[0]].append(k)
    return hits
