"""The member-format registry lists every built-in format; adapters have one override point."""

from __future__ import annotations

import pytest

from fuse.errors import FormatError
from fuse.members import FORMATS, VISION_BRANCHES, FormatAdapter
from fuse.members.registry import branch_class, format_adapter


def test_every_built_in_format_and_branch_is_listed_without_importing_anything_else():
    assert list(FORMATS) == ["llava-hf", "llava", "mgm", "slime", "comm"]
    assert sorted(VISION_BRANCHES) == ["comm", "llava", "mgm", "slime"]
    assert all(FORMATS[name].branch_kind in VISION_BRANCHES for name in FORMATS)
    with pytest.raises(FormatError, match="format 'gguf' unknown; known: auto, comm, llava, llava-hf, mgm, slime"):
        format_adapter("gguf")
    with pytest.raises(FormatError, match="unknown vision branch kind 'x'"):
        branch_class("x")


def test_adapters_override_build_member_not_load():
    """load() wraps build_member() in transformers' no-init context; an adapter overriding load would
    skip it (and build every module with a random init first), so defining one is refused."""
    for adapter in FORMATS.values():
        assert "load" not in vars(adapter) and "build_member" in vars(adapter)
    with pytest.raises(TypeError, match="implement build_member, not load"):
        class Bad(FormatAdapter):  # noqa: F841
            @classmethod
            def load(cls, *a, **k):
                raise AssertionError
