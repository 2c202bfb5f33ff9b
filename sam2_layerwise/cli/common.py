"""Argument plumbing shared by the subcommands: one-line errors, positive ints, model flags."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from sam2_layerwise.errors import one_line


# argparse takes only -1 and -.5 for negative numbers: `--points -1e3 5 1` or `--box -inf ...` read as an unknown
# flag and ended "--points: expected at least one argument", never naming the value
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE | re.ASCII)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line naming the flag and value (`--seed -1: must be 0 or more`),
    exit 2, and a flag that takes one value given twice with different values is an error rather than the
    last one silently winning. Every spelling of a negative number (-1e3, -inf) is a value, not a flag."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if type(action) is argparse._StoreAction and action.option_strings:
            action.__class__ = Once  # same fields, one more check
        return action

    def parse_known_args(self, args=None, namespace=None):
        self._given: dict[str, tuple[str, object]] = {}  # dest -> (option string, value) of single-value flags
        return super().parse_known_args(args, namespace)

    def _get_value(self, action, arg_string):
        try:
            return super()._get_value(action, arg_string)
        except argparse.ArgumentError as exc:
            if not action.option_strings or exc.message.startswith("invalid "):
                raise
            # our type functions say only what is wrong; the message names the flag and the value
            shown = one_line(arg_string, 200)
            raise argparse.ArgumentError(None, f"{action.option_strings[0]} {shown}: {exc.message}") from None

    def error(self, message):
        message = one_line(re.sub(r"^argument (-[^\s:/]+)(?:/\S+)?: ", r"\1: ", message))
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


class Once(argparse.Action):
    """A flag that takes its value(s) once: a second occurrence is an error, not a silent replacement."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(parser, "_given", {})
        if self.dest in given and given[self.dest][1] != values:
            first_flag, first = given[self.dest]
            shown = one_line(" ".join(map(str, values)) if isinstance(values, list) else str(values), 200)
            was = one_line(" ".join(map(str, first)) if isinstance(first, list) else str(first), 200)
            raise argparse.ArgumentError(None, f"{option_string} {shown}: given twice (first {first_flag} {was}); "
                                               f"give one {option_string}")
        given[self.dest] = (option_string, values)
        setattr(namespace, self.dest, values)


def _whole(text: str) -> int:
    """int(text); a number of more than 30 digits reads as ±10**30 (int() refuses > 4300 digits, and no count
    or seed here comes near 10**30), so range checks still say the right thing."""
    t = text.strip()
    if not re.fullmatch(r"[+-]?[0-9]+", t):  # int() would also take "1_000" and other scripts' digits
        raise argparse.ArgumentTypeError("not a whole number")
    if len(t.lstrip("+-")) > 30:
        return -10**30 if t.startswith("-") else 10**30
    return int(t)


def positive_int(text: str) -> int:
    value = _whole(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def nonnegative_int(text: str) -> int:
    value = _whole(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


SEED_LIMIT = 2**63  # torch.manual_seed takes a 64-bit seed; negative seeds alias large ones, so refuse both


def seed_int(text: str) -> int:
    """A seed: a whole number in [0, 2**63)."""
    value = nonnegative_int(text)
    if value >= SEED_LIMIT:
        raise argparse.ArgumentTypeError("must be below 2**63 (9223372036854775808)")
    return value


def user_path(text: str) -> str:
    """A path flag's value with `~` expanded, as the shell does when it is not quoted (and as every other path
    flag here reads it)."""
    return os.path.expanduser(text)


def image_size(text: str) -> int:
    """`--image-size`: a whole number in [32, 4096], a multiple of 32 (Hiera's total stride); whether it also
    fits the config's first-stage windows is checked once the config is read, before the model is built."""
    from sam2_layerwise.model.loading import MAX_IMAGE_SIZE

    value = positive_int(text)
    if value > MAX_IMAGE_SIZE or value < 32 or value % 32:
        raise argparse.ArgumentTypeError(f"must be a multiple of 32 between 32 and {MAX_IMAGE_SIZE} "
                                         f"(SAM 2's own is 1024)")
    return value


def device_name(text: str) -> str:
    """`--device`: the spelling only (auto, cpu, cuda, cuda:N, mps); whether this machine has it is checked by
    `model.loading.pick_device`, which names what it has instead."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d{1,3})?", text):
        raise argparse.ArgumentTypeError("not a device this tool runs on; give auto, cpu, cuda, cuda:N or mps")
    return text


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
        p.add_argument("--seed", type=seed_int, default=0, help="seed for --random-init (default 0; 0 <= seed < 2**63)")
        p.add_argument("--device", type=device_name, default="auto",
                       help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
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
