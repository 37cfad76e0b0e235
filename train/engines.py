"""Which distributed engine a run uses, and making sure it is the one ``accelerate launch`` asked for.

``accelerate launch --config_file recipes/accelerate/<engine>.yaml`` tells the training
processes what to set up through environment variables (``ACCELERATE_USE_DEEPSPEED``,
``ACCELERATE_USE_FSDP``). On GPUs ``Accelerator()`` honours them. Without CUDA,
``Accelerator(cpu=True)`` makes a ``MULTI_CPU`` (gloo) group and silently drops both
requests, so a "ZeRO-3" or "FSDP" run on CPU would really be plain DDP. This module:

- joins the gloo group as a non-CPU accelerator state when DeepSpeed or FSDP is asked for
  on a CPU-only machine, which is how DeepSpeed's own CPU accelerator gets used
  (ZeRO-2 and ZeRO-3 run on CPU that way);
- refuses to start when the engine set up is not the engine asked for (accelerate
  1.x enables FSDP only for accelerator devices, so FSDP on CPU stops here with a
  clear message instead of running DDP under an FSDP config);
- names the engine (``DEEPSPEED-ZERO3``, ``FSDP-FULL_SHARD``, ``MULTI_CPU``, ...) for the run log.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from fuse.errors import RecipeError

ENGINE_ENV = {"deepspeed": "ACCELERATE_USE_DEEPSPEED", "fsdp": "ACCELERATE_USE_FSDP"}


def requested_engine() -> str | None:
    """``"deepspeed"``, ``"fsdp"`` or None, as set by ``accelerate launch`` for this process."""
    for name, var in ENGINE_ENV.items():
        if os.environ.get(var, "false").lower() == "true":
            return name
    return None


def accelerator_kwargs() -> dict[str, Any]:
    """``cpu`` and ``kwargs_handlers`` for ``Accelerator(...)`` on this machine.

    CUDA present: accelerate's defaults. CPU only, launched by torchrun with DeepSpeed or
    FSDP asked for: a non-CPU state over gloo, the only way accelerate hands the model to
    DeepSpeed (whose CPU accelerator then runs ZeRO over gloo). Otherwise ``cpu=True``
    (one process, or DDP over gloo).
    """
    if torch.cuda.is_available():
        return {"cpu": False}
    if requested_engine() is not None and "LOCAL_RANK" in os.environ:
        from accelerate.utils import InitProcessGroupKwargs

        return {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {"cpu": True}


def engine_name(acc) -> str:
    """The engine ``acc`` runs: e.g. ``DEEPSPEED-ZERO3``, ``FSDP-FULL_SHARD``, ``MULTI_GPU``, ``MULTI_CPU``, ``NO``."""
    from accelerate.utils import DistributedType

    kind = acc.distributed_type
    if kind == DistributedType.DEEPSPEED:
        stage = acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)
        return f"DEEPSPEED-ZERO{stage}"
    if kind == DistributedType.FSDP:
        plugin = acc.state.fsdp_plugin
        if getattr(plugin, "fsdp_version", 1) == 2:
            return "FSDP2"
        strategy = getattr(plugin, "sharding_strategy", None)
        return f"FSDP-{getattr(strategy, 'name', strategy)}"
    return str(kind.value)


def check_engine(acc) -> None:
    """Refuse a run whose engine is not the one ``accelerate launch`` asked for (one line, names the fix)."""
    from accelerate.utils import DistributedType

    want = requested_engine()
    expected = {"deepspeed": DistributedType.DEEPSPEED, "fsdp": DistributedType.FSDP}.get(want)
    if expected is None or acc.distributed_type == expected:
        return
    import accelerate

    msg = (f"accelerate launch asked for {want} but accelerate {accelerate.__version__} set up {engine_name(acc)} "
           f"({acc.num_processes} process(es))")
    if want == "fsdp" and not torch.cuda.is_available():
        msg += ("; accelerate enables FSDP only on GPUs and other accelerators: on CPU use DDP "
                "(accelerate launch --multi_gpu --num_processes N) or DeepSpeed")
    raise RecipeError(msg)


__all__ = ["accelerator_kwargs", "check_engine", "engine_name", "requested_engine"]
