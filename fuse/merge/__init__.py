"""Training-free merge of a same-family MLLM set (VisionFuse), backed by mergekit's methods.

Output layout written by :func:`run_merge` (atomically: a temp dir renamed into place):

- ``OUT/llm/``: the merged LLM, a standalone ``LlamaForCausalLM`` checkpoint (config, shards,
  tokenizer of the text member, generation_config with the union of the members' eos ids);
- ``OUT/members/<name>/``: each member's vision branch (``Member.save_vision_branch``);
- ``OUT/fuse_config.json`` and ``OUT/config.json`` (``model_type: visionfuse``); ``OUT/README.md``.

Modules: ``methods`` (mergekit adapter), ``sources`` (open inputs), ``family`` (checks +
distance report), ``plan`` (tensor plan, bytes, memory), ``writer`` (streaming shards),
``checksums``, ``outputs`` (small files), ``run`` (the driver), ``export`` (an LLM part as a
plain HF checkpoint).
"""

from .family import MAX_DISTANCE, FamilyReport, check_family
from .methods import MERGE_METHODS, MergeError, TensorMerger, method_info
from .plan import MergePlan, build_plan
from .run import AlignCheck, MergeResult, check_alignment, check_recipe, prepare, run_merge

__all__ = ["MAX_DISTANCE", "MERGE_METHODS", "AlignCheck", "FamilyReport", "MergeError", "MergePlan", "MergeResult",
           "TensorMerger", "build_plan", "check_alignment", "check_family", "check_recipe", "method_info", "prepare", "run_merge"]
