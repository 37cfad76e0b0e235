"""``fuse merge`` and ``fuse check`` (see :mod:`fuse.merge`)."""

from __future__ import annotations

import click

HUB_OPTIONS = [
    click.option("--offline", is_flag=True,
                 help="Use local directories and the local Hugging Face cache only (like HF_HUB_OFFLINE=1)."),
    click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                 help="Hugging Face cache for hub ids [default: HF_HUB_CACHE, else $HF_HOME/hub]."),
]


def hub_options(fn):
    for opt in reversed(HUB_OPTIONS):
        fn = opt(fn)
    return fn


@click.command("merge")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", type=click.Path(file_okay=False), default=None,
              help="Output directory (default: the recipe's output.dir, relative to the recipe file).")
@click.option("--force", is_flag=True, help="Replace an existing output directory (only once the new one is complete).")
@click.option("--dry-run", is_flag=True,
              help="Check the family, print the plan (tensors, bytes, peak memory); write nothing. Hub models are "
                   "checked on their configs, tokenizers and safetensors headers (no weights downloaded).")
@click.option("--allow-foreign", is_flag=True,
              help="Merge members whose LLM is far from the base (relative L2 distance > 0.5).")
@click.option("--no-checksums", is_flag=True, help="Skip the SHA-256 of the source files in fuse_config.json.")
@click.option("-j", "--threads", type=click.IntRange(min=1), default=None,
              help="torch threads for the merge math [default: 1 for row-chunked methods, all cores otherwise].")
@click.option("--kernel", type=click.Choice(["auto", "mergekit"]), default="auto", show_default=True,
              help="auto: mergekit's task_arithmetic/linear formula replayed in reused buffers (bit-identical, "
                   "checked against mergekit on every tensor); mergekit: call mergekit for every row chunk.")
@hub_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def merge_cmd(recipe: str, out: str | None, force: bool, dry_run: bool, allow_foreign: bool, no_checksums: bool,
              threads: int | None, kernel: str, offline: bool, cache_dir: str | None, quiet: bool) -> None:
    """Merge the members' LLMs (mergekit methods, streamed tensor by tensor) and keep every
    member's vision branch: writes OUT/llm, OUT/members/<name>, OUT/fuse_config.json.
    Hub ids are downloaded (safetensors, configs, tokenizer files only) into the Hugging Face cache."""
    from pathlib import Path

    from ..cli_utils import startup_imports
    from ..recipe import load_recipe

    with startup_imports():
        r = load_recipe(recipe)  # no torch yet: what the method and formats allow is checked by run_merge
        sums = local = None
        if not (dry_run or no_checksums) and (force or not Path(out or r.output.dir).exists()):
            # every model already on disk: start hashing it now, while torch and mergekit import
            from ..hub import resolve_recipe
            from ..merge.checksums import start_checksums

            local = resolve_recipe(r, local_only=True, cache_dir=cache_dir)
            sums = start_checksums(local) if local else None
        try:
            from ..merge.run import run_merge
        except BaseException:
            if sums is not None:
                sums.cancel()
            raise
    run_merge(r, out=out, force=force, dry_run=dry_run, allow_foreign=allow_foreign, progress=not quiet,
              checksums=sums if sums is not None else not no_checksums, echo=click.echo, threads=threads,
              kernel=kernel, offline=offline, cache_dir=cache_dir, models=local)


@click.command("check")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--allow-foreign", is_flag=True, help="Report far-away members as allowed instead of refused.")
@hub_options
def check_cmd(recipe: str, allow_foreign: bool, offline: bool, cache_dir: str | None) -> None:
    """Family check of a recipe: table of member, format, vocab rows, distance to the base, verdict.
    Hub models not in the local cache are checked on configs, tokenizers and safetensors headers."""
    from ..cli_utils import startup_imports
    from ..recipe import load_recipe

    with startup_imports():
        r = load_recipe(recipe)
        from ..merge.run import check_recipe
    check_recipe(r, allow_foreign=allow_foreign, echo=click.echo, offline=offline, cache_dir=cache_dir)
    click.echo(f"family check passed: {len(r.members)} member(s), method {r.merge.method}")


def register(group: click.Group) -> None:
    group.add_command(merge_cmd)
    group.add_command(check_cmd)
