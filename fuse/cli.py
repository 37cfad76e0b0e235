"""``fuse``: training-free fusion of same-family MLLMs (VisionFuse)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .cli_utils import CONTEXT_SETTINGS, FriendlyGroup
from .commands import eval as eval_commands
from .commands import generate as generate_commands
from .commands import merge as merge_commands
from .commands import toyfamily as toyfamily_commands


@click.group(cls=FriendlyGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="visionfuse-toolkit")
def main() -> None:
    """Fuse MLLMs of one family: merge their LLMs, keep every member's vision branch."""


@main.command()
@click.argument("model", type=click.Path())
@click.option("--format", "fmt", default="auto", show_default=True, help="Checkpoint format (auto-detected).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of text.")
def inspect(model: str, fmt: str, as_json: bool) -> None:
    """Show how a member checkpoint is read: format, parts, tensor counts, text side."""
    from .members import load_member

    m = load_member(model, format=fmt)
    info = {
        "path": str(m.path), "format": m.format, "vision_branch": m.vision.kind,
        "tensors_by_part": m.usage_summary(), "llm": {k: m.llm.config.get(k) for k in
                                                      ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                       "num_key_value_heads", "intermediate_size")},
        "vocab_rows": m.llm.vocab_rows, "llm_bytes": m.llm.total_bytes(),
        "prompt_style": m.text.prompt_style, "eos_token_ids": m.text.eos_token_ids,
    }
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for k, v in info.items():
        click.echo(f"{k:16s} {v}")


@main.command()
@click.option("-o", "--output", "out", type=click.Path(), default="out/demo", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
def demo(out: str, force: bool) -> None:
    """Build a tiny two-member LLaVA family and inspect it (no downloads)."""
    from .members import load_member
    from .output_dir import atomic_output_dir
    from .testing import build_base_llm, build_llava_hf_member, build_llava_member, random_image

    final = Path(out).absolute()
    with atomic_output_dir(out, force=force) as tmp:
        base = build_base_llm(tmp / "base", seed=0)
        build_llava_hf_member(tmp / "member_a", base, seed=1)
        # member_b names its CLIP tower by path (as LLaVA-1.5 names openai/clip-...): record where the
        # tower will be after the rename, not inside the temporary build directory
        build_llava_member(tmp / "member_b", base, seed=2, tower_ref=final / "member_b-clip")
    click.echo(f"built tiny family in {out}: base, member_a (llava-hf), member_b (llava)")
    img = random_image(0, (56, 56))
    for name in ("member_a", "member_b"):
        m = load_member(Path(out) / name)
        toks = m.visual_tokens([img])[0]
        click.echo(f"  {name}: format={m.format} visual tokens {tuple(toks.shape)} vocab={m.llm.vocab_rows}")


# the `toyworld` group is made by fuse.commands.eval and extended by fuse.commands.toyfamily: eval goes first
for _commands in (merge_commands, generate_commands, eval_commands, toyfamily_commands):
    _commands.register(main)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
