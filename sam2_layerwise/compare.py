"""`python -m sam2_layerwise.compare ...` is `sam2-layerwise compare ...` (the seed ran it as a script)."""

import sys

from sam2_layerwise.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
