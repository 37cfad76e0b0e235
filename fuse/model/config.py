"""``FusedConfig``: the transformers config of a fused model directory (model_type ``visionfuse``).

``OUT/config.json`` = ``{"model_type": "visionfuse", "architectures": ["FusedModel"], ...}`` plus
the content of ``OUT/fuse_config.json`` (see the fused output layout in the docs):
``format_version``, ``base_model``, ``members`` (list, visual-token order), ``merge``,
``text`` (``member``, ``prompt_style``, ``placeholder``, ``eos_token_ids``), ``inference``
(token budget / positions / separator, see :mod:`fuse.model.options`) and ``sources``.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from ..fused_layout import FUSE_CONFIG  # noqa: F401  (re-exported: its former home)
from ..fused_layout import ARCHITECTURE, FORMAT_VERSION, MODEL_TYPE

CONFIG_FIELDS = ("format_version", "base_model", "members", "merge", "text", "inference", "sources")


class FusedConfig(PreTrainedConfig):
    """Everything a fused model needs besides weights. Members' fields: ``name``, ``dir``
    (``members/<name>``), ``format``, ``source``, ``weight``, ``density``, ``eos_token_ids``,
    ``vocab_rows``, ``prompt_style``, ``separator_token_id``, ``question_words`` (None, or the sorted words
    of the member's training questions: ``inference.abstain``)."""

    model_type = MODEL_TYPE

    def __init__(self, format_version: int = FORMAT_VERSION, base_model: str | None = None,
                 members: list[dict[str, Any]] | None = None, merge: dict[str, Any] | None = None,
                 text: dict[str, Any] | None = None, inference: dict[str, Any] | None = None,
                 sources: dict[str, Any] | None = None, **kwargs: Any):
        self.format_version = format_version
        self.base_model = base_model
        self.members = list(members or [])
        self.merge = dict(merge or {})
        self.text = dict(text or {})
        self.inference = dict(inference or {})
        self.sources = dict(sources or {})
        kwargs.setdefault("architectures", [ARCHITECTURE])
        super().__init__(**kwargs)

    @property
    def member_names(self) -> list[str]:
        return [m["name"] for m in self.members]

    def fuse_dict(self) -> dict[str, Any]:
        """The ``fuse_config.json`` content (no transformers bookkeeping)."""
        return {k: getattr(self, k) for k in CONFIG_FIELDS}
