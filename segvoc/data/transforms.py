"""Paired image/mask transforms on uint8 arrays, and the one normalisation step (run on the device).

Images stay uint8 from the decoder to the device: the CPU never touches float pixels, and a batch crosses to the
GPU at a quarter of the float size. Masks are resized with nearest neighbour only and padded with the ignore index.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Annotated, Any

# albumentations asks PyPI for a newer version at import: a delay and a warning offline, nothing to act on
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.core.pydantic import nondecreasing
from albumentations.core.transforms_interface import BaseTransformInitSchema
from albumentations.core.type_definitions import Targets
from pydantic import AfterValidator, Field

from segvoc.palette import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pad_to(size: int, ignore_index: int = IGNORE_INDEX) -> A.PadIfNeeded:
    """Pad to at least ``size`` x ``size``: the image with 0, the mask with ``ignore_index``."""
    return A.PadIfNeeded(
        min_height=size, min_width=size, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=ignore_index
    )


class RandomScaleCrop(A.DualTransform):
    """Random scale, ``crop_size`` square crop and horizontal flip, done as one ``cv2.warpAffine`` per target.

    Same result as ``RandomScale`` + ``PadIfNeeded`` (centred) + ``RandomCrop`` + ``HorizontalFlip``: the image is
    scaled by ``s ~ U(scale_range)`` (bilinear; the mask nearest-neighbour), a ``crop_size`` window is taken at a
    random integer offset of the scaled image (centred where the scaled image is smaller, the rest filled with
    ``fill`` / ``fill_mask``) and mirrored with probability ``flip_p``. Only the pixels of the crop are computed, so
    a 2x scale-up costs no more than a scale-down. At the scaled image's edges the source is clamped, as
    ``cv2.resize`` does: edge pixels are never blended with the padding.
    """

    _targets = (Targets.IMAGE, Targets.MASK)

    class InitSchema(BaseTransformInitSchema):
        crop_size: int = Field(ge=1)
        scale_range: Annotated[tuple[float, float], AfterValidator(nondecreasing)]
        flip_p: float = Field(ge=0, le=1)
        fill: float
        fill_mask: float

    def __init__(
        self,
        crop_size: int,
        scale_range: tuple[float, float] = (0.5, 2.0),
        flip_p: float = 0.5,
        fill: float = 0,
        fill_mask: float = IGNORE_INDEX,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        if scale_range[0] <= 0:
            raise ValueError(f"scale_range={scale_range}: scales must be positive")
        self.crop_size = crop_size
        self.scale_range = scale_range
        self.flip_p = flip_p
        self.fill = fill
        self.fill_mask = fill_mask

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        scale = self.py_random.uniform(*self.scale_range)
        crop = self.crop_size

        def axis(size: int) -> tuple[float, float, int, int]:
            """Factor and shift of the source-to-crop map of one axis, and the crop's range the image covers."""
            scaled = max(int(size * scale + 0.5), 1)  # the size RandomScale would produce
            offset = self.py_random.randint(0, scaled - crop) if scaled >= crop else -((crop - scaled) // 2)
            factor = scaled / size
            # pixel centres: dst = factor * (src + 0.5) - 0.5 - offset, as cv2.resize maps them
            return factor, factor * 0.5 - 0.5 - offset, max(-offset, 0), min(scaled - offset, crop)

        fy, by, top, bottom = axis(height)
        fx, bx, left, right = axis(width)
        if self.py_random.random() < self.flip_p:
            fx, bx, left, right = -fx, crop - 1 - bx, crop - right, crop - left
        matrix = np.array([[fx, 0.0, bx], [0.0, fy, by]], dtype=np.float64)
        return {"matrix": matrix, "box": (top, bottom, left, right)}

    def _warp(
        self, array: np.ndarray, matrix: np.ndarray, box: tuple[int, int, int, int], flags: int, fill: float
    ) -> np.ndarray:
        """The whole crop is warped with the source clamped at its edges, then the padding outside ``box`` (the
        rectangle the scaled image covers) is filled: one output array, as cheap as a warp with a constant
        border, and the edge pixels are the image's own."""
        size = (self.crop_size, self.crop_size)
        out = cv2.warpAffine(array, matrix, size, flags=flags, borderMode=cv2.BORDER_REPLICATE)
        top, bottom, left, right = box
        out[:top], out[bottom:], out[:, :left], out[:, right:] = fill, fill, fill, fill
        return out

    def apply(self, img: np.ndarray, matrix: np.ndarray, box: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        return self._warp(img, matrix, box, cv2.INTER_LINEAR, self.fill)

    def apply_to_mask(
        self, mask: np.ndarray, matrix: np.ndarray, box: tuple[int, int, int, int], **params: Any
    ) -> np.ndarray:
        return self._warp(mask, matrix, box, cv2.INTER_NEAREST, self.fill_mask)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("crop_size", "scale_range", "flip_p", "fill", "fill_mask")


def train_transform(
    crop_size: int,
    scale_range: Sequence[float] = (0.5, 2.0),
    ignore_index: int = IGNORE_INDEX,
) -> A.Compose:
    """Random scale (``scale_range``), ``crop_size`` crop (image padded with 0, mask with ``ignore_index``), flip.

    Call as ``t(image=rgb_uint8_hwc, mask=index_uint8_hw)``; returns uint8 arrays of ``crop_size`` squares.
    Normalisation happens later, on the device (``normalize``).
    """
    low, high = scale_range
    return A.Compose(
        [RandomScaleCrop(crop_size, (float(low), float(high)), flip_p=0.5, fill=0, fill_mask=ignore_index)],
        strict=True,
    )


def val_transform(crop_size: int | None = None, ignore_index: int = IGNORE_INDEX) -> A.Compose:
    """Whole images unchanged; with ``crop_size`` (the seed's ``crop_val``) the shorter side is resized to
    ``crop_size`` (mask: nearest neighbour) and the centre ``crop_size`` square taken. uint8 in, uint8 out."""
    crop: list[A.BasicTransform] = []
    if crop_size is not None:
        crop = [
            A.SmallestMaxSize(max_size=crop_size, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST),
            pad_to(crop_size, ignore_index),
            A.CenterCrop(height=crop_size, width=crop_size),
        ]
    return A.Compose(crop, strict=True)


def normalize(
    images: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` RGB in 0..255 -> float32 ``(x / 255 - mean) / std``, on the images' device.

    The one normalisation of the project: training, validation and prediction all call it after the batch has
    reached the device. ``mean`` / ``std`` may be given as tensors already on that device (no copy per call).
    Float input is returned unchanged (already normalised).
    """
    if images.is_floating_point():
        return images
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255 - mean) / std
