"""Pascal VOC segmentation dataset over the standard ``VOC2012/{JPEGImages, SegmentationClass, ImageSets}`` tree."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from segvoc.data.image import displayed_sizes, read_image, read_mask
from segvoc.errors import SegvocError

IMAGE_DIR = "JPEGImages"
MASK_DIR = "SegmentationClass"
SPLIT_DIR = Path("ImageSets") / "Segmentation"
# the folders of a VOC-layout tree: images, masks, split lists
LAYOUT_DIRS = (IMAGE_DIR, MASK_DIR, SPLIT_DIR.as_posix())


# The SBD-augmented training set ("trainaug") that `python -m segvoc.data.prepare sbd` writes into a VOC2012 folder.
AUG_SPLIT = "train_aug"
AUG_MASK_DIR = "SegmentationClassAug"


def aug_hint(voc: Path) -> str:
    """The sentence telling how to make the SBD-augmented split and masks of the VOC2012 folder ``voc``."""
    return (
        f"The {AUG_SPLIT} split and {AUG_MASK_DIR} masks are made from SBD (Hariharan et al.): run "
        f"`python -m segvoc.data.prepare sbd --root {voc.parent.parent}` once."
    )


def split_ids(text: str) -> list[tuple[int, str]]:
    """``(line number, id)`` for every non-blank line of a split list: its first word (VOC's and SBD's lists)."""
    return [(number, line.split()[0]) for number, line in enumerate(text.splitlines(), 1) if line.strip()]


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
    ids = [name for _, name in split_ids(path.read_text())]
    if not ids:
        raise SegvocError(f"The split file {path} lists no image ids; it must hold one id per line.")
    return ids


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
