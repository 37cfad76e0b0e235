"""Hub ids in recipes (fuse.hub) at the huggingface_hub boundary: the shipped
recipes/minigemini_slime.yaml with its real ids served by a FakeHub from tiny checkpoints, the
file selection (safetensors + configs + tokenizer, never pickles or code), headers-only check and
dry run, offline use of the cache, and the one-line errors (offline, no network, gated, missing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from fuse.checkpoint import LazyCheckpoint
from fuse.testing.hub import FakeHub, copy_as_repo

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "minigemini_slime.yaml"
BASE_ID, MGM_ID, SLIME_ID = "meta-llama/Meta-Llama-3-8B-Instruct", "YanweiLi/MGM-8B", "yifanzhang114/SliME-Llama3-8B"
JUNK = {"pytorch_model.bin": b"pickle", "training_args.bin": b"pickle", "optimizer.pt": b"pickle",
        "modeling_mgm.py": b"print('remote code')", "original/consolidated.00.pth": b"pickle",
        "original/params.json": b"{}", "README.md": b"# card"}


@pytest.fixture(scope="module")
def repos(tmp_path_factory, tiny_base):
    """Tiny base / MGM / SliME checkpoints laid out as hub repos (plus files a repo may also hold)."""
    from fuse.testing.mgm import build_mgm_member
    from fuse.testing.slime import build_slime_member

    d = tmp_path_factory.mktemp("hub_repos")
    build_mgm_member(d / "mgm_src", tiny_base, seed=1)
    build_slime_member(d / "slime_src", tiny_base, seed=2, extra_rows=1)
    return {BASE_ID: copy_as_repo(tiny_base, d / "base", JUNK),
            MGM_ID: copy_as_repo(d / "mgm_src", d / "mgm", JUNK),
            SLIME_ID: copy_as_repo(d / "slime_src", d / "slime", JUNK)}


@pytest.fixture
def online(monkeypatch, tmp_path):
    """An empty HF_HOME and network allowed (CI runs with HF_HUB_OFFLINE=1)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return tmp_path / "hf" / "hub"


def one_line_error(out: str) -> str:
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    assert "{" not in lines[0], out  # no unformatted placeholder
    return lines[0]


