"""``fuse merge`` / ``fuse check`` flags are generated from MergeOptions' fields and come back as one
MergeOptions (the command passes it to run_merge / check_recipe unchanged)."""

from __future__ import annotations

import dataclasses

import pytest

from fuse.merge.options import MergeOptions


@pytest.fixture()
def calls(monkeypatch):
    seen = []
    monkeypatch.setattr("fuse.merge.run.run_merge", lambda recipe, out, options, **kw: seen.append((out, options)))
    monkeypatch.setattr("fuse.merge.run.check_recipe", lambda recipe, options, **kw: seen.append((None, options)))
    return seen


def test_every_flag_sets_its_field(tmp_path, calls, run_fuse, write_recipe):
    recipe = write_recipe(tmp_path)
    res = run_fuse("merge", recipe, "-o", tmp_path / "o", "--force", "--dry-run", "--allow-foreign", "--no-checksums",
                   "-j", "3", "--kernel", "mergekit", "--offline", "--cache-dir", tmp_path / "c", "-q")
    assert res.exit_code == 0, res.output
    assert calls == [(str(tmp_path / "o"), MergeOptions(force=True, dry_run=True, allow_foreign=True, checksums=False,
                                                         threads=3, kernel="mergekit", offline=True,
                                                         cache_dir=str(tmp_path / "c"), progress=False))]


def test_no_flags_give_the_defaults_and_check_takes_its_subset(tmp_path, calls, run_fuse, write_recipe):
    recipe = write_recipe(tmp_path)
    assert run_fuse("merge", recipe, "--no-checksums").exit_code == 0
    assert calls[-1] == (None, MergeOptions(checksums=False))
    assert run_fuse("check", recipe, "--allow-foreign").exit_code == 0
    assert calls[-1] == (None, MergeOptions(allow_foreign=True))
    assert "no such option '--force'" in run_fuse("check", recipe, "--force").output.lower()
    assert run_fuse("merge", recipe, "-j", "0").exit_code == 2  # the field's range


def test_options_are_frozen_and_every_cli_field_has_help():
    with pytest.raises(dataclasses.FrozenInstanceError):
        MergeOptions().force = True
    assert all(f.metadata["cli"]["help"] for f in dataclasses.fields(MergeOptions) if "cli" in f.metadata)
