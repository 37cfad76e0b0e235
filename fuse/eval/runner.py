"""Batched evaluation of any model that answers questions about images.

The model protocol is one method::

    generate(images: list[PIL.Image], prompts: list[str], max_new_tokens: int, **kw) -> list[str]

(prompts are user text containing the ``<image>`` placeholder once; the model
applies its own chat template). :class:`~fuse.model.FusedModel` implements it;
tests use stubs. Results follow the lmms-eval spirit: task, metrics, n, config,
timing, and a per-sample log when asked.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

from PIL import Image

from ..images import load_image
from .distributed import SINGLE, Shard
from .prompts import OPTION_LETTER, SHORT_ANSWER, with_placeholder
from .tasks import Sample, Scored, Task, load_samples, task_parts


class GenerativeModel(Protocol):
    def generate(self, images: list[Image.Image], prompts: list[str], max_new_tokens: int,
                 **kw: Any) -> list[str]: ...


@dataclass
class EvalConfig:
    """How to run: batch size, generation length, sample limit (per part), per-sample log, extra generate kwargs."""

    batch_size: int = 8
    max_new_tokens: int = 16
    limit: int | None = None
    log_samples: bool = False
    images: str | None = None
    sort_by_length: bool = True
    gen_kwargs: dict[str, Any] = field(default_factory=dict)


def placeholder_of(model: Any) -> str:
    """The image placeholder the model expects (``model.placeholder`` / ``model.text.placeholder``), default ``<image>``."""
    for holder in (model, getattr(model, "text", None)):
        ph = getattr(holder, "placeholder", None)
        if isinstance(ph, str) and ph:
            return ph
    return "<image>"


def batch_schedule(samples: Sequence[Sample], batch_size: int, sort_by_length: bool = True) -> list[list[int]]:
    """Sample indices in batches: longest prompt first (small padding, memory peaks early), ``batch_size`` each."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    order = list(range(len(samples)))
    if sort_by_length:
        order.sort(key=lambda i: -len(samples[i].prompt))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def generate_all(model: GenerativeModel, samples: Sequence[Sample], batch_size: int = 8, max_new_tokens: int = 16,
                 sort_by_length: bool = True, progress: bool = True, desc: str = "eval", shard: Shard = SINGLE,
                 visual_tokens: dict[int, int] | None = None, **gen_kwargs: Any) -> tuple[list[str], float]:
    """Answers for every sample (in the samples' order) and the seconds spent inside ``model.generate``.

    ``visual_tokens``: a dict filled with sample index -> visual tokens the model's LLM read for that answer
    over every pass (``GenerationResult.visual_tokens_read``), for models whose ``generate`` takes
    ``return_details`` (fused models); left empty for others.

    Batches follow :func:`batch_schedule`; images are decoded one batch at a time. With a ``shard`` of
    several processes, this process answers its batches of that same schedule and the
    answers of all processes are gathered (every process returns all of them; the
    seconds are summed over processes).
    """
    from tqdm.auto import tqdm

    batches = shard.take(batch_schedule(samples, batch_size, sort_by_length))
    ph = placeholder_of(model)
    outputs: dict[int, str] = {}
    read: dict[int, int] = {}
    details = visual_tokens is not None and _takes_return_details(model)
    gen_s = 0.0
    with tqdm(total=sum(map(len, batches)), desc=desc, unit="sample", disable=not (progress and shard.is_main),
              leave=False) as bar:
        for idx in batches:
            images = [load_image(samples[i].image) for i in idx]
            prompts = [with_placeholder(samples[i].prompt, ph) for i in idx]
            t0 = time.perf_counter()
            answers = model.generate(images, prompts, max_new_tokens=max_new_tokens,
                                     **({"return_details": True} if details else {}), **gen_kwargs)
            gen_s += time.perf_counter() - t0
            if details:
                if answers.visual_tokens_read is not None:
                    read.update(zip(idx, answers.visual_tokens_read))
                answers = answers.texts
            if not isinstance(answers, (list, tuple)) or len(answers) != len(idx):
                got = len(answers) if isinstance(answers, (list, tuple)) else type(answers).__name__
                raise RuntimeError(f"model.generate returned {got} answers for a batch of {len(idx)}")
            for i, a in zip(idx, answers):
                outputs[i] = a if isinstance(a, str) else str(a)
            bar.update(len(idx))
    if shard.world > 1:
        parts = shard.gather((outputs, gen_s, read))
        outputs = {i: a for answered, _, _ in parts for i, a in answered.items()}
        gen_s = sum(g for _, g, _ in parts)
        read = {i: v for _, _, counted in parts for i, v in counted.items()}
    if visual_tokens is not None:
        visual_tokens.update(read)
    return [outputs.get(i) or "" for i in range(len(samples))], gen_s


