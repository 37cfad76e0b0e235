"""Bad inputs to `fuse merge` / `fuse check`: one-line error naming the file/field, exit != 0, nothing written."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

from fuse.testing import rewrite_weights


@pytest.fixture(scope="module")
def fam(tmp_path_factory, tiny_base, llava_pair):
    """:func:`llava_pair` plus ``narrow`` (another hidden size) and ``foreign`` (another base's weights)."""
    from fuse.testing import build_base_llm, build_llava_hf_member

    root = tmp_path_factory.mktemp("bad")
    narrow_base = build_base_llm(root / "narrow_base", seed=0, hidden_size=32, intermediate_size=64)
    narrow = build_llava_hf_member(root / "narrow", narrow_base, seed=3)[0]
    other_base = build_base_llm(root / "other_base", seed=9)  # same shapes, independent weights
    foreign = build_llava_hf_member(root / "foreign", other_base, seed=4)[0]
    return {**llava_pair, "narrow": narrow, "foreign": foreign}


def fails(tmp_path: Path, res, contains: list[str]) -> str:
    """The one ``error:`` line of a failed ``fuse`` run, which must contain ``contains``; nothing written."""
    assert res.exit_code != 0, res.output
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), res.exception
    err = [line for line in res.output.splitlines() if line.startswith("error: ")]
    assert len(err) == 1, res.output
    assert "Traceback" not in res.output
    for c in contains:
        assert c in err[0], err[0]
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*")), "temp dir left behind"
    return err[0]


def test_unknown_method(tmp_path, run_fuse, write_recipe):
    p = write_recipe(tmp_path, merge={"method": "slerp"})
    fails(tmp_path, run_fuse("merge", p), contains=[str(p), "merge.method: 'slerp' is not one of task_arithmetic"])


def test_missing_base(tmp_path, run_fuse, write_recipe):
    p = write_recipe(tmp_path, base_model=None)
    fails(tmp_path, run_fuse("merge", p), contains=[str(p), "base_model: required for merge.method 'task_arithmetic'"])


def test_member_of_another_family(tmp_path, fam, run_fuse, write_recipe):
    p = write_recipe(tmp_path, members=("a", fam["narrow"]))
    fails(tmp_path, run_fuse("merge", p),
          contains=[str(p), "members[1] (narrow)", "hidden_size 32 != 64 of base_model"])
    fails(tmp_path, run_fuse("check", p), contains=["hidden_size 32 != 64"])


def test_mismatched_vocab_in_shared_rows(tmp_path, fam, run_fuse, write_recipe):
    from fuse.testing import tiny_tokenizer

    bad = tmp_path / "retok"
    shutil.copytree(fam["a"], bad)
    tiny_tokenizer(300).save_pretrained(str(bad))  # same rows, but the specials sit at other ids
    p = write_recipe(tmp_path, members=("b", str(bad)))
    fails(tmp_path, run_fuse("merge", p),
          contains=[str(p), "members[1] (retok)", "tokenizer maps", "base_model's maps it to"])


def test_member_path_does_not_exist(tmp_path, run_fuse, write_recipe):
    p = write_recipe(tmp_path, members=("a", str(tmp_path / "nowhere" / "m")))
    fails(tmp_path, run_fuse("merge", p), contains=[str(p), "members[1].model", "nowhere/m"])


def test_truncated_shard(tmp_path, fam, run_fuse, write_recipe):
    bad = tmp_path / "trunc"
    shutil.copytree(fam["b"], bad)
    f = bad / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    p = write_recipe(tmp_path, members=("a", str(bad)))
    fails(tmp_path, run_fuse("merge", p), contains=[str(p), "members[1].model", "truncated safetensors file"])


def test_nan_produced_in_merged_tensor(tmp_path, fam, run_fuse, write_recipe):
    def huge(sd):
        sd["model.layers.1.mlp.up_proj.weight"] = torch.full_like(sd["model.layers.1.mlp.up_proj.weight"], 3e38)

    h1 = rewrite_weights(fam["b"], tmp_path / "h1", huge)
    h2 = rewrite_weights(fam["b"], tmp_path / "h2", huge)
    p = write_recipe(tmp_path, members=({"model": str(h1), "weight": 1.0}, {"model": str(h2), "weight": 1.0}))
    fails(tmp_path, run_fuse("merge", p), contains=[str(p), "merged tensor model.layers.1.mlp.up_proj.weight",
                                                    "NaN/Inf", "overflow", "nothing was written"])


def test_nan_in_an_input_is_named(tmp_path, fam, run_fuse, write_recipe):
    def nan(sd):
        sd["model.norm.weight"][3] = float("nan")

    bad = rewrite_weights(fam["b"], tmp_path / "nanny", nan)
    p = write_recipe(tmp_path, members=("a", str(bad)))
    fails(tmp_path, run_fuse("merge", p), contains=["model.norm.weight", "input nanny already contains NaN/Inf"])


