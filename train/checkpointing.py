"""Atomic training checkpoints and exact resume.

Layout (``<output_dir>/checkpoints/step-0000040/``)::

    accelerate/              accelerator.save_state: model.safetensors (fusion + LLM; encoders are
                             frozen and not part of the wrapped model), optimizer.bin, scheduler.bin,
                             random_states_<rank>.pkl (python/numpy/torch RNG of every process)
    trainer_state.json       step, epoch, data position, fusion spec, stage, global batch, counters, config

A checkpoint is written into ``.step-0000040.tmp`` and renamed when complete, so an
interrupted save never looks like a checkpoint; ``trainer_state.json`` is written last.
``accelerate`` loads optimizer/scheduler/RNG files with ``torch.load(weights_only=True)``.
The data position is the global step: batches are a pure function of (seed, epoch, step),
so resuming replays nothing and skips nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from fuse.errors import CheckpointError

STATE_FILE = "trainer_state.json"
ACCELERATE_DIR = "accelerate"
CHECKPOINTS = "checkpoints"
FORMAT = "visionfuse-train-checkpoint"
_STEP_RX = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` (sorted by step)."""
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RX.match(p.name)
        if m and (p / STATE_FILE).is_file():
            out.append((int(m[1]), p))
    return sorted(out)


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint dir, or the latest complete checkpoint of a run dir / checkpoints dir."""
    p = Path(path)
    if (p / STATE_FILE).is_file():
        return p
    for root in (p / CHECKPOINTS, p):
        found = list_checkpoints(root)
        if found:
            return found[-1][1]
    if not p.exists():
        raise CheckpointError(f"{p}: --resume path does not exist")
    raise CheckpointError(f"{p}: no training checkpoint here (expected {STATE_FILE} or {CHECKPOINTS}/step-*/)")


def read_state(ckpt: Path) -> dict[str, Any]:
    f = ckpt / STATE_FILE
    try:
        state = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f}: unreadable trainer state ({e.__class__.__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{f}: not a `train comm` checkpoint")
    if not (ckpt / ACCELERATE_DIR).is_dir():
        raise CheckpointError(f"{ckpt / ACCELERATE_DIR}: missing (incomplete checkpoint)")
    return state


def check_compatible(ckpt: Path, state: dict, expected: dict[str, Any]) -> None:
    """Refuse a checkpoint from another fusion type / architecture / batch layout, naming the field."""
    fs, fe = state.get("fusion") or {}, expected["fusion"]
    if fs.get("type") != fe.get("type"):
        raise CheckpointError(f"{ckpt}: checkpoint is from a {fs.get('type')!r} fusion run; this run trains "
                              f"{fe.get('type')!r} (fusion.type)")
    for k in ("layers", "dims", "grid", "llm_hidden", "projector", "mlp_depth", "mlp_ratio", "concat", "width"):
        a, b = fs.get(k), fe.get(k)
        if k == "grid":
            a, b = list(a or []), list(b or [])
        if a != b:
            raise CheckpointError(f"{ckpt}: fusion.{k} differs from this run ({a!r} in the checkpoint, {b!r} now)")
    for k in ("stage", "global_batch_size", "total_steps"):
        if state.get(k) != expected.get(k):
            raise CheckpointError(f"{ckpt}: {k} is {state.get(k)!r} in the checkpoint but {expected.get(k)!r} in "
                                  "this run; resume with the same config")


def save_checkpoint(accelerator, root: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Collective: every process calls it. Returns the final checkpoint dir."""
    final = root / checkpoint_name(step)
    tmp = root / f".{checkpoint_name(step)}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / ACCELERATE_DIR), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        body = json.dumps({"format": FORMAT, "version": 1, **state}, indent=2, default=str)
        (tmp / (STATE_FILE + ".part")).write_text(body)
        os.replace(tmp / (STATE_FILE + ".part"), tmp / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        for _, old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def init_optimizer_state(optimizer) -> None:
    """Create every parameter's optimizer state (zeros; weights unchanged) before a restore.

    accelerate restores an FSDP ``SHARDED_STATE_DICT`` optimizer by asking
    ``torch.distributed.checkpoint`` to fill in the optimizer's *current* state dict. A fresh
    AdamW has no per-parameter state until its first step, so only the hyper-parameters
    would come back: the moments and step count would silently restart from zero (the
    resumed run then drifts by about one learning rate per weight on its first step).
    One step at learning rate 0 with zero gradients creates the state without moving a
    weight (AdamW: ``p *= 1 - lr * wd`` and ``p -= lr * m / (sqrt(v) + eps)`` with ``lr = 0``).
    """
    import torch

    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
        for p in g["params"]:
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr


def _check_rng_files(acc_dir: Path) -> None:
    """accelerate skips an unreadable RNG file silently (the resume would then not be exact): read each
    one first, as accelerate does (``torch.load(weights_only=True)``, so no pickled code ever runs)."""
    from accelerate.utils import load

    for f in sorted(acc_dir.glob("random_states_*.pkl")):
        try:
            states = load(f)
        except Exception as e:  # truncated, not a torch file, or a pickle that wants to run code
            raise CheckpointError(f"{f}: unreadable RNG state ({_first_line(e)})") from None
        if not isinstance(states, dict) or "torch_manual_seed" not in states:
            raise CheckpointError(f"{f}: not an RNG state saved by accelerate")


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return f"{e.__class__.__name__}: {lines[0][:200]}" if lines else e.__class__.__name__


def load_checkpoint(accelerator, ckpt: Path, expected: dict[str, Any], optimizer=None) -> dict[str, Any]:
    """Check compatibility, restore model/optimizer/scheduler/RNG, return the trainer state.

    Every file is read safely (safetensors; ``torch.load(weights_only=True)`` for the rest): a truncated
    or malicious file is a one-line error naming the checkpoint, never a traceback or code execution.
    ``optimizer`` (the torch optimizer under accelerate's wrapper) gets its state created first under
    FSDP (see :func:`init_optimizer_state`).
    """
    from accelerate.utils import DistributedType

    from fuse.checkpoint import LazyCheckpoint

    state = read_state(ckpt)
    check_compatible(ckpt, state, expected)
    acc_dir = ckpt / ACCELERATE_DIR
    for f in sorted(acc_dir.glob("*.safetensors")):
        LazyCheckpoint(f)  # header + size check: a truncated file names itself
    _check_rng_files(acc_dir)
    if optimizer is not None and accelerator.distributed_type == DistributedType.FSDP:
        init_optimizer_state(optimizer)
    try:
        accelerator.load_state(str(acc_dir))
    except Exception as e:  # torch / safetensors / pickle raise many types; none is the user's bug
        raise CheckpointError(f"{ckpt}: cannot restore ({_first_line(e)})") from None
    return state


__all__ = ["ACCELERATE_DIR", "CHECKPOINTS", "STATE_FILE", "check_compatible", "checkpoint_name", "find_checkpoint",
           "init_optimizer_state", "list_checkpoints", "load_checkpoint", "read_state", "save_checkpoint"]