def _takes_return_details(model: Any) -> bool:
    import inspect

    try:
        return "return_details" in inspect.signature(model.generate).parameters
    except (TypeError, ValueError):
        return False


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("visionfuse-toolkit", "torch", "transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def evaluate(model: GenerativeModel, task: str, data: str | os.PathLike, config: EvalConfig | None = None,
             model_name: str | None = None, progress: bool = True,
             parts: list[tuple[str, Task, Path]] | None = None,
             samples: list[list[Sample]] | None = None, shard: Shard = SINGLE) -> dict[str, Any]:
    """Run ``task`` on ``data`` and return the results dict (see module doc).

    ``parts``/``samples`` may be passed pre-loaded (the CLI validates data before loading the model).
    ``shard``: this process's place under ``accelerate launch`` (:mod:`fuse.eval.distributed`);
    every process returns the same results.
    """
    cfg = config or EvalConfig()
    parts = parts if parts is not None else task_parts(task, data)
    samples = samples if samples is not None else load_samples(parts, images=cfg.images, limit=cfg.limit)
    composite = len(parts) > 1 or parts[0][0] != task
    scored: dict[str, Scored] = {}
    gen_s = 0.0
    read: list[int] = []  # visual tokens read per answer, every part (fused models only)
    t0 = time.perf_counter()
    for (name, t, _), ss in zip(parts, samples):
        counted: dict[int, int] = {}
        outs, g = generate_all(model, ss, cfg.batch_size, cfg.max_new_tokens, cfg.sort_by_length, progress,
                               desc=f"{task}:{name}" if composite else task, shard=shard, visual_tokens=counted,
                               **cfg.gen_kwargs)
        read.extend(counted.values())
        gen_s += g
        scored[name] = t.score(ss, outs)
    wall = time.perf_counter() - t0
    n = sum(len(s) for s in samples)
    mine = sum(len(b) for ss in samples for b in shard.take(batch_schedule(ss, cfg.batch_size, cfg.sort_by_length)))

    def pick(attr: str) -> Any:
        if composite:
            return {name: getattr(sc, attr) for name, sc in scored.items()}
        return getattr(next(iter(scored.values())), attr)

    results: dict[str, Any] = {
        "task": task,
        "model": model_name,
        "n": n,
        "metrics": pick("metrics"),
        "breakdown": pick("breakdown"),
        "primary": ({name: t.primary for name, t, _ in parts} if composite else parts[0][1].primary),
        "config": {**{k: v for k, v in asdict(cfg).items() if k != "log_samples"}, "data": str(data),
                   "parts": {name: str(p) for name, _, p in parts},
                   "prompts": {"short_answer": SHORT_ANSWER, "multiple_choice": OPTION_LETTER}},
        "timing": {"eval_s": round(wall, 4), "generate_s": round(gen_s, 4),
                   "samples_per_s": round(n / wall, 3) if wall > 0 else None,
                   "processes": shard.world, "samples_per_process": shard.gather(mine)},
        # mean visual tokens the LLM read per answer over all its passes (None: the model does not say)
        "visual_tokens_per_answer": round(sum(read) / len(read), 3) if read else None,
        "versions": _versions(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if cfg.log_samples:
        results["samples"] = pick("records")
    return results


def write_results(results: Any, path: str | os.PathLike) -> Path:
    """Write a JSON document (the results) atomically: temp file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def format_summary(results: dict[str, Any]) -> str:
    """Human-readable lines: metrics per part, per-category headline metric, throughput."""
    lines = []
    metrics, breakdown, primary = results["metrics"], results["breakdown"], results["primary"]
    if not isinstance(primary, dict):
        metrics, breakdown, primary = ({results["task"]: metrics}, {results["task"]: breakdown},
                                       {results["task"]: primary})
    for part, m in metrics.items():
        lines.append(f"{part:6s} " + "  ".join(f"{k}={_fmt(v)}" for k, v in m.items()))
        key = primary.get(part)
        for cat, cm in (breakdown.get(part) or {}).items():
            lines.append(f"       {cat:14s} {key}={_fmt(cm.get(key))}  n={cm.get('n')}")
    t = results["timing"]
    lines.append(f"{results['n']} samples in {t['eval_s']:.2f} s: {t['samples_per_s']} samples/s "
                 f"(generate {t['generate_s']:.2f} s)")
    return "\n".join(lines)
