"""The one table of Pascal VOC class names and the VOC colour map."""

from __future__ import annotations

import numpy as np

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

IGNORE_INDEX = 255


def voc_palette(n: int = 256) -> np.ndarray:
    """Return the VOC colour map as a ``(n, 3)`` uint8 array; index 255 is the cream boundary colour.

    The map spreads the bits of the class index over the three channels, most significant first, so it is the
    same one the VOC devkit uses to write ``SegmentationClass`` PNGs.
    """
    palette = np.zeros((n, 3), dtype=np.uint8)
    for index in range(n):
        label, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (label & 1) << shift
            g |= ((label >> 1) & 1) << shift
            b |= ((label >> 2) & 1) << shift
            label >>= 3
        palette[index] = (r, g, b)
    return palette


def colorize(mask: np.ndarray) -> np.ndarray:
    """Map an ``(H, W)`` array of class indices to an ``(H, W, 3)`` uint8 RGB image in the VOC colours."""
    return voc_palette()[mask.astype(np.int64) % 256]
