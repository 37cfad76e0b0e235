"""Session-wide tiny checkpoints shared by all test areas (built once, in a temp dir)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A tiny LLaMA base LLM directory (vocab 256)."""
    from fuse.testing import build_base_llm

    return build_base_llm(tmp_path_factory.mktemp("base") / "base", seed=0)


@pytest.fixture(scope="session")
def tiny_llava_hf(tmp_path_factory, tiny_base):
    """(dir, LlavaForConditionalGeneration) of a tiny llava-hf member fine-tuned from ``tiny_base``."""
    from fuse.testing import build_llava_hf_member

    return build_llava_hf_member(tmp_path_factory.mktemp("llava_hf") / "llava_hf", tiny_base, seed=1)


@pytest.fixture(scope="session")
def tiny_llava_orig(tmp_path_factory, tiny_llava_hf):
    """The same weights as ``tiny_llava_hf`` in the original LLaVA-1.5 layout."""
    from fuse.testing import llava_hf_to_original

    return llava_hf_to_original(tiny_llava_hf[0], tmp_path_factory.mktemp("llava") / "llava", image_aspect_ratio="square")
