"""Do the members' visual tokens share one LLM input space? The verdict ``fuse check`` prints.

VisionFuse rests on the observation that the projected visual tokens of the members of one
family (MLLMs fine-tuned from one pretrained LLM) are "highly aligned": each member's projector
was trained, with the LLM frozen, to write into the *base* LLM's input space, so a merged LLM
can read every member's tokens. Members whose projectors were trained together with their own
LLM from the start learn private codes instead, and fusing them helps nobody.

The statistic (:func:`shared_direction_similarity`): for ``n`` images, each member's per-image
mean visual token ``a_i`` (``[D_llm]``), centred over the images (``A = [a_i - mean_i a_i]``,
``[n, D]``); the similarity of two members is the cosine between the two matrices,
``<A, B>_F / (|A|_F |B|_F)``, coordinates *not* rotated: it is high when the members move
their tokens along the same LLM input directions for the same images, ~0 when each member
uses its own directions. Image means make members with different token counts comparable.

The reference (the threshold is relative to it): the same statistic between each member and
the *other* member's random-projector control (:func:`random_projector_copy`: that member's
branch with every non-encoder parameter replaced by Gaussian noise of the same per-tensor mean
and std), for :data:`CONTROL_DRAWS` draws of the noise. A control keeps the encoders' own
structure and token scale but has no trained mapping into the LLM space, so its similarity is
what "same encoders, unrelated projectors" gives: around 0, by an amount that depends on the
draw (it does not shrink with more images). The control level is the root mean square of those
similarities; a pair is **aligned** when ``similarity >= RATIO x control`` (a two-sigma test
against the random-projector null) and ``similarity >= FLOOR``.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

RATIO = 2.0  # member-pair similarity must be at least this multiple of the random-projector control level
FLOOR = 0.05  # ... and at least this (a control level near 0 by chance must not make any pair "aligned")
CONTROL_DRAWS = 3  # random-projector controls per member
DEFAULT_PROBES = 32  # images rendered by probe_images() when the user gives none


def random_projector_copy(branch: nn.Module, seed: int = 0) -> tuple[nn.Module, list[str]]:
    """A deep copy of ``branch`` whose non-encoder parameters (projector, adapters) are replaced by
    Gaussian noise with each tensor's own mean and std (a constant tensor, e.g. a zero bias, keeps
    its value). Returns (copy, names of replaced tensors)."""
    from transformers import PreTrainedModel

    from .encoders import Encoder

    ctrl = copy.deepcopy(branch)
    enc: set[str] = set()
    for mname, mod in ctrl.named_modules():
        if isinstance(mod, (Encoder, PreTrainedModel)):
            enc.update(f"{mname}.{p}" if mname else p for p, _ in mod.named_parameters())
    g = torch.Generator().manual_seed(seed)
    replaced = []
    with torch.no_grad():
        for name, p in ctrl.named_parameters():
            if name in enc or not p.is_floating_point():
                continue
            t = p.detach().float().cpu()
            std = float(t.std()) if t.numel() > 1 else 0.0
            noise = torch.randn(t.shape, generator=g) * std + float(t.mean())  # constant tensors stay constant
            p.copy_(noise.to(p.device, p.dtype))
            replaced.append(name)
    return ctrl, replaced


@torch.no_grad()
def image_mean_tokens(branch: nn.Module, images: Sequence[Any], batch_size: int = 16,
                      text_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image mean of a branch's visual tokens: ``[n_images, D_llm]`` (float64).

    ``text_embeds`` ``[T, D]`` is given to text-conditioned branches (``needs_text``, e.g. SliME)."""
    branch.eval()
    out = []
    for i in range(0, len(images), batch_size):
        chunk = list(images[i:i + batch_size])
        batch = branch.preprocess(chunk)
        batch = {k: (v.to(branch.device, branch.dtype) if torch.is_tensor(v) and v.is_floating_point() else v)
                 for k, v in batch.items()}
        te = [text_embeds.to(branch.device, branch.dtype)] * len(chunk) if getattr(branch, "needs_text", False) \
            and text_embeds is not None else None
        toks = branch(batch, text_embeds=te)
        out.extend(t.double().mean(0).cpu() for t in toks)
    return torch.stack(out)


