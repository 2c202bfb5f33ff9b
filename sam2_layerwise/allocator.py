"""glibc's allocator, set for a process that runs SAM 2 on the CPU.

A b+ forward allocates and frees tensors of tens of MiB hundreds of times. glibc's defaults give most of that memory
back to the system on free and fault it in again page by page on the next allocation: about a million page
faults a forward, a tenth of its time on a CPU. Keeping tensors below 32 MiB on the heap and not trimming it cuts
the faults to a third for about 90 MiB more peak memory (README, "Speed"). The CLI sets this for the commands
that run models and their Ray workers; the library never changes a process it does not own.
"""

from __future__ import annotations

import ctypes
import os
import sys

OPT_OUT = "SAM2_LAYERWISE_MALLOC"  # "default": leave glibc's settings alone
# mallopt(3) parameters
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = {
    M_MMAP_THRESHOLD: 32 << 20,  # the largest glibc takes: blocks below it come from the heap, reused without faults
    M_TRIM_THRESHOLD: (1 << 31) - 1,  # never hand the heap's top back (mallopt takes an int)
    M_TOP_PAD: 256 << 20,  # grow the heap in large steps
}
# the same settings given in the environment: the user's choice is kept
_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def tune_for_tensors() -> bool:
    """Set SETTINGS in this process; True where glibc took them. Nothing happens off glibc, with OPT_OUT=default,
    or where the environment already sets glibc's malloc parameters."""
    if sys.platform != "linux" or os.environ.get(OPT_OUT, "").strip().lower() == "default":
        return False
    if any(name in os.environ for name in _ENV) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, ValueError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all([mallopt(param, value) == 1 for param, value in SETTINGS.items()])
