"""The allocator settings the CLI gives its model-running processes: glibc keeps freed tensor memory for the next
tensor instead of faulting it in again."""

import os
import subprocess
import sys
import textwrap

import pytest

from sam2_layerwise.cli.main import build_parser

PROBE = textwrap.dedent("""
    import resource, numpy as np
    from sam2_layerwise.allocator import tune_for_tensors
    tuned = tune_for_tensors()
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(5 << 20, np.float32); del a  # 20 MiB written and freed, as a forward does with its activations
    b = np.ones(3 << 20, np.float32); del b
    before = faults(); c = np.ones(5 << 20, np.float32)
    print(tuned, faults() - before)
""")


def probe(**env) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, check=True, capture_output=True,
                         text=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"), reason="glibc")
def test_freed_tensor_memory_is_reused_without_faults():
    tuned, faults = probe()
    assert tuned and faults < 64  # 20 MiB is 5120 pages: the heap handed the freed ones back
    untouched, faults_default = probe(SAM2_LAYERWISE_MALLOC="default")
    assert not untouched and faults_default > 4 * max(faults, 16)  # glibc's defaults fault them in again
    # the user's own settings are kept
    assert probe(MALLOC_TRIM_THRESHOLD_="131072")[0] is False
    assert probe(GLIBC_TUNABLES="glibc.malloc.mmap_threshold=131072")[0] is False
    assert probe(GLIBC_TUNABLES="glibc.cpu.hwcaps=-AVX512F")[0] is True


def test_only_commands_that_run_models_change_the_allocator():
    import argparse

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    runs = {name: p.get_default("_runs_models") for name, p in sub.choices.items()}
    assert runs == {"visualize": True, "visualize-quantized": True, "compare": True, "sweep": True, "quantize": True,
                    "render": False, "view": False, "generate": False, "init-checkpoint": False}
