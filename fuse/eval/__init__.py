"""Evaluation harness: MMVP, POPE, VQA and the toy world, on any model with ``generate``.

>>> from fuse.eval import evaluate, load_for_eval
>>> model = load_for_eval("out/fused")                    # fused dir, member dir or COMM checkpoint
>>> results = evaluate(model, "mmvp", "data/MMVP")         # {"task", "metrics", "n", "config", "timing", ...}

- :mod:`fuse.eval.tasks`: task registry ``TASKS`` (loaders + scorers, data validation)
- :mod:`fuse.eval.metrics`: metric formulas on parsed answers
- :mod:`fuse.eval.answers`: answer parsing/normalisation
- :mod:`fuse.eval.prompts`: prompt templates (shared with the toy world's training data)
- :mod:`fuse.eval.runner`: batched generation, results JSON
- :mod:`fuse.eval.loader`: ``load_for_eval`` (fused dir / member / COMM)
"""

from .loader import load_for_eval
from .runner import EvalConfig, GenerativeModel, evaluate, format_summary, generate_all, write_results
from .tasks import TASKS, Sample, Scored, Task, load_samples, task_parts

__all__ = ["TASKS", "EvalConfig", "GenerativeModel", "Sample", "Scored", "Task", "evaluate", "format_summary",
           "generate_all", "load_for_eval", "load_samples", "task_parts", "write_results"]
