"""``fuse eval`` (benchmarks) and ``fuse toyworld`` (synthetic data) commands."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click


def _load_for_eval(model: str, fmt: str, dtype, device: str | None):
    """Indirection so tests can substitute a stub model loader."""
    from ..eval.loader import load_for_eval

    return load_for_eval(model, format=fmt, dtype=dtype, device=device)


def _gen_kwargs(pairs: tuple[str, ...]) -> dict:
    from ..errors import FuseError

    out = {}
    for p in pairs:
        key, sep, val = p.partition("=")
        if not sep or not key:
            raise FuseError(f"--gen {p!r}: expected KEY=VALUE (e.g. --gen do_sample=true)")
        try:
            out[key] = json.loads(val)
        except json.JSONDecodeError:
            out[key] = val
    return out


def register(group: click.Group) -> None:
    @group.command("eval")
    @click.argument("model", type=click.Path())
    @click.option("--task", "task", required=True, help="mmvp, pope, vqa or toy.")
    @click.option("--data", "data", required=True, type=click.Path(),
                  help="MMVP dir (Questions.csv), POPE/VQA .jsonl, or a toy-world dir.")
    @click.option("--images", type=click.Path(), default=None,
                  help="Image folder (default: beside the data file; MMVP: 'MMVP Images/').")
    @click.option("-o", "--output", type=click.Path(), default=None, help="Write the results JSON here.")
    @click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
    @click.option("--max-new-tokens", type=click.IntRange(min=1), default=16, show_default=True)
    @click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate only the first N questions (per part).")
    @click.option("--log-samples", is_flag=True, help="Keep every prompt, prediction and score in the results JSON.")
    @click.option("--format", "fmt", default="auto", show_default=True, help="Member checkpoint format.")
    @click.option("--dtype", default=None, help="float32, float16 or bfloat16 (default: as stored).")
    @click.option("--device", default=None, help="e.g. cuda:0 (default: cpu).")
    @click.option("--gen", "gen", multiple=True, metavar="KEY=VALUE", help="Extra generate() keyword (repeatable).")
    @click.option("--json", "as_json", is_flag=True, help="Print the results JSON instead of the summary.")
    def eval_cmd(model, task, data, images, output, batch_size, max_new_tokens, limit, log_samples, fmt, dtype,
                 device, gen, as_json):
        """Evaluate MODEL (a fused dir, a member checkpoint or a COMM checkpoint) on a benchmark.

        Data are validated before the model is loaded; the summary ends with samples/s. Under
        `accelerate launch --num_processes N -m fuse eval ...` the questions are split across the
        N processes and process 0 writes the one results JSON.
        """
        from ..devices import resolve_device
        from ..dtypes import parse_dtype
        from ..errors import CheckpointError
        from ..eval import EvalConfig, evaluate, format_summary, load_samples, task_parts, write_results
        from ..eval.distributed import current_shard
        from ..eval.loader import model_kind

        if not Path(model).exists():
            raise CheckpointError(f"{model}: no such model directory")
        dtype, device = parse_dtype(dtype), (str(resolve_device(device)) if device else None)  # before any work
        cfg = EvalConfig(batch_size=batch_size, max_new_tokens=max_new_tokens, limit=limit, log_samples=log_samples,
                         images=images, gen_kwargs=_gen_kwargs(gen))
        parts = task_parts(task, data)
        samples = load_samples(parts, images=images, limit=limit)
        shard = current_shard()
        t0 = time.perf_counter()
        m = _load_for_eval(model, fmt, dtype, device or shard.device)
        load_s = time.perf_counter() - t0
        results = evaluate(m, task, data, cfg, model_name=str(model), parts=parts, samples=samples, shard=shard)
        results["model_kind"] = model_kind(model)
        results["timing"]["load_model_s"] = round(load_s, 4)
        if not shard.is_main:
            return
        if output:
            write_results(results, output)
        if as_json:
            click.echo(json.dumps(results, indent=2, default=str))
        else:
            click.echo(f"{task} on {data} with {model}")
            click.echo(format_summary(results))
            if output:
                click.echo(f"results: {output}")

    @group.group("toyworld")
    def toyworld() -> None:
        """Synthetic world with separable vision skills (colour vs spatial detail)."""

    @toyworld.command("generate")
    @click.option("-o", "--output", "out", type=click.Path(), required=True, help="Output directory.")
    @click.option("--n-train", type=int, default=2000, show_default=True, help="Training images (even: pairs).")
    @click.option("--n-test", type=int, default=300, show_default=True, help="Test images (even: pairs).")
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--size", type=int, default=84, show_default=True, help="Image side in pixels (at least 40).")
    @click.option("--mc-answer", type=click.Choice(["text", "letter"]), default="text", show_default=True,
                  help="Training target of choice questions: the option's text or its letter.")
    @click.option("--force", is_flag=True, help="Replace an existing output directory.")
    def toyworld_generate(out, n_train, n_test, seed, size, mc_answer, force):
        """Write OUT/train and OUT/test (LLaVA JSON, MMVP layout, VQA and POPE JSONL) deterministically."""
        from ..toyworld import generate

        t0 = time.perf_counter()
        manifest = generate(out, n_train=n_train, n_test=n_test, seed=seed, size=size, mc_answer=mc_answer,
                            force=force)
        for name, s in manifest["splits"].items():
            click.echo(f"{name:5s} {s['images']} images ({s['pairs']} pairs): {s['mmvp_questions']} choice, "
                       f"{s['vqa_questions']} open, {s['pope_questions']} yes/no questions; "
                       f"{s['conversations']} conversations")
        click.echo(f"wrote {out} in {time.perf_counter() - t0:.1f} s")

    @toyworld.command("subset")
    @click.argument("conversations", type=click.Path())
    @click.option("--skills", required=True, help="Comma-separated: colour,position,count,shape,orientation.")
    @click.option("--kinds", default=None, help="Comma-separated subset of open,yesno,choice (default: all).")
    @click.option("-o", "--output", "out", type=click.Path(), required=True)
    def toyworld_subset(conversations, skills, kinds, out):
        """Keep only some skills of a split's llava.json (e.g. to train a colour-only member)."""
        from ..errors import DataError
        from ..toyworld import select_skills

        src = Path(conversations)
        if not src.is_file():
            raise DataError(f"{src}: conversation JSON not found")
        try:
            records = json.loads(src.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{src}: invalid JSON ({e.__class__.__name__})") from None
        if not isinstance(records, list):
            raise DataError(f"{src}: expected a JSON list of conversations")
        kept = select_skills(records, [s.strip() for s in skills.split(",") if s.strip()],
                             None if kinds is None else [k.strip() for k in kinds.split(",") if k.strip()])
        from ..eval.runner import write_results

        write_results(kept, out)  # atomic: temp file renamed into place
        click.echo(f"kept {len(kept)} of {len(records)} conversations -> {out}")
