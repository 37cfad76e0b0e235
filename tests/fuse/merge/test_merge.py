"""`fuse merge` against mergekit's own CLI, exact identities, the output layout, appended vocab rows.

mergekit is run as a subprocess on the members' LLM parts exported to plain HF dirs (the same
weights `fuse merge` reads out of the MLLM checkpoints): one `mergekit-multi` process for the
deterministic methods and one `mergekit-yaml --random-seed` per DARE variant.
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

from fuse.checkpoint import LazyCheckpoint
from fuse.merge.options import MergeOptions
from fuse.merge.run import run_merge
from fuse.output_dir import MARKER
from fuse.recipe import load_recipe
from fuse.testing import rewrite_weights

WEIGHTS = [0.5, 0.3, 0.4]
DENSITIES = [0.5, 0.7, 0.6]
# name -> (recipe merge section, per-member extras, mergekit top-level extras)
CASES = {
    "task_arithmetic": ({"method": "task_arithmetic", "out_dtype": "float32"}, {}, {}),
    "ties": ({"method": "ties", "parameters": {"int8_mask": True}, "out_dtype": "bfloat16"},
             {"density": DENSITIES}, {"parameters": {"int8_mask": True}}),
    "linear": ({"method": "linear", "out_dtype": "float16"}, {}, {}),
    "dare_ties": ({"method": "dare_ties", "seed": 7, "out_dtype": "float32"}, {"density": DENSITIES}, {}),
    "dare_linear": ({"method": "dare_linear", "seed": 11, "out_dtype": "float32"}, {"density": DENSITIES}, {}),
}
SEEDED = {"dare_ties": 7, "dare_linear": 11}


def no_echo(*args) -> None:
    pass


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    return LazyCheckpoint(directory).state_dict()


@pytest.fixture(scope="module")
def family(tmp_path_factory, tiny_base, llava_pair):
    """Three members of the tiny family in both LLaVA layouts (:func:`llava_pair` + ``c``) and their LLMs as
    plain HF dirs."""
    from fuse.members import load_member
    from fuse.merge.export import export_llm
    from fuse.testing import build_llava_hf_member

    root = tmp_path_factory.mktemp("family")
    members = [llava_pair["a"], llava_pair["b"], build_llava_hf_member(root / "c", tiny_base, seed=3)[0]]
    llms = [export_llm(load_member(m).llm, root / f"{m.name}_llm", tokenizer_dir=m) for m in members]
    return {"root": root, "base": Path(tiny_base), "members": members, "llms": llms}


@pytest.fixture(scope="module")
def mergekit_out(family):
    """mergekit's outputs, one dir per case, from its own CLIs."""
    root = family["root"] / "mergekit"
    root.mkdir()

    def config(case: str) -> dict:
        merge, per_member, top = CASES[case]
        models = []
        for i, llm in enumerate(family["llms"]):
            params = {"weight": WEIGHTS[i], **{k: v[i] for k, v in per_member.items()}}
            models.append({"model": str(llm), "parameters": params})
        cfg = {"merge_method": merge["method"], "models": models, "dtype": "float32", "out_dtype": merge["out_dtype"],
               **top}
        if merge["method"] != "linear":
            cfg["base_model"] = str(family["base"])
        return cfg

    multi = [dict(name=f"mk_{c}", **config(c)) for c in CASES if c not in SEEDED]
    (root / "multi.yml").write_text(yaml.safe_dump_all(multi))
    cmds = [["mergekit-multi", str(root / "multi.yml"), "-I", str(root), "--quiet"]]
    for case, seed in SEEDED.items():
        (root / f"{case}.yml").write_text(yaml.safe_dump(config(case)))
        cmds.append(["mergekit-yaml", str(root / f"{case}.yml"), str(root / f"mk_{case}"), "--random-seed", str(seed),
                     "--quiet"])
    with ThreadPoolExecutor(len(cmds)) as pool:
        results = list(pool.map(lambda c: subprocess.run(c, capture_output=True, text=True), cmds))
    for cmd, res in zip(cmds, results):
        assert res.returncode == 0, f"{cmd}: {res.stderr[-2000:]}"
    return root


