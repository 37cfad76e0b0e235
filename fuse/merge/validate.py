"""What a recipe must meet to be merged, beyond its schema (:mod:`fuse.recipe`).

The schema knows fields and types; the names and rules here come from where they are defined: merge
methods and their parameters from :data:`fuse.merge.methods.MERGE_METHODS` (mergekit's own specs),
member formats from :data:`fuse.members.registry.FORMATS`, inference options from
:mod:`fuse.model.options`. ``fuse check`` and ``fuse merge`` run :func:`validate_recipe` before anything
else, so a recipe that cannot be merged fails before any file is read.
"""

from __future__ import annotations

from ..errors import RecipeError
from ..members.registry import FORMATS
from ..model.options import InferenceOptions
from ..recipe import Recipe
from .methods import MERGE_METHODS, MergeParameterError, method_info


def validate_recipe(recipe: Recipe) -> Recipe:
    """Method name, base requirement, per-member parameters, method parameters, member formats and the
    inference section. Raises :class:`~fuse.errors.RecipeError` naming the file and field."""
    method = recipe.merge.method
    if method not in MERGE_METHODS:
        raise recipe.error("merge.method", f"{method!r} is not one of {', '.join(MERGE_METHODS)}")
    for i, m in enumerate(recipe.members):
        if m.format != "auto" and m.format not in FORMATS:
            raise recipe.error(f"members[{i}].format", f"{m.format!r} is not one of auto, {', '.join(FORMATS)}")
    info = method_info(method)
    if info.needs_base and not recipe.base_model:
        raise recipe.error("base_model", f"required for merge.method {method!r} (only 'linear' merges without a base)")
    for i, m in enumerate(recipe.members):
        if m.density is not None and "density" not in info.member_parameters():
            raise recipe.error(f"members[{i}].density", f"not used by merge.method {method!r} "
                               "(ties, dare_ties, dare_linear use it)")
    try:
        info.validate_parameters(recipe.merge.parameters)
    except MergeParameterError as e:
        raise recipe.error(f"merge.parameters.{e.parameter}", e.reason) from None
    try:  # checked now, not first at `fuse generate` after the whole merge
        InferenceOptions.parse(recipe.inference, recipe.member_names())
    except RecipeError as e:
        raise RecipeError(f"{recipe.label}: {e}") from None
    return recipe


__all__ = ["validate_recipe"]
