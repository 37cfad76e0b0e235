"""torch's intra-op thread count for a block of merge work.

Why it matters: the merge and the family check run element-wise ops on cache-sized blocks
(64K to 256K elements). Splitting such an op over OpenMP threads gains nothing, and on a
machine whose cores are busy with other work every parallel region waits until all its
threads are scheduled, which made the family check's distance an order of magnitude slower with
two threads than with one on a shared 2-core machine (figures in the README).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``; restore the previous count after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(saved)


__all__ = ["torch_threads"]
