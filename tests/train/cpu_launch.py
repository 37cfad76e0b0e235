"""``train`` under ``accelerate launch`` on CPU, with three CPU-only gaps of the engines filled.

Test use only: ``accelerate launch --config_file CFG tests/train/cpu_launch.py comm -c run.yaml``.
The trainer's code is untouched; each adjustment stands in for something accelerate, torch or
DeepSpeed do differently on CPU than on a GPU (each was hit by running without it):

1. FSDP: accelerate (1.16) turns an FSDP request into FSDP only for accelerator process
   groups (``MULTI_GPU``, ...); a CPU group stays plain DDP, which the trainer refuses
   (``train.engines.check_engine``). The CPU gloo group is reported as ``MULTI_GPU`` with
   device ``cpu``, so accelerate's own FSDP set-up (wrap policy, FULL_SHARD, sharded
   checkpoints, full-state export) runs on CPU. torch's FSDP1 works on CPU when given
   ``device_id=cpu``, which accelerate passes.
2. FSDP: accelerate gathers the full state dict with ``offload_to_cpu=True``. On GPU that
   copies to host memory; on CPU torch's ``FlatParamHandle.to_cpu()`` copies nothing and then
   frees storage the parameters still alias (SIGSEGV in rank 0 during export). The tensors
   are on CPU already, so the gather runs without the offload.
3. DeepSpeed: its CPU accelerator JIT-compiles a shared-memory all-reduce with g++ on first
   use (1-2 minutes on 2 cores). It is marked unavailable, so DeepSpeed's collectives go
   through torch.distributed over gloo (its fallback), as they go through NCCL on GPUs.
"""

from __future__ import annotations

import os
import sys


def _fsdp_on_cpu() -> None:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    original = PartialState._prepare_backend

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        found, kind = original(self, cpu, sagemaker_dp, backend)
        if found == "gloo" and kind == DistributedType.NO:
            return found, DistributedType.MULTI_GPU
        return found, kind

    PartialState._prepare_backend = prepare_backend
    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"

    import torch.distributed.fsdp as tfsdp

    full = tfsdp.FullStateDictConfig
    tfsdp.FullStateDictConfig = lambda offload_to_cpu=False, rank0_only=False: full(False, rank0_only)


def _deepspeed_without_shm_op() -> None:
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


if __name__ == "__main__":
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        _fsdp_on_cpu()
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        _deepspeed_without_shm_op()
    from train.cli import main

    sys.exit(main())
