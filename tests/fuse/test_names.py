"""One member-naming scheme: given names kept, collisions get -2, -3, ... (recipes, from_members, builders)."""

from __future__ import annotations

from fuse.names import derive_member_name, unique_names
from fuse.recipe import parse_recipe


def test_unique_names_suffixes_repeats_and_avoids_reserved():
    assert unique_names(["a", "b", "a", "a"]) == ["a", "b", "a-2", "a-3"]
    assert unique_names(["a", "a"], reserved=["a-2"]) == ["a", "a-3"]
    assert unique_names(["a-2", "a", "a"]) == ["a-2", "a", "a-3"]
    assert unique_names([]) == []


def test_recipe_names_follow_the_same_scheme():
    r = parse_recipe({"base_model": "b", "members": [{"model": "x/m"}, {"model": "y/m"}, {"model": "z", "name": "m-3"},
                                                   {"model": "m"}]})
    assert r.member_names() == ["m", "m-2", "m-3", "m-4"]
    assert derive_member_name("org/My Model!") == "My_Model_" and derive_member_name("..") not in ("", "..")
