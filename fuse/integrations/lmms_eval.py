"""lmms-eval model adapter: evaluate fused models (and single members, COMM models) with lmms-eval.

lmms-eval is optional: this module imports without it, and the model class
exists only when it is installed. Registration, any of:

- entry point (lmms-eval >= 0.7 reads the ``lmms_eval.models`` group)::

      [project.entry-points."lmms_eval.models"]
      visionfuse = "fuse.integrations.lmms_eval:manifest"

  then ``python -m lmms_eval --model visionfuse --model_args pretrained=out/fused --tasks mmvp,pope``;
- in Python: ``from fuse.integrations.lmms_eval import register; register()``, then
  ``lmms_eval.evaluator.simple_evaluate(model="visionfuse", model_args="pretrained=out/fused", ...)``;
- or pass an instance: ``simple_evaluate(model=VisionFuseLMM(pretrained="out/fused"), tasks=[...])``.

The model is a *simple* (non-chat) lmms-eval model: each request's context becomes
the user text (the image placeholder is prepended when missing), the model applies
its own chat template. ``generate_until`` is implemented (batched, grouped by
generation settings, ``until`` stop strings applied); ``loglikelihood`` and
multi-round generation are not.
"""

from __future__ import annotations

import json
import warnings
from typing import Any, Sequence

from ..errors import FuseError
from ..eval.prompts import with_placeholder
from ..eval.runner import placeholder_of

MODEL_ID = "visionfuse"
CLASS_PATH = "fuse.integrations.lmms_eval.VisionFuseLMM"

try:  # optional dependency
    from lmms_eval.api.model import lmms as _LMMSBase
except ImportError:  # pragma: no cover - depends on the environment
    _LMMSBase = None

HAVE_LMMS_EVAL = _LMMSBase is not None


def _require() -> None:
    if not HAVE_LMMS_EVAL:
        raise FuseError("lmms-eval is not installed: `pip install lmms-eval` to use the visionfuse lmms-eval model")


def manifest():
    """The ``ModelManifest`` lmms-eval's ``lmms_eval.models`` entry point group expects."""
    _require()
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


def register() -> str:
    """Make ``--model visionfuse`` known to the running lmms-eval (no entry point needed); returns the name."""
    _require()
    import lmms_eval.models as models

    registry = getattr(models, "MODEL_REGISTRY_V2", None)
    if registry is not None:  # lmms-eval >= 0.7
        registry.register_manifest(manifest(), overwrite=True)
    else:  # older releases map names to class paths
        models.AVAILABLE_MODELS[MODEL_ID] = CLASS_PATH
    return MODEL_ID


# --- request handling (pure: testable without lmms-eval) ---------------------------------------------------

def _flatten(visuals: Any) -> list:
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    out: list = []
    for v in visuals:
        out.extend(_flatten(v))
    return out


def _cut(text: str, until: Sequence[str]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text.strip()


def _generation_settings(gen_kwargs: dict, default_max_new_tokens: int) -> tuple[list[str], dict]:
    """lmms-eval generation kwargs -> (stop strings, kwargs for ``model.generate``)."""
    kw = dict(gen_kwargs or {})
    until = kw.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    out: dict[str, Any] = {"max_new_tokens": int(kw.pop("max_new_tokens", default_max_new_tokens))}
    temperature = float(kw.pop("temperature", 0) or 0)
    do_sample = bool(kw.pop("do_sample", temperature > 0))
    if do_sample:
        out.update(do_sample=True, temperature=temperature or 1.0)
        if kw.get("top_p") is not None:
            out["top_p"] = float(kw.pop("top_p"))
    return until, out


def generate_for_requests(model: Any, requests: Sequence[Any], task_dict: dict, batch_size: int = 1,
                          max_new_tokens: int = 128) -> list[str]:
    """Answers for lmms-eval ``generate_until`` requests (simple-model argument layout:
    ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``), in request order.

    Requests with identical generation settings are batched together; each needs exactly one image.
    """
    args = [r.args for r in requests]
    groups: dict[str, list[int]] = {}
    for i, a in enumerate(args):
        groups.setdefault(json.dumps(a[1] or {}, sort_keys=True, default=str), []).append(i)
    ph = placeholder_of(model)
    out: list[str] = [""] * len(args)
    for idxs in groups.values():
        until, gen = _generation_settings(args[idxs[0]][1], max_new_tokens)
        for start in range(0, len(idxs), max(1, int(batch_size))):
            chunk = idxs[start:start + max(1, int(batch_size))]
            images, prompts = [], []
            for i in chunk:
                context, _, doc_to_visual, doc_id, task, split = args[i]
                visuals = _flatten(doc_to_visual(task_dict[task][split][doc_id]))
                if len(visuals) != 1:
                    raise FuseError(f"visionfuse: task {task!r} doc {doc_id} has {len(visuals)} images; "
                                    "exactly one image per question is supported")
                img = visuals[0]
                if isinstance(img, str):
                    from ..images import load_image

                    img = load_image(img)
                images.append(img.convert("RGB") if getattr(img, "mode", "RGB") != "RGB" else img)
                prompts.append(with_placeholder(context, ph))
            answers = model.generate(images, prompts, **gen)
            for i, a in zip(chunk, answers):
                out[i] = _cut(a if isinstance(a, str) else str(a), until)
    return out


# --- the lmms-eval model ------------------------------------------------------------------------------------

if HAVE_LMMS_EVAL:

    class VisionFuseLMM(_LMMSBase):  # type: ignore[misc, valid-type]
        """``--model visionfuse --model_args pretrained=DIR[,batch_size=8,max_new_tokens=128,dtype=bfloat16,device=cuda]``.

        ``pretrained``: a ``fuse merge`` output, a member checkpoint or a COMM checkpoint.
        """

        is_simple = True

        def __init__(self, pretrained: str, batch_size: int | str = 1, max_new_tokens: int | str = 128,
                     device: str | None = None, dtype: str | None = None, format: str = "auto", **kwargs: Any):
            self.pretrained = str(pretrained)
            super().__init__()
            ignored = {k: v for k, v in kwargs.items() if k not in ("max_batch_size",) and v is not None}
            if ignored:
                warnings.warn(f"visionfuse: ignoring unsupported model_args {sorted(ignored)}", stacklevel=2)
            from ..dtypes import parse_dtype
            from ..eval.loader import load_for_eval

            self._model = load_for_eval(self.pretrained, format=format, dtype=parse_dtype(dtype), device=device)
            self.batch_size_per_gpu = int(batch_size)
            self.max_new_tokens = int(max_new_tokens)

        @property
        def model(self):
            return self._model

        @property
        def batch_size(self) -> int:
            return self.batch_size_per_gpu

        def generate_until(self, requests) -> list[str]:
            return generate_for_requests(self._model, requests, self.task_dict, self.batch_size_per_gpu,
                                         self.max_new_tokens)

        def loglikelihood(self, requests):
            raise NotImplementedError("visionfuse: loglikelihood is not supported; use generation tasks "
                                      "(output_type generate_until, e.g. mmvp, pope, vqav2)")

        def generate_until_multi_round(self, requests):
            raise NotImplementedError("visionfuse: multi-round generation is not supported")

    try:  # also in the legacy name registry (lmms_eval.api.registry.get_model)
        from lmms_eval.api.registry import register_model as _register_model

        _register_model(MODEL_ID)(VisionFuseLMM)
    except Exception:  # pragma: no cover - registry import pulls optional packages in some releases
        pass
