"""A fused-model directory in the ``fuse merge`` output layout, built without merging.

Stand-in for ``fuse merge`` in tests and benchmarks of the fused model: the LLM is
one member's own LLM (or any ``AutoModelForCausalLM`` directory), each member's
vision branch is saved with ``Member.save_vision_branch``, and ``fuse_config.json``
/ ``config.json`` follow the documented contract.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence


def build_fused_dir(out: str | os.PathLike, members: Sequence[Any], llm: int | str | os.PathLike = 0,
                    text_member: int = 0, inference: dict | None = None, names: Sequence[str] | None = None,
                    dtype=None) -> Path:
    """Write OUT/{llm/, members/<name>/, fuse_config.json, config.json, README.md}.

    ``members``: member dirs or loaded ``Member`` objects (visual-token order);
    ``llm``: index of the member whose LLM becomes ``OUT/llm``, or a causal-LM directory.
    """
    from transformers import AutoModelForCausalLM

    from ..fused_layout import (FORMAT_VERSION, LLM_DIR, MODEL_CARD, fused_eos_ids, member_dir, member_entry, model_card,
                                write_configs)
    from ..members import Member, load_member
    from ..names import unique_names
    from ..output_dir import atomic_output_dir

    loaded = [m if isinstance(m, Member) else load_member(m) for m in members]
    names = unique_names(names or [m.name for m in loaded])
    with atomic_output_dir(out, force=True) as tmp:
        if isinstance(llm, int):
            model = loaded[llm].llm.load_model(dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(llm), dtype=dtype, use_safetensors=True)
        model.save_pretrained(str(tmp / LLM_DIR))
        text = loaded[text_member].text
        text.tokenizer.save_pretrained(str(tmp / LLM_DIR))
        infos = []
        for n, m in zip(names, loaded):
            m.save_vision_branch(tmp / member_dir(n))
            infos.append(member_entry(n, m, str(m.path), 1.0 / len(loaded)))
        eos = fused_eos_ids([m.text.eos_token_ids for m in loaded], text_member)
        cfg = {"format_version": FORMAT_VERSION, "base_model": None, "members": infos,
               "merge": {"method": "copy" if isinstance(llm, int) else "external", "parameters": {},
                         "dtype": None, "out_dtype": None, "seed": None},
               "text": {"member": names[text_member], "prompt_style": text.prompt_style,
                        "placeholder": text.placeholder, "eos_token_ids": eos},
               "inference": dict(inference or {}), "sources": {}}
        write_configs(tmp, cfg)
        (tmp / MODEL_CARD).write_text(model_card(cfg))
    return Path(out)
