"""The one table of Pascal VOC class names and the VOC colour map, and the colours of any dataset's classes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

IGNORE_INDEX = 255

Palette = Sequence[Sequence[int]] | np.ndarray  # class colours: (N, 3) [R, G, B] rows, or flat [R, G, B, R, ...]


def default_class_names(num_classes: int) -> list[str]:
    """VOC's names for 21 classes, ``class_<i>`` otherwise."""
    return list(VOC_CLASSES) if num_classes == len(VOC_CLASSES) else [f"class_{i}" for i in range(num_classes)]


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


def class_palette(num_classes: int, palette: Palette | None = None) -> np.ndarray:
    """The colours of ``num_classes`` classes as a ``(num_classes, 3)`` uint8 array: ``palette`` when given (one
    ``[R, G, B]`` per class, validated by ``segvoc.config``), else the first ``num_classes`` colours of the VOC map."""
    if palette is None:
        return voc_palette(num_classes)
    colours = np.asarray(palette, dtype=np.int64).reshape(-1, 3)
    if len(colours) != num_classes or colours.min(initial=0) < 0 or colours.max(initial=0) > 255:
        raise ValueError(f"a palette of {num_classes} [R, G, B] colours (0..255) is needed, got {palette!r}")
    return colours.astype(np.uint8)


def lookup_table(palette: Palette | None = None, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """256 colours, ``(256, 3)`` uint8, for colouring uint8 masks: the class colours ``palette`` (``(N, 3)`` or flat
    ``[R, G, B, ...]``; None: the VOC map) first, ``ignore_index`` in the VOC boundary cream, the rest the VOC map."""
    voc = voc_palette()
    table = voc.copy()
    if palette is not None:
        colours = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)[:256]
        table[: len(colours)] = colours
    if 0 <= ignore_index < 256:
        table[ignore_index] = voc[IGNORE_INDEX]
    return table


def colorize(mask: np.ndarray, palette: Palette | None = None, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Map an ``(H, W)`` array of class indices to an ``(H, W, 3)`` uint8 RGB image: the class colours ``palette``
    (None: the VOC colours), ``ignore_index`` pixels in the VOC boundary cream (see ``lookup_table``)."""
    return lookup_table(palette, ignore_index)[mask.astype(np.int64) % 256]