@pytest.mark.parametrize("case", list(CASES))
def test_bit_exact_vs_mergekit(family, mergekit_out, tmp_path, case, run_fuse, write_recipe):
    merge, per_member, _ = CASES[case]
    members = [{"model": str(m), "weight": WEIGHTS[i], **{k: v[i] for k, v in per_member.items()}}
               for i, m in enumerate(family["members"])]
    base = None if merge["method"] == "linear" else str(family["base"])
    recipe = write_recipe(tmp_path / "r.yaml", members, base_model=base, merge={**merge, "dtype": "float32"})
    # tiny chunks: element-wise methods are merged in many row chunks, which must not change a bit
    run_merge(load_recipe(recipe), tmp_path / "out", MergeOptions(chunk_bytes=1024, progress=False), echo=no_echo)
    ours, ref = tensors(tmp_path / "out" / "llm"), tensors(mergekit_out / f"mk_{case}")
    assert sorted(ours) == sorted(ref)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype, k
        assert torch.equal(ours[k], ref[k]), f"{case}: {k} differs from mergekit"
    if case in SEEDED:  # a different seed must give a different result (the seed is really used)
        recipe = write_recipe(tmp_path / "r2.yaml", members, base_model=base,
                              merge={**merge, "dtype": "float32", "seed": 1})
        assert run_fuse("merge", recipe, "-o", tmp_path / "out2", "-q").exit_code == 0
        other = tensors(tmp_path / "out2" / "llm")
        assert not torch.equal(other["model.layers.0.mlp.up_proj.weight"], ref["model.layers.0.mlp.up_proj.weight"])


def test_single_member_and_identical_members_reproduce_the_llm(family, tmp_path, run_fuse, write_recipe):
    a = family["members"][0]
    want = tensors(family["llms"][0])
    cases = {
        # float64 compute makes base + 1*(a - base) exact for float32 weights
        "ta_single": (family["base"], [{"model": str(a), "weight": 1.0}], {"dtype": "float64"}),
        "linear_single": (None, [{"model": str(a), "weight": 1.0}], {"method": "linear"}),
        "ta_twice": (family["base"], [{"model": str(a)}, {"model": str(a)}], {"dtype": "float64"}),
        "ties_twice": (family["base"], [{"model": str(a), "weight": 1.0}, {"model": str(a), "weight": 1.0}],
                       {"method": "ties", "dtype": "float64"}),
        "linear_twice": (None, [{"model": str(a)}, {"model": str(a)}], {"method": "linear"}),
    }
    for name, (base, members, merge) in cases.items():
        recipe = write_recipe(tmp_path / f"{name}.yaml", members, base_model=base and str(base), merge=merge)
        res = run_fuse("merge", recipe, "-o", tmp_path / name, "-q", "--no-checksums")
        assert res.exit_code == 0, res.output
        got = tensors(tmp_path / name / "llm")
        assert sorted(got) == sorted(want)
        for k in want:
            assert torch.equal(got[k], want[k]), f"{name}: {k}"


@pytest.fixture(scope="module")
def layout(family, tmp_path_factory, llava_pair, run_fuse, write_recipe):
    """(recipe dir, OUT, `fuse merge` output) of one merge whose recipe sets every section: text member
    "orig" with an extra eos id, an inference option, a relative output dir and small shards."""
    a, b = family["members"][:2]
    root = tmp_path_factory.mktemp("layout")
    recipe = write_recipe(root / "r.yaml", [{"model": str(a)}, {"model": str(b), "name": "orig"}],
                          merge={"method": "task_arithmetic"}, text={"member": "orig", "extra_eos_ids": [5]},
                          inference={"token_budget": "pool:2"}, output={"dir": "fused", "max_shard_size": "40KB"})
    res = run_fuse("merge", recipe, "-q", catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return root, root / "fused", res.output  # output.dir is relative to the recipe file


def test_layout_top_level(layout):
    root, out, printed = layout
    assert "dist to base" in printed and "wrote" in printed
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "README.md", "config.json", "fuse_config.json", "llm",
                                                     "members"]
    assert not list(root.glob(".fused.tmp-*"))


