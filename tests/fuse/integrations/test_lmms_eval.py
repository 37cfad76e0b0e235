"""lmms-eval adapter: optional import, request handling, and the model class against lmms-eval's API
(the installed lmms-eval when present, else a minimal stand-in with the same names)."""

from __future__ import annotations

import importlib
import sys
import types
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from PIL import Image

import fuse.integrations.lmms_eval as adapter
from fuse.errors import FuseError


class EchoModel:
    placeholder = "<image>"

    def __init__(self):
        self.calls = []

    def generate(self, images, prompts, max_new_tokens, **kw):
        self.calls.append((len(images), max_new_tokens, kw, list(prompts)))
        return [f"{im.getpixel((0, 0))[0]} STOP tail" for im in images]


def _requests(n: int, gen: dict, task="t", split="test"):
    docs = {i: {"img": Image.new("RGB", (4, 4), (i, 0, 0))} for i in range(n)}
    reqs = [SimpleNamespace(args=(f"Question {i}?", gen, lambda d: [d["img"]], i, task, split)) for i in range(n)]
    return reqs, {task: {split: docs}}


def test_generate_for_requests_batches_and_cuts():
    reqs, tasks = _requests(5, {"until": ["STOP"], "max_new_tokens": 7})
    model = EchoModel()
    out = adapter.generate_for_requests(model, reqs, tasks, batch_size=2)
    assert out == ["0", "1", "2", "3", "4"]
    assert [c[0] for c in model.calls] == [2, 2, 1]
    assert all(c[1] == 7 and c[2] == {} for c in model.calls)
    assert model.calls[0][3] == ["<image>\nQuestion 0?", "<image>\nQuestion 1?"]


def test_generate_for_requests_groups_by_settings_and_keeps_order():
    reqs_a, tasks = _requests(4, {"until": "STOP"})
    greedy, sampled = reqs_a[0::2], reqs_a[1::2]
    for r in sampled:
        r.args = (r.args[0], {"temperature": 0.7, "top_p": 0.9, "until": "STOP"}, *r.args[2:])
    model = EchoModel()
    out = adapter.generate_for_requests(model, reqs_a, tasks, batch_size=8, max_new_tokens=3)
    assert out == ["0", "1", "2", "3"]
    assert len(model.calls) == 2
    assert model.calls[0][2] == {} and model.calls[1][2] == {"do_sample": True, "temperature": 0.7, "top_p": 0.9}


def test_two_images_is_a_clear_error():
    reqs, tasks = _requests(1, {})
    reqs[0].args = (reqs[0].args[0], {}, lambda d: [d["img"], d["img"]], 0, "t", "test")
    with pytest.raises(FuseError, match="2 images"):
        adapter.generate_for_requests(EchoModel(), reqs, tasks)


def _fake_lmms_eval(monkeypatch):
    """Minimal modules with lmms-eval 0.7's names: lmms base, register_model, ModelManifest, MODEL_REGISTRY_V2."""

    class lmms:  # noqa: N801 - lmms-eval's name
        is_simple = True

        def __init__(self):
            self.task_dict = {}

    @dataclass(frozen=True)
    class ModelManifest:
        model_id: str
        simple_class_path: str | None = None
        chat_class_path: str | None = None

    registry: dict = {}
    manifests: dict = {}
    mods = {name: types.ModuleType(name) for name in
            ("lmms_eval", "lmms_eval.api", "lmms_eval.api.model", "lmms_eval.api.registry", "lmms_eval.models",
             "lmms_eval.models.registry_v2")}
    mods["lmms_eval.api.model"].lmms = lmms
    mods["lmms_eval.api.registry"].register_model = lambda *names: (lambda cls: [registry.__setitem__(n, cls) for n in names] and cls)
    mods["lmms_eval.models.registry_v2"].ModelManifest = ModelManifest
    mods["lmms_eval.models"].MODEL_REGISTRY_V2 = SimpleNamespace(
        register_manifest=lambda m, overwrite=False: manifests.__setitem__(m.model_id, m))
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return lmms, registry, manifests


def _reload_clean():
    """Reload the adapter from scratch (a reload keeps names defined by an earlier execution)."""
    adapter.__dict__.pop("VisionFuseLMM", None)
    return importlib.reload(adapter)


@pytest.fixture()
def with_lmms_eval(monkeypatch):
    try:
        import lmms_eval.api.model  # noqa: F401  (the real package)

        real = True
        fake = None
    except ImportError:
        real = False
        fake = _fake_lmms_eval(monkeypatch)
    mod = importlib.reload(adapter)
    yield mod, real, fake
    monkeypatch.undo()
    _reload_clean()


def test_model_class_with_lmms_eval(with_lmms_eval, monkeypatch):
    mod, real, fake = with_lmms_eval
    assert mod.HAVE_LMMS_EVAL and hasattr(mod, "VisionFuseLMM")
    from lmms_eval.api.model import lmms

    assert issubclass(mod.VisionFuseLMM, lmms) and mod.VisionFuseLMM.is_simple
    man = mod.manifest()
    assert man.model_id == "visionfuse" and man.simple_class_path == mod.CLASS_PATH
    module_name, cls_name = man.simple_class_path.rsplit(".", 1)
    assert getattr(importlib.import_module(module_name), cls_name).__name__ == "VisionFuseLMM"
    assert mod.register() == "visionfuse"
    if fake is not None:
        _, registry, manifests = fake
        assert registry["visionfuse"] is mod.VisionFuseLMM and manifests["visionfuse"] == man

    stub = EchoModel()
    monkeypatch.setattr("fuse.eval.loader.load_for_eval", lambda *a, **k: stub)
    lm = mod.VisionFuseLMM(pretrained="some/dir", batch_size="2", max_new_tokens="5")
    reqs, tasks = _requests(3, {"until": ["STOP"]})
    lm.task_dict = tasks
    assert lm.generate_until(reqs) == ["0", "1", "2"]
    assert [c[0] for c in stub.calls] == [2, 1] and stub.calls[0][1] == 5
    with pytest.raises(NotImplementedError, match="loglikelihood is not supported"):
        lm.loglikelihood(reqs)


def test_without_lmms_eval_the_module_imports_and_explains(monkeypatch):
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # makes `import lmms_eval` fail
    monkeypatch.setitem(sys.modules, "lmms_eval.api", None)
    monkeypatch.setitem(sys.modules, "lmms_eval.api.model", None)
    mod = _reload_clean()
    try:
        assert not mod.HAVE_LMMS_EVAL and not hasattr(mod, "VisionFuseLMM")
        with pytest.raises(FuseError, match="lmms-eval is not installed"):
            mod.manifest()
    finally:
        monkeypatch.undo()
        _reload_clean()