def test_file_selection_keeps_weights_configs_and_tokenizer_only():
    from huggingface_hub.utils import filter_repo_objects

    from fuse.hub import IGNORE_PATTERNS, META_PATTERNS, WEIGHT_PATTERNS

    listing = [".gitattributes", "LICENSE", "README.md", "USE_POLICY.md", "config.json", "generation_config.json",
               "model-00001-of-00004.safetensors", "model-00004-of-00004.safetensors", "model.safetensors.index.json",
               "original/consolidated.00.pth", "original/params.json", "original/tokenizer.model",
               "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json", "training_args.bin",
               "modeling_mgm.py", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
               "tokenizer.model", "preprocessor_config.json", "chat_template.jinja", "optimizer.pt", "rng.pth"]
    full = set(filter_repo_objects(listing, allow_patterns=META_PATTERNS + WEIGHT_PATTERNS,
                                   ignore_patterns=IGNORE_PATTERNS))
    assert full == {"config.json", "generation_config.json", "model-00001-of-00004.safetensors",
                    "model-00004-of-00004.safetensors", "model.safetensors.index.json", "pytorch_model.bin.index.json",
                    "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                    "preprocessor_config.json", "chat_template.jinja"}
    headers_only = set(filter_repo_objects(listing, allow_patterns=META_PATTERNS, ignore_patterns=IGNORE_PATTERNS))
    assert headers_only == full - {"model-00001-of-00004.safetensors", "model-00004-of-00004.safetensors"}


def test_fresh_machine_offline_error_is_one_actionable_line(online, monkeypatch, run_fuse):
    """No cache, HF_HUB_OFFLINE=1, the real huggingface_hub (nothing patched)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for args in (["merge", RECIPE, "--dry-run"], ["merge", RECIPE, "-o", online.parent / "out"], ["check", RECIPE]):
        r = run_fuse(*args, catch_exceptions=False)
        assert r.exit_code == 2
        line = one_line_error(r.output)
        assert f"minigemini_slime.yaml: base_model: {BASE_ID}: not (fully) in the local Hugging Face cache" in line
        assert "offline mode is on" in line and f"`hf download {BASE_ID}`" in line
    assert not (online.parent / "out").exists()


def test_no_network_gated_and_missing_repos(online, repos, tmp_path, monkeypatch, run_fuse):
    hub = FakeHub(dict(repos), network=False).install(monkeypatch)
    line = one_line_error(run_fuse("merge", RECIPE, "--dry-run", catch_exceptions=False).output)
    assert f"base_model: {BASE_ID}: cannot reach the Hugging Face Hub" in line

    hub.network, hub.gated = True, {BASE_ID}
    r = run_fuse("merge", RECIPE, "-o", tmp_path / "out", catch_exceptions=False)
    line = one_line_error(r.output)
    assert r.exit_code == 2 and f"{BASE_ID}: gated model on the Hugging Face Hub" in line
    assert f"https://huggingface.co/{BASE_ID}" in line and "`hf auth login`" in line and "HF_TOKEN" in line

    hub.gated = set()
    del hub.repos[SLIME_ID]
    line = one_line_error(run_fuse("check", RECIPE, catch_exceptions=False).output)
    assert f"members[1].model: {SLIME_ID}: no such model on the Hugging Face Hub" in line
    assert not (tmp_path / "out").exists() and not list(online.rglob("*.safetensors"))


def test_repo_without_safetensors_is_refused(online, repos, tmp_path, monkeypatch, run_fuse):
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    (pickles / "config.json").write_text((repos[MGM_ID] / "config.json").read_text())
    (pickles / "pytorch_model.bin").write_bytes(b"pickle")
    FakeHub({**repos, MGM_ID: pickles}).install(monkeypatch)
    for args in (["merge", RECIPE, "--dry-run"], ["merge", RECIPE, "-o", tmp_path / "out", "-q"]):
        line = one_line_error(run_fuse(*args, catch_exceptions=False).output)
        assert f"members[0].model: {MGM_ID}: the Hub has no safetensors weights" in line


def test_shipped_recipe_check_dry_run_and_merge_through_the_hub(online, repos, tmp_path, monkeypatch, tiny_base, run_fuse):
    hub = FakeHub(dict(repos)).install(monkeypatch)

    # check + dry run: configs, tokenizer files and safetensors headers only
    r = run_fuse("check", RECIPE, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert r.output.count("distance not measured (weights not downloaded)") == 2 and "family check passed" in r.output
    r = run_fuse("merge", RECIPE, "--dry-run", "-o", tmp_path / "out", catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "LLM tensors" in r.output and "to download" in r.output and "dry run: nothing written" in r.output
    assert not list(online.rglob("*.safetensors")) and not (tmp_path / "out").exists()
    assert all(c["fn"] != "snapshot_download" or c["local_files_only"] or "*.safetensors" not in c["allow"]
               for c in hub.calls)
    assert {c["repo"] for c in hub.calls if c["fn"] == "get_safetensors_metadata"} == {BASE_ID, MGM_ID, SLIME_ID}
    assert {c["cache"] for c in hub.calls if c["fn"] == "snapshot_download"} == {str(online)}  # HF_HOME respected

    # the merge: headers check, then weights + configs + tokenizer files, never pickles or code
    r = run_fuse("merge", RECIPE, "-o", tmp_path / "out", "-q", catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "family check on configs and headers passed; fetching" in r.output and f"downloading {MGM_ID}" in r.output
    fetched = set(hub.fetched())
    assert "model.safetensors" in fetched and "tokenizer.json" in fetched and "config.json" in fetched
    assert not [f for f in fetched if f.endswith((".bin", ".pt", ".pth", ".py")) or "/" in f], fetched
    for repo in repos:  # the cache as the hub lays it out: snapshot links into blobs/
        snap = FakeHub.repo_folder(online, repo) / "snapshots" / hub.commit(repo)
        assert (snap / "model.safetensors").is_symlink()
        assert Path(snap / "model.safetensors").resolve().parent.name == "blobs"
    cfg = json.loads((tmp_path / "out" / "fuse_config.json").read_text())
    assert cfg["base_model"] == BASE_ID and [m["source"] for m in cfg["members"]] == [MGM_ID, SLIME_ID]
    blob_names = {f["sha256"] for src in cfg["sources"].values() for f in src["files"].values()}
    assert {Path(p).resolve().name for p in online.rglob("model.safetensors")} <= blob_names

    # same result as the same checkpoints given as local directories
    data = yaml.safe_load(RECIPE.read_text())
    data["base_model"] = str(repos[BASE_ID])
    for m, repo in zip(data["members"], (MGM_ID, SLIME_ID)):
        m["model"] = str(repos[repo])
    local = tmp_path / "local.yaml"
    local.write_text(yaml.safe_dump(data))
    r = run_fuse("merge", local, "-o", tmp_path / "out_local", "-q", catch_exceptions=False)
    assert r.exit_code == 0, r.output
    a, b = LazyCheckpoint(tmp_path / "out" / "llm"), LazyCheckpoint(tmp_path / "out_local" / "llm")
    assert sorted(a.keys()) == sorted(b.keys()) and all(torch.equal(a.get(k), b.get(k)) for k in a.keys())

    # offline again: the cache alone, no hub call that would need the network
    hub.calls.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = run_fuse("merge", RECIPE, "-o", tmp_path / "out2", "-q", catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert hub.calls and all(c.get("local_files_only") for c in hub.calls)
    r = run_fuse("check", RECIPE, "--offline", catch_exceptions=False)
    assert r.exit_code == 0 and "distance not measured" not in r.output  # weights cached: the full check runs


def test_partial_cache_and_cache_dir(online, repos, tmp_path, monkeypatch, run_fuse):
    """A cache holding configs only (what a check leaves) is not a model: offline use says so."""
    from fuse.hub import local_model

    hub = FakeHub(dict(repos)).install(monkeypatch)
    other = tmp_path / "elsewhere"
    assert run_fuse("check", RECIPE, "--cache-dir", other, catch_exceptions=False).exit_code == 0
    assert {c["cache"] for c in hub.calls if c["fn"] == "snapshot_download"} == {str(other)}
    assert (FakeHub.repo_folder(other, BASE_ID) / "snapshots").is_dir() and not online.exists()
    assert local_model(BASE_ID, other) is None  # configs only
    r = run_fuse("merge", RECIPE, "--offline", "--cache-dir", other, "-o", tmp_path / "out",
                 catch_exceptions=False)
    line = one_line_error(r.output)
    assert r.exit_code == 2 and f"{BASE_ID}: not (fully) in the local Hugging Face cache {other}" in line


def test_headers_only_checkpoint_has_facts_but_no_data(tiny_base):
    import struct

    from fuse.errors import CheckpointError

    raw = (Path(tiny_base) / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    ck = LazyCheckpoint.from_headers(tiny_base / "nowhere", {"model.safetensors": header})
    full = LazyCheckpoint(tiny_base)
    assert not ck.has_data and full.has_data
    assert sorted(ck.keys()) == sorted(full.keys())
    assert all(ck.shape(k) == full.shape(k) and ck.dtype(k) == full.dtype(k) for k in ck.keys())
    with pytest.raises(CheckpointError, match="not downloaded"):
        ck.get("model.norm.weight")
