"""Argument plumbing shared by the subcommands: one-line errors, positive ints, model flags."""

from __future__ import annotations

import argparse
import logging
import sys


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line naming the flag, exit 2."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be greater than 0")
    return value


def nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def add_model_flags(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """--config / --checkpoint / --random-init / --seed / --device / --precision."""
    p.add_argument(f"--config{prefix}", metavar="NAME_OR_YAML",
                   help="SAM 2 config: a name the sam2 package knows (configs/sam2.1/sam2.1_hiera_b+.yaml) "
                        "or a YAML file; may be omitted when --checkpoint is an official model id")
    p.add_argument(f"--checkpoint{prefix}", metavar="PT_OR_MODEL_ID",
                   help="SAM 2 checkpoint (.pt with a 'model' state dict) or an official model id "
                        "(sam2.1_hiera_tiny, ...), downloaded once into ~/.cache/sam2_layerwise")
    if not prefix:
        p.add_argument("--random-init", action="store_true",
                       help="run on seeded random weights, on purpose (no checkpoint); said loudly in logs and summary")
        p.add_argument("--seed", type=int, default=0, help="seed for --random-init (default 0)")
        p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
        p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                       help="fp32 (default) or bf16 autocast (CUDA only)")


def setup_logging(quiet: bool) -> None:
    """Our own messages on stderr (INFO, or WARNING with --quiet); sam2's chatter stays at WARNING."""
    logger = logging.getLogger("sam2_layerwise")
    logger.handlers[:] = [logging.StreamHandler(sys.stderr)]
    logger.handlers[0].setFormatter(logging.Formatter("%(message)s"))
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    logging.getLogger().setLevel(logging.WARNING)
