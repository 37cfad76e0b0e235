"""Evaluation across the processes of ``accelerate launch`` / torchrun.

``accelerate launch --num_processes N -m fuse eval MODEL ...`` starts N copies of ``fuse eval``.
Each loads the model, answers its share of the questions, and every process receives all
answers (one all-gather of ``(index, answer)`` pairs); process 0 scores them and writes the
one results JSON.

The share is whole batches of the single-process schedule (questions sorted by prompt
length, longest first, cut into ``batch_size`` batches; batch ``k`` goes to process
``k mod N``). Every question is therefore answered in exactly the batch, with exactly the
padding, it would get in one process, so the per-sample predictions are the single-process
ones, not merely close to them; and the longest batches are spread over the processes.

Without a launcher (``WORLD_SIZE`` unset or 1) nothing here starts a process group.
On CPU the group is gloo (accelerate's ``MULTI_CPU``); on GPUs each process uses
``cuda:<local rank>``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """This process's place among ``world`` evaluation processes."""

    rank: int = 0
    world: int = 1
    device: str | None = None  # the process's own device under a launcher (cuda:<local rank>), else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def take(self, batches: Sequence[T]) -> list[T]:
        """This process's batches: every ``world``-th, starting at ``rank``."""
        return list(batches[self.rank::self.world])

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every process, in rank order (collective: every process must call it)."""
        if self.world == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])


SINGLE = Shard()


def current_shard() -> Shard:
    """The shard of this process: joins the launcher's process group when ``WORLD_SIZE`` > 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return SINGLE
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    device = str(state.device) if state.device.type != "cpu" else None
    return Shard(state.process_index, state.num_processes, device)


__all__ = ["SINGLE", "Shard", "current_shard"]
