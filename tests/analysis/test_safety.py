"""Reports never cost the user a file, and odd inputs are skipped or refused in one line."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from click.testing import CliRunner

from analysis.cli import main
from fuse.testing import png_bomb


def _align(recipe: Path, images: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["align", str(recipe), "--images", str(images), "-o", str(out), "-q",
                                     "--workers", "0", "--control", "none", *extra])


def test_a_225_megapixel_png_is_skipped_and_counted(family, square_images, tmp_path, recipe_writer, report_checker):
    recipe = recipe_writer(tmp_path / "r.yaml", [family["hf1"], family["hf2"]], family["base"])
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for f in sorted(square_images.iterdir())[:2]:
        shutil.copy(f, imgs / f.name)
    png_bomb(imgs / "huge.png")
    r = _align(recipe, imgs, tmp_path / "rep")
    assert r.exit_code == 0, r.output
    assert "1 unreadable image(s) skipped" in r.output
    nums = report_checker(tmp_path / "rep")
    assert nums["images"]["skipped"] == 1 and nums["images"]["done"] == 2
    assert "huge.png: image too large to decode safely" in (tmp_path / "rep" / "report.md").read_text()


def test_force_replaces_only_a_report_dir(family, square_images, tmp_path, recipe_writer, one_error):
    recipe = recipe_writer(tmp_path / "r.yaml", [family["hf1"], family["hf2"]], family["base"])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("mine")
    assert "exists and was not written by this toolkit" in one_error(_align(recipe, square_images, mine, "--force"))
    assert [p.name for p in mine.iterdir()] == ["notes.md"]
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    assert "exists and is a symlink" in one_error(_align(recipe, square_images, loop, "--force"))
    assert os.readlink(loop) == "loop" and sorted(p.name for p in tmp_path.iterdir()) == ["loop", "mine", "r.yaml"]


def test_read_only_parent_and_seed_out_of_range(family, square_images, tmp_path, recipe_writer, read_only_dir,
                                                one_error):
    recipe = recipe_writer(tmp_path / "r.yaml", [family["hf1"], family["hf2"]], family["base"])
    with read_only_dir(tmp_path / "ro"):
        assert f"cannot write in {tmp_path / 'ro'}" in one_error(_align(recipe, square_images, tmp_path / "ro" / "r"))
    r = _align(recipe, square_images, tmp_path / "rep", "--seed", str(10 ** 29))
    assert r.exit_code == 2 and "Invalid value for '--seed'" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "rep").exists()


def test_a_report_never_replaces_what_it_reads(family, square_images, tmp_path, one_error):
    """--force may replace an earlier output of this toolkit, but not the fused model the report reads."""
    from fuse.testing.fused import build_fused_dir

    fused = build_fused_dir(tmp_path / "fused", [family["hf1"], family["hf2"]])
    before = sorted(str(p.relative_to(fused)) for p in fused.rglob("*"))
    msg = one_error(_align(fused, square_images, fused, "--force"))
    assert f"output overlaps the input SOURCE ({fused})" in msg
    assert sorted(str(p.relative_to(fused)) for p in fused.rglob("*")) == before
