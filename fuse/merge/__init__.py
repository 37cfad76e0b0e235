"""Training-free merge of a same-family MLLM set (VisionFuse), backed by mergekit's methods.

Output layout written by :func:`run_merge` (atomically: a temp dir renamed into place):

- ``OUT/llm/``: the merged LLM, a standalone ``LlamaForCausalLM`` checkpoint (config, shards,
  tokenizer of the text member, generation_config with the union of the members' eos ids);
- ``OUT/members/<name>/``: each member's vision branch (``Member.save_vision_branch``);
- ``OUT/fuse_config.json`` and ``OUT/config.json`` (``model_type: visionfuse``); ``OUT/README.md``.

Modules: ``methods`` (mergekit adapter), ``kernels`` (mergekit's element-wise formulas in reused
buffers), ``sources`` (open inputs), ``family`` (checks + distance report), ``plan`` (tensor plan,
bytes, memory), ``writer`` (streaming shards), ``checksums``, ``outputs`` (small files), ``run``
(the driver), ``export`` (an LLM part as a plain HF checkpoint).

The names below are imported on first access, so ``fuse.merge.checksums`` (which ``fuse merge``
starts before torch is loaded) does not pull torch in.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "MAX_DISTANCE": "family", "FamilyReport": "family", "check_family": "family",
    "MERGE_METHODS": "methods", "MergeError": "methods", "TensorMerger": "methods", "method_info": "methods",
    "MergePlan": "plan", "build_plan": "plan",
    "MergeResult": "run", "check_alignment": "run", "check_recipe": "run", "open_family": "run", "run_merge": "run",
    "validate_recipe": "validate",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'fuse.merge' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
