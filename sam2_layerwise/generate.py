"""`python -m sam2_layerwise.generate ...` is `sam2-layerwise generate ...` (the seed ran it as a script)."""

import sys

from sam2_layerwise.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
