"""Fusion modules: multi-layer, multi-encoder features -> visual tokens in the LLM input space.

One registry (``FUSIONS``: name -> module class) holds COMM's fusion, the LLaVA-1.5 baseline, COMM's
analysis variants and the MMVP / Prismatic mixtures (:mod:`fuse.fusions.modules`); projectors
(LLaVA's ``mm_projector_type``) are a registry of their own (:mod:`fuse.fusions.projectors`).

Both sides use this package: ``train`` builds and trains the modules, ``fuse`` runs them inside a
trained model's vision branch (a ``comm`` member) and in the LLaVA/MGM branches' projectors, so a
trained model runs the very same code at inference. Adding a variant is one ``@register_fusion`` class.
"""

from __future__ import annotations

from .modules import (FUSIONS, Fusion, FusionSpec, build_fusion, fusion_class, layers_note, make_spec,
                      register_fusion)
from .projectors import build_projector

__all__ = ["FUSIONS", "Fusion", "FusionSpec", "build_fusion", "build_projector", "fusion_class", "layers_note",
           "make_spec", "register_fusion"]
