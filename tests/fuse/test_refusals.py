"""Inputs that used to pass silently (NaN weights, odd names, unchecked recipe sections) or end in a
Python traceback: each is now one clear line (exit code 2) or a loud failure, never a wrong result."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from fuse.checkpoint import LazyCheckpoint
from fuse.errors import CheckpointError, DataError, FuseError, NumericsError
from fuse.testing import png_bomb, rewrite_weights


@pytest.fixture(scope="module")
def fam(tmp_path_factory, tiny_base, llava_pair):
    """:func:`llava_pair` plus ``notower`` (a LLaVA member naming its CLIP tower by path) and ``fused``
    (the pair in the fused layout)."""
    from fuse.testing import build_llava_member
    from fuse.testing.fused import build_fused_dir

    root = tmp_path_factory.mktemp("refusals")
    return {**llava_pair, "notower": build_llava_member(root / "notower", tiny_base, seed=3, include_tower=False),
            "fused": build_fused_dir(root / "fused", [llava_pair["a"], llava_pair["b"]])}


def nan_in(key_part: str):
    def edit(sd):
        k = next(k for k in sd if key_part in k)
        sd[k] = sd[k].clone()
        sd[k].view(-1)[0] = float("nan")
    return edit


# ------------------------------------------------------------------------------ case 6: NaN/Inf
@pytest.mark.parametrize("member, layout", [("b", "checkpoint"), ("notower", "module")])
def test_nan_in_a_members_vision_weights_stops_the_merge(tmp_path, fam, member, layout, one_error, run_fuse, write_recipe):
    bad = rewrite_weights(fam[member], tmp_path / "nanny", nan_in("mm_projector.0.weight"))
    msg = one_error(run_fuse("merge", write_recipe(tmp_path, members=("a", str(bad))), "-q", "--no-checksums"))
    assert "members[1] (nanny): vision tensor" in msg and "projector.0.weight contains NaN/Inf" in msg
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_generate_and_eval_fail_loudly_on_nan(tmp_path, fam, one_error, run_fuse, write_recipe):
    from safetensors.torch import load_file, save_file

    from fuse.testing import random_image

    fused = tmp_path / "fused"
    shutil.copytree(fam["fused"], fused)
    f = fused / "members" / "b" / "vision.safetensors"
    sd = load_file(str(f))
    for k in sd:
        if "projector" in k or "mm_projector" in k:
            sd[k] = torch.full_like(sd[k], float("nan"))
    save_file(sd, str(f), metadata={"format": "pt"})
    img = tmp_path / "img.png"
    random_image(0, (56, 56)).save(img)
    msg = one_error(run_fuse("generate", fused, "--image", img, "--prompt", "<image>\nWhat?", "--max-new-tokens", 2))
    assert "member 'b': its vision branch produced NaN/Inf visual tokens" in msg
    data = tmp_path / "vqa.jsonl"
    data.write_text(json.dumps({"question": "colour?", "image": str(img), "answers": ["red"]}) + "\n")
    assert "NaN/Inf visual tokens" in one_error(run_fuse("eval", fused, "--task", "vqa", "--data", data))
    # NaN in the LLM itself: every logit is NaN, greedy decoding used to answer "" with exit code 0
    import fuse

    m = fuse.load(fam["fused"])
    with torch.no_grad():
        m.llm.get_output_embeddings().weight[5, 0] = float("nan")
    with pytest.raises(NumericsError, match="NaN/Inf logits at generation step 1"):
        m.generate([str(img)], ["<image>\nWhat?"], max_new_tokens=2)


# ------------------------------------------------------------------------------ case 7: demo's tower
def test_demo_member_b_names_a_tower_that_exists_and_a_guess_is_a_warning(tmp_path, run_fuse):
    from fuse.members import load_member

    out = tmp_path / "demo"
    res = run_fuse("demo", "-o", out)
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "member_b" / "config.json").read_text())
    assert Path(cfg["mm_vision_tower"]) == (out / "member_b-clip").absolute()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no guessed tower config
        m = load_member(out / "member_b")
    assert m.vision.encoder.model.config.num_attention_heads == 4
    # a tower config that cannot be found is guessed from shapes: say so, naming the guess
    cfg["mm_vision_tower"] = str(tmp_path / "gone")
    (out / "member_b" / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match=r"mm_vision_tower '.*gone' is not available locally; the CLIP tower config "
                                         r"was guessed from the weight shapes: 3 layers, hidden 32, 1 attention head "):
        load_member(out / "member_b")


# ------------------------------------------------------------------------------ case 8: derived names
def test_member_path_ending_in_dotdot_gets_a_real_name(tmp_path, fam, run_fuse, write_recipe):
    b = tmp_path / "bcopy"
    shutil.copytree(fam["b"], b)
    (b / "sub").mkdir()
    rec = write_recipe(tmp_path, members=("a", f"{b}/sub/.."), text={"member": "a"})
    res = run_fuse("merge", rec, "-q", "--no-checksums")
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "members").iterdir()) == ["a", "bcopy"]
    assert not (out / "vision.safetensors").exists()  # a member named '..' wrote its branch into OUT
    import fuse

    assert fuse.load(out).member_names == ["a", "bcopy"]
    from fuse.members import load_member
    from fuse.model import FusedModel

    assert load_member(f"{b}/sub/..").name == "bcopy"
    m = load_member(fam["a"])
    m.name = "../escape"
    with pytest.raises(FuseError, match="member name '../escape' is not a plain directory name"):
        FusedModel.from_members([m])


# ------------------------------------------------------------------------------ case 9: inference section
def test_inference_section_is_checked_before_merging(tmp_path, fam, one_error, run_fuse, write_recipe):
    rec = write_recipe(tmp_path, inference={"token_budget": "squash:3"})
    for cmd in ("check", "merge"):
        msg = one_error(run_fuse(cmd, rec, "-q") if cmd == "merge" else run_fuse(cmd, rec))
        assert f"{rec}: inference.token_budget: unknown token budget 'squash'" in msg
    assert not (tmp_path / "out").exists()
    rec = write_recipe(tmp_path, inference={"budget": "pool:2"})
    assert "inference: unknown key(s) ['budget']" in one_error(run_fuse("check", rec))


def test_yaml_alias_bomb_is_refused_at_load(tmp_path, fam, one_error, run_fuse, write_recipe):
    text = write_recipe(tmp_path).read_text()
    bomb = "inference:\n  x0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for i in range(1, 9):
        bomb += f"  x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n"  # 9^9 = 387M strings once expanded
    rec = tmp_path / "bomb.yaml"
    rec.write_text(text + bomb)
    assert "expands to more than 100000 values (YAML aliases?)" in one_error(run_fuse("check", rec))


# ------------------------------------------------------------------------------ case 10: mixed dtypes
def test_members_with_different_dtypes_are_reported(tmp_path, fam, run_fuse, write_recipe):
    half = rewrite_weights(fam["b"], tmp_path / "b16",
                           lambda sd: sd.update({k: v.to(torch.bfloat16) for k, v in sd.items()}))
    res = run_fuse("merge", write_recipe(tmp_path, members=("a", str(half))), "-q", "--no-checksums")
    assert res.exit_code == 0, res.output
    assert "warning: " in res.output and "members store different dtypes (a: float32, b16: bfloat16); the merged " \
                                          "LLM is written in a's (float32); set merge.out_dtype" in res.output
    assert LazyCheckpoint(tmp_path / "out" / "llm").dtype("model.norm.weight") == torch.float32
    shutil.rmtree(tmp_path / "out")
    res = run_fuse("merge", write_recipe(tmp_path, members=("a", str(half)), merge={"out_dtype": "bfloat16"}), "-q",
                   "--no-checksums")
    assert res.exit_code == 0 and "different dtypes" not in res.output
    assert LazyCheckpoint(tmp_path / "out" / "llm").dtype("model.norm.weight") == torch.bfloat16


# ------------------------------------------------------------------------------ CLI options
@pytest.mark.parametrize("extra, expected", [
    (["--device", "tpu9"], "--device 'tpu9': expected cpu, cuda, cuda:N or auto"),
    (["--device", "cuda"], "--device cuda: CUDA is not available on this machine"),
    (["--sample", "--temperature", "0"], "temperature: sampling needs a temperature > 0, got 0.0"),
    (["--sample", "--top-p", "1.5"], "top_p: expected a number in (0, 1], got 1.5"),
    (["--sample", "--seed", str(10 ** 29)], "seed: expected an integer in [0, 2^64)"),
])
def test_generate_options_are_one_line_errors(tmp_path, fam, extra, expected, one_error, run_fuse):
    if extra[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    from fuse.testing import random_image

    img = tmp_path / "img.png"
    random_image(0, (56, 56)).save(img)
    msg = one_error(run_fuse("generate", fam["fused"], "--image", img, "--prompt", "<image>\nWhat?",
                             "--max-new-tokens", 2, *extra))
    assert expected in msg


def test_eval_device_cuda_on_a_cpu_build(tmp_path, fam, one_error, run_fuse):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    from fuse.testing import random_image

    random_image(0, (56, 56)).save(tmp_path / "x.png")
    data = tmp_path / "vqa.jsonl"
    data.write_text(json.dumps({"question": "colour?", "image": "x.png", "answers": ["red"]}) + "\n")
    msg = one_error(run_fuse("eval", fam["fused"], "--task", "vqa", "--data", data, "--device", "cuda"))
    assert "--device cuda: CUDA is not available on this machine" in msg


# ------------------------------------------------------------------------------ Python API
@pytest.fixture(scope="module")
def model(fam):
    import fuse

    return fuse.load(fam["fused"])


@pytest.mark.parametrize("call, expected", [
    (lambda m, img: m.generate([None], ["<image>\nWhat?"]), "image: expected a file path or a PIL image, got NoneType"),
    (lambda m, img: m.generate([img], [None]), "prompt 0: expected a string, got NoneType"),
    (lambda m, img: m.generate([img], [42]), "prompt 0: expected a string, got int"),
    (lambda m, img: m.generate([torch.zeros(3, 56, 56)], ["<image>\nWhat?"]),
     "got Tensor (convert a tensor with torchvision's to_pil_image or PIL.Image.fromarray)"),
    (lambda m, img: m.generate([img], ["<image>\nWhat?"], max_new_tokens=-1),
     "max_new_tokens: expected a positive integer, got -1"),
    (lambda m, img: m.generate([img], ["<image>\nWhat?"], do_sample=True, temperature=0),
     "temperature: sampling needs a temperature > 0"),
    (lambda m, img: m.generate([img], ["<image>\nWhat?"], do_sample=True, seed=10 ** 29), "seed: expected an integer"),
    (lambda m, img: m(images=[img], prompts=None), "prompt 0: expected a string, got NoneType"),
])
def test_api_bad_arguments_raise_fuse_errors(model, call, expected):
    from fuse.testing import random_image

    with pytest.raises(FuseError) as e:
        call(model, random_image(0, (56, 56)))
    assert expected in str(e.value)


def test_api_non_float_dtypes_are_refused(fam, run_fuse):
    import fuse
    from fuse.members import load_member
    from fuse.model import FusedModel

    for call in (lambda: load_member(fam["a"], dtype="int8"), lambda: load_member(fam["a"], dtype=torch.int8),
                 lambda: FusedModel.from_members([load_member(fam["a"])], dtype="int8"),
                 lambda: fuse.load(fam["fused"], dtype=torch.int8)):
        with pytest.raises(FuseError, match="dtype"):
            call()


# ------------------------------------------------------------------------------ images
def test_decompression_bomb_image_is_a_data_error(tmp_path, fam, one_error, run_fuse):
    from fuse.images import load_image

    bomb = png_bomb(tmp_path / "huge.png")
    with pytest.raises(DataError, match="huge.png: image too large to decode safely"):
        load_image(bomb)
    assert "image too large" in one_error(run_fuse("generate", fam["fused"], "--image", bomb, "--prompt", "hi"))


# ------------------------------------------------------------------------------ checkpoints
def test_tower_folder_with_only_a_pickle_is_never_unpickled(tmp_path, fam, monkeypatch):
    from safetensors.torch import load_file

    from fuse.members import load_member

    tower = tmp_path / "tower_bin"
    src = Path(json.loads((fam["notower"] / "config.json").read_text())["mm_vision_tower"])
    tower.mkdir()
    for f in ("config.json", "preprocessor_config.json"):
        shutil.copy(src / f, tower / f)
    torch.save(load_file(str(src / "model.safetensors")), tower / "pytorch_model.bin")
    m = tmp_path / "m"
    shutil.copytree(fam["notower"], m)
    cfg = json.loads((m / "config.json").read_text())
    cfg["mm_vision_tower"] = str(tower)
    (m / "config.json").write_text(json.dumps(cfg))

    def no_pickles(*a, **k):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_pickles)
    with pytest.raises(CheckpointError, match=rf"{tower}: cannot load clip encoder .*safetensors"):
        load_member(m)


def test_misleading_messages_now_name_the_real_problem(tmp_path, fam, one_error, run_fuse, write_recipe):
    # a member dir given to generate: not "fuse_config.json: 'members' is empty"
    from fuse.testing import random_image

    img = tmp_path / "img.png"
    random_image(0, (56, 56)).save(img)
    msg = one_error(run_fuse("generate", fam["a"], "--image", img, "--prompt", "hi"))
    assert "not a fused model (no fuse_config.json; config.json describes a LlavaForConditionalGeneration)" in msg
    # a config without hidden_size: not "hidden_size 4096 != 64"
    m = tmp_path / "nohidden"
    shutil.copytree(fam["a"], m)
    cfg = json.loads((m / "config.json").read_text())
    del cfg["text_config"]["hidden_size"]
    (m / "config.json").write_text(json.dumps(cfg))
    msg = one_error(run_fuse("merge", write_recipe(tmp_path, members=("b", str(m))), "-q"))
    assert "no hidden_size (an integer) in the language model's config" in msg and "4096" not in msg


@pytest.mark.parametrize("name", ["../x.safetensors", "/abs/model.safetensors"])
def test_index_shards_must_stay_inside_the_checkpoint(tmp_path, fam, name):
    from safetensors.torch import save_file

    m = tmp_path / "m"
    shutil.copytree(fam["a"], m)
    sd = LazyCheckpoint(m).state_dict()
    head = "language_model.lm_head.weight"
    outside = tmp_path / "x.safetensors" if name.startswith("..") else Path(name)
    if name.startswith(".."):
        save_file({head: sd.pop(head)}, str(outside))
    save_file(sd, str(m / "model.safetensors"))
    wm = {k: "model.safetensors" for k in sd}
    wm[head] = name
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(CheckpointError, match=rf"shard '{name}' is not a file name inside {m}"):
        LazyCheckpoint(m)


def test_fused_member_dirs_must_stay_inside_the_fused_dir(tmp_path, fam):
    import fuse

    fused = tmp_path / "fused"
    shutil.copytree(fam["fused"], fused)
    cfg = json.loads((fused / "fuse_config.json").read_text())
    cfg["members"][1]["dir"] = str(fam["fused"] / "members" / "b")
    (fused / "fuse_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="member 'b' dir .* is outside"):
        fuse.load(fused)
