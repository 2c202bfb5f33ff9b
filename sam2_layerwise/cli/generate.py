"""`sam2-layerwise generate` (placeholder until the analysis lands)."""


def add_arguments(p) -> None:
    p.add_argument("--run_dir", "--run-dir", dest="run_dir", required=True)


def run(args) -> int:
    raise NotImplementedError
