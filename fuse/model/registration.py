"""Registering ``visionfuse`` with transformers' Auto classes, without making ``import fuse`` slow.

``register()`` adds ``FusedConfig`` to ``AutoConfig`` and ``FusedModel`` to ``AutoModel``
(no ``trust_remote_code`` involved). ``import fuse`` calls :func:`install`, which registers at
once if transformers' auto modules are already imported and otherwise adds a tiny import hook
that registers right after transformers imports them. So after ``import fuse``::

    AutoConfig.from_pretrained("out/fused")      # -> FusedConfig
    AutoModel.from_pretrained("out/fused")       # -> FusedModel
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

_CONFIG_MODULE = "transformers.models.auto.configuration_auto"
_MODEL_MODULE = "transformers.models.auto.modeling_auto"
_done: set[str] = set()


def register_config() -> None:
    if "config" in _done:
        return
    from transformers.models.auto.configuration_auto import AutoConfig

    from .config import FusedConfig

    AutoConfig.register(FusedConfig.model_type, FusedConfig, exist_ok=True)
    _done.add("config")


def _loader_class() -> type:
    """A stand-in for ``FusedModel`` registered with ``AutoModel`` while transformers is still importing
    (the real class cannot be imported then); its ``from_pretrained`` delegates to ``FusedModel``."""
    from .config import FusedConfig

    class FusedModelLoader:
        config_class = FusedConfig

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            from .fused import FusedModel

            register_model()
            return FusedModel.from_pretrained(*args, **kwargs)

        @classmethod
        def from_config(cls, *args, **kwargs):
            from ..errors import FuseError

            raise FuseError("a fused model cannot be built from its config alone; "
                            "use AutoModel.from_pretrained(DIR)")

        _from_config = from_config

    return FusedModelLoader


def _register_loader() -> None:
    """AutoModel registration that imports nothing heavy (safe inside transformers' own import)."""
    if "model" in _done or "loader" in _done:
        return
    register_config()
    from transformers.models.auto.modeling_auto import AutoModel

    loader = _loader_class()
    AutoModel.register(loader.config_class, loader, exist_ok=True)
    _done.add("loader")


def register_model() -> None:
    """Register the real ``FusedModel`` class with ``AutoModel``."""
    if "model" in _done:
        return
    register_config()
    from transformers.models.auto.modeling_auto import AutoModel

    from .config import FusedConfig
    from .fused import FusedModel

    AutoModel.register(FusedConfig, FusedModel, exist_ok=True)
    _done.add("model")


def register() -> None:
    """Register config and model with the Auto classes (idempotent)."""
    register_config()
    register_model()


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs our registration right after transformers' auto modules finish importing."""

    targets = {_CONFIG_MODULE: lambda: register_config(), _MODEL_MODULE: lambda: _register_loader()}

    def find_spec(self, name, path, target=None):
        if name not in self.targets:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _Loader(spec.loader, self.targets[name])
                return spec
        return None


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, after):
        self.inner, self.after = inner, after

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        try:
            self.after()
        except Exception as e:  # never break importing transformers itself
            warnings.warn(f"fuse: could not register the visionfuse model type with transformers ({e})")

    def __getattr__(self, item):
        return getattr(self.inner, item)


def install() -> None:
    """Register now if transformers' auto modules are loaded, else when they get imported."""
    pending = False
    if _CONFIG_MODULE in sys.modules:
        register_config()
    else:
        pending = True
    if _MODEL_MODULE in sys.modules:
        _register_loader()
    else:
        pending = True
    if pending and not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
