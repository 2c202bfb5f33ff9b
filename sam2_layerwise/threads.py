"""torch's intra-op threads, per block of work."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def one_thread():
    """torch's intra-op threads set to 1 for the block (restored after): for many small tensors, where each parallel
    region costs more than it saves (10-100x on busy cores). Process-wide: for a command or a worker, not for
    library code that a threaded server may call."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