def shared_direction_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of the centred image-mean matrices ``a``, ``b`` (``[n, D]``, images paired)."""
    if a.shape != b.shape:
        raise ValueError(f"image-mean matrices differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    a = a - a.mean(0)
    b = b - b.mean(0)
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else 0.0


@dataclass
class PairVerdict:
    a: str
    b: str
    similarity: float
    control: float  # RMS similarity of each member vs the other member's random-projector controls
    aligned: bool

    @property
    def ratio(self) -> float | None:
        return self.similarity / self.control if self.control > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "similarity": self.similarity, "control": self.control,
                "ratio": self.ratio, "aligned": self.aligned}


@dataclass
class AlignmentVerdict:
    """Per member pair: similarity, control level, verdict. ``aligned``: every pair aligned."""

    pairs: list[PairVerdict]
    n_images: int
    ratio: float = RATIO
    floor: float = FLOOR
    notes: list[str] = field(default_factory=list)

    @property
    def aligned(self) -> bool:
        return all(p.aligned for p in self.pairs)

    def to_dict(self) -> dict[str, Any]:
        return {"aligned": self.aligned, "n_images": self.n_images, "ratio": self.ratio, "floor": self.floor,
                "pairs": [p.to_dict() for p in self.pairs], "notes": list(self.notes)}

    def lines(self) -> list[str]:
        """Human-readable lines (one per pair, then the verdict)."""
        out = [f"visual-token alignment on {self.n_images} images (shared-direction similarity of image-mean "
               f"tokens; aligned when >= {self.ratio:g} x the random-projector control level and >= {self.floor:g}):"]
        for p in self.pairs:
            r = f"{p.ratio:.1f}x" if p.ratio is not None else "n/a"
            out.append(f"  {p.a} vs {p.b}: similarity {p.similarity:.3f}, control {p.control:.3f} ({r}) -> "
                       f"{'aligned' if p.aligned else 'NOT aligned'}")
        out.append("alignment verdict: " + ("aligned: the members' visual tokens share one LLM input space"
                                            if self.aligned else
                                            "NOT aligned: the members' visual tokens look like private codes; "
                                            "a fused model is unlikely to beat its members"))
        return out


def judge(similarity: float, control: float, ratio: float = RATIO, floor: float = FLOOR) -> bool:
    return similarity >= floor and similarity >= ratio * control


def member_statistics(branch: nn.Module, images: Sequence[Any], index: int = 0, seed: int = 0,
                      text_embeds: torch.Tensor | None = None, batch_size: int = 16,
                      draws: int = CONTROL_DRAWS) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(image means of the member's tokens ``[n, D]``, image means of each of its ``draws``
    random-projector controls; empty when the branch has no non-encoder parameter). ``index``
    varies the controls' seeds per member."""
    means = image_mean_tokens(branch, images, batch_size, text_embeds)
    controls = []
    for k in range(draws):
        ctrl, replaced = random_projector_copy(branch, seed=seed + 1000 + 100 * index + k)
        if not replaced:
            break
        controls.append(image_mean_tokens(ctrl, images, batch_size, text_embeds))
        del ctrl
    return means, controls


def verdict_from_statistics(stats: dict[str, tuple[torch.Tensor, Sequence[torch.Tensor]]], n_images: int,
                            ratio: float = RATIO, floor: float = FLOOR) -> AlignmentVerdict:
    """Pairwise verdicts from :func:`member_statistics` of every member (name -> (means, controls))."""
    pairs, notes = [], []
    for name, (_, controls) in stats.items():
        if not controls:
            notes.append(f"{name}: no non-encoder parameters, no random-projector control")
    for a, b in itertools.combinations(stats, 2):
        (ma, ca), (mb, cb) = stats[a], stats[b]
        if ma.shape[1] != mb.shape[1]:
            notes.append(f"{a} vs {b}: token widths differ ({ma.shape[1]} vs {mb.shape[1]})")
            pairs.append(PairVerdict(a, b, 0.0, 0.0, False))
            continue
        sim = shared_direction_similarity(ma, mb)
        refs = [shared_direction_similarity(x, c) for x, cs in ((ma, cb), (mb, ca)) for c in cs]
        control = (sum(r * r for r in refs) / len(refs)) ** 0.5 if refs else 0.0
        pairs.append(PairVerdict(a, b, sim, control, judge(sim, control, ratio, floor)))
    return AlignmentVerdict(pairs, n_images, ratio, floor, notes)


