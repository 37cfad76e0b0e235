"""``analysis`` subcommands: align, attention, blind-pairs, layers.

Every command writes a report directory (``report.md``, ``report.html``,
``report.json``, ``figures/*.png``) atomically; user errors end as one
``error: ...`` line with exit code 2 (the group is a FriendlyGroup).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any, Callable

import click

from fuse.cli_utils import options_from_dataclass
from fuse.dtypes import parse_dtype

from .options import PipelineOptions


def _command_line() -> str:
    return "analysis " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def pipeline_options(default_out: str, default_batch: int = 8) -> Callable:
    """The flags every command that reads images shares (:class:`~analysis.options.PipelineOptions`'s
    fields), with this command's default report directory and batch size; the command gets them as
    one ``pipeline`` argument."""
    return options_from_dataclass(PipelineOptions, param="pipeline", out=default_out, batch_size=default_batch)


def _inputs(pipeline: PipelineOptions, **named: str | None) -> list[tuple[str, str | None]]:
    """What a report command reads, for the output-overlap check: a report is never written over (or
    around) its inputs, even with --force. A recipe SOURCE adds its members and base model."""
    out: list[tuple[str, str | None]] = [("--images", pipeline.images), ("--cache", pipeline.cache_dir),
                                         *named.items()]
    src = named.get("SOURCE")
    if src and str(src).endswith((".yaml", ".yml")) and Path(src).is_file():
        from fuse.recipe import load_recipe

        r = load_recipe(src)
        out += [(f"{src}: members[{i}].model", m.model) for i, m in enumerate(r.members) if Path(m.model).exists()]
        out += [(f"{src}: base_model", r.base_model)] if r.base_model and Path(r.base_model).exists() else []
    return out


def _quiet(pipeline: PipelineOptions) -> None:
    """-q also silences transformers' weight-loading progress bars."""
    if not pipeline.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _select(pipeline: PipelineOptions, n: int | None):
    """The images to read (``n`` of ``--images``, seeded), with a warning when there are fewer."""
    from .features import select_images

    sel = select_images(pipeline.images, n, pipeline.seed)
    if sel.note:
        click.echo(f"warning: {sel.note}", err=True)
    return sel


def _done(out: Path, extra: str = "") -> None:
    click.echo(f"report written to {out}/report.md (and report.html, report.json){extra}")


# ---------------------------------------------------------------------------
@click.command("align")
@click.argument("source", type=click.Path())
@click.option("--n", "n", default=500, show_default=True, type=int, help="Number of images (random sample).")
@click.option("--control", type=click.Choice(["all", "first", "none"]), default="all", show_default=True,
              help="Members that get a random-projector control.")
@click.option("--ridge", default=1e-4, show_default=True, type=float,
              help="Covariance regulariser for KL (times the mean variance).")
@click.option("--prompt", default="Describe the image.", show_default=True,
              help="Prompt for text-conditioned vision branches.")
@pipeline_options("reports/align")
def align_cmd(source: str, n: int, control: str, ridge: float, prompt: str, pipeline: PipelineOptions) -> None:
    """Visual-token alignment between members.

    SOURCE: a recipe .yaml (members need not be fused) or a fused directory (`fuse merge` output).
    """
    from .align import build_report, run_align
    from .report import Report
    from .sources import load_sources

    Report.check_output(pipeline.out, pipeline.force, _inputs(pipeline, SOURCE=source))
    _quiet(pipeline)
    sel = _select(pipeline, n)
    src = load_sources(source, dtype=parse_dtype(pipeline.dtype))
    res = run_align(src, sel.paths, pipeline, control=control, ridge=ridge, prompt=prompt)
    _warn_skipped(res.extract)
    build_report(res, src, sel, _command_line()).write(pipeline.out, force=pipeline.force)
    _done(Path(pipeline.out))


def _warn_skipped(stats: Any) -> None:
    if stats.skipped:
        click.echo(f"warning: {len(stats.skipped)} unreadable image(s) skipped (listed in the report), "
                   f"e.g. {stats.skipped[0][1]}", err=True)


@click.command("blind-pairs")
@click.option("--clip", "clip_src", required=True, help="CLIP checkpoint (dir or cached hub id).")
@click.option("--dino", "dino_src", required=True, help="DINOv2 checkpoint (dir or cached hub id).")
@click.option("--clip-kind", default="clip", show_default=True, help="Embedder for --clip (clip, siglip).")
@click.option("--dino-kind", default="dinov2", show_default=True, help="Embedder for --dino.")
@click.option("--clip-min", default=0.95, show_default=True, type=float, help="Keep pairs with CLIP cosine above.")
@click.option("--dino-max", default=0.6, show_default=True, type=float, help="... and DINO cosine below.")
@click.option("--n", "n", default=None, type=int, help="Use a random sample of N images [default: all].")
@click.option("--top", default=12, show_default=True, type=click.IntRange(1), help="Pairs on the contact sheet.")
@click.option("--block", default=4096, show_default=True, type=click.IntRange(1), help="Similarity block size.")
@click.option("--max-pairs", default=1_000_000, show_default=True, type=click.IntRange(1),
              help="Keep at most this many pairs (largest CLIP-DINO gap).")
