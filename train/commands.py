"""``train comm``: train a COMM-family fusion (or a baseline) into a causal LLM."""

from __future__ import annotations

import click

from .config import load_config


def _flags(**kw):
    return {k: v for k, v in kw.items() if v is not None}


@click.command("comm")
@click.option("--stage", type=click.IntRange(1, 2), default=None, help="Training stage (preset: what trains, lr, batch).")
@click.option("-c", "--config", "config_path", type=click.Path(), default=None,
              help="Recipe YAML (e.g. recipes/comm_stage1.yaml).")
@click.option("--from", "from_dir", type=click.Path(), default=None, help="Previous stage's output (stage 2).")
@click.option("--llm", default=None, help="Base LLM dir or hub id (stage 1).")
@click.option("--data", "data_train", default=None, help="Training data: LLaVA JSON / JSONL.")
@click.option("--image-root", default=None, help="Directory the records' image paths are relative to.")
@click.option("-o", "--output", "output_dir", default=None, help="Output dir (checkpoints/, final/, train_log.jsonl).")
@click.option("--fusion", "fusion_type", default=None, help="Fusion type (comm, clip, mean_half, ..., channel_concat).")
@click.option("--preset", type=click.Choice(["comm", "llava"]), default=None,
              help="comm: LLM + fusion in both stages (paper); llava: stage 1 trains the fusion only.")
@click.option("--max-steps", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--resume", default=None, help="Checkpoint dir, run dir, or 'auto' (latest in --output).")
@click.option("--force", is_flag=True, default=None, help="Start over in an output dir that holds a run.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override any config key, e.g. --set fusion.mlp_ratio=4 --set data.num_workers=0.")
def comm(stage, config_path, from_dir, llm, data_train, image_root, output_dir, fusion_type, preset, max_steps, lr,
         resume, force, overrides):
    """Train a COMM fusion (CLIP all layers + DINOv2 deep layers) into a causal LLM.

    \b
    train comm --stage 1 -c recipes/comm_stage1.yaml --llm meta-llama/... -o runs/s1
    train comm --stage 2 -c recipes/comm_stage2.yaml --from runs/s1 -o runs/s2
    accelerate launch --config_file recipes/accelerate/ddp.yaml -m train comm --stage 1 -c ...
    accelerate launch --multi_gpu --num_processes 2 -m train comm ...   (CPU: gloo)

    The result is <output>/final, a member that `fuse` loads (format comm).
    """
    from .api import train

    sets = list(overrides)
    if data_train is not None:
        sets.append(f"data.train={data_train}")
    if image_root is not None:
        sets.append(f"data.image_root={image_root}")
    if fusion_type is not None:
        sets.append(f"fusion.type={fusion_type}")
    cfg = load_config(config_path, sets, **_flags(stage=stage, from_dir=from_dir, llm=llm, output_dir=output_dir,
                                                   preset=preset, max_steps=max_steps, lr=lr, resume=resume,
                                                   force=force))
    res = train(cfg)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    if res.stopped_early:
        click.echo(f"stopped at step {res.step}; checkpoint {res.checkpoint}")
    else:
        last = f"{res.losses[-1]:.4f}" if res.losses else "n/a"
        click.echo(f"done: {res.step} steps, final loss {last}; model {res.final_dir} (fuse format: comm)")


@click.command("fusions")
def fusions():
    """List the registered fusion types."""
    from fuse.fusions import FUSIONS

    for name, cls in sorted(FUSIONS.items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        click.echo(f"{name:16s} {doc}")


@click.command("toy-family")
@click.option("-o", "--output", "out", type=click.Path(file_okay=False), required=True,
              help="Output dir: base/, colour/, spatial/, comm/, figures.json (an existing dir needs --force).")
@click.option("--seed", type=int, default=0, show_default=True, help="World and training seed (0 = the shipped family).")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--keep-work", is_flag=True, help="Keep OUT/work (world, encoders, training runs).")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=None,
              help="Training processes at once after the base LLM, one torch thread each [default: 2]; "
                   "the weights are bit-identical for a seed whatever the value.")
@click.option("--steps-scale", type=float, default=1.0, show_default=True,
              help="Scale every schedule (quick trials; not the shipped family).")
def toy_family(out, seed, force, keep_work, jobs, steps_scale):
    """Re-train the toy family that `fuse toyworld compare` uses: a base LLM pretrained on the toy
    world's text, two members (colour, spatial) trained in two stages (projector with the base frozen,
    then LLM + projector briefly), and a COMM model. About 20 minutes on 2 CPU cores.

    Prints each member's relative L2 distance to the base and the visual-token alignment verdict;
    writes OUT/figures.json. Compare with `fuse toyworld compare --family OUT`.
    """
    import shutil
    import time
    from pathlib import Path

    from fuse.output_dir import atomic_output_dir

    from .toyfamily import JOBS, train_family

    dest = Path(out)
    t0 = time.perf_counter()
    with atomic_output_dir(dest, force=force) as tmp:  # a failure or Ctrl-C leaves nothing behind
        figures = train_family(tmp, seed=seed, jobs=jobs or JOBS, steps_scale=steps_scale, echo=click.echo)
        if not keep_work:
            shutil.rmtree(tmp / "work", ignore_errors=True)
    click.echo(f"wrote {dest} in {time.perf_counter() - t0:.0f} s (training {figures['train_seconds_wall']:.0f} s, "
               f"load average at the end {figures['load_average']})")
    for name, row in figures["eval"]["rows"].items():
        click.echo(f"  {name:8s} vqa={row['vqa']:.3f} pope={row['pope_acc']:.3f} mmvp_pair={row['mmvp_pair']:.3f} "
                   f"mean={row['mean']:.3f}")


def register(group: click.Group) -> None:
    group.add_command(comm)
    group.add_command(fusions)
    group.add_command(toy_family)
