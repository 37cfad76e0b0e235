"""``fuse merge`` and ``fuse check`` (see :mod:`fuse.merge`)."""

from __future__ import annotations

import click


@click.command("merge")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", type=click.Path(file_okay=False), default=None,
              help="Output directory (default: the recipe's output.dir, relative to the recipe file).")
@click.option("--force", is_flag=True, help="Replace an existing output directory (only once the new one is complete).")
@click.option("--dry-run", is_flag=True,
              help="Check the family, print the plan (tensors, bytes, peak memory); write nothing.")
@click.option("--allow-foreign", is_flag=True,
              help="Merge members whose LLM is far from the base (relative L2 distance > 0.5).")
@click.option("--no-checksums", is_flag=True, help="Skip the SHA-256 of the source files in fuse_config.json.")
@click.option("-j", "--threads", type=click.IntRange(min=1), default=None,
              help="torch threads for the merge math [default: 1 for row-chunked methods, all cores otherwise].")
@click.option("--kernel", type=click.Choice(["auto", "mergekit"]), default="auto", show_default=True,
              help="auto: mergekit's task_arithmetic/linear formula replayed in reused buffers (bit-identical, "
                   "checked against mergekit on every tensor); mergekit: call mergekit for every row chunk.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def merge_cmd(recipe: str, out: str | None, force: bool, dry_run: bool, allow_foreign: bool, no_checksums: bool,
              threads: int | None, kernel: str, quiet: bool) -> None:
    """Merge the members' LLMs (mergekit methods, streamed tensor by tensor) and keep every
    member's vision branch: writes OUT/llm, OUT/members/<name>, OUT/fuse_config.json."""
    from ..merge import run_merge
    from ..recipe import load_recipe

    r = load_recipe(recipe)
    run_merge(r, out=out, force=force, dry_run=dry_run, allow_foreign=allow_foreign, progress=not quiet,
              checksums=not no_checksums, echo=click.echo, threads=threads, kernel=kernel)


@click.command("check")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--allow-foreign", is_flag=True, help="Report far-away members as allowed instead of refused.")
def check_cmd(recipe: str, allow_foreign: bool) -> None:
    """Family check of a recipe: table of member, format, vocab rows, distance to the base, verdict."""
    from ..merge import check_recipe
    from ..recipe import load_recipe

    r = load_recipe(recipe)
    check_recipe(r, allow_foreign=allow_foreign, echo=click.echo)
    click.echo(f"family check passed: {len(r.members)} member(s), method {r.merge.method}")


def register(group: click.Group) -> None:
    group.add_command(merge_cmd)
    group.add_command(check_cmd)
