"""``fuse generate OUT --image PATH --prompt TEXT``: answer a question about an image with a fused model."""

from __future__ import annotations

import json
import time

import click

from ..errors import FuseError
from ..model.options import ABSTAIN, ANSWER_SELECT


def _member_specs(values: tuple[str, ...], option: str):
    """``("pool:2",)`` -> "pool:2"; ``("a=topk:64", "b=all")`` -> {"a": "topk:64", "b": "all"}; () -> None."""
    if not values:
        return None
    plain = [v for v in values if "=" not in v]
    named = dict(v.split("=", 1) for v in values if "=" in v)
    if plain and named:
        raise FuseError(f"{option}: give either one spec for all members or NAME=SPEC entries, not both")
    if len(plain) > 1:
        raise FuseError(f"{option}: several specs given ({', '.join(plain)}); use NAME=SPEC per member")
    return plain[0] if plain else named


def _separator(value: str | None):
    if value is None or value in ("none", "member"):
        return value
    try:
        return int(value)
    except ValueError:
        raise FuseError(f"--separator: expected none, member or a token id, got {value!r}") from None


def register(group: click.Group) -> None:
    @group.command("generate")
    @click.argument("model", type=click.Path())
    @click.option("--image", "images", multiple=True, required=True, type=click.Path(),
                  help="Image file (repeat for a batch; one --prompt for all or one per image).")
    @click.option("--prompt", "prompts", multiple=True, required=True,
                  help="Question; put <image> where the image goes (prepended if absent).")
    @click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(1))
    @click.option("--token-budget", multiple=True, metavar="[NAME=]SPEC",
                  help="all | pool[:S] | pool:HxW | topk:K (default: the model's inference settings).")
    @click.option("--max-visual-tokens", default=None, metavar="N[@LAYER]",
                  help="Cap on all members' visual tokens together, kept by the question's attention in LLM layer "
                       "LAYER (default 1).")
    @click.option("--positions", multiple=True, metavar="[NAME=]SPEC",
                  help="sequential | share | groups:K | rows (MouSi-style position sharing).")
    @click.option("--separator", default=None, help="none | member | TOKEN_ID between members' tokens.")
    @click.option("--member-positions", type=click.Choice(["sequential", "parallel"]), default=None,
                  help="parallel: every member's span ends where the text after the image starts (default: the "
                       "model's inference settings).")
    @click.option("--answer-select", type=click.Choice(list(ANSWER_SELECT)), default=None,
                  help="confidence: answer with all members' tokens and with each member's alone, keep the most "
                       "probable answer (confidence:members: each member's alone only); pmi / pmi:members: the "
                       "same answers, each scored by its log-probability minus that given a flat --null-image "
                       "(default: the model's inference settings).")
    @click.option("--null-image", default=None, metavar="#RRGGBB",
                  help="The content-free image of the pmi modes, a flat colour (default: the model's inference "
                       "settings, else #000000).")
    @click.option("--abstain", type=click.Choice(list(ABSTAIN)), default=None,
                  help="unseen_words: with --answer-select, a member gives no answer to a question with a word its "
                       "training questions never had (default: the model's inference settings).")
    @click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
    @click.option("--temperature", default=1.0, show_default=True, type=float)
    @click.option("--top-p", default=1.0, show_default=True, type=float)
    @click.option("--seed", default=None, type=int, help="Random seed for --sample.")
    @click.option("--raw-prompt", is_flag=True, help="Use the prompt as is, without the chat template.")
    @click.option("--dtype", default=None, help="float32 | bfloat16 | float16 (default: checkpoint's).")
    @click.option("--device", default="cpu", show_default=True)
    @click.option("--alpha", type=click.Choice(["drop", "white"]), default="drop", show_default=True,
                  help="Transparent images: drop the alpha channel (as the members' original code does) or "
                       "composite over white.")
    @click.option("--json", "as_json", is_flag=True, help="Print answer, tokens per member and timings as JSON.")
    def generate(model: str, images: tuple[str, ...], prompts: tuple[str, ...], max_new_tokens: int,
                 token_budget: tuple[str, ...], max_visual_tokens: str | None, positions: tuple[str, ...],
                 separator: str | None, member_positions: str | None, answer_select: str | None, null_image: str | None,
                 abstain: str | None, sample: bool,
                 temperature: float, top_p: float, seed: int | None, raw_prompt: bool, dtype: str | None,
                 device: str, alpha: str, as_json: bool) -> None:
        """Answer PROMPT about IMAGE with the fused model in MODEL (a `fuse merge` output directory)."""
        import warnings

        from ..devices import resolve_device
        from ..dtypes import parse_dtype
        from ..images import load_image
        from ..model.fused import FusedModel, check_generation

        if len(prompts) != 1 and len(prompts) != len(images):
            raise FuseError(f"--prompt given {len(prompts)} times for {len(images)} --image; give one, or one per image")
        check_generation(max_new_tokens, sample, temperature, top_p, seed)  # before loading anything
        dev = resolve_device(device)
        plist = list(prompts) * len(images) if len(prompts) == 1 else list(prompts)
        pil = [load_image(p, alpha) for p in images]  # fail on a bad image before loading the model
        t0 = time.perf_counter()
        fm = FusedModel.from_pretrained(model, dtype=parse_dtype(dtype), device=dev)
        t_load = time.perf_counter() - t0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = fm.generate(pil, plist, max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature,
                              top_p=top_p, seed=seed, template=not raw_prompt,
                              inference={"token_budget": _member_specs(token_budget, "--token-budget"),
                                         "positions": _member_specs(positions, "--positions"),
                                         "separator": _separator(separator),
                                         "max_visual_tokens": max_visual_tokens,
                                         "member_positions": member_positions,
                                         "answer_select": answer_select, "null_image": null_image,
                                         "abstain": abstain},
                              return_details=True)
        for w in {str(w.message) for w in caught if issubclass(w.category, UserWarning)}:
            click.echo(f"warning: {w}", err=True)
        if not as_json:
            for text in res.texts:
                click.echo(text)
            return
        timings = {"load": t_load, **res.timings}
        items = [{"image": str(img), "prompt": p, "answer": t, "tokens": tok, "visual_tokens": sum(tok.values()),
                  "prompt_tokens": n} for img, p, t, tok, n in zip(images, plist, res.texts, res.tokens, res.prompt_tokens)]
        if res.selected is not None:
            for item, chosen in zip(items, res.selected):
                item["answered_by"] = chosen
        payload = {**items[0], "timings": timings} if len(items) == 1 else {"results": items, "timings": timings}
        click.echo(json.dumps(payload, indent=2))