@pipeline_options("reports/blind-pairs", default_batch=32)
def blind_pairs_cmd(clip_src: str, dino_src: str, clip_kind: str, dino_kind: str, clip_min: float, dino_max: float,
                    n: int | None, top: int, block: int, max_pairs: int, pipeline: PipelineOptions) -> None:
    """Mine CLIP-blind image pairs (MMVP).

    Pairs with CLIP cosine > --clip-min and DINO cosine < --dino-max.
    """
    from .blind_pairs import build_embedder, build_report, run_blind_pairs
    from .report import Report

    Report.check_output(pipeline.out, pipeline.force, _inputs(pipeline, **{"--clip": clip_src, "--dino": dino_src}))
    _quiet(pipeline)
    sel = _select(pipeline, n)
    dt = parse_dtype(pipeline.dtype)
    clip = build_embedder(clip_kind, clip_src, dtype=dt)
    dino = build_embedder(dino_kind, dino_src, dtype=dt)
    res = run_blind_pairs(sel.paths, clip, dino, pipeline, clip_min=clip_min, dino_max=dino_max, block=block,
                          max_pairs=max_pairs)
    _warn_skipped(res.stats)
    report = build_report(res, sel, clip_min, dino_max, top, _command_line(), root=Path(pipeline.images))
    report.write(pipeline.out, force=pipeline.force)
    _done(Path(pipeline.out), f"; {res.pairs.found} pair(s), CSV in {pipeline.out}/pairs.csv")


@click.command("layers")
@click.option("--encoder", "kind", required=True, help="Encoder kind: clip, siglip, dinov2.")
@click.option("--model", default=None, help="Encoder checkpoint (dir or cached hub id).")
@click.option("--config", default=None, type=click.Path(), help="Encoder config JSON (random weights; for tests).")
@click.option("--n", "n", default=200, show_default=True, type=int, help="Number of images (random sample).")
@click.option("--pool", type=click.Choice(["tokens", "mean"]), default="tokens", show_default=True,
              help="Samples: fixed patch positions, or one mean vector per image.")
@click.option("--max-tokens", default=2048, show_default=True, type=click.IntRange(3),
              help="Total token samples per layer (--pool tokens).")
@pipeline_options("reports/layers")
def layers_cmd(kind: str, model: str | None, config: str | None, n: int, pool: str, max_tokens: int,
               pipeline: PipelineOptions) -> None:
    """Linear CKA between an encoder's layers.

    Every pair of layers and each layer to the last one (COMM's analysis).
    """
    from .layers import build_report, load_encoder, run_layers
    from .report import Report

    Report.check_output(pipeline.out, pipeline.force, _inputs(pipeline, **{"--model": model, "--config": config}))
    _quiet(pipeline)
    enc = load_encoder(kind, model, config, dtype=parse_dtype(pipeline.dtype))
    sel = _select(pipeline, n)
    res = run_layers(sel.paths, enc, pipeline, pool=pool, max_tokens=max_tokens)
    _warn_skipped(res.stats)
    build_report(res, sel, model or f"config {config}", _command_line()).write(pipeline.out, force=pipeline.force)
    _done(Path(pipeline.out))


def _parse_layers(spec: str) -> list[int] | None:
    if spec.strip().lower() == "all":
        return None
    from fuse.errors import DataError

    try:
        return [int(x) for x in spec.replace(" ", "").split(",") if x]
    except ValueError:
        raise DataError(f"--layers {spec!r}: expected 'all' or comma-separated layer indices like '-1,-2,10'") from None


@click.command("attention")
@click.argument("fused_dir", type=click.Path())
@click.option("--questions", required=True, type=click.Path(),
              help="Questions: a text file (one per line, asked of every image) or .jsonl/.json with "
                   "{\"image\", \"question\"} entries.")
@click.option("--n", "n", default=None, type=int, help="Use a random sample of N (image, question) samples.")
@click.option("--layers", "layers_spec", default="all", show_default=True, help="LLM layers: all or e.g. '-1,-2,8'.")
@click.option("--query", type=click.Choice(["answer", "last"]), default="answer", show_default=True,
              help="Attending positions: answer-generating positions, or the last prompt position only.")
@click.option("--max-new-tokens", default=16, show_default=True, type=click.IntRange(1))
@click.option("--topk", default=10.0, show_default=True, type=click.FloatRange(0, 100, min_open=True),
              help="Top-k%% cells for the IoU.")
@click.option("--figures", "max_figures", default=8, show_default=True, type=click.IntRange(0),
              help="Samples with overlay figures.")
@pipeline_options("reports/attention", default_batch=4)
def attention_cmd(fused_dir: str, questions: str, n: int | None, layers_spec: str, query: str, max_new_tokens: int,
                  topk: float, max_figures: int, pipeline: PipelineOptions) -> None:
    """Attention-region divergence between members.

    FUSED_DIR: a fused model directory (`fuse merge` output).
    """
    from .attention import build_report, read_questions, run_attention
    from fuse.devices import resolve_device
    from .report import Report
    from .sources import require_fused

    Report.check_output(pipeline.out, pipeline.force,
                        _inputs(pipeline, FUSED_DIR=fused_dir, **{"--questions": questions}))
    _quiet(pipeline)
    root = require_fused(fused_dir)
    layers = _parse_layers(layers_spec)
    samples, note = read_questions(questions, pipeline.images, n, pipeline.seed)
    if note:
        click.echo(f"warning: {note}", err=True)
    if pipeline.cache_dir:
        click.echo("note: --cache is not used by attention (maps depend on the question)", err=True)
    from fuse.model import FusedModel

    model = FusedModel.from_pretrained(root, dtype=parse_dtype(pipeline.dtype), device=resolve_device(pipeline.device))
    res = run_attention(model, samples, pipeline, layers=layers, query=query, max_new_tokens=max_new_tokens, topk=topk)
    _warn_skipped(res.stats)
    report = build_report(res, str(root), note, _command_line(), max_figures, root=Path(pipeline.images))
    report.write(pipeline.out, force=pipeline.force)
    _done(Path(pipeline.out))


COMMANDS: list[click.Command] = [align_cmd, attention_cmd, blind_pairs_cmd, layers_cmd]


def register(group: click.Group) -> None:
    for cmd in COMMANDS:
        group.add_command(cmd)
