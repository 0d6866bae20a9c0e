"""LightningDataModule for VOC-layout data: prepares (download / demo generation), splits, loaders."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.seed import pl_worker_init_function as seed_lightning_worker
from torch.utils.data import DataLoader, get_worker_info

from segvoc.data.demo import make_demo_voc
from segvoc.data.download import VOC_URL, prepare_voc, voc_dir
from segvoc.data.transforms import IMAGENET_MEAN, IMAGENET_STD, train_transform, val_transform
from segvoc.data.voc import VOCSegmentation
from segvoc.palette import IGNORE_INDEX


def pad_collate(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Stack samples of different sizes: images padded with 0 and masks with 255 at the bottom/right.

    Returns ``(images, masks, sizes)``; ``sizes[i]`` is the ``(height, width)`` of sample ``i`` before padding.
    """
    height = max(image.shape[-2] for image, _ in batch)
    width = max(image.shape[-1] for image, _ in batch)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(t, (0, width - t.shape[-1], 0, height - t.shape[-2]), value=value)

    images = torch.stack([pad(image, 0) for image, _ in batch])
    masks = torch.stack([pad(mask, IGNORE_INDEX) for _, mask in batch])
    return images, masks, [tuple(image.shape[-2:]) for image, _ in batch]


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: give each worker its own, reproducible augmentation stream.

    albumentations 2.x keeps its own random generator, seeded from OS entropy unless told otherwise, and forked
    workers would all inherit one copy of it; here it is reseeded from the worker's torch seed (derived from the
    run's ``seed``, different for every worker and epoch), and NumPy / ``random`` as Lightning does.
    """
    seed_lightning_worker(worker_id)
    info = get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(info.seed % 2**32)


def default_num_workers() -> int:
    """The number of CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class VOCDataModule(L.LightningDataModule):
    """Train/val loaders over ``<root>/VOCdevkit/VOC2012``.

    ``prepare_data`` makes sure the tree exists (generating the demo set when ``demo`` is true, else finding,
    extracting ``tar_path`` or downloading VOC2012 when ``download`` is true) and raises a ``SegvocError`` that
    says what to do when it cannot. Validation runs on whole images unless ``crop_val`` is set.
    """

    def __init__(
        self,
        root: str | Path = "data",
        download: bool = False,
        tar_path: str | Path | None = None,
        url: str = VOC_URL,
        demo: bool = False,
        train_split: str = "train",
        val_split: str = "val",
        num_classes: int = 21,
        batch_size: int = 8,
        val_batch_size: int = 1,
        crop_size: int = 513,
        crop_val: bool = False,
        scale_range: Sequence[float] = (0.5, 2.0),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        check: bool = True,
        skip_bad_samples: bool = False,
    ) -> None:
        super().__init__()
        self.root = Path(root).expanduser()
        self.download = download
        self.tar_path = Path(tar_path).expanduser() if tar_path else None
        self.url = url
        self.demo = demo
        self.train_split = train_split
        self.val_split = val_split
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.crop_size = crop_size
        self.crop_val = crop_val
        self.scale_range = tuple(scale_range)
        self.mean, self.std = tuple(mean), tuple(std)
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.check = check
        self.skip_bad_samples = skip_bad_samples
        self.excluded: dict[str, set[str]] = {}
        self.train_set: VOCSegmentation | None = None
        self.val_set: VOCSegmentation | None = None

    @property
    def voc(self) -> Path:
        return voc_dir(self.root)

    def prepare_data(self) -> None:
        if self.demo:
            make_demo_voc(self.root)
        else:
            prepare_voc(self.root, download=self.download, tar_path=self.tar_path, url=self.url)

    def check_data(self, splits: Sequence[str] | None = None) -> None:
        """Decode every listed image and mask of ``splits`` (default: train and val) and refuse a broken dataset.

        Raises ``DatasetCheckError`` with every problem found, or, with ``skip_bad_samples``, leaves the bad samples
        out of the splits and logs which. Does nothing when ``check`` is false.
        """
        if not self.check:
            return
        from segvoc.data.check import require_usable_dataset

        splits = list(dict.fromkeys(splits or (self.train_split, self.val_split)))
        self.excluded = require_usable_dataset(self.voc, splits, self.num_classes, skip_bad=self.skip_bad_samples)

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None) and self.train_set is None:
            transform = train_transform(self.crop_size, self.scale_range, self.mean, self.std)
            # Without workers the transform runs here: seed it from torch's generator, which the run's seed sets.
            transform.set_random_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
            self.train_set = VOCSegmentation(
                self.voc, self.train_split, transform, exclude=self.excluded.get(self.train_split)
            )
        if stage in ("fit", "validate", None) and self.val_set is None:
            crop = self.crop_size if self.crop_val else None
            transform = val_transform(crop, self.mean, self.std)
            self.val_set = VOCSegmentation(
                self.voc, self.val_split, transform, exclude=self.excluded.get(self.val_split)
            )

    def _loader(self, dataset: VOCSegmentation, batch_size: int, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            drop_last=train and len(dataset) > batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=None if train else pad_collate,
            worker_init_fn=seed_worker,
        )

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "setup('fit') must run first"
        return self._loader(self.train_set, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "setup('validate') must run first"
        return self._loader(self.val_set, self.val_batch_size, train=False)
