"""Pictures of predictions (uint8 RGB): masks in a dataset's class colours (VOC's by default), overlays,
side-by-side panels, confusion matrices."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from segvoc.palette import IGNORE_INDEX, Palette, colorize


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


def confusion_image(confmat: torch.Tensor, cell: int = 12) -> np.ndarray:
    """A row-normalised confusion matrix (rows: ground truth) as a heat map, ``cell`` pixels per entry.

    White is 0, dark blue is 1; a line of the diagonal is what a class gets right.
    """
    counts = confmat.double().cpu()
    rates = (counts / counts.sum(dim=1, keepdim=True).clamp(min=1)).numpy()
    low, high = np.array([255.0, 255.0, 255.0]), np.array([8.0, 48.0, 107.0])
    rgb = (low + (high - low) * rates[..., None]).round().astype(np.uint8)
    return np.kron(rgb, np.ones((cell, cell, 1), dtype=np.uint8))
