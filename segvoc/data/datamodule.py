"""LightningDataModule for VOC-layout data: prepares (download / demo generation), splits, loaders."""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.seed import pl_worker_init_function as seed_lightning_worker
from torch.utils.data import DataLoader, DistributedSampler, get_worker_info

from segvoc.data.demo import make_demo_voc
from segvoc.data.download import VOC_MEMBER, VOC_URL, prepare_voc
from segvoc.data.sampler import SizeGroupedBatchSampler
from segvoc.data.transforms import IMAGENET_MEAN, IMAGENET_STD, train_transform, val_transform
from segvoc.data.voc import VOCSegmentation
from segvoc.errors import SegvocError
from segvoc.palette import IGNORE_INDEX


def pad_stack(tensors: Sequence[torch.Tensor], value: int = 0) -> torch.Tensor:
    """Stack tensors ``(..., H, W)`` of different sizes into one, each padded with ``value`` at the bottom/right to
    the largest height and width (``segvoc.models.inference.crop_to_sizes`` undoes it)."""
    height = max(t.shape[-2] for t in tensors)
    width = max(t.shape[-1] for t in tensors)
    return torch.stack(
        [F.pad(t, (0, width - t.shape[-1], 0, height - t.shape[-2]), value=value) for t in tensors]
    )


def pad_collate(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor]], ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Stack samples of different sizes: images padded with 0 and masks with ``ignore_index`` at the bottom/right.

    Returns ``(images, masks, sizes)``; ``sizes[i]`` is the ``(height, width)`` of sample ``i`` before padding.
    """
    images = pad_stack([image for image, _ in batch])
    masks = pad_stack([mask for _, mask in batch], ignore_index)
    return images, masks, [tuple(image.shape[-2:]) for image, _ in batch]


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: give each worker its own, reproducible augmentation stream.

    albumentations 2.x keeps its own random generator, seeded from OS entropy unless told otherwise, and forked
    workers would all inherit one copy of it; here it is reseeded from the worker's torch seed (derived from the
    run's ``seed``, different for every worker and epoch), and NumPy / ``random`` as Lightning does.
    """
    seed_lightning_worker(worker_id)
    # No cv2.setNumThreads here: in a forked worker whose parent has already run OpenCV's thread pool it blocks
    # forever (it waits for the parent's pool threads, which do not exist in the child).
    info = get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(info.seed % 2**32)


def default_num_workers() -> int:
    """The number of CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class VOCDataModule(L.LightningDataModule):
    """Train/val loaders over ``<root>/<subdir>``: ``<root>/VOCdevkit/VOC2012`` for VOC, ``<root>`` itself for a
    dataset of one's own (``subdir=""``, ``data=custom``), which is used where it is (``segvoc.config`` checks it).

    ``classes``, ``palette`` and ``ignore_index`` describe the dataset (the model config reads them from ``data.*``);
    masks are padded with ``ignore_index`` and checked against ``num_classes`` and it.

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
        mask_dir: str = "SegmentationClass",
        num_classes: int = 21,
        classes: Sequence[str] | None = None,
        palette: Sequence[Sequence[int]] | None = None,
        ignore_index: int = IGNORE_INDEX,
        subdir: str = VOC_MEMBER,
        batch_size: int = 8,
        val_batch_size: int = 8,
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
        self.mask_dir = mask_dir
        self.num_classes = num_classes
        self.classes = list(classes) if classes is not None else None
        self.palette = [list(colour) for colour in palette] if palette is not None else None
        self.ignore_index = ignore_index
        self.subdir = subdir
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
        self._val_sizes: list[tuple[int, int]] | None = None

    @property
    def voc(self) -> Path:
        return self.root / self.subdir

    def prepare_data(self) -> None:
        if self.demo:
            make_demo_voc(self.root)
        elif Path(self.subdir) == Path(VOC_MEMBER):  # another tree (data=custom) is a dataset of one's own: as is
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
        self.excluded = require_usable_dataset(
            self.voc,
            splits,
            self.num_classes,
            ignore_index=self.ignore_index,
            skip_bad=self.skip_bad_samples,
            mask_dir=self.mask_dir,
        )

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None) and self.train_set is None:
            transform = train_transform(self.crop_size, self.scale_range, ignore_index=self.ignore_index)
            # Without workers the transform runs here: seed it from torch's generator, which the run's seed sets.
            transform.set_random_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
            self.train_set = VOCSegmentation(
                self.voc, self.train_split, transform, self.mask_dir, exclude=self.excluded.get(self.train_split)
            )
        if stage in ("fit", "validate", None) and self.val_set is None:
            crop = self.crop_size if self.crop_val else None
            transform = val_transform(crop, ignore_index=self.ignore_index)
            self.val_set = VOCSegmentation(
                self.voc, self.val_split, transform, self.mask_dir, exclude=self.excluded.get(self.val_split)
            )

    def _world(self) -> tuple[int, int]:
        """``(world_size, global_rank)`` of the trainer this data module is attached to, ``(1, 0)`` without one."""
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def per_device_batch_size(self) -> int:
        """``batch_size`` is the global batch: each of the ``world_size`` processes loads its share."""
        world_size, _ = self._world()
        if self.batch_size % world_size:
            raise SegvocError(
                f"data.batch_size={self.batch_size} is the global batch and must divide evenly over the "
                f"{world_size} training processes (devices x nodes); use a multiple of {world_size}."
            )
        return self.batch_size // world_size

    def train_dataloader(self) -> DataLoader:
        """Shuffled ``crop_size`` crops in batches of ``per_device_batch_size()``; under several processes a
        ``DistributedSampler`` (seeded with the run's seed) gives each its own part of every epoch."""
        assert self.train_set is not None, "setup('fit') must run first"
        world_size, rank = self._world()
        batch_size = self.per_device_batch_size()
        sampler = None
        if world_size > 1:
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
            sampler = DistributedSampler(self.train_set, world_size, rank, shuffle=True, seed=seed, drop_last=True)
        return DataLoader(
            self.train_set,
            batch_size=batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            drop_last=len(self.train_set) > batch_size * world_size,
            **self._loader_options(),
        )

    def val_dataloader(self) -> DataLoader:
        """Whole validation images in batches of up to ``val_batch_size`` images of one size (exactly the
        per-image result, see ``SizeGroupedBatchSampler``), each image in exactly one process."""
        assert self.val_set is not None, "setup('validate') must run first"
        world_size, rank = self._world()
        if self._val_sizes is None:
            self._val_sizes = self.val_set.image_sizes() if not self.crop_val else [(0, 0)] * len(self.val_set)
        if len(self._val_sizes) < world_size:
            raise SegvocError(
                f"The {self.val_split} split has {len(self._val_sizes)} images for {world_size} processes: each "
                "process validates at least one. Train on fewer devices or list more images in the split."
            )
        sampler = SizeGroupedBatchSampler(self._val_sizes, self.val_batch_size, world_size, rank)
        collate = partial(pad_collate, ignore_index=self.ignore_index)
        return DataLoader(self.val_set, batch_sampler=sampler, collate_fn=collate, **self._loader_options())

    def _loader_options(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.num_workers > 0,
            "worker_init_fn": seed_worker,
        }
