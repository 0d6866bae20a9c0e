"""A small generated dataset in the VOC layout, for offline demos and tests.

Scenes have a sky/ground background with smooth shading and sensor noise, and one to three objects of a few VOC
classes; each class has its own shape family and colour range, jittered per object. Masks are palette PNGs with a
255 band along object boundaries, as in VOC's ``SegmentationClass``. ``write_voc_tree`` is the one writer of a
generated VOC-layout tree: the demo's, and ``segvoc.bench``'s with its own scenes.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from segvoc.data.voc import IMAGE_DIR, LAYOUT_DIRS, MASK_DIR, SPLIT_DIR
from segvoc.errors import SegvocError
from segvoc.palette import IGNORE_INDEX, voc_palette

# class index -> (shape, base RGB colour)
DEMO_CLASSES: dict[int, tuple[str, tuple[int, int, int]]] = {
    3: ("triangle", (40, 170, 60)),  # bird
    7: ("box", (40, 80, 200)),  # car
    12: ("disc", (210, 170, 40)),  # dog
    15: ("ellipse", (200, 50, 50)),  # person
    5: ("bar", (170, 60, 190)),  # bottle
}
COMPLETE_MARKER = ".segvoc-demo-complete"


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int, amplitude: float) -> np.ndarray:
    grid = rng.normal(0.0, amplitude, size=(cells, cells)).astype(np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    sky, ground = (rng.uniform(90, 200, size=3) for _ in range(2))
    horizon = int(rng.uniform(0.3, 0.7) * height)
    t = np.clip((np.arange(height, dtype=np.float32) - horizon) / 6.0, -1, 1)[:, None, None] * 0.5 + 0.5
    image = (1 - t) * sky + t * ground
    image = np.broadcast_to(image, (height, width, 3)).copy()
    image = image * 0.55 + image.mean(axis=2, keepdims=True) * 0.45  # desaturate: objects carry the colour
    return image + _smooth_noise(rng, height, width, 5, 18.0)[..., None]


def _draw_shape(shape: str, canvas: np.ndarray, center: tuple[int, int], size: int, rng: np.random.Generator) -> None:
    cx, cy = center
    if shape == "ellipse":
        cv2.ellipse(canvas, (cx, cy), (int(size * 0.45), size), float(rng.uniform(-15, 15)), 0, 360, 1, -1)
    elif shape == "disc":
        cv2.circle(canvas, (cx, cy), int(size * 0.8), 1, -1)
    elif shape == "box":
        w, h = int(size * 1.3), int(size * 0.6)
        cv2.rectangle(canvas, (cx - w, cy - h), (cx + w, cy + h), 1, -1)
    elif shape == "bar":
        w, h = int(size * 0.3), int(size * 1.1)
        cv2.rectangle(canvas, (cx - w, cy - h), (cx + w, cy + h), 1, -1)
    else:  # triangle
        pts = np.array([[cx, cy - size], [cx - size, cy + size // 2], [cx + size, cy + size // 2]], np.int32)
        cv2.fillPoly(canvas, [pts], 1)


def make_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Return one ``(image RGB uint8, mask uint8)`` pair; the mask holds class indices and a 255 boundary band."""
    image = _background(rng, height, width)
    labels = np.zeros((height, width), dtype=np.uint8)
    classes = list(DEMO_CLASSES)
    for _ in range(rng.integers(1, 4)):
        cls = int(rng.choice(classes))
        shape, colour = DEMO_CLASSES[cls]
        size = int(rng.uniform(0.12, 0.28) * min(height, width))
        center = (int(rng.uniform(0.15, 0.85) * width), int(rng.uniform(0.2, 0.8) * height))
        region = np.zeros((height, width), dtype=np.uint8)
        _draw_shape(shape, region, center, size, rng)
        inside = region.astype(bool)
        shade = _smooth_noise(rng, height, width, 3, 20.0)[..., None]
        tint = np.asarray(colour, np.float32) + rng.normal(0, 14, size=3)
        image[inside] = (tint + shade)[inside]
        labels[inside] = cls
    image += rng.normal(0, 6.0, size=image.shape)
    edges = cv2.dilate(labels, np.ones((3, 3), np.uint8)) != cv2.erode(labels, np.ones((3, 3), np.uint8))
    labels[edges] = IGNORE_INDEX
    return np.clip(image, 0, 255).astype(np.uint8), labels


