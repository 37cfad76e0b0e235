"""``fuse merge`` and ``fuse check`` (see :mod:`fuse.merge`); their flags are the fields of
:class:`~fuse.merge.options.MergeOptions`."""

from __future__ import annotations

from pathlib import Path

import click

from ..cli_utils import options_from_dataclass
from ..merge.options import MergeOptions


@click.command("merge")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", type=click.Path(file_okay=False), default=None,
              help="Output directory (default: the recipe's output.dir, relative to the recipe file).")
@options_from_dataclass(MergeOptions)
def merge_cmd(recipe: str, out: str | None, options: MergeOptions) -> None:
    """Merge the members' LLMs (mergekit methods, streamed tensor by tensor) and keep every
    member's vision branch: writes OUT/llm, OUT/members/<name>, OUT/fuse_config.json.
    Hub ids are downloaded (safetensors, configs, tokenizer files only) into the Hugging Face cache.
    Before merging, checks that the members' visual tokens are aligned (a warning, not a refusal, when not)."""
    from ..cli_utils import startup_imports
    from ..recipe import load_recipe

    with startup_imports():
        r = load_recipe(recipe)  # no torch yet: what the method and formats allow is checked by run_merge
        sums = local = None
        if options.checksums and not options.dry_run and (options.force or not Path(out or r.output.dir).exists()):
            # every model already on disk: start hashing it now, while torch and mergekit import
            from ..hub import resolve_recipe
            from ..merge.checksums import start_checksums

            local = resolve_recipe(r, local_only=True, cache_dir=options.cache_dir)
            sums = start_checksums(local) if local else None
        try:
            from ..merge.run import run_merge
        except BaseException:
            if sums is not None:
                sums.cancel()
            raise
    run_merge(r, out, options, echo=click.echo, models=local, started_checksums=sums)


@click.command("check")
@click.argument("recipe", type=click.Path(dir_okay=False))
@options_from_dataclass(MergeOptions, only=("allow_foreign", "offline", "cache_dir", "align_check", "align_images",
                                             "align_n"),
                        help={"allow_foreign": "Report far-away members as allowed instead of refused."})
def check_cmd(recipe: str, options: MergeOptions) -> None:
    """Family check of a recipe: table of member, format, vocab rows, distance to the base, verdict;
    then whether the members' visual tokens are aligned (relative to random-projector controls).
    Hub models not in the local cache are checked on configs, tokenizers and safetensors headers."""
    from ..cli_utils import startup_imports
    from ..recipe import load_recipe

    with startup_imports():
        r = load_recipe(recipe)
        from ..merge.run import check_recipe
    check_recipe(r, options, echo=click.echo)
    click.echo(f"family check passed: {len(r.members)} member(s), method {r.merge.method}")


def register(group: click.Group) -> None:
    group.add_command(merge_cmd)
    group.add_command(check_cmd)
