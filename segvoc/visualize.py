"""Pictures of predictions (uint8 RGB): masks in a dataset's class colours (VOC's by default), overlays,
side-by-side panels, error maps, legends, confusion matrices.

Drawn with Pillow (already a dependency through torchvision) rather than matplotlib: a labelled 21-class confusion
matrix takes a few milliseconds, needs no plotting backend in training processes and no extra 30 MB package; the
pictures are simple grids of squares and text, which is all matplotlib would add here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from segvoc.palette import IGNORE_INDEX, Palette, class_palette, colorize


def denormalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised ``(3, H, W)`` tensor back to an ``(H, W, 3)`` uint8 RGB array."""
    mean_t = torch.as_tensor(mean, dtype=image.dtype, device=image.device)[:, None, None]
    std_t = torch.as_tensor(std, dtype=image.dtype, device=image.device)[:, None, None]
    rgb = ((image * std_t + mean_t) * 255).clamp(0, 255).round().byte()
    return rgb.permute(1, 2, 0).cpu().numpy()


def overlay(
    image: np.ndarray,
    mask: np.ndarray,
    alpha: float = 0.5,
    palette: Palette | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> np.ndarray:
    """Blend the class colours of ``mask`` (``palette``; None: VOC's) over ``image``; class 0 (background) and
    ``ignore_index`` pixels stay as they are."""
    coloured = colorize(mask, palette, ignore_index).astype(np.float32)
    blend = image.astype(np.float32)
    objects = (mask != 0) & (mask != ignore_index)
    blend[objects] = (1 - alpha) * blend[objects] + alpha * coloured[objects]
    return blend.round().astype(np.uint8)


def panel(
    image: np.ndarray,
    target: np.ndarray | None,
    prediction: np.ndarray,
    palette: Palette | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> np.ndarray:
    """``image | ground truth | prediction | overlay`` side by side (ground truth left out when ``None``), masks in
    the class colours ``palette`` (None: VOC's) with ``ignore_index`` pixels in the VOC boundary cream."""
    parts = [image] + ([colorize(target, palette, ignore_index)] if target is not None else [])
    parts += [
        colorize(prediction, palette, ignore_index),
        overlay(image, prediction, palette=palette, ignore_index=ignore_index),
    ]
    return np.concatenate(parts, axis=1)


def font(size: int = 12) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font at ``size`` pixels (its fixed bitmap font where Pillow lacks FreeType)."""
    return ImageFont.load_default(size=size)


def error_map(
    image: np.ndarray, target: np.ndarray, prediction: np.ndarray, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """The image in dim grey with the wrongly predicted pixels in red; ``ignore_index`` pixels stay grey."""
    grey = image.astype(np.float32).mean(axis=2, keepdims=True) * 0.45 + 40
    out = np.repeat(grey, 3, axis=2).round().astype(np.uint8)
    out[(prediction != target) & (target != ignore_index)] = (230, 30, 30)
    return out


def with_legend(
    picture: np.ndarray,
    classes: Sequence[int],
    class_names: Sequence[str],
    palette: Palette | None = None,
    min_height: int = 256,
) -> np.ndarray:
    """``picture`` enlarged by a whole factor (nearest neighbour, so masks stay crisp) to at least ``min_height``
    pixels high, above a legend of ``classes``: a swatch in the class colour and the class name, wrapped to the
    picture's width."""
    factor = max(1, -(-min_height // picture.shape[0]))
    big = np.repeat(np.repeat(picture, factor, axis=0), factor, axis=1)
    colours = class_palette(len(class_names), palette)
    face = font(14)
    width, pad, swatch, line = big.shape[1], 6, 14, 20
    entries, x, rows = [], pad, 0
    for c in classes:
        size = swatch + 4 + int(face.getlength(class_names[c])) + 12
        if x + size > width and x > pad:
            x, rows = pad, rows + 1
        entries.append((x, rows, c))
        x += size
    legend = Image.new("RGB", (width, (rows + 1) * line + pad), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    for x, row, c in entries:
        y = pad // 2 + row * line + (line - swatch) // 2
        colour = tuple(int(v) for v in colours[c])
        draw.rectangle((x, y, x + swatch - 1, y + swatch - 1), fill=colour, outline=(0, 0, 0))
        draw.text((x + swatch + 4, y + swatch // 2), class_names[c], fill=(0, 0, 0), font=face, anchor="lm")
    return np.concatenate([big, np.asarray(legend)], axis=0)


def present_classes(*masks: np.ndarray, num_classes: int) -> list[int]:
    """The class indices ``0..num_classes-1`` that occur in any of ``masks``, in order (ignored pixels skipped)."""
    seen = np.zeros(num_classes, dtype=bool)
    for mask in masks:
        values = np.unique(mask)
        seen[values[values < num_classes]] = True
    return np.flatnonzero(seen).tolist()


def diagnostic_panel(
    image: np.ndarray,
    target: np.ndarray,
    prediction: np.ndarray,
    class_names: Sequence[str],
    palette: Palette | None = None,
    ignore_index: int = IGNORE_INDEX,
    min_height: int = 256,
) -> np.ndarray:
    """``image | truth | prediction | errors`` (``error_map``) at a readable size, with a legend of the classes in
    the truth or the prediction: the picture of one badly segmented image."""
    parts = [
        image,
        colorize(target, palette, ignore_index),
        colorize(prediction, palette, ignore_index),
        error_map(image, target, prediction, ignore_index),
    ]
    classes = present_classes(target, prediction, num_classes=len(class_names))
    return with_legend(np.concatenate(parts, axis=1), classes, class_names, palette, min_height)


def confusion_image(
    confmat: torch.Tensor, class_names: Sequence[str] | None = None, cell: int = 30, min_share: float = 0.01
) -> np.ndarray:
    """The row-normalised confusion matrix (rows: ground truth, each row the shares of that class's pixels) as a
    labelled heat map: class names left of the rows and above the columns, white for 0 to dark blue for 1, and
    the share in per cent written in every cell of at least ``min_share`` (the diagonal always, where the class
    occurs). Rows of classes absent from the ground truth stay white."""
    counts = confmat.double().cpu()
    n = counts.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
    total = counts.sum(dim=1, keepdim=True)
    rates = (counts / total.clamp(min=1)).numpy()
    low, high = np.array([255.0, 255.0, 255.0]), np.array([8.0, 48.0, 107.0])
    rgb = (low + (high - low) * rates[..., None]).round().astype(np.uint8)
    face = font(max(9, cell * 2 // 5))
    label = int(max(face.getlength(name) for name in names)) + 10
    grid = Image.fromarray(np.kron(rgb, np.ones((cell, cell, 1), dtype=np.uint8)))
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        for j in range(n):
            share = rates[i, j]
            if total[i, 0] > 0 and (share >= min_share or i == j):
                colour = (255, 255, 255) if share > 0.5 else (0, 0, 0)
                centre = (j * cell + cell // 2, i * cell + cell // 2)
                draw.text(centre, f"{100 * share:.0f}", fill=colour, font=face, anchor="mm")
    for k in range(n + 1):  # cell borders
        draw.line((0, k * cell, n * cell, k * cell), fill=(200, 200, 200))
        draw.line((k * cell, 0, k * cell, n * cell), fill=(200, 200, 200))
    # column names written left to right, then turned to read bottom to top
    header = Image.new("RGB", (label, n * cell), (255, 255, 255))
    hdraw = ImageDraw.Draw(header)
    canvas = Image.new("RGB", (label + n * cell + 4, label + n * cell + 4), (255, 255, 255))
    cdraw = ImageDraw.Draw(canvas)
    for i, name in enumerate(names):
        cdraw.text((label - 5, label + i * cell + cell // 2), name, fill=(0, 0, 0), font=face, anchor="rm")
        hdraw.text((5, i * cell + cell // 2), name, fill=(0, 0, 0), font=face, anchor="lm")
    canvas.paste(header.rotate(90, expand=True), (label, 0))
    canvas.paste(grid, (label, label))
    return np.asarray(canvas)