def _demo_size(rng: np.random.Generator) -> tuple[int, int]:
    """``(height, width)``: 60% landscape 135x180, 25% portrait 180x135, 15% anything in 120..180 x 160..240."""
    draw = rng.random()
    if draw < 0.60:
        return 135, 180
    if draw < 0.85:
        return 180, 135
    return int(rng.integers(120, 181)), int(rng.integers(160, 241))


def write_voc_tree(
    voc: Path,
    splits: Mapping[str, int],
    scene: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]],
    seed: int = 0,
    prefix: str = "demo",
    jpeg_quality: int = 92,
) -> Path:
    """Write generated images in the VOC layout under ``voc`` (the folder that is, or will be, ``VOC2012``) and
    return it: ``JPEGImages/<id>.jpg`` (RGB at ``jpeg_quality``), ``SegmentationClass/<id>.png`` (palette PNGs with the
    VOC colours) and ``ImageSets/Segmentation/<split>.txt``.

    ``splits`` maps a split name to its number of images, written in that order. ``scene(rng, i)`` draws the ``i``-th
    image of its split as ``(image RGB uint8, mask uint8)`` from the one generator seeded with ``seed``, so a tree is
    a function of its arguments. Ids are ``<prefix>_<n:05d>``, ``n`` counting on across the splits. Folders are
    created as needed and files of the same names overwritten; making the tree appear atomically is the caller's job.
    """
    for sub in LAYOUT_DIRS:
        (voc / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    palette = voc_palette().flatten().tolist()
    index = 0
    for split, count in splits.items():
        ids = []
        for i in range(count):
            name = f"{prefix}_{index:05d}"
            index += 1
            image, mask = scene(rng, i)
            jpeg = voc / IMAGE_DIR / f"{name}.jpg"
            cv2.imwrite(str(jpeg), image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
            png = Image.fromarray(mask, mode="P")
            png.putpalette(palette)
            png.save(voc / MASK_DIR / f"{name}.png")
            ids.append(name)
        (voc / SPLIT_DIR / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return voc


def _demo_scene(rng: np.random.Generator, index: int) -> tuple[np.ndarray, np.ndarray]:
    """A ``make_scene`` at a ``_demo_size``, whatever its place in the split."""
    return make_scene(rng, *_demo_size(rng))


def make_demo_voc(root: str | Path, n_train: int = 64, n_val: int = 16, seed: int = 0) -> Path:
    """Generate the demo dataset under ``root/VOCdevkit/VOC2012`` once and return that folder.

    Generation is atomic (written to a temporary folder, then renamed); an existing complete tree is reused.
    Image sizes mimic VOC's at a smaller scale: most are 180x135 landscape or 135x180 portrait (VOC: 500x375 and
    375x500), the rest vary between 160x120 and 240x180.
    """
    root = Path(root)
    voc = root / "VOCdevkit" / "VOC2012"
    if (voc / COMPLETE_MARKER).is_file():
        return voc
    if voc.exists() and any(voc.iterdir()):
        raise SegvocError(
            f"{voc} exists and is not a generated demo dataset; the demo will not overwrite it. "
            "Give the demo its own folder with data.root=data/demo (the default of experiment=demo)."
        )
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=root))
    try:
        write_voc_tree(tmp, {"train": n_train, "val": n_val}, _demo_scene, seed=seed)
        (tmp / COMPLETE_MARKER).write_text(f"seed={seed} train={n_train} val={n_val}\n")
        if voc.exists():
            voc.rmdir()  # empty, checked above
        voc.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(voc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return voc
