"""End-to-end CPU runs on tiny CLIP/DINOv2/LLaMA: stages, trainable sets, loss, member export, resume, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fuse.checkpoint import LazyCheckpoint
from fuse.errors import CheckpointError
from fuse.members import load_member
from fuse.images import load_image
from train.api import make_config, train
from train.logs import read_log
from train.loop import Trainer


def _losses(run_dir):
    return [r["loss"] for r in read_log(run_dir) if "loss" in r and "event" not in r]


@pytest.mark.parametrize("preset,groups", [("llava", ("fusion.",)), ("comm", ("fusion.", "llm."))])
def test_only_the_stage_parameters_train_and_encoders_get_no_gradient(tmp_path, toy_cfg, preset, groups):
    tr = Trainer(make_config(toy_cfg(tmp_path / "run", preset=preset, lr=1e-2, max_steps=2)))
    named = dict(tr.raw_model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable == {n for n in named if n.startswith(groups)}
    assert any(n.startswith("fusion.clip_lln.") for n in trainable) and "fusion.dino_scale.logits" in trainable
    enc_params = dict(tr.branch.encoders.named_parameters())
    assert enc_params and not any(p.requires_grad for p in enc_params.values())
    assert not any(n.startswith("encoders.") for n in named)  # encoders are outside the wrapped model
    before = {n: p.detach().clone() for n, p in {**named, **{"enc." + k: v for k, v in enc_params.items()}}.items()}
    it = tr._loader(0, 0)
    tr.train_step([next(it)])
    assert all(p.grad is None for p in enc_params.values())
    assert not tr.branch.encoders.training and all(not m.training for m in tr.branch.encoders.modules())
    changed = {n for n, p in {**named, **{"enc." + k: v for k, v in enc_params.items()}}.items()
               if not torch.equal(before[n], p.detach())}
    assert changed and all(n.startswith(groups) for n in changed)
    if preset == "llava":
        assert not any(n.startswith("llm.") for n in changed)


def test_stage1_loss_halves_and_stage2_continues_from_it(stage1_run, tmp_path, cli, yaml_file, toy_cfg):
    s1 = _losses(stage1_run)
    assert len(s1) == 40 and min(s1[-5:]) <= 0.5 * s1[0], s1  # memorisable 16-sample set, <= 200 steps
    cfg = toy_cfg(tmp_path / "ignored")
    for k in ("llm", "encoders", "fusion", "output_dir", "stage", "max_steps"):
        cfg.pop(k)
    y = yaml_file(tmp_path / "s2.yaml", cfg)
    res = cli("comm", "--stage", "2", "-c", str(y), "--from", str(stage1_run / "final"), "-o", str(tmp_path / "s2"),
              "--max-steps", "5", "--lr", "1e-3")
    assert res.exit_code == 0, res.output
    s2 = _losses(tmp_path / "s2")
    assert s2[0] < 0.6 * s1[0]  # starts from the trained stage-1 weights, not from scratch
    cfg2 = json.loads((tmp_path / "s2/final/config.json").read_text())
    assert cfg2["training"]["stage"] == 2 and cfg2["training"]["from"] == str(stage1_run / "final")
    assert cfg2["fusion"] == json.loads((stage1_run / "final/config.json").read_text())["fusion"]


def test_final_member_loads_in_fuse_and_reproduces_the_trained_model(stage1_run, toy_data):
    final = stage1_run / "final"
    m = load_member(final)  # auto-detected
    assert m.format == "comm" and m.vision.kind == "comm" and m.text.prompt_style == "chat_template"
    assert m.usage_summary()["llm"] == len(m.llm.names()) and m.llm.names()[0].startswith(("model.", "lm_head."))
    # weights = the last training checkpoint's (step 40)
    ckpt = load_file(str(stage1_run / "checkpoints/step-0000040/accelerate/model.safetensors"))
    reader = LazyCheckpoint(final)
    for k, v in ckpt.items():
        stored = "vision." + k if k.startswith("fusion.") else k[len("llm."):]
        assert torch.equal(reader.get(stored), v), k
    # the fuse code path (Member.visual_tokens + TextSide + LLMPart) gives the trained low loss
    js, root = toy_data
    rec = json.loads(js.read_text())[0]
    img = load_image(root / rec["image"])
    vis = m.visual_tokens([img])[0]
    assert vis.shape == (m.vision.num_tokens, m.llm.config["hidden_size"])
    before, after = m.text.encode(m.text.prompt(rec["conversations"][0]["value"]))
    tok = m.text.tokenizer
    ans = tok(rec["conversations"][1]["value"], add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|eot_id|>")]
    llm = m.llm.load_model()
    emb = llm.get_input_embeddings()
    ids = torch.tensor(before + after + ans)
    with torch.no_grad():
        x = torch.cat([emb(torch.tensor(before)), vis, emb(torch.tensor(after + ans))])[None]
        logits = llm(inputs_embeds=x).logits[0]
    n_ans = len(ans)
    loss = torch.nn.functional.cross_entropy(logits[-n_ans - 1:-1], ids[-n_ans:])
    first = _losses(stage1_run)[0]
    assert float(loss) < 0.5 * first


def test_resume_after_stop_is_bit_exact(tmp_path, toy_cfg):
    over = dict(max_steps=6, save_every=3, per_device_batch_size=2, global_batch_size=4, lr=1e-2)
    full = train(toy_cfg(tmp_path / "full", **over))
    part = train(toy_cfg(tmp_path / "part", stop_at_step=3, **over))
    assert part.stopped_early and part.final_dir is None and part.checkpoint.name == "step-0000003"
    assert not (tmp_path / "part/final").exists()
    resumed = train(toy_cfg(tmp_path / "part", resume="auto", **over))
    assert resumed.step == 6 and not resumed.stopped_early
    a, b = load_file(str(full.final_dir / "model.safetensors")), load_file(str(resumed.final_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.losses == resumed.losses
    steps = [r["step"] for r in read_log(tmp_path / "part") if "loss" in r and "event" not in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # no duplicated or missing log lines

    # a crash in the middle of step 5 (after the step-4 checkpoint): progress after 4 is lost, resume redoes it
    crash = Trainer(make_config(toy_cfg(tmp_path / "crash", **{**over, "save_every": 2})))
    real_step, calls = crash.train_step, []

    def dying_step(mbs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # like a SIGINT / preemption mid-step
        return real_step(mbs)

    crash.train_step = dying_step
    with pytest.raises(KeyboardInterrupt):
        crash.train()
    assert not (tmp_path / "crash/final").exists()
    again = train(toy_cfg(tmp_path / "crash", resume="auto", **{**over, "save_every": 2}))
    c = load_file(str(again.final_dir / "model.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a) and again.losses == full.losses


def test_interrupted_checkpoint_is_never_seen(tmp_path, toy_cfg, monkeypatch):
    tr = Trainer(make_config(toy_cfg(tmp_path / "run", max_steps=2)))

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tr.acc, "save_state", boom)
    with pytest.raises(KeyboardInterrupt):
        tr.save()
    from train.checkpointing import find_checkpoint, list_checkpoints

    assert list_checkpoints(tmp_path / "run/checkpoints") == []
    with pytest.raises(CheckpointError, match="no training checkpoint"):
        find_checkpoint(tmp_path / "run")


def test_bad_inputs_are_one_line_errors(tmp_path, cli, yaml_file, toy_cfg, toy_data, stage1_run):
    def err(*args):
        res = cli(*args)
        assert res.exit_code == 2, res.output
        lines = [x for x in res.output.splitlines() if x.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in res.output, res.output
        return lines[0]

    good = yaml_file(tmp_path / "good.yaml", toy_cfg(tmp_path / "o1"))
    assert "unknown key 'fusion.mlp_ration'; valid keys in fusion:" in err(
        "comm", "-c", str(good), "--set", "fusion.mlp_ration=4")
    bad = tmp_path / "bad.jsonl"
    lines = toy_data[0].read_text()
    recs = json.loads(lines)
    bad.write_text(json.dumps(recs[0]) + "\n" + json.dumps(recs[1])[:-3] + "\n")
    assert f"{bad}:2: invalid JSON line" in err("comm", "-c", str(good), "--data", str(bad))
    assert "image root" in err("comm", "-c", str(good), "--image-root", str(tmp_path / "nowhere"))
    assert "stage 2 needs --from" in err("comm", "-c", str(good), "--stage", "2")
    # a checkpoint written by another fusion type
    msg = err("comm", "-c", str(good), "--fusion", "clip", "-o", str(tmp_path / "o2"), "--resume", str(stage1_run))
    assert "checkpoint is from a 'comm' fusion run; this run trains 'clip'" in msg
    # an output dir that already holds a run
    assert "already holds a run" in err("comm", "-c", str(good), "-o", str(stage1_run))


def test_encoders_from_source_dirs_eval_and_gradient_checkpointing(tmp_path, toy_cfg, toy_data):
    """Real loading path (from_pretrained dirs), encoders not stored, eval every N, checkpointing on/off."""
    from transformers import Dinov2Config, Dinov2Model

    from fuse.testing import build_tiny_clip
    from train.toy import TINY_DINOV2

    build_tiny_clip(tmp_path / "clip", seed=3)
    torch.manual_seed(4)
    Dinov2Model(Dinov2Config(**TINY_DINOV2)).save_pretrained(str(tmp_path / "dino"))
    enc = {"clip": {"source": str(tmp_path / "clip"), "image_size": 56},
           "dinov2": {"source": str(tmp_path / "dino"), "image_size": 56}}
    over = dict(encoders=enc, max_steps=4, eval_every=2, store_encoders=False,
                data={"eval": str(toy_data[0]), "eval_image_root": str(toy_data[1])})
    a = train(toy_cfg(tmp_path / "a", **over))
    b = train(toy_cfg(tmp_path / "b", gradient_checkpointing=True, **over))
    torch.testing.assert_close(torch.tensor(a.losses), torch.tensor(b.losses), rtol=1e-5, atol=1e-6)
    assert [s for s, _ in a.eval_losses] == [2, 4] and a.eval_losses[1][1] < a.eval_losses[0][1]
    evals = [r for r in read_log(tmp_path / "a") if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    cfg = json.loads((a.final_dir / "config.json").read_text())
    assert cfg["encoders"]["clip"] == {**cfg["encoders"]["clip"], "stored": False, "source": str(tmp_path / "clip")}
    assert not any(k.startswith("vision.encoders.") for k in LazyCheckpoint(a.final_dir).keys())
    m = load_member(a.final_dir)  # encoders rebuilt from their source dirs
    ref = Dinov2Model.from_pretrained(str(tmp_path / "dino"))
    got = m.vision.encoders["dinov2"].model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items())


def test_vision_branch_roundtrip_through_save_vision_branch(stage1_run, tmp_path):
    """What `fuse merge` does with a member's branch: save, rebuild, same tokens."""
    from fuse.members import load_vision_branch
    from fuse.testing import random_image

    m = load_member(stage1_run / "final")
    ims = [random_image(i, (80, 60)) for i in range(3)]
    m.save_vision_branch(tmp_path / "vb")
    branch, cfg = load_vision_branch(tmp_path / "vb")
    assert cfg["kind"] == "comm" and cfg["format"] == "comm"
    with torch.no_grad():
        got = branch(branch.preprocess(ims))
    for x, y in zip(m.visual_tokens(ims), got):
        assert torch.equal(x, y)
    assert m.vision.token_grids(m.vision.preprocess(ims)) == [[("image", 4, 4)]] * 3