def test_layout_llm_is_a_plain_sharded_llama(layout):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = layout[1]
    assert (out / "llm" / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(out / "llm"))
    sd = tensors(out / "llm")
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    tok = AutoTokenizer.from_pretrained(str(out / "llm"))
    assert tok.convert_tokens_to_ids("<|eot_id|>") == 253
    # generation stops on the eos union (the text member's) + the recipe's extra id
    assert json.loads((out / "llm" / "generation_config.json").read_text())["eos_token_id"] == [253, 5]


def test_layout_fuse_config(layout, family):
    from fuse.members import load_member

    b = family["members"][1]
    cfg = json.loads((layout[1] / "fuse_config.json").read_text())
    # the text side comes from the member named by text.member; eos = union + extra
    assert cfg["text"] == {"member": "orig", "prompt_style": load_member(b).text.prompt_style,
                           "placeholder": "<image>", "eos_token_ids": [253, 5]}
    assert [m["name"] for m in cfg["members"]] == ["a", "orig"]
    assert [m["weight"] for m in cfg["members"]] == [0.5, 0.5]
    assert cfg["members"][1]["dir"] == "members/orig" and cfg["members"][1]["format"] == "llava"
    assert cfg["merge"] == {"method": "task_arithmetic", "parameters": {}, "dtype": "float32", "out_dtype": "float32",
                            "seed": 0}
    assert cfg["inference"] == {"token_budget": "pool:2"} and cfg["format_version"] == 1
    assert cfg["base_model"] == str(family["base"])


def test_layout_config_json_is_fuse_config_plus_model_type(layout):
    cfg = json.loads((layout[1] / "fuse_config.json").read_text())
    full = json.loads((layout[1] / "config.json").read_text())
    assert full.pop("model_type") == "visionfuse" and full.pop("architectures") == ["FusedModel"] and full == cfg


def test_layout_checksums_of_every_source_file(layout, family):
    from fuse.merge.checksums import sha256_file

    a, b = family["members"][:2]
    cfg = json.loads((layout[1] / "fuse_config.json").read_text())
    files = cfg["sources"][str(a)]["files"]
    assert files["model.safetensors"]["sha256"] == sha256_file(a / "model.safetensors")
    assert files["config.json"]["size"] == (a / "config.json").stat().st_size
    assert set(cfg["sources"]) == {str(a), str(b), str(family["base"])}


def test_layout_vision_branches_are_the_members_own(layout, family):
    from fuse.members import load_member, load_vision_branch

    a, b = family["members"][:2]
    for name, src in (("a", a), ("orig", b)):
        branch, vcfg = load_vision_branch(layout[1] / "members" / name)
        own = load_member(src)
        assert vcfg["format"] == own.format
        for k, v in own.vision.state_dict().items():
            assert torch.equal(branch.state_dict()[k], v), (name, k)


def test_layout_model_card(layout):
    card = (layout[1] / "README.md").read_text()
    assert "| 2 | orig | llava |" in card and "mergekit `task_arithmetic`" in card


