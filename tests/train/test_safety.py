"""Training never loses a user's files, and a broken or hostile checkpoint is a one-line error."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest

from train.api import train

OVER = dict(max_steps=2, save_every=1, per_device_batch_size=2, global_batch_size=4)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, toy_cfg, yaml_file):
    """(config yaml, run dir) of a run stopped after its step-1 checkpoint (as by a preemption)."""
    d = tmp_path_factory.mktemp("stopped")
    res = train(toy_cfg(d / "run", stop_at_step=1, **OVER))
    assert res.stopped_early and res.checkpoint.name == "step-0000001"
    return yaml_file(d / "cfg.yaml", toy_cfg(d / "unused", **OVER)), d / "run"


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _truncate(f: Path) -> None:
    os.truncate(f, f.stat().st_size // 2)


@pytest.mark.parametrize("name, damage", [
    ("model.safetensors", "truncated"), ("optimizer.bin", "malicious"),
    ("random_states_0.pkl", "truncated"), ("random_states_0.pkl", "malicious"),
])
def test_resume_from_a_damaged_checkpoint_is_one_line(tmp_path, stopped_run, cli, name, damage, one_error):
    cfg, src = stopped_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    f = run / "checkpoints" / "step-0000001" / "accelerate" / name
    marker = tmp_path / "pwned"
    if damage == "truncated":
        _truncate(f)
    else:
        f.write_bytes(pickle.dumps(_Evil(marker)))
    msg = one_error(cli("comm", "-c", str(cfg), "-o", str(run), "--resume", "auto"))
    assert "step-0000001" in msg and not marker.exists()  # never unpickled into code execution
    assert not (run / "final").exists()


def test_output_dir_checks_before_any_work(tmp_path, stopped_run, cli, read_only_dir, one_error):
    cfg, _ = stopped_run
    with read_only_dir(tmp_path / "ro"):
        msg = one_error(cli("comm", "-c", str(cfg), "-o", str(tmp_path / "ro" / "run")))
        assert "cannot write the output directory" in msg
    msg = one_error(cli("comm", "-c", str(cfg), "-o", str(tmp_path / "r"), "--set", f"seed={10 ** 29}"))
    assert "seed: Input should be less than or equal to 4294967295" in msg
    # --force starts over: it removes its own step checkpoints, never a `final/` it did not write
    run = tmp_path / "mine"
    (run / "final").mkdir(parents=True)
    (run / "final" / "paper.tex").write_text("mine")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "notes.txt").write_text("mine too")
    msg = one_error(cli("comm", "-c", str(cfg), "-o", str(run), "--force"))
    assert f"{run / 'final'}: exists and was not written by this toolkit" in msg
    (run / "final" / "paper.tex").unlink()
    (run / "final").rmdir()
    res = cli("comm", "-c", str(cfg), "-o", str(run), "--force")
    assert res.exit_code == 0, res.output
    assert (run / "checkpoints" / "notes.txt").read_text() == "mine too" and (run / "final" / "config.json").is_file()


def test_final_is_never_written_over_the_previous_stage(tmp_path, stopped_run, cli, one_error):
    """Stage 2 from RUN/final into RUN with --force would replace the model it starts from."""
    cfg, src = stopped_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    res = cli("comm", "-c", str(cfg), "-o", str(run), "--resume", "auto")  # finish stage 1: RUN/final
    assert res.exit_code == 0, res.output
    before = (run / "final" / "model.safetensors").read_bytes()
    msg = one_error(cli("comm", "--stage", "2", "-c", str(cfg), "--from", str(run / "final"), "-o", str(run),
                        "--force"))
    assert f"output overlaps the input --from ({run / 'final'})" in msg
    assert (run / "final" / "model.safetensors").read_bytes() == before
