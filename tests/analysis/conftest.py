"""Shared fixtures for the analysis tests: a tiny LLaVA family, image folders, a report checker."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from fuse.testing import build_base_llm, build_llava_hf_member, build_llava_member, random_image


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> dict[str, Path]:
    """base LLM; ``hf1`` (llava-hf, seed 1); ``orig1`` (original LLaVA layout, SAME vision weights as hf1);
    ``hf2`` (llava-hf, seed 2: different encoder and projector)."""
    root = tmp_path_factory.mktemp("family")
    base = build_base_llm(root / "base", seed=0)
    hf1, _ = build_llava_hf_member(root / "hf1", base, seed=1)
    orig1 = build_llava_member(root / "orig1", base, seed=1)
    hf2, _ = build_llava_hf_member(root / "hf2", base, seed=2)
    return {"root": root, "base": base, "hf1": hf1, "orig1": orig1, "hf2": hf2}


def make_fused_dir(out: Path, family: dict[str, Path], names=("hf1", "hf2")) -> Path:
    """A fused output in the documented ``fuse merge`` layout (members' branches copied; the LLM is the
    base here: the analysis only needs the layout, not a real merge)."""
    import shutil

    from fuse.members import load_member

    shutil.copytree(family["base"], out / "llm")
    entries = []
    for n in names:
        m = load_member(family[n])
        m.save_vision_branch(out / "members" / n)
        entries.append({"name": n, "dir": f"members/{n}", "format": m.format, "source": str(family[n]),
                        "weight": 1 / len(names), "eos_token_ids": m.text.eos_token_ids})
    cfg = {"format_version": 1, "base_model": str(family["base"]), "members": entries,
           "merge": {"method": "task_arithmetic"}, "text": {"member": names[0]}, "inference": {}}
    (out / "fuse_config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="session")
def fused_dir(family, tmp_path_factory) -> Path:
    return make_fused_dir(tmp_path_factory.mktemp("fused") / "out", family)


@pytest.fixture(scope="session")
def square_images(tmp_path_factory) -> Path:
    """12 random square images (LLaVA's pad-to-square is then a no-op in both formats)."""
    d = tmp_path_factory.mktemp("square")
    for i in range(12):
        random_image(100 + i, (56, 56)).save(d / f"img_{i:02d}.png")
    return d


@pytest.fixture()
def images_with_bad(tmp_path) -> Path:
    """6 readable images (mixed modes/sizes) + 2 unreadable files."""
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    for i in range(5):
        random_image(i, (64 + 4 * i, 48)).save(d / f"ok_{i}.png")
    random_image(9, (40, 40)).convert("L").save(d / "sub" / "gray.jpg")
    (d / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (d / "empty.png").write_bytes(b"")
    return d


def write_recipe(path: Path, members: list[Path], base: Path | None = None, names: list[str] | None = None) -> Path:
    lines = []
    if base is not None:
        lines.append(f"base_model: {base}")
    lines.append("members:")
    for i, m in enumerate(members):
        lines.append(f"  - model: {m}")
        if names:
            lines.append(f"    name: {names[i]}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture()
def recipe_writer():
    return write_recipe


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs: list[str] = []
        self.links: list[str] = []
        self.tables = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
        elif tag == "a":
            self.links.append(a["href"])
        elif tag == "table":
            self.tables += 1


def _no_constants(name: str):
    raise AssertionError(f"report.json contains {name}")


def check_report(out: Path, min_figures: int = 1) -> dict:
    """Render-check a report dir: Markdown and HTML parse, every referenced PNG exists and is a
    valid, non-trivial image; the JSON is strict. Returns the JSON numbers."""
    md = (out / "report.md").read_text()
    md_imgs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    md_links = [x for x in re.findall(r"(?<!!)\[[^\]]*\]\(([^)]+)\)", md)]
    parser = _Refs()
    parser.feed((out / "report.html").read_text())
    parser.close()
    assert md.startswith("# ")
    assert len(md_imgs) >= min_figures, md
    assert sorted(md_imgs) == sorted(parser.imgs), "Markdown and HTML reference different figures"
    assert sorted(md_links) == sorted(parser.links)
    for ref in md_imgs:
        p = out / ref
        assert p.is_file(), ref
        assert p.stat().st_size > 2000, f"{ref}: suspiciously small PNG"
        with Image.open(p) as im:
            assert im.format == "PNG"
            im.verify()
        with Image.open(p) as im:
            assert im.width >= 100 and im.height >= 100, (ref, im.size)
            ext = im.convert("L").getextrema()
            assert ext[0] != ext[1], f"{ref}: blank image"
    for ref in md_links:
        assert (out / ref).is_file(), ref
    data = json.loads((out / "report.json").read_text(), parse_constant=_no_constants)  # NaN/Infinity fail
    return data["numbers"]


@pytest.fixture()
def report_checker():
    return check_report
