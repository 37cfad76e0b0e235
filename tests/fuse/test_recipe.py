"""Recipe schema: defaults, relative paths, and one-line errors that name the file and field."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fuse.errors import RecipeError
from fuse.recipe import load_recipe


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_defaults_and_names(tmp_path):
    (tmp_path / "m").mkdir()
    r = load_recipe(write(tmp_path, """
        base_model: base
        members:
          - model: m
          - model: other/m
          - model: x/m
            name: mine
          - model: m
    """))
    assert r.merge.method == "task_arithmetic" and r.merge.dtype == "float32" and r.merge.out_dtype is None
    assert r.merge.seed == 0 and r.merge.parameters == {} and r.inference == {}
    assert r.weights() == [0.25] * 4
    assert r.member_names() == ["m", "m-2", "mine", "m-3"]
    assert r.text_member_index() == 0
    assert r.output.max_shard_size == "5GB"


def test_relative_paths_resolve_against_recipe_dir(tmp_path, monkeypatch):
    sub = tmp_path / "recipes"
    (sub / "ckpt" / "a").mkdir(parents=True)
    p = write(sub, """
        base_model: ./ckpt/base-missing
        members:
          - {model: ckpt/a, weight: 0.7}
          - {model: YanweiLi/MGM-8B, format: mgm}
        output: {dir: out/fused, max_shard_size: 100MB}
        text: {member: MGM-8B, extra_eos_ids: [7]}
        inference: {token_budget: "topk:64", positions: {MGM-8B: share}}
    """)
    monkeypatch.chdir(tmp_path.parent)
    r = load_recipe(p)
    assert Path(r.members[0].model) == (sub / "ckpt" / "a").resolve()
    assert r.members[1].model == "YanweiLi/MGM-8B"  # not a local path: kept as a hub id
    assert Path(r.base_model) == (sub / "ckpt" / "base-missing").resolve()  # ./ = a path, even if missing
    assert Path(r.output.dir) == (sub / "out" / "fused").resolve()
    assert r.weights() == [0.7, 0.5]
    assert r.text_member_index() == 1 and r.text.extra_eos_ids == [7]
    assert r.inference == {"token_budget": "topk:64", "positions": {"MGM-8B": "share"}}  # kept as written


@pytest.mark.parametrize("body, expected", [
    ("merge: {method: ties}", None),  # the method's own rules are fuse.merge.validate's (tests/fuse/merge)
    ("members: [{model: a, wieght: 2}]", "members[0].wieght: unknown field"),
    ("members: [{model: a, density: 1.5}]", "members[0].density: must be in (0, 1], got 1.5"),
    ("members: [{model: a, weight: heavy}]", "members[0].weight: "),
    ("members: []", "members: needs at least one entry"),
    ("merge: {dtype: int8}", "merge.dtype: 'int8' is not one of float32, float16, bfloat16, float64"),
    ("output: {max_shard_size: huge}", "output.max_shard_size: 'huge' is not a size"),
    ("text: {member: nobody}", "text.member: 'nobody' is not a member name (members: a, b)"),
    ("members: [{model: a, name: x}, {model: b, name: x}]", "members[1].name: 'x' is used by two members"),
    ("members: [{model: a, name: 'a/b'}]", "members[0].name: "),
    ("surprise: 1", "surprise: unknown field"),
])
def test_field_errors(tmp_path, body, expected, recipe_error):
    head = "base_model: base\n" + ("" if body.startswith("members") else "members: [{model: a}, {model: b}]\n")
    msg = recipe_error(tmp_path, head + body + "\n", load_recipe)
    assert msg is None if expected is None else msg.startswith(expected), msg


def test_reading_a_recipe_imports_no_torch(tmp_path):
    """`fuse merge` reads the recipe and starts hashing local inputs before torch is imported."""
    code = ("import sys; from fuse.recipe import load_recipe; "
            f"load_recipe({str(Path(__file__).parents[2] / 'recipes' / 'minigemini_slime.yaml')!r}); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_file_level_errors(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")
    p = write(tmp_path, "members: [model: a\n")
    with pytest.raises(RecipeError, match=r"recipe.yaml: invalid YAML at line \d"):
        load_recipe(p)
    p = write(tmp_path, "- just\n- a list\n")
    with pytest.raises(RecipeError, match="expected a mapping"):
        load_recipe(p)
    p = write(tmp_path, "base_model: b\n")
    with pytest.raises(RecipeError, match="recipe.yaml: members: required field is missing"):
        load_recipe(p)


def test_example_recipe_validates():
    r = load_recipe(Path(__file__).parents[2] / "recipes" / "llava_tiny.yaml")
    assert r.merge.method == "task_arithmetic" and len(r.members) == 2