def _with_pad_row(src: Path, dst: Path, seed: int = 5) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A copy of an original-layout LLaVA member with one appended vocab row (like SliME's pad 128256)."""
    from transformers import AutoTokenizer

    g = torch.Generator().manual_seed(seed)
    rows = {}

    def append_row(sd: dict) -> None:
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            rows[k] = torch.randn(1, sd[k].shape[1], generator=g)
            sd[k] = torch.cat([sd[k], rows[k]])

    rewrite_weights(src, dst, append_row)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["vocab_size"] += 1
    (dst / "config.json").write_text(json.dumps(cfg))
    tok = AutoTokenizer.from_pretrained(str(src))
    tok.add_special_tokens({"pad_token": "<pad>"})
    assert tok.convert_tokens_to_ids("<pad>") == cfg["vocab_size"] - 1
    tok.save_pretrained(str(dst))
    return dst, rows["model.embed_tokens.weight"][0], rows["lm_head.weight"][0]


def test_appended_vocab_rows_are_carried(family, tmp_path, run_fuse, write_recipe):
    from transformers import AutoModelForCausalLM

    a, b = family["members"][:2]
    b_pad, emb_row, head_row = _with_pad_row(b, tmp_path / "b_pad")
    plain = write_recipe(tmp_path / "plain.yaml", [a, b])
    padded = write_recipe(tmp_path / "pad.yaml", [a, b_pad], text={"member": "b_pad"})
    check = run_fuse("check", padded)
    assert check.exit_code == 0, check.output
    assert "257" in check.output and "+1 appended vocab row" in check.output
    for r, o in ((plain, "plain"), (padded, "pad")):
        res = run_fuse("merge", r, "-o", tmp_path / o, "-q", "--no-checksums")
        assert res.exit_code == 0, res.output
    want, got = tensors(tmp_path / "plain" / "llm"), tensors(tmp_path / "pad" / "llm")
    for k in want:
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            assert got[k].shape[0] == 257
            assert torch.equal(got[k][:256], want[k])  # shared rows: merged as usual
        else:
            assert torch.equal(got[k], want[k])
    assert torch.equal(got["model.embed_tokens.weight"][256], emb_row)  # appended row: carried verbatim
    assert torch.equal(got["lm_head.weight"][256], head_row)
    cfg = json.loads((tmp_path / "pad" / "llm" / "config.json").read_text())
    assert cfg["vocab_size"] == 257
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "pad" / "llm")).config.vocab_size == 257
    fcfg = json.loads((tmp_path / "pad" / "fuse_config.json").read_text())
    assert [m["vocab_rows"] for m in fcfg["members"]] == [256, 257] and fcfg["llm"]["vocab_rows"] == 257


def test_dry_run_plan_writes_nothing(family, tmp_path, run_fuse, write_recipe):
    from fuse.members import load_member

    members = [{"model": str(m), "density": 0.5} for m in family["members"]]
    recipe = write_recipe(tmp_path / "r.yaml", members, merge={"method": "ties", "out_dtype": "bfloat16"})
    res = run_fuse("merge", recipe, "-o", tmp_path / "out", "--dry-run")
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["r.yaml"]
    llm = load_member(family["members"][0]).llm
    n, nbytes = len(llm.names()), llm.total_bytes()  # float32 weights
    out = res.output
    assert f"LLM tensors      {n} ({n} merge calls, whole tensors)" in out  # TIES top-k: whole tensors
    assert f"bytes to read    {4 * nbytes / 1e9:.3f} GB" in out  # 3 members + base
    assert f"LLM {nbytes / 2 / 1e9:.3f} GB" in out  # one bfloat16 copy
    assert "peak memory      ~" in out and "dry run: nothing written" in out


