"""Loading/saving fused directories, transformers Auto-class integration, `fuse generate`, bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fuse.errors import CheckpointError, DataError
from fuse.model import FusedModel
from fuse.testing import random_image
from fuse.testing.fused import build_fused_dir


@pytest.fixture(scope="module")
def out(tmp_path_factory, tiny_llava_hf, tiny_llava_orig):
    return build_fused_dir(tmp_path_factory.mktemp("io") / "fused", [tiny_llava_hf[0], tiny_llava_orig])


@pytest.fixture(scope="module")
def fused(out):
    return FusedModel.from_pretrained(out)


def test_save_pretrained_round_trip(fused, tmp_path):
    img = random_image(1, (60, 60))
    fused.save_pretrained(tmp_path / "copy")
    again = FusedModel.from_pretrained(tmp_path / "copy")
    assert again.member_names == fused.member_names and again.eos_token_ids == fused.eos_token_ids
    assert again.config.fuse_dict() == fused.config.fuse_dict()
    cfg = json.loads((tmp_path / "copy" / "config.json").read_text())
    assert cfg["model_type"] == "visionfuse" and cfg["architectures"] == ["FusedModel"]
    assert json.loads((tmp_path / "copy" / "fuse_config.json").read_text())["members"][0]["dir"] == \
        f"members/{fused.member_names[0]}"
    with torch.no_grad():
        a = fused(images=[img], prompts=["<image>\nhi"]).logits
        b = again(images=[img], prompts=["<image>\nhi"]).logits
    assert torch.equal(a, b)


def test_auto_classes_after_import_fuse_in_fresh_process(out):
    """`import fuse` registers model_type visionfuse lazily (no torch import), AutoConfig/AutoModel load it."""
    code = (
        "import sys, fuse\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "from transformers import AutoConfig, AutoModel\n"
        f"c = AutoConfig.from_pretrained({str(out)!r})\n"
        f"m = AutoModel.from_pretrained({str(out)!r})\n"
        "print(type(c).__name__, c.model_type, type(m).__name__, m.member_names)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "FusedConfig visionfuse FusedModel" in r.stdout


def test_from_members_save_and_fuse_load(tiny_llava_hf, tmp_path):
    import fuse
    from fuse.members import load_member

    m = FusedModel.from_members([load_member(tiny_llava_hf[0])], inference={"token_budget": "pool:2"})
    m.save_pretrained(tmp_path / "single")
    again = fuse.load(tmp_path / "single")
    img = random_image(2)
    assert again.prepare([img], ["<image>\nhi"]).tokens == [{m.member_names[0]: 4}]
    assert again.generate([img], ["<image>\nhi"], max_new_tokens=5) == m.generate([img], ["<image>\nhi"], max_new_tokens=5)


def test_cli_generate_text_and_json(out, tmp_path, run_fuse):
    img = tmp_path / "img.png"
    random_image(3, (64, 48)).save(img)
    r = run_fuse("generate", out, "--image", img, "--prompt", "<image>\nWhat colour?", "--max-new-tokens", "6",
                 "--json", "--token-budget", "pool:2")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout[r.stdout.index("{"):])
    fm = FusedModel.from_pretrained(out)
    names = fm.member_names
    assert data["tokens"] == {names[0]: 4, names[1]: 4} and data["visual_tokens"] == 8
    assert data["answer"] == fm.generate([str(img)], ["<image>\nWhat colour?"], max_new_tokens=6,
                                         inference={"token_budget": "pool:2"})[0]
    assert set(data["timings"]) >= {"load", "vision", "assembly", "generate", "total"}
    assert set(data["timings"]["vision"]) == set(names)
    r = run_fuse("generate", out, "--image", img, "--prompt", "<image>\nWhat colour?", "--max-new-tokens", "6",
                 "--json", "--member-positions", "parallel")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout[r.stdout.index("{"):])["answer"] == fm.generate(
        [str(img)], ["<image>\nWhat colour?"], max_new_tokens=6, inference={"member_positions": "parallel"})[0]
    r = run_fuse("generate", out, "--image", img, "--prompt", "<image>\nWhat colour?", "--max-new-tokens", "6",
                 "--json", "--answer-select", "confidence")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout[r.stdout.index("{"):])
    ref = fm.generate([str(img)], ["<image>\nWhat colour?"], max_new_tokens=6,
                      inference={"answer_select": "confidence"}, return_details=True)
    assert data["answer"] == ref.texts[0] and data["answered_by"] == ref.selected[0]
    assert data["tokens"] == {n: 16 for n in ref.selected[0]}
    r = run_fuse("generate", out, "--image", img, "--prompt", "<image>\nWhat colour?", "--max-new-tokens", "6",
                 "--json", "--answer-select", "pmi:members", "--null-image", "#336699")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout[r.stdout.index("{"):])
    ref = fm.generate([str(img)], ["<image>\nWhat colour?"], max_new_tokens=6,
                      inference={"answer_select": "pmi:members", "null_image": "#336699"}, return_details=True)
    assert data["answer"] == ref.texts[0] and data["answered_by"] == ref.selected[0]
    r = run_fuse("generate", out, "--image", img, "--prompt", "<image>\nhi", "--answer-select", "pmi",
                 "--null-image", "grey")
    assert r.exit_code != 0 and "null_image" in r.output and "#rrggbb" in r.output
    r = run_fuse("generate", out, "--image", img, "--prompt", "What colour?", "--max-new-tokens", "3")
    assert r.exit_code == 0 and "warning: prompt has no <image>" in r.output


def test_odd_images_are_converted_and_corrupt_ones_fail(fused, tmp_path, run_fuse):
    rng = np.random.default_rng(0)
    gray = Image.fromarray(rng.integers(0, 256, (40, 50), dtype=np.uint8), "L")
    rgba = Image.fromarray(rng.integers(0, 256, (40, 50, 4), dtype=np.uint8), "RGBA")
    deep = Image.fromarray(rng.integers(0, 65535, (40, 50), dtype=np.uint16).astype(np.int32), "I")
    paths = []
    for name, im in [("gray.png", gray), ("rgba.png", rgba), ("deep.png", deep.convert("I;16"))]:
        im.save(tmp_path / name)
        paths.append(tmp_path / name)
    assert Image.open(paths[2]).mode.startswith("I;16")
    res = fused.generate(paths, ["<image>\nhi"] * 3, max_new_tokens=2, return_details=True)
    assert [sum(t.values()) for t in res.tokens] == [32, 32, 32]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match="bad.jpg"):
        fused.generate([bad], ["<image>\nhi"])
    r = run_fuse("generate", "unused", "--image", bad, "--prompt", "hi")
    assert r.exit_code == 2 and "error:" in r.output and "bad.jpg" in r.output and "Traceback" not in r.output


def test_prompt_without_placeholder_is_prepended_with_warning(fused):
    img = random_image(4)
    with pytest.warns(UserWarning, match="no <image>"):
        implicit = fused.prepare([img], ["What colour?"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explicit = fused.prepare([img], ["<image>\nWhat colour?"])
    assert torch.equal(implicit.inputs_embeds, explicit.inputs_embeds)


def test_prompt_longer_than_context_reports_counts(fused):
    ctx = fused.context_length
    img = random_image(5)
    with pytest.raises(DataError, match=rf"context of {ctx} positions.*visual tokens.*max_new_tokens 5"):
        fused.generate([img], ["<image>\n" + "the " * ctx], max_new_tokens=5)
    # what counts is positions: a prompt that only fits when the visual tokens share positions
    def n_text(k):
        b, a = fused.text.encode(fused.text.prompt("<image>\n" + "the " * k))
        return len(b) + len(a)
    k = ctx - 40
    k += ctx - 10 - n_text(k)  # "the " is one token each: n_text(k) == ctx - 10 now
    assert n_text(k) == ctx - 10
    prompt = "<image>\n" + "the " * k
    with pytest.raises(DataError, match=rf"{ctx - 10} text tokens \+ 32 visual tokens"):
        fused.prepare([img], [prompt], max_new_tokens=5)
    inputs = fused.prepare([img], [prompt], max_new_tokens=5, inference={"positions": "share"})
    assert inputs.assembled.n_positions == [ctx - 10 + 2] and inputs.assembled.lengths == [ctx - 10 + 32]


def test_mismatched_batch(fused):
    with pytest.raises(DataError, match="2 images for 1 prompts"):
        fused.prepare([random_image(1), random_image(2)], ["<image>"])


@pytest.mark.parametrize("victim,expected", [
    ("fuse_config.json+config.json", "fuse_config.json"),
    ("llm/config.json", "llm/config.json"),
    ("llm/model.safetensors", "llm"),
    ("members/{m}/vision.safetensors", "vision.safetensors"),
    ("members/{m}", "members/{m}"),
])
def test_missing_files_name_the_file(out, tmp_path, victim, expected, run_fuse):
    m = json.loads((out / "fuse_config.json").read_text())["members"][1]["name"]
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    for v in victim.format(m=m).split("+"):
        p = broken / v
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    with pytest.raises(CheckpointError, match=expected.format(m=m)):
        FusedModel.from_pretrained(broken)
    r = run_fuse("generate", broken, "--image", tmp_path / "x.png", "--prompt", "hi")
    assert r.exit_code == 2  # image missing or model broken: both one-line errors
    random_image(0).save(tmp_path / "x.png")
    r = run_fuse("generate", broken, "--image", tmp_path / "x.png", "--prompt", "hi")
    last = r.output.strip().splitlines()[-1]
    assert r.exit_code == 2 and last.startswith("error:") and expected.format(m=m).split("/")[-1] in last


def test_llm_with_more_rows_than_tokenizer(tiny_llava_hf, tmp_path):
    """SliME-style extra embedding rows: loading, generation and decoding never assume rows == tokenizer size."""
    from fuse.members import load_member

    member = load_member(tiny_llava_hf[0])
    llm = member.llm.load_model()
    n_tok = len(member.text.tokenizer)
    llm.resize_token_embeddings(n_tok + 2, mean_resizing=False)
    llm.save_pretrained(str(tmp_path / "llm_rows"))
    out = build_fused_dir(tmp_path / "fused", [member], llm=tmp_path / "llm_rows")
    fm = FusedModel.from_pretrained(out)
    assert fm.llm.get_input_embeddings().weight.shape[0] == n_tok + 2
    res = fm.generate([random_image(9)], ["<image>\nhi"], max_new_tokens=4, return_details=True)
    ids = res.token_ids[0]
    assert fm.decode(ids + [n_tok + 1, n_tok]) == fm.decode(ids) == res.texts[0]
    with pytest.raises(DataError, match="outside the LLM's embedding table"):
        fm.embed_ids([n_tok + 5])
