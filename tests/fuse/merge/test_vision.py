"""Vision branches in OUT/members/<name>: byte copies for self-contained members, built branches otherwise.

Reference: the source member loaded directly (``load_member(src)``); the copy must give the same
visual tokens and, for the ``checkpoint`` layout, the very same tensors (names, dtypes, bytes).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from fuse.checkpoint import LazyCheckpoint
from fuse.members import load_member, load_vision_branch
from fuse.testing import build_llava_hf_member, build_llava_member, random_image


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, tiny_base):
    from fuse.testing.mgm import build_mgm_member
    from fuse.testing.slime import build_slime_member

    root = tmp_path_factory.mktemp("vision_copy")
    members = {
        "hf": build_llava_hf_member(root / "hf", tiny_base, seed=1)[0],
        "orig": build_llava_member(root / "orig", tiny_base, seed=2),
        "notower": build_llava_member(root / "notower", tiny_base, seed=3, include_tower=False),
        "mgm": build_mgm_member(root / "mgm", tiny_base, seed=4),
        "slime": build_slime_member(root / "slime", tiny_base, seed=5),
    }
    recipe = root / "r.yaml"
    recipe.write_text(yaml.safe_dump({"base_model": str(tiny_base), "merge": {"method": "task_arithmetic"},
                                      "members": [{"model": str(p), "name": n} for n, p in members.items()]}))
    out = root / "out"
    r = subprocess.run([sys.executable, "-m", "fuse.cli", "merge", str(recipe), "-o", str(out), "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return members, out


def test_layouts(mixed):
    members, out = mixed
    layouts = {n: json.loads((out / "members" / n / "vision_config.json").read_text()).get("layout", "module")
               for n in members}
    # external tower (mm_vision_tower) and SliME's separator row (borrowed from the LLM) need a built branch
    assert layouts == {"hf": "checkpoint", "orig": "checkpoint", "notower": "module", "mgm": "checkpoint",
                       "slime": "module"}


@pytest.mark.parametrize("name", ["hf", "orig", "mgm"])
def test_checkpoint_copy_is_byte_exact(mixed, name):
    members, out = mixed
    src, d = members[name], out / "members" / name
    m = load_member(src, vision=False)
    want = sorted(k for k, part in m.key_usage.items() if part != "llm")
    got = LazyCheckpoint(d / "vision.safetensors")
    assert sorted(got.keys()) == want and want
    ref = LazyCheckpoint(src)
    for k in want:
        a, b = got.get(k), ref.get(k)
        assert a.dtype == b.dtype and torch.equal(a, b), k
    assert (d / "config.json").read_bytes() == (src / "config.json").read_bytes()
    cfg = json.loads((d / "vision_config.json").read_text())
    assert cfg["format"] == m.format and cfg["text"] == m.text.to_dict()


@pytest.mark.filterwarnings("ignore:SliME branch called without prompt embeddings")
@pytest.mark.parametrize("name", ["hf", "orig", "notower", "mgm", "slime"])
def test_copied_branch_gives_the_members_tokens(mixed, name):
    members, out = mixed
    ref = load_member(members[name])
    branch, cfg = load_vision_branch(out / "members" / name)
    assert cfg["kind"] == branch.kind
    img = [random_image(3, (70, 50))]
    with torch.no_grad():
        want = ref.visual_tokens(img)
        branch.eval()
        got = branch(branch.preprocess(img))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6, rtol=0), (name, (a - b).abs().max())


def test_llm_only_member_matches_full_load(mixed):
    members, _ = mixed
    for name, src in members.items():
        full, light = load_member(src), load_member(src, vision=False)
        assert light.vision is None and full.vision is not None
        assert light.llm.keys == full.llm.keys and light.llm.config == full.llm.config, name
        assert light.key_usage == full.key_usage and light.text.to_dict() == full.text.to_dict(), name


def test_merge_of_copyable_members_never_imports_transformers_modeling(mixed, tmp_path):
    """The start-up cost that dominated `fuse merge` at small sizes: modeling code is not imported by the
    merge itself (the visual-token alignment check, on by default, has to build and run the branches:
    it is switched off here to measure the merge path alone)."""
    members, _ = mixed
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"members": [{"model": str(members["hf"])}, {"model": str(members["orig"])}],
                                      "merge": {"method": "linear"}}))
    code = ("import sys; from fuse.cli import main; "
            f"main(['merge', {str(recipe)!r}, '-o', {str(tmp_path / 'o')!r}, '-q', '--no-align-check'], "
            "standalone_mode=False); "
            "print(sorted(m for m in sys.modules if m.startswith('transformers.model')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "o" / "members").is_dir()


def test_copied_mgm_branch_loads_in_a_fresh_process(mixed):
    """Reading an MGM copy must not depend on an earlier import of the MGM adapter (the registry lists it)."""
    _, out = mixed
    code = ("from fuse.members.loader import load_vision_branch; "
            f"b, c = load_vision_branch({str(out / 'members' / 'mgm')!r}); print(c['layout'], b.kind)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["checkpoint", "mgm"]