def alignment_verdict(branches: dict[str, nn.Module], images: Sequence[Any], seed: int = 0,
                      text_embeds: dict[str, torch.Tensor | None] | None = None, batch_size: int = 16,
                      ratio: float = RATIO, floor: float = FLOOR) -> AlignmentVerdict:
    """Verdict for every pair of ``branches`` (member name -> vision branch) on ``images`` (PIL)."""
    text_embeds = text_embeds or {}
    stats = {name: member_statistics(br, images, i, seed, text_embeds.get(name), batch_size)
             for i, (name, br) in enumerate(branches.items())}
    return verdict_from_statistics(stats, len(images), ratio, floor)


def recipe_alignment(recipe: Any, images: str | None = None, n: int = DEFAULT_PROBES, seed: int = 0,
                     echo: Callable[[str], None] | None = None,
                     paths: dict[str, Any] | None = None) -> AlignmentVerdict:
    """The verdict for a recipe's members: each member's vision branch is built (one at a time, in
    float32) and run on ``n`` images of the directory ``images`` (a seeded sample) or, without one, on
    :func:`probe_images`. Text-conditioned branches get a neutral prompt embedded by the member's LLM.
    ``paths``: recipe model source -> local directory (hub ids resolved by :func:`fuse.hub.resolve_recipe`)."""
    from .members import load_member

    pil = load_probe_images(images, n, seed)
    stats = {}
    for i, (name, spec) in enumerate(zip(recipe.member_names(), recipe.members)):
        if echo:
            echo(f"alignment: running {name}'s vision branch on {len(pil)} images")
        m = load_member((paths or {}).get(spec.model, spec.model), format=spec.format, dtype=torch.float32, **(spec.options or {}))
        te = _neutral_prompt_embeds(m) if getattr(m.vision, "needs_text", False) else None
        stats[name] = member_statistics(m.vision, pil, i, seed, te)
        del m
    return verdict_from_statistics(stats, len(pil))


NEUTRAL_PROMPT = "Describe the image."


def _neutral_prompt_embeds(member: Any) -> torch.Tensor | None:
    """Embeddings ``[T, D]`` of :data:`NEUTRAL_PROMPT` from the member's own LLM embedding table."""
    ids = member.text.tokenizer(NEUTRAL_PROMPT, add_special_tokens=False)["input_ids"]
    if not ids:
        return None
    table = member.llm.get("model.embed_tokens.weight", torch.float32)
    return table[torch.tensor([i for i in ids if i < table.shape[0]], dtype=torch.long)]


def load_probe_images(images: str | None, n: int = DEFAULT_PROBES, seed: int = 0) -> list:
    """``n`` images: a seeded sample of the directory ``images`` (recursive), or :func:`probe_images`."""
    if images is None:
        return probe_images(n, seed)
    import random

    from .errors import DataError
    from .images import list_images, load_image

    paths = sorted(list_images(images))
    if len(paths) < 2:
        raise DataError(f"{images}: need at least 2 images for the alignment check, found {len(paths)}")
    if len(paths) > n:
        paths = sorted(random.Random(seed).sample(paths, n))
    return [load_image(p) for p in paths]


def probe_images(n: int = DEFAULT_PROBES, seed: int = 0, size: int = 336) -> list:
    """``n`` deterministic synthetic images (toy-world scenes of coloured shapes, ``size`` px) for
    when no image directory is given: enough to see whether projectors share directions, but
    real images (``--images``) are a better probe for real members."""
    import random

    from .toyworld import random_scene, render

    rng = random.Random(f"visionfuse-align-probe-{seed}")
    return [render(random_scene(rng, size)) for _ in range(n)]