def test_disk_full(tmp_path, monkeypatch, run_fuse, write_recipe):
    import fuse.merge.writer as writer

    calls = {"n": 0}
    real = writer._write

    def full(fh, data):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fh, data)

    monkeypatch.setattr(writer, "_write", full)
    p = write_recipe(tmp_path)
    fails(tmp_path, run_fuse("merge", p, "--no-checksums"), contains=[str(tmp_path / "out"), "disk full"])
    assert calls["n"] == 6


def test_existing_output_is_refused_then_replaced_with_force(tmp_path, run_fuse, write_recipe):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    p = write_recipe(tmp_path)
    # --force replaces only what fuse wrote: a user's directory stays, with or without it
    for force in ([], ["--force"]):
        res = run_fuse("merge", p, "-q", "--no-checksums", *force)
        assert res.exit_code == 2 and "exists and was not written by this toolkit; choose another output" in res.output
        assert sorted(q.name for q in out.iterdir()) == ["keep.txt"] and not list(tmp_path.glob(".out.*"))
    out.joinpath("keep.txt").unlink()
    out.rmdir()
    res = run_fuse("merge", p, "-q", "--no-checksums")
    assert res.exit_code == 0, res.output
    (out / "extra.txt").write_text("added by hand")
    res = run_fuse("merge", p, "-q", "--no-checksums")
    assert res.exit_code == 2 and "output exists (use --force to replace it)" in res.output
    res = run_fuse("merge", p, "--force", "-q", "--no-checksums")  # fuse's own output
    assert res.exit_code == 0, res.output
    assert (out / "llm" / "model.safetensors").is_file() and not (out / "extra.txt").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_interrupt_leaves_nothing(tmp_path, monkeypatch, run_fuse, write_recipe):
    import fuse.merge.run as run

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "save_vision_branches", interrupted)  # after the LLM shards were written
    p = write_recipe(tmp_path)
    res = run_fuse("merge", p, "-q")
    assert res.exit_code == 130 and "nothing was left half-written" in res.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_foreign_member_refused_unless_allowed(tmp_path, fam, run_fuse, write_recipe):
    p = write_recipe(tmp_path, members=("a", fam["foreign"]))
    msg = fails(tmp_path, run_fuse("merge", p), contains=[str(p), "members[1] (foreign)",
                                                          "relative L2 distance to base_model", "--allow-foreign"])
    dist = float(msg.split("distance to base_model is ")[1].split(" ")[0])
    assert 1.0 < dist < 2.0  # independent weights: about sqrt(2)
    res = run_fuse("check", p)
    assert res.exit_code == 2
    table = res.output.splitlines()
    assert table[0].split()[:4] == ["member", "format", "vocab", "dist"]
    assert table[2].split()[:4] == ["a", "llava-hf", "256", "0.0200"] and table[2].split()[4] == "ok"
    assert "REFUSED" in table[3]
    res = run_fuse("merge", p, "--allow-foreign", "-q", "--no-checksums")
    assert res.exit_code == 0, res.output
    assert "foreign (allowed)" in res.output and (tmp_path / "out" / "llm").is_dir()


def test_text_member_without_tokenizer(tmp_path, fam, run_fuse, write_recipe):
    bare = tmp_path / "bare"
    shutil.copytree(fam["b"], bare)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (bare / f).unlink(missing_ok=True)
    base = tmp_path / "base_notok"
    base.mkdir()
    for f in fam["base"].iterdir():
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(f, base / f.name)
    p = write_recipe(tmp_path, members=(str(bare), "a"), base_model=str(base))
    fails(tmp_path, run_fuse("merge", p), contains=[str(p), "text.member: 'bare' has no tokenizer files"])
    cfg = json.loads((bare / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaLlamaForCausalLM"]


def test_output_over_an_input_is_refused_even_with_force(tmp_path, fam, run_fuse, write_recipe):
    src = tmp_path / "a_copy"
    shutil.copytree(fam["a"], src)
    p = write_recipe(tmp_path, members=(str(src), "b"))
    res = run_fuse("merge", p, "-o", src, "--force", "-q")
    assert res.exit_code == 2 and "exists and was not written by this toolkit" in res.output
    res = run_fuse("merge", p, "-o", src / "fused", "-q")
    assert res.exit_code == 2 and "output overlaps the input members[0].model" in res.output
    assert (src / "model.safetensors").is_file() and not list(tmp_path.glob(".a_copy.*"))
    assert not (src / "fused").exists() and not list(src.glob(".fused.*"))
