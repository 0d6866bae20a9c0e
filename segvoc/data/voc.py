"""Pascal VOC segmentation dataset over the standard ``VOC2012/{JPEGImages, SegmentationClass, ImageSets}`` tree."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from segvoc.errors import SegvocError

IMAGE_DIR = "JPEGImages"
MASK_DIR = "SegmentationClass"
SPLIT_DIR = Path("ImageSets") / "Segmentation"
EXIF_ORIENTATION = 0x0112


# The SBD-augmented training set ("trainaug") that `python -m segvoc.data.prepare sbd` writes into a VOC2012 folder.
AUG_SPLIT = "train_aug"
AUG_MASK_DIR = "SegmentationClassAug"


def aug_hint(voc: Path) -> str:
    """The sentence telling how to make the SBD-augmented split and masks of the VOC2012 folder ``voc``."""
    return (
        f"The {AUG_SPLIT} split and {AUG_MASK_DIR} masks are made from SBD (Hariharan et al.): run "
        f"`python -m segvoc.data.prepare sbd --root {voc.parent.parent}` once."
    )


def read_split(voc: Path, split: str) -> list[str]:
    """Return the ids listed in ``ImageSets/Segmentation/<split>.txt`` (blank lines skipped)."""
    path = voc / SPLIT_DIR / f"{split}.txt"
    if not path.is_file():
        available = sorted(p.stem for p in (voc / SPLIT_DIR).glob("*.txt"))
        raise SegvocError(
            f"The split file {path} does not exist (splits found there: {available or 'none'}). "
            "Check data.root and the data.train_split / data.val_split names."
            + (f" {aug_hint(voc)}" if split == AUG_SPLIT else "")
        )
    ids = [line.strip().split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise SegvocError(f"The split file {path} lists no image ids; it must hold one id per line.")
    return ids


def read_image(path: Path) -> np.ndarray:
    """Read an image file as an RGB uint8 ``(H, W, 3)`` array, as displayed (OpenCV applies the EXIF orientation)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise SegvocError(f"Cannot read the image {path}: it is missing, truncated or not an image file.")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def displayed_size(path: Path) -> tuple[int, int] | None:
    """``(height, width)`` of an image as displayed (EXIF rotation applied), from its header alone; None when the
    header cannot be read (whoever decodes the file reports the error)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            turned = image.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8)
    except Exception:  # noqa: BLE001 - any unreadable header
        return None
    return (width, height) if turned else (height, width)


def displayed_sizes(paths: Sequence[Path]) -> list[tuple[int, int]]:
    """``displayed_size`` of every file, for grouping images of one size into batches; a file whose header cannot
    be read gets a size of its own, ``(-1 - i, 0)``, so it forms a batch alone (its reader reports the error)."""
    return [displayed_size(path) or (-1 - i, 0) for i, path in enumerate(paths)]


def read_mask(path: Path) -> np.ndarray:
    """Read a VOC mask as class indices ``(H, W)`` uint8: palette (``P``) or grayscale (``L``) PNGs only.

    Palette PNGs are read through their indices, never their colours, so 255 stays the ignore label.
    """
    try:
        with Image.open(path) as mask:
            if mask.mode not in ("P", "L"):
                raise SegvocError(
                    f"The mask {path} is a {mask.mode} image; VOC masks must be palette (P) or grayscale (L) "
                    "PNGs holding class indices. Re-save it with the class indices as pixel values."
                )
            return np.array(mask, dtype=np.uint8)
    except OSError as exc:
        raise SegvocError(f"Cannot read the mask {path} ({exc}); it is missing or not a valid PNG.") from exc


class VOCSegmentation(Dataset):
    """Image/mask pairs of one split of a VOC2012 folder.

    Ids in ``exclude`` (samples the dataset check found broken) are left out.
    ``dataset[i]`` returns ``(image, mask)``: the image as a uint8 ``(3, H, W)`` RGB tensor and the mask as a uint8
    ``(H, W)`` tensor of class indices (255 = ignore), both as the transform leaves them; normalisation and the
    conversion of masks to int64 happen on the device (``SegmentationModule.on_after_batch_transfer``).
    """

    def __init__(
        self,
        voc: str | Path,
        split: str,
        transform: Callable[..., dict[str, Any]] | None = None,
        mask_dir: str = MASK_DIR,
        exclude: set[str] | None = None,
    ) -> None:
        self.voc = Path(voc)
        self.split = split
        self.transform = transform
        self.ids = [i for i in read_split(self.voc, split) if not exclude or i not in exclude]
        self.image_dir = self.voc / IMAGE_DIR
        self.mask_dir = self.voc / mask_dir

    def __len__(self) -> int:
        return len(self.ids)

    def paths(self, index: int) -> tuple[Path, Path]:
        """Return the image and mask paths of sample ``index``."""
        name = self.ids[index]
        return self.image_dir / f"{name}.jpg", self.mask_dir / f"{name}.png"

    def image_sizes(self) -> list[tuple[int, int]]:
        """``(height, width)`` of every image as ``read_image`` gives it (see ``displayed_sizes``)."""
        return displayed_sizes([self.paths(index)[0] for index in range(len(self))])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.paths(index)
        image, mask = read_image(image_path), read_mask(mask_path)
        if image.shape[:2] != mask.shape:
            raise SegvocError(
                f"{image_path} is {image.shape[1]}x{image.shape[0]} but its mask {mask_path} is "
                f"{mask.shape[1]}x{mask.shape[0]}; image and mask must have the same size."
            )
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), torch.from_numpy(mask)
