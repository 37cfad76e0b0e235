"""``accelerate launch --num_processes 2`` on CPU (gloo) follows the one-process loss curve.

Same global batch (4): one process x 4 per device vs two processes x 2 per device. The
step loss is the mean over all target tokens of the global batch in both cases, so the
curves agree up to float32 reduction order: tolerance 1e-5 (relative) on every step's
loss and 1e-5 (absolute) on the final weights.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from train.api import train
from train.logs import read_log

pytestmark = pytest.mark.slow


def test_two_cpu_processes_match_one(tmp_path, toy_cfg, yaml_file, launch):
    over = dict(max_steps=3, global_batch_size=4, lr=1e-2)
    one = train(toy_cfg(tmp_path / "one", per_device_batch_size=4, **over))
    y = yaml_file(tmp_path / "two.yaml", toy_cfg(tmp_path / "two", per_device_batch_size=2, **over))
    # --multi_gpu selects accelerate's torchrun launcher; without CUDA the trainer's Accelerator(cpu=True)
    # joins a gloo process group (accelerate's --cpu launcher would need MPI for 2 processes)
    proc = launch("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no", "-m", "train", "comm", "-c", str(y), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = next(r for r in read_log(tmp_path / "two") if r.get("event") == "start")
    assert start["processes"] == 2 and start["accumulation"] == 1 and start["global_batch"] == 4
    assert start["engine"] == "MULTI_CPU"
    two = [r["loss"] for r in read_log(tmp_path / "two") if "loss" in r and "event" not in r]
    assert len(two) == 3
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one.losses), rtol=1e-5, atol=0)
    a = load_file(str(one.final_dir / "model.safetensors"))
    b = load_file(str(tmp_path / "two/final/model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)
