"""Compare runs of the tiny model: quantized checkpoints made by the real `quantize` command, runs by `compare`."""

from __future__ import annotations

import pytest

from sam2_layerwise.cli.main import main
from tests.conftest import COFFEE, REPO, TINY_CONFIG

EXAMPLES = REPO / "examples" / "quantization"
POINTS = ["300", "200", "1", "120", "80", "0"]


# quant_checkpoints (passthrough / w8a8 / w4a8_mixed made by the real quantize command): tests/conftest.py,
# shared with the sweep tests so the whole suite calibrates them once.


def compare_args(tiny_checkpoint, qcfg, qckpt, out, mode="--save-raw", *extra):
    return ["compare", "--config-original", TINY_CONFIG, "--checkpoint-original", str(tiny_checkpoint),
            "--config-quantized", str(qcfg), "--checkpoint-quantized", str(qckpt), "--image", str(COFFEE),
            "--points", *POINTS, "--query-points", "500", "350", "--output-dir", str(out), mode, "-q", *extra]


@pytest.fixture(scope="session")
def compare_runs(tmp_path_factory, tiny_checkpoint, quant_checkpoints):
    """(quantization, mode) -> a compare run directory."""
    d = tmp_path_factory.mktemp("compare")
    runs = {}
    for name, mode in (("passthrough", "--save-raw"), ("w8a8", "--save-raw"), ("w4a8_mixed", "--save-raw"),
                       ("w4a8_mixed", "--save-full-attn"), ("passthrough", "--save-full-attn")):
        out = d / f"{name}{mode}"
        cfg, ckpt = quant_checkpoints[name]
        assert main(compare_args(tiny_checkpoint, cfg, ckpt, out, mode)) == 0
        runs[name, mode.removeprefix("--save-").split("-")[0]] = out
    return runs
