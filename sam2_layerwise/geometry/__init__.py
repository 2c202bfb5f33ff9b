"""Token <-> pixel geometry. Three frames appear everywhere:

- *original*: pixels of the user's photograph, (x, y) with x to the right, origin top-left.
- *input*: pixels of the square model input (`image_size` x `image_size`); SAM 2 resizes without
  keeping the aspect ratio, so x and y scale differently.
- *grid*: token (row, col) on a layer's token grid, stride `image_size / grid_size` input pixels.
"""

from sam2_layerwise.geometry.frames import ImageFrame
from sam2_layerwise.geometry.hiera import HieraLayerGeometry
from sam2_layerwise.geometry.decoder import DecoderTokenLayout, GridGeometry

__all__ = ["ImageFrame", "HieraLayerGeometry", "DecoderTokenLayout", "GridGeometry"]
