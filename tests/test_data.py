"""VOC dataset, transforms and data module on generated VOC-layout data."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from segvoc.data.datamodule import VOCDataModule, pad_collate
from segvoc.data.image import read_mask
from segvoc.data.sampler import SizeGroupedBatchSampler
from segvoc.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandomScaleCrop,
    normalize,
    train_transform,
    val_transform,
)
from segvoc.data.voc import VOCSegmentation
from segvoc.errors import SegvocError

COLOURS = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [220, 220, 40]], dtype=np.uint8)


def blocky_pair(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """An image whose colour encodes its class: mask = class of an 8x8-cell grid, image = COLOURS[mask]."""
    cells = rng.integers(0, len(COLOURS), size=(height // 8 + 1, width // 8 + 1))
    mask = np.kron(cells, np.ones((8, 8), dtype=np.int64))[:height, :width].astype(np.uint8)
    return COLOURS[mask], mask


def test_train_transform_keeps_image_and_mask_aligned() -> None:
    rng = np.random.default_rng(0)
    transform = train_transform(crop_size=64)
    for _ in range(20):
        image, mask = blocky_pair(rng, 75, 100)
        out = transform(image=image, mask=mask)
        img, msk = out["image"].astype(np.float64), out["mask"]
        assert img.shape == (64, 64, 3) and msk.shape == (64, 64) and msk.dtype == np.uint8
        # interior pixels (same label in a 5x5 window) must carry their class's colour
        for cls, colour in enumerate(COLOURS):
            same = msk == cls
            interior = same.copy()
            for dy in range(-2, 3):
                for dx in range(-2, 3):
                    interior &= np.roll(np.roll(same, dy, 0), dx, 1)
            interior[:2], interior[-2:], interior[:, :2], interior[:, -2:] = False, False, False, False
            if interior.any():
                assert np.abs(img[interior] - colour).max() < 3.0, f"class {cls} misaligned"


def test_padding_fills_the_mask_with_255_and_the_image_with_0() -> None:
    rng = np.random.default_rng(1)
    transform = train_transform(crop_size=96, scale_range=(1.0, 1.0))
    image, mask = blocky_pair(rng, 40, 50)
    out = transform(image=image, mask=mask)
    img, msk = out["image"], out["mask"]
    padded = msk == 255
    assert padded.sum() == 96 * 96 - 40 * 50
    assert img[padded].max() == 0
    assert (img[~padded].max(axis=1) > 20).all()


@pytest.mark.parametrize(
    ("scale", "crop", "flip"),
    [(0.6, 64, False), (1.0, 64, False), (1.7, 64, True), (2.0, 64, False), (1.2, 128, False), (1.37, 128, True)],
)
def test_random_scale_crop_equals_resize_pad_crop(scale: float, crop: int, flip: bool) -> None:
    """The one-warp transform matches resize, centred pad, a crop and a flip (up to rounding of the fixed-point
    warp), also where an upscaled image is smaller than the crop: its edge pixels are the image's, not blended with
    the padding (scales 1.2 and 1.37 at crop 128)."""
    image, mask = blocky_pair(np.random.default_rng(4), 75, 100)
    image = cv2.GaussianBlur(image, (0, 0), 1.5)  # smooth: a half-pixel shift would show as more than 1 grey level
    transform = A.Compose([RandomScaleCrop(crop, (scale, scale), flip_p=float(flip))], strict=True)
    transform.set_random_seed(5)
    out = transform(image=image, mask=mask)
    height, width = int(75 * scale + 0.5), int(100 * scale + 0.5)
    resized = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    # pixel-centre nearest neighbour (plain INTER_NEAREST of cv2.resize is shifted by half a source pixel)
    resized_mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)
    pad_h, pad_w = max(crop - height, 0), max(crop - width, 0)  # centred, as PadIfNeeded does
    border = (pad_h // 2, pad_h - pad_h // 2, pad_w // 2, pad_w - pad_w // 2)
    resized = cv2.copyMakeBorder(resized, *border, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    resized_mask = cv2.copyMakeBorder(resized_mask, *border, cv2.BORDER_CONSTANT, value=255)
    if flip:
        resized, resized_mask = resized[:, ::-1], resized_mask[:, ::-1]
    height, width = resized_mask.shape
    matches = [
        (top, left)
        for top in range(height - crop + 1)
        for left in range(width - crop + 1)
        if np.abs(resized[top : top + crop, left : left + crop].astype(int) - out["image"]).max() <= 1
    ]
    assert matches, "the crop is not a window of the resized image"
    top, left = matches[0]
    assert np.array_equal(resized_mask[top : top + crop, left : left + crop], out["mask"])


def test_random_scale_crop_flip_mirrors_image_and_mask() -> None:
    image, mask = blocky_pair(np.random.default_rng(6), 64, 64)
    flipped = A.Compose([RandomScaleCrop(64, (1.0, 1.0), flip_p=1.0)], strict=True)(image=image, mask=mask)
    assert np.array_equal(flipped["image"], image[:, ::-1]) and np.array_equal(flipped["mask"], mask[:, ::-1])


def test_normalize_matches_the_float_formula() -> None:
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    expected = (images.float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1
    )
    assert torch.allclose(normalize(images, IMAGENET_MEAN, IMAGENET_STD), expected, atol=1e-6)
    assert normalize(expected, IMAGENET_MEAN, IMAGENET_STD) is expected


def test_val_transform_keeps_full_size_or_centre_crops() -> None:
    image, mask = blocky_pair(np.random.default_rng(2), 75, 100)
    assert val_transform()(image=image, mask=mask)["image"].shape == (75, 100, 3)
    out = val_transform(crop_size=96)(image=image, mask=mask)  # shorter side 75 -> 96, then centre crop
    assert out["image"].shape == (96, 96, 3) and (out["mask"] == 255).sum() == 0


def test_dataset_reads_palette_masks_as_indices(voc_root: Path) -> None:
    voc = voc_root / "VOCdevkit" / "VOC2012"
    dataset = VOCSegmentation(voc, "val", val_transform())
    assert len(dataset) == 4
    image, mask = dataset[0]
    _, mask_path = dataset.paths(0)
    raw = np.array(Image.open(mask_path))
    assert Image.open(mask_path).mode == "P"
    assert image.dtype == torch.uint8 and image.shape[0] == 3 and image.shape[1:] == mask.shape
    assert mask.dtype == torch.uint8
    assert torch.equal(mask, torch.from_numpy(raw))
    assert set(np.unique(raw)) <= set(range(21)) | {255} and 255 in raw


def test_rgb_mask_is_refused_with_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "rgb.png"
    Image.new("RGB", (4, 4), (128, 0, 0)).save(path)
    with pytest.raises(SegvocError, match="rgb.png"):
        read_mask(path)


def test_missing_split_names_the_file(voc_root: Path) -> None:
    with pytest.raises(SegvocError, match="trainaug.txt"):
        VOCSegmentation(voc_root / "VOCdevkit" / "VOC2012", "trainaug")
    # without the dataset check (data.check=false) the missing trainaug split still says how to make it
    with pytest.raises(SegvocError, match=f"prepare sbd --root {voc_root}"):
        VOCSegmentation(voc_root / "VOCdevkit" / "VOC2012", "train_aug")


def test_pad_collate_pads_masks_with_ignore() -> None:
    a = (torch.ones(3, 4, 5), torch.zeros(4, 5, dtype=torch.long))
    b = (torch.ones(3, 6, 3), torch.ones(6, 3, dtype=torch.long))
    images, masks, sizes = pad_collate([a, b])
    assert sizes == [(4, 5), (6, 3)]
    assert images.shape == (2, 3, 6, 5) and masks.shape == (2, 6, 5)
    assert (masks[0, 4:] == 255).all() and (masks[1, :, 3:] == 255).all() and images[1, :, :, 3:].sum() == 0


def test_datamodule_loaders(voc_root: Path) -> None:
    dm = VOCDataModule(root=voc_root, batch_size=4, val_batch_size=2, crop_size=64, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    images, masks = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 64, 64) and images.dtype == torch.uint8
    assert masks.shape == (4, 64, 64) and masks.dtype == torch.uint8
    for images, masks, sizes in dm.val_dataloader():
        assert images.shape[0] <= 2 and images.shape[-2:] == masks.shape[-2:]
        assert len(set(sizes)) == 1  # one image size per batch: nothing padded


def test_size_grouped_batches_cover_every_image_once_across_ranks() -> None:
    sizes = [(5, 7), (7, 5), (5, 7), (5, 7), (9, 9), (7, 5), (5, 7)]
    single = list(SizeGroupedBatchSampler(sizes, batch_size=2))
    assert single == [[0, 2], [1, 5], [3, 6], [4]]
    shares = [list(SizeGroupedBatchSampler(sizes, 2, num_replicas=3, rank=r)) for r in range(3)]
    seen = sorted(i for share in shares for batch in share for i in batch)
    assert seen == list(range(len(sizes)))
    assert all(len({sizes[i] for i in batch}) == 1 for share in shares for batch in share)


def test_every_process_gets_a_validation_batch_when_batches_are_few() -> None:
    sizes = [(5, 7)] * 4  # one batch of 8 would leave three of four processes without any
    shares = [list(SizeGroupedBatchSampler(sizes, 8, num_replicas=4, rank=r)) for r in range(4)]
    assert all(len(share) == 1 for share in shares)
    assert sorted(i for share in shares for batch in share for i in batch) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="3 images cannot give each of 4 processes"):
        SizeGroupedBatchSampler(sizes[:3], 8, num_replicas=4, rank=0)


def test_global_batch_must_divide_over_processes(voc_root: Path) -> None:
    dm = VOCDataModule(root=voc_root, batch_size=6)

    class FakeTrainer:
        world_size, global_rank = 4, 0

    dm.trainer = FakeTrainer()
    with pytest.raises(SegvocError, match="batch_size=6.*4 training processes"):
        dm.per_device_batch_size()
    dm.batch_size = 8
    assert dm.per_device_batch_size() == 2


def _augmented_mask_sums(voc_root: Path, num_workers: int) -> list[int]:
    import lightning as L

    L.seed_everything(3, workers=True)
    dm = VOCDataModule(root=voc_root, batch_size=1, crop_size=64, num_workers=num_workers)
    dm.setup("fit")
    dm.train_set.ids = [dm.train_set.ids[0]] * 8  # one image: differences come from augmentation alone
    loader = torch.utils.data.DataLoader(
        dm.train_set, batch_size=1, num_workers=num_workers, worker_init_fn=dm.train_dataloader().worker_init_fn
    )
    return [int(mask.sum()) for _, mask in loader]


def test_augmentation_is_reproducible_and_differs_between_workers(voc_root: Path) -> None:
    first = _augmented_mask_sums(voc_root, num_workers=2)
    assert first == _augmented_mask_sums(voc_root, num_workers=2)
    assert first[0::2] != first[1::2]  # worker 0 and worker 1 do not replay one random stream
    assert _augmented_mask_sums(voc_root, num_workers=0) == _augmented_mask_sums(voc_root, num_workers=0)