def test_tensorboard_without_package_is_a_clear_error(tmp_path, toy_cfg):
    try:
        import torch.utils.tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    from fuse.errors import RecipeError

    with pytest.raises(RecipeError, match="pip install"):
        Trainer(make_config(toy_cfg(tmp_path / "tb", tensorboard=True)))
    assert not (tmp_path / "tb").exists()


@pytest.mark.parametrize("fusion", ["clip", "mean_half", "layerscale", "conv_layerscale", "a_mof", "i_mof",
                                    "channel_concat", "comm_token"])
def test_every_fusion_trains_and_exports_a_member(tmp_path, toy_cfg, fusion):
    from fuse.testing import random_image

    f = {"type": "comm", "concat": "token"} if fusion == "comm_token" else {"type": fusion}
    res = train(toy_cfg(tmp_path / "r", fusion=f, max_steps=1, save_every=None))
    m = load_member(res.final_dir)
    tokens = m.visual_tokens([random_image(0)])[0]
    n = {"i_mof": 32, "comm_token": 32}.get(fusion, 16)
    assert tokens.shape == (n, 64) and m.vision.num_tokens == n
    assert sorted(m.vision.encoders) == (["clip"] if fusion in ("clip", "mean_half", "layerscale", "conv_layerscale")
                                         else ["clip", "dinov2"])
