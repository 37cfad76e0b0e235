"""Helpers shared by the ``fuse`` tests: the CLI in-process, recipe files and their errors, and a
two-member tiny LLaVA family (built once per session). Checkpoint builders (and ``rewrite_weights``)
are in :mod:`fuse.testing`, shared with the benchmarks."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml


@pytest.fixture(scope="session")
def run_fuse() -> Callable[..., Any]:
    """``run_fuse(*args, env=None, catch_exceptions=True)``: the ``fuse`` CLI run in this process with click's
    ``CliRunner`` (arguments are passed through ``str``); returns click's ``Result``."""
    from click.testing import CliRunner

    from fuse.cli import main

    def run(*args: Any, env: dict[str, str] | None = None, catch_exceptions: bool = True):
        return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=catch_exceptions)

    return run


@pytest.fixture(scope="session")
def llava_pair(tmp_path_factory, tiny_base) -> dict[str, Path]:
    """``base`` (the tiny base LLM), ``a`` (llava-hf member, seed 1) and ``b`` (original LLaVA layout, seed 2).

    Shared by every test module that needs a small family: tests must not modify these directories
    (copy them first)."""
    from fuse.testing import build_llava_hf_member, build_llava_member

    root = tmp_path_factory.mktemp("llava_pair")
    return {"base": Path(tiny_base), "a": build_llava_hf_member(root / "a", tiny_base, seed=1)[0],
            "b": build_llava_member(root / "b", tiny_base, seed=2)}


@pytest.fixture(scope="session")
def write_recipe(llava_pair) -> Callable[..., Path]:
    """``write_recipe(where, members=("a", "b"), **sections)``: write a recipe YAML and return its path.

    ``where``: a directory (the recipe is ``where/recipe.yaml``) or the recipe file's path. ``members``:
    dicts (written as given), paths, or the names ``"a"``/``"b"`` of :func:`llava_pair`. ``sections``:
    top-level recipe keys, written as given; ``base_model`` defaults to the pair's base (``None`` writes no
    base) and ``output`` to ``{"dir": <recipe dir>/out}``."""

    def write(where: Path, members=("a", "b"), **sections: Any) -> Path:
        where = Path(where)
        path = where / "recipe.yaml" if where.is_dir() else where
        data = {"base_model": str(llava_pair["base"]),
                "members": [m if isinstance(m, dict) else {"model": str(llava_pair.get(m, m))} for m in members],
                "output": {"dir": str(path.parent / "out")}, **sections}
        if data["base_model"] is None:
            del data["base_model"]
        path.write_text(yaml.safe_dump(data))
        return path

    return write


@pytest.fixture(scope="session")
def recipe_error() -> Callable[..., str | None]:
    """``recipe_error(directory, text, check)``: write ``text`` (YAML, dedented) as ``directory/recipe.yaml``,
    run ``check(path)`` and return the RecipeError it raises, which must be one line starting with the file
    name, without that prefix; None when ``check`` passes."""
    from fuse.errors import RecipeError

    def run(directory: Path, text: str, check: Callable[[Path], Any]) -> str | None:
        p = Path(directory) / "recipe.yaml"
        p.write_text(textwrap.dedent(text))
        try:
            check(p)
        except RecipeError as e:
            msg = str(e)
            assert "\n" not in msg and msg.startswith(f"{p}: "), msg
            return msg[len(f"{p}: "):]
        return None

    return run

