"""A deterministic synthetic world where vision skills are separable by encoder.

Each image (84x84 by default, dark background) holds 1-4 identical small objects:
the same **colour** (red, green, blue, yellow), **shape** (circle, square,
triangle) and, for triangles, **orientation** (up, down), all on one **side**
(left or right half). Five skills, one fixed question each, one-word answers:

=============  ======================================  ===========================  =======
skill          question                                answers                      detail
=============  ======================================  ===========================  =======
colour         What colour are the objects?            red green blue yellow        coarse
position       Are the objects on the left or right?   left right                   coarse
count          How many objects are there?             one two three four           fine
shape          What shape are the objects?             circle square triangle       fine
orientation    Do the triangles point up or down?      up down                      fine
=============  ======================================  ===========================  =======

Why the skills separate by vision encoder:

- *coarse* skills survive a 7x7 thumbnail (an object is one blurred pixel there,
  its hue intact; the side is which half it is in), so a low-resolution member answers them;
- *fine* skills need the object's outline at full resolution (objects are ~10-14 px);
- every palette colour has the same channel sum (R+G+B = 360, times one brightness
  factor per image), so an encoder that averages the channels (a luminance-only
  encoder) sees the two images of a colour pair as identical: it is colour-blind
  by construction, yet sees shape, count, orientation and position perfectly.

A low-res RGB member and a full-res luminance member are therefore complementary,
which is the situation VisionFuse claims to exploit.

Images come in MMVP-style **pairs** that differ in exactly one attribute (the
other attributes, object size, brightness and positions are shared; a position
pair is the mirror image); both images get the same question with options, and
the answers differ. Each split directory is written in every format the toolkit
reads::

    split/images/<k>.png    k = 1..2N; images 2j-1 and 2j form pair j
    split/Questions.csv     MMVP layout (Index, Question, Options, Correct Answer, Pattern)
    split/vqa.jsonl         open questions: {question_id, image, question, answers, category}
    split/pope.jsonl        yes/no questions: {question_id, image, question, label, category}
    split/llava.json        LLaVA conversations of all of the above (training format), with "skill"/"kind"
    split/scenes.jsonl      ground truth of every image

The user text of every conversation is exactly what ``fuse eval`` sends (same
prompt builders), so models trained on ``train/llava.json`` are evaluated on the
prompts they learned. Same seed -> byte-identical files.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from PIL import Image, ImageDraw

from .output_dir import atomic_output_dir
from .errors import DataError
from .eval.prompts import multiple_choice_prompt, short_answer_prompt

FORMAT = "visionfuse-toyworld"
VERSION = 1
IMAGE_SIZE = 84
BACKGROUND = (20, 20, 20)
CHANNEL_SUM = 360
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (250, 55, 55), "green": (55, 250, 55), "blue": (55, 55, 250), "yellow": (170, 170, 20)}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
SIDES = ("left", "right")
ORIENTATIONS = ("up", "down")
BRIGHTNESS = (0.75, 1.0)
RADIUS_FRACTION = (0.06, 0.085)  # object radius as a fraction of the image side (84 px -> 5..7 px)


@dataclass(frozen=True)
class Scene:
    """One image's content. ``orientation`` only shows on triangles (kept for the others so a
    shape pair changes one attribute only). ``centres`` are 4 candidate object centres in the left
    half; the first ``count`` are drawn, mirrored when ``side == "right"``."""

    colour: str
    shape: str
    count: int
    side: str
    orientation: str
    radius: int
    brightness: float
    centres: tuple[tuple[int, int], ...]
    size: int = IMAGE_SIZE

    def attributes(self) -> dict[str, Any]:
        return {a: getattr(self, a) for a in ATTRIBUTES}

    def rgb(self) -> tuple[int, int, int]:
        return tuple(int(round(c * self.brightness)) for c in COLOURS[self.colour])  # type: ignore[return-value]

    def object_centres(self) -> list[tuple[int, int]]:
        return [((self.size - 1 - x) if self.side == "right" else x, y) for x, y in self.centres[:self.count]]


ATTRIBUTES = ("colour", "shape", "count", "side", "orientation")
DOMAINS: dict[str, tuple] = {"colour": tuple(COLOURS), "shape": SHAPES, "count": tuple(COUNT_WORDS),
                             "side": SIDES, "orientation": ORIENTATIONS}


@dataclass(frozen=True)
class Skill:
    """A question about one attribute; ``detail`` says whether a 7x7 view suffices ("coarse") or not ("fine")."""

    name: str
    attribute: str
    question: str
    detail: str
    applies: Callable[[Scene], bool] = lambda s: True

    def answer(self, scene: Scene) -> str:
        return word(self.attribute, getattr(scene, self.attribute))

    @property
    def answers(self) -> tuple[str, ...]:
        return tuple(word(self.attribute, v) for v in DOMAINS[self.attribute])


def word(attribute: str, value: Any) -> str:
    return COUNT_WORDS[value] if attribute == "count" else str(value)


SKILLS: dict[str, Skill] = {s.name: s for s in (
    Skill("colour", "colour", "What colour are the objects?", "coarse"),
    Skill("position", "side", "Are the objects on the left or right?", "coarse"),
    Skill("count", "count", "How many objects are there?", "fine"),
    Skill("shape", "shape", "What shape are the objects?", "fine"),
    Skill("orientation", "orientation", "Do the triangles point up or down?", "fine",
          applies=lambda s: s.shape == "triangle"),
)}

# yes/no (POPE-style) presence questions: skill -> (template, attribute)
YES_NO: dict[str, tuple[str, str]] = {
    "colour": ("Is there a {} object in the image?", "colour"),
    "shape": ("Is there a {} in the image?", "shape"),
}


# --- sampling and rendering ------------------------------------------------------------------------------

MIN_SIZE = 40  # 36 px and less cannot hold 4 objects of radius 3 apart; 38 px only for some draws
MAX_PLACEMENT_TRIES = 100


def _centres(rng: random.Random, size: int, radius: int) -> tuple[tuple[int, int], ...] | None:
    lo, hi_x, hi_y = radius + 2, size // 2 - radius - 2, size - radius - 3
    gap = 2 * radius + 3  # Chebyshev distance between centres: bounding boxes never touch
    pts: list[tuple[int, int]] = []
    for _ in range(400):
        p = (rng.randint(lo, hi_x), rng.randint(lo, hi_y))
        if all(max(abs(p[0] - q[0]), abs(p[1] - q[1])) >= gap for q in pts):
            pts.append(p)
            if len(pts) == 4:
                return tuple(pts)
    return None


def random_scene(rng: random.Random, size: int = IMAGE_SIZE) -> Scene:
    """Uniform attributes, a random object radius/brightness and 4 non-overlapping candidate centres."""
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    count, side, orientation = rng.choice(list(COUNT_WORDS)), rng.choice(SIDES), rng.choice(ORIENTATIONS)
    brightness = round(rng.uniform(*BRIGHTNESS), 3)
    r_lo, r_hi = (max(3, round(f * size)) for f in RADIUS_FRACTION)
    radius = rng.randint(r_lo, r_hi)
    for _ in range(radius + MAX_PLACEMENT_TRIES):
        centres = _centres(rng, size, radius)
        if centres is not None:
            break
        radius = max(3, radius - 1)
    else:  # below MIN_SIZE four objects of the smallest radius may not fit: fail instead of looping forever
        raise DataError(f"size={size}: could not place 4 objects in the image; use at least {MIN_SIZE} px")
    return Scene(colour, shape, count, side, orientation, radius, brightness, centres, size)


def render(scene: Scene) -> Image.Image:
    """Draw the scene (no anti-aliasing: every object pixel has exactly the scene's colour)."""
    img = Image.new("RGB", (scene.size, scene.size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    fill, r = scene.rgb(), scene.radius
    for x, y in scene.object_centres():
        if scene.shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif scene.shape == "square":
            h = round(0.85 * r)
            draw.rectangle([x - h, y - h, x + h, y + h], fill=fill)
        elif scene.orientation == "up":
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
        else:
            draw.polygon([(x, y + r), (x - r, y - r), (x + r, y - r)], fill=fill)
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def make_pair(rng: random.Random, skill: str, size: int = IMAGE_SIZE) -> tuple[Scene, Scene]:
    """Two scenes that differ only in ``SKILLS[skill].attribute`` (in random order)."""
    sk = SKILLS[skill]
    base = random_scene(rng, size)
    if skill == "orientation":
        base = replace(base, shape="triangle")
    alt = rng.choice([v for v in DOMAINS[sk.attribute] if v != getattr(base, sk.attribute)])
    pair = [base, replace(base, **{sk.attribute: alt})]
    rng.shuffle(pair)
    return pair[0], pair[1]


# --- questions ---------------------------------------------------------------------------------------------

PAIR_SKILLS = tuple(SKILLS)


def _conversation(rec_id: str, image: str, prompt: str, answer: str, skill: str, kind: str) -> dict:
    return {"id": rec_id, "image": image, "skill": skill, "kind": kind,
            "conversations": [{"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": answer}]}


@dataclass
class SplitFiles:
    """Everything written for one split (in memory until saved)."""

    images: list[bytes]
    scenes: list[dict]
    mmvp: list[dict]
    vqa: list[dict]
    pope: list[dict]
    llava: list[dict]


def build_split(name: str, n_pairs: int, seed: int, size: int = IMAGE_SIZE, mc_answer: str = "text",
                exclude: set[str] | None = None) -> SplitFiles:
    """``n_pairs`` pairs (skills balanced, order shuffled); images whose hash is in ``exclude`` are redrawn."""
    if mc_answer not in ("text", "letter"):
        raise ValueError("mc_answer must be 'text' or 'letter'")
    rng = random.Random(f"{FORMAT}-{VERSION}-{seed}-{name}")
    skills = [PAIR_SKILLS[i % len(PAIR_SKILLS)] for i in range(n_pairs)]
    rng.shuffle(skills)
    exclude = exclude or set()
    out = SplitFiles([], [], [], [], [], [])
    for j, skill in enumerate(skills):
        while True:
            a, b = make_pair(rng, skill, size)
            blobs = [png_bytes(render(a)), png_bytes(render(b))]
            if not any(hashlib.sha256(x).hexdigest() in exclude for x in blobs):
                break
        sk = SKILLS[skill]
        options = [sk.answer(a), sk.answer(b)]
        rng.shuffle(options)
        opt_text = " ".join(f"({chr(97 + i)}) {o}" for i, o in enumerate(options))
        for scene, blob in zip((a, b), blobs):
            k = len(out.images) + 1
            image = f"images/{k}.png"
            out.images.append(blob)
            out.scenes.append({"index": k, "image": image, "pair": j + 1, "varied": skill,
                               "attributes": scene.attributes(), "radius": scene.radius,
                               "brightness": scene.brightness, "centres": [list(c) for c in scene.object_centres()]})
            # MMVP-style choice question on the varied attribute
            ans = sk.answer(scene)
            letter = chr(97 + options.index(ans))
            out.mmvp.append({"Index": k, "Question": sk.question, "Options": opt_text,
                             "Correct Answer": f"({letter})", "Pattern": skill})
            out.llava.append(_conversation(f"{name}-{k}-choice-{skill}", image,
                                           multiple_choice_prompt(sk.question, options),
                                           ans if mc_answer == "text" else letter.upper(), skill, "choice"))
            # open questions: every skill that applies
            for s in SKILLS.values():
                if not s.applies(scene):
                    continue
                qid = f"{name}-{k}-{s.name}"
                out.vqa.append({"question_id": qid, "image": image, "question": s.question,
                                "answers": [s.answer(scene)], "category": s.name})
                out.llava.append(_conversation(qid, image, short_answer_prompt(s.question), s.answer(scene),
                                               s.name, "open"))
            # yes/no presence questions, balanced yes/no
            for yn_skill, (template, attr) in YES_NO.items():
                truth = getattr(scene, attr)
                value = truth if rng.random() < 0.5 else rng.choice([v for v in DOMAINS[attr] if v != truth])
                q = template.format(value)
                label = "yes" if value == truth else "no"
                qid = f"{name}-{k}-yesno-{yn_skill}"
                out.pope.append({"question_id": qid, "image": image, "question": q, "label": label,
                                 "category": yn_skill})
                out.llava.append(_conversation(qid, image, short_answer_prompt(q), label, yn_skill, "yesno"))
    return out


def _jsonl(rows: Iterable[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=False) + "\n" for r in rows)


def write_split(files: SplitFiles, directory: Path) -> dict[str, Any]:
    (directory / "images").mkdir(parents=True, exist_ok=True)
    for k, blob in enumerate(files.images, start=1):
        (directory / "images" / f"{k}.png").write_bytes(blob)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["Index", "Question", "Options", "Correct Answer", "Pattern"],
                       lineterminator="\n")
    w.writeheader()
    w.writerows(files.mmvp)
    (directory / "Questions.csv").write_text(buf.getvalue(), encoding="utf-8")
    (directory / "vqa.jsonl").write_text(_jsonl(files.vqa), encoding="utf-8")
    (directory / "pope.jsonl").write_text(_jsonl(files.pope), encoding="utf-8")
    (directory / "scenes.jsonl").write_text(_jsonl(files.scenes), encoding="utf-8")
    (directory / "llava.json").write_text(json.dumps(files.llava, indent=1) + "\n", encoding="utf-8")
    return {"images": len(files.images), "pairs": len(files.images) // 2, "mmvp_questions": len(files.mmvp),
            "vqa_questions": len(files.vqa), "pope_questions": len(files.pope),
            "conversations": len(files.llava)}


def describe() -> dict[str, Any]:
    """The world's vocabulary and templates (written to ``toyworld.json``)."""
    return {
        "image_size_default": IMAGE_SIZE, "background": BACKGROUND, "channel_sum": CHANNEL_SUM,
        "colours": COLOURS, "shapes": SHAPES, "counts": COUNT_WORDS, "sides": SIDES, "orientations": ORIENTATIONS,
        "brightness": BRIGHTNESS, "radius_fraction": RADIUS_FRACTION,
        "skills": {s.name: {"attribute": s.attribute, "question": s.question, "answers": s.answers,
                            "detail": s.detail} for s in SKILLS.values()},
        "yes_no": {k: t for k, (t, _) in YES_NO.items()},
        "prompts": {"open": short_answer_prompt("{question}"),
                    "choice": multiple_choice_prompt("{question}", ["{option a}", "{option b}"])},
    }


def generate(out: str | os.PathLike, n_train: int = 2000, n_test: int = 300, seed: int = 0,
             size: int = IMAGE_SIZE, mc_answer: str = "text", force: bool = False) -> dict[str, Any]:
    """Write ``out/{train,test}`` (and ``out/toyworld.json``) atomically; returns the manifest.

    ``n_train``/``n_test`` are numbers of images (even: images come in pairs). Test
    images never repeat a training image (checked by hash).
    """
    for name, n in (("n_train", n_train), ("n_test", n_test)):
        if n < 2 or n % 2:
            raise DataError(f"{name}={n}: expected a positive even number of images (images come in pairs)")
    if size < MIN_SIZE:
        raise DataError(f"size={size}: images must be at least {MIN_SIZE} px (room for 4 objects of radius 3)")
    train = build_split("train", n_train // 2, seed, size, mc_answer)
    seen = {hashlib.sha256(b).hexdigest() for b in train.images}
    test = build_split("test", n_test // 2, seed, size, mc_answer, exclude=seen)
    manifest: dict[str, Any] = {"format": FORMAT, "version": VERSION, "seed": seed, "image_size": size,
                                "mc_answer": mc_answer, "world": describe(), "splits": {}}
    with atomic_output_dir(out, force=force) as tmp:
        for name, files in (("train", train), ("test", test)):
            manifest["splits"][name] = write_split(files, tmp / name)
        (tmp / "toyworld.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def select_skills(records: Sequence[dict], skills: Iterable[str], kinds: Iterable[str] | None = None) -> list[dict]:
    """The conversations of a split restricted to ``skills`` (and ``kinds``: open, yesno, choice)."""
    skills = set(skills)
    unknown = skills - set(SKILLS)
    if unknown:
        raise DataError(f"unknown skill(s) {', '.join(sorted(unknown))}; known: {', '.join(SKILLS)}")
    kinds = set(kinds) if kinds is not None else None
    return [r for r in records if r.get("skill") in skills and (kinds is None or r.get("kind") in kinds)]


__all__ = ["ATTRIBUTES", "COLOURS", "SKILLS", "Scene", "Skill", "build_split", "describe", "generate", "make_pair",
           "random_scene", "render", "select_skills"]
