"""``fuse toyworld train-family`` and ``fuse toyworld compare`` (the shipped toy family, :mod:`fuse.toyfamily`)."""

from __future__ import annotations

import time

import click


def register(group: click.Group) -> None:
    toyworld = group.commands.get("toyworld")
    if not isinstance(toyworld, click.Group):  # fuse.commands.eval not present: own group

        @group.group("toyworld")
        def toyworld() -> None:
            """Synthetic world with separable vision skills (colour vs spatial detail)."""

    @toyworld.command("compare")
    @click.option("-o", "--output", "out", type=click.Path(file_okay=False), default="out/toy_compare",
                  show_default=True, help="Work dir: test split, fused models, compare.json.")
    @click.option("--family", type=click.Path(file_okay=False), default=None,
                  help="Toy family dir (default: the one shipped in fuse/assets/toy_family).")
    @click.option("--limit", type=click.IntRange(min=2), default=None,
                  help="Questions per part (vqa, pope, mmvp) [default: 160].")
    @click.option("--all", "all_questions", is_flag=True, help="Evaluate every test question (slower).")
    @click.option("--methods", default="task_arithmetic,ties,linear", show_default=True,
                  help="Comma-separated merge methods.")
    @click.option("--budget", default="pool:2", show_default=True,
                  help="Token budget of the extra task_arithmetic row ('none' to skip).")
    @click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
    @click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
                  help="Also write the table JSON here (always written to OUT/compare.json).")
    @click.option("--force", is_flag=True, help="Replace OUT if an earlier `compare` wrote it.")
    def compare_cmd(out, family, limit, all_questions, methods, budget, batch_size, json_path, force):
        """Merge the toy family (task_arithmetic, ties, linear), then evaluate each member alone, the fused
        models, the fused model with a token budget, and the COMM model on the toy test split.

        Prints one row per model: per-skill VQA accuracy, overall VQA, POPE accuracy, MMVP pair
        accuracy and samples/s; writes OUT/compare.json.
        """
        from ..errors import FuseError
        from ..eval.runner import write_results
        from ..toyfamily import ASSETS, DEFAULT_LIMIT, compare

        fam = family or ASSETS
        from pathlib import Path

        if not (Path(fam) / "figures.json").is_file():
            raise FuseError(f"{fam}: not a toy family (no figures.json); train one with "
                            "`fuse toyworld train-family --out DIR`")
        ms = [m.strip() for m in methods.split(",") if m.strip()]
        from ..merge import MERGE_METHODS

        bad = [m for m in ms if m not in MERGE_METHODS]
        if bad or not ms:
            raise FuseError(f"--methods: {', '.join(bad) or '(empty)'} not among {', '.join(MERGE_METHODS)}")
        t0 = time.perf_counter()
        doc = compare(out, family=fam, limit=None if all_questions else (limit or DEFAULT_LIMIT), methods=ms,
                      budget=None if budget.lower() == "none" else budget, batch_size=batch_size, echo=click.echo,
                      force=force)
        if json_path:
            write_results(doc, json_path)
        n = "all" if all_questions else (limit or DEFAULT_LIMIT)
        click.echo(f"{n} questions per part (vqa, pope, mmvp); wrote {Path(out) / 'compare.json'} "
                   f"in {time.perf_counter() - t0:.1f} s")

    @toyworld.command("train-family")
    @click.option("-o", "--out", "out", type=click.Path(file_okay=False), required=True)
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--keep-work", is_flag=True, help="Keep OUT/work (world, encoders, training runs).")
    @click.option("--force", is_flag=True, help="Replace OUT if an earlier `train-family` wrote it.")
    def train_family_cmd(out, seed, keep_work, force):
        """Regenerate the toy family: world, base LM, colour + spatial members, COMM model, figures.json
        (about 20-25 minutes on 2 CPU cores). OUT is written atomically (temp dir renamed at the end)."""
        from ..toyfamily import train_family

        t0 = time.perf_counter()
        figures = train_family(out, seed=seed, echo=click.echo, force=force, keep_work=keep_work)
        click.echo(f"wrote {out} in {time.perf_counter() - t0:.0f} s")
        for name, row in figures["eval"]["rows"].items():
            click.echo(f"  {name:8s} vqa={row['vqa']:.3f} mmvp_pair={row['mmvp_pair']:.3f}")
