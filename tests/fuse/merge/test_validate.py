"""What a recipe must meet to be merged beyond its schema: names from the registries, the method's rules
from mergekit's own specs; one line naming the file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuse.members import FORMATS
from fuse.merge.methods import MERGE_METHODS, MergeParameterError, method_info
from fuse.merge.validate import validate_recipe
from fuse.recipe import load_recipe, parse_recipe


def load_and_validate(path: Path):
    return validate_recipe(load_recipe(path))


@pytest.mark.parametrize("body, expected", [
    ("merge: {method: foo}", "merge.method: 'foo' is not one of " + ", ".join(MERGE_METHODS)),
    ("merge: {method: ties}", None),  # fine with a base (checked below without)
    ("members: [{model: a, format: gguf}]", "members[0].format: 'gguf' is not one of auto, " + ", ".join(FORMATS)),
    ("merge: {parameters: {normalise: true}}", "merge.parameters.normalise: unknown parameter for task_arithmetic"),
    ("merge: {parameters: {weight: 1}}", "merge.parameters.weight: set per member"),
    ("merge: {parameters: {lambda: lots}}", "merge.parameters.lambda: expected a float"),
    ("inference: {token_budget: squash}", "inference.token_budget: unknown token budget 'squash'"),
])
def test_field_errors(tmp_path, body, expected, recipe_error):
    head = "base_model: base\n" + ("" if body.startswith("members") else "members: [{model: a}, {model: b}]\n")
    msg = recipe_error(tmp_path, head + body + "\n", load_and_validate)
    assert msg is None if expected is None else msg.startswith(expected), msg


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "dare_linear"])
def test_base_required_except_linear(tmp_path, method, recipe_error):
    msg = recipe_error(tmp_path, f"members: [{{model: a}}]\nmerge: {{method: {method}}}\n", load_and_validate)
    assert msg.startswith(f"base_model: required for merge.method '{method}'")
    r = validate_recipe(parse_recipe({"members": [{"model": "a"}], "merge": {"method": "linear"}}))
    assert r.base_model is None


def test_density_only_for_methods_that_use_it(tmp_path, recipe_error):
    msg = recipe_error(tmp_path, "members: [{model: a, density: 0.5}]\nmerge: {method: linear}\n", load_and_validate)
    assert msg.startswith("members[0].density: not used by merge.method 'linear'")


def test_parameter_errors_are_typed():
    """The method layer says which parameter and why; the recipe layer adds file and field path."""
    with pytest.raises(MergeParameterError) as e:
        method_info("ties").validate_parameters({"int8_mask": "maybe"})
    assert (e.value.parameter, e.value.reason) == ("int8_mask", "expected a bool, got 'maybe'")
    assert method_info("ties").validate_parameters({"int8_mask": True, "normalize": False}) == \
        {"int8_mask": True, "normalize": False}
