"""``fuse toyworld compare``: the shipped toy family (:mod:`fuse.toyfamily`) merged and evaluated on a test world.

Re-training the family is ``train toy-family`` (``fuse`` never imports ``train``)."""

from __future__ import annotations

import time

import click

from ..toyfamily import BUDGET


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
    @click.option("--seed", type=int, default=None,
                  help="Test on a fresh toy world of this seed (default: the family's own test split).")
    @click.option("--limit", type=click.IntRange(min=2), default=None,
                  help="Evaluate only the first N questions per part (vqa, pope, mmvp) [default: all].")
    @click.option("--all", "all_questions", is_flag=True, help="Evaluate every test question (the default).")
    @click.option("--methods", default="task_arithmetic,ties,linear", show_default=True,
                  help="Comma-separated merge methods.")
    @click.option("--budget", default=BUDGET, show_default=True,
                  help="Token budget of the extra task_arithmetic row: total:N[@layer] (the visual tokens of one "
                       "forward pass, all its members together, kept by the question's attention; the recipe "
                       "runs one pass per member that may answer, one per toy question), a per-member spec (pool:2, topk:24) or 'none'.")
    @click.option("--select", default="none", show_default=True,
                  help="Add a task_arithmetic row with this answer_select mode (none if it is the recipe's own, "
                       "confidence:members): none (one answer from every member's tokens: plain concatenation, the "
                       "paper's method), confidence (greedy answers with all members' tokens and with each member's "
                       "alone, the most probable kept), confidence:members (each member's tokens alone only), pmi / "
                       "pmi:members (the same answers scored by their log-probability minus that given the world's "
                       "empty scene).")
    @click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
    @click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
                  help="Also write the table JSON here (always written to OUT/compare.json).")
    @click.option("--force", is_flag=True, help="Replace OUT if an earlier `compare` wrote it.")
    def compare_cmd(out, family, seed, limit, all_questions, methods, budget, select, batch_size, json_path, force):
        """Merge the toy family (task_arithmetic, ties, linear), then evaluate each member alone, the fused
        models, the fused model with a token budget, and the COMM model on a toy test split.

        Prints one row per model: per-skill VQA accuracy, overall VQA, POPE accuracy, MMVP pair
        accuracy, their mean and samples/s, then the fused model's gain over the best member; writes
        OUT/compare.json and OUT/compare.png (per-skill bars).
        """
        from ..errors import FuseError
        from ..eval.runner import write_results
        from ..toyfamily import ASSETS, DEFAULT_LIMIT, compare, format_summary, recipe_select

        fam = family or ASSETS
        from pathlib import Path

        if not (Path(fam) / "figures.json").is_file():
            raise FuseError(f"{fam}: not a toy family (no figures.json); train one with "
                            "`train toy-family -o DIR`")
        ms = [m.strip() for m in methods.split(",") if m.strip()]
        from ..merge import MERGE_METHODS

        bad = [m for m in ms if m not in MERGE_METHODS]
        if bad or not ms:
            raise FuseError(f"--methods: {', '.join(bad) or '(empty)'} not among {', '.join(MERGE_METHODS)}")
        from ..model.options import parse_answer_select

        parse_answer_select(select, "--select")
        if select != recipe_select() and "task_arithmetic" not in ms:
            raise FuseError(f"--select {select}: its row is a task_arithmetic merge; add task_arithmetic to --methods")
        t0 = time.perf_counter()
        doc = compare(out, family=fam, seed=seed, limit=None if all_questions else (limit or DEFAULT_LIMIT), methods=ms,
                      budget=None if budget.lower() == "none" else budget, batch_size=batch_size, echo=click.echo,
                      force=force, select=select)
        if json_path:
            write_results(doc, json_path)
        for line in format_summary(doc):
            click.echo(line)
        n = doc["limit_per_part"] or "all"
        split = "the family's test split" if doc["shipped_split"] else f"a fresh test world (seed {doc['test_seed']})"
        click.echo(f"{n} questions per part (vqa, pope, mmvp) of {split}; wrote {Path(out) / 'compare.json'} and "
                   f"{Path(out) / 'compare.png'} in {time.perf_counter() - t0:.1f} s")

    @toyworld.command("train-family", hidden=True, context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def train_family_cmd(args):
        """Moved: the toy family is re-trained by `train toy-family -o DIR` (fuse never imports train)."""
        from ..errors import FuseError

        raise FuseError("the toy family is trained by the `train` CLI: run `train toy-family -o DIR`")