def test_plan_chunks_and_peak_estimate(family):
    from fuse.merge.family import check_family
    from fuse.merge.plan import build_plan
    from fuse.merge.sources import open_base, open_members
    from fuse.recipe import parse_recipe

    def plan(method, density=None, chunk=1024):
        r = parse_recipe({"base_model": str(family["base"]), "merge": {"method": method},
                          "members": [{"model": str(m), **({"density": density} if density else {})}
                                      for m in family["members"]]})
        base, members = open_base(r), open_members(r)
        return build_plan(r, base, members, check_family(base, members).tensor_names, chunk_bytes=chunk)

    ta = plan("task_arithmetic")
    emb = next(j for j in ta.jobs if j.name == "model.embed_tokens.weight")
    assert emb.chunks == [(i, i + 4) for i in range(0, 256, 4)]  # 1024 B / (64 * 4 B) = 4 rows per call
    assert [j.name for j in ta.jobs] == sorted(j.name for j in ta.jobs)
    sparse = plan("ties", density=0.5)
    assert all(j.chunks == [(0, j.shape[0])] for j in sparse.jobs)  # top-k needs the whole tensor
    assert sparse.working_set_bytes() > ta.working_set_bytes()
    peak, base = ta.peak_memory_estimate(baseline=100)
    assert peak == 100 + max(ta.working_set_bytes() + 16 * 2**20, int(1.25 * ta.vision_load_bytes))
    assert ta.vision_load_bytes > 0 and ta.vision_bytes > 0


def test_sampled_rows_cover_small_tensors_and_spread_over_big_ones():
    from fuse.merge.family import sampled_rows

    assert sampled_rows(256, 64) == [(0, 256)]
    big = sampled_rows(128256, 4096)  # LLaMA-3 embedding: 8 blocks of 128 rows, first and last rows included
    assert len(big) == 8 and big[0][0] == 0 and big[-1][1] == 128256
    assert all(b - a == 128 for a, b in big) and all(x[1] <= y[0] for x, y in zip(big, big[1:]))


def test_relative_distance_on_sampled_rows_tracks_the_full_formula(tmp_path):
    from safetensors.torch import save_file

    from fuse.checkpoint import LazyCheckpoint
    from fuse.members.base import LLMPart
    from fuse.merge.family import relative_distance

    g = torch.Generator().manual_seed(0)
    ref = {"big": torch.randn(4096, 2048, generator=g), "small": torch.randn(64, 32, generator=g)}
    other = {k: v + 0.03 * torch.randn(v.shape, generator=g) * (1 + torch.arange(v.shape[0])[:, None] / v.shape[0])
             for k, v in ref.items()}
    parts = []
    for name, sd in (("ref", ref), ("other", other)):
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
        parts.append(LLMPart({}, {k: k for k in sd}, LazyCheckpoint(tmp_path / f"{name}.safetensors")))
    for names in (["small"], ["big", "small"]):
        full = (sum(float(((other[n] - ref[n]).double() ** 2).sum()) for n in names) /
                sum(float((ref[n].double() ** 2).sum()) for n in names)) ** 0.5
        got = relative_distance(parts[0], parts[1], names)
        tol = (1e-9 if names == ["small"] else 0.05) * full  # small: every row; big: 8 blocks of rows
        assert abs(got - full) <= tol, (names, got, full)


def test_checksums_take_sha256_from_hub_cache_blob_names(tmp_path):
    """A hub snapshot file links to blobs/<sha256>: that name is used, the file is not hashed again."""
    import hashlib

    from fuse.merge.checksums import checksum_dir

    data = b"weights" * 1000
    true = hashlib.sha256(data).hexdigest()
    fake = "ab" * 32  # proves the name, not the content, is used for linked blobs
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / true).write_bytes(data)
    (tmp_path / "blobs" / fake).write_bytes(data)
    snap = tmp_path / "snapshots" / "rev"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(tmp_path / "blobs" / true)
    (snap / "extra.safetensors").symlink_to(tmp_path / "blobs" / fake)
    (snap / "config.json").write_text("{}")  # a plain file: hashed
    files = checksum_dir(snap)["files"]
    assert files["model.safetensors"] == {"size": len(data), "sha256": true}
    assert files["extra.safetensors"]["sha256"] == fake
    assert files["config.json"]["sha256"] == hashlib.sha256(b"{}").hexdigest()
