"""Paired image/mask transforms. Masks are resized with nearest neighbour only and padded with the ignore index."""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from segvoc.palette import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pad_to(size: int, ignore_index: int = IGNORE_INDEX) -> A.PadIfNeeded:
    """Pad to at least ``size`` x ``size``: the image with 0, the mask with ``ignore_index``."""
    return A.PadIfNeeded(
        min_height=size, min_width=size, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=ignore_index
    )


def train_transform(
    crop_size: int,
    scale_range: Sequence[float] = (0.5, 2.0),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    ignore_index: int = IGNORE_INDEX,
) -> A.Compose:
    """Random scale, pad to ``crop_size`` (image 0, mask ``ignore_index``), random crop, flip, normalise.

    Call as ``t(image=rgb_uint8_hwc, mask=index_uint8_hw)``; returns a float CHW tensor and the mask as HW.
    """
    low, high = scale_range
    return A.Compose(
        [
            A.RandomScale(scale_limit=(low - 1.0, high - 1.0), interpolation=cv2.INTER_LINEAR, p=1.0),
            pad_to(crop_size, ignore_index),
            A.RandomCrop(height=crop_size, width=crop_size),
            A.HorizontalFlip(p=0.5),
            A.Normalize(mean=mean, std=std),
            ToTensorV2(),
        ],
        strict=True,
    )


def val_transform(
    crop_size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    ignore_index: int = IGNORE_INDEX,
) -> A.Compose:
    """Normalise the whole image; with ``crop_size`` (the seed's ``crop_val``) first resize the shorter side to
    ``crop_size`` (mask: nearest neighbour) and take the centre ``crop_size`` square."""
    crop: list[A.BasicTransform] = []
    if crop_size is not None:
        crop = [
            A.SmallestMaxSize(max_size=crop_size, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST),
            pad_to(crop_size, ignore_index),
            A.CenterCrop(height=crop_size, width=crop_size),
        ]
    return A.Compose([*crop, A.Normalize(mean=mean, std=std), ToTensorV2()], strict=True)
