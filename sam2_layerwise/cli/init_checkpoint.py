"""`sam2-layerwise init-checkpoint`: a seeded random-weight checkpoint in SAM 2's own format."""

from __future__ import annotations

import logging

from sam2_layerwise.cli.common import seed_int, setup_logging

EXAMPLES = """examples:
  sam2-layerwise init-checkpoint --config configs/sam2.1/sam2.1_hiera_b+.yaml --output random_b+.pt --seed 1"""


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, metavar="NAME_OR_YAML", help="SAM 2 config name or YAML file")
    p.add_argument("--output", required=True, help="where to write the .pt file")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the random weights (default 0; 0 <= seed < 2**63)")


def run(args) -> int:
    from sam2_layerwise.model import build_model, save_checkpoint
    from sam2_layerwise.store.layout import check_output_file

    setup_logging(args.quiet)
    out = check_output_file(args.output, "--output", inputs={"--config": args.config})
    loaded = build_model(args.config, random_init=True, seed=args.seed, device="cpu")
    save_checkpoint(loaded.model, out)
    logging.getLogger(__name__).info("wrote random-weight checkpoint (seed %d, %s) to %s", args.seed,
                                     loaded.config_path.name, out)
    return 0
