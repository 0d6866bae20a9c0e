"""Statistics of a VOC-layout dataset's masks, and class weights from them: ``python -m segvoc.data.stats``.

For each split (``splits``, default the training split) it counts the pixels of every class, the images each class
occurs in and the ignored pixels, summarises the image sizes, derives two sets of class weights, prints a table and
writes a JSON file (``output``, default ``<VOC folder>/stats-<split>.json``) that the losses read
(``loss.class_weights=<that path>``, see ``segvoc.losses``).

Definitions, with "labelled" pixels those holding a class index (neither ``ignore_index`` nor a value outside the
classes):

- ``class_frequency[c]``: pixels of class ``c`` / labelled pixels of the split;
- median frequency balancing (Eigen & Fergus, 2015): ``freq(c)`` = pixels of ``c`` / labelled pixels of the images
  in which ``c`` occurs, ``weight(c) = median(freq) / freq(c)``, the median taken over the classes that occur;
- inverse log frequency (ENet, Paszke et al., 2016): ``weight(c) = 1 / ln(1.02 + class_frequency[c])``;
- a class that never occurs in the split gets weight 0 in both: it has no pixels for a weight to act on, and a
  weight must never be inf or NaN.

Masks are decoded with training's reader (``segvoc.data.image.read_mask``) on a thread pool (Pillow decodes PNGs
without the GIL); the image sizes are the masks' sizes, which equal the images' in a dataset that passes
``python -m segvoc.data.check``, so no JPEG is decoded. An id listed twice in a split counts twice, as training
sees it twice.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from segvoc.config import register_resolvers, validate_data
from segvoc.data.download import VOC_MEMBER
from segvoc.data.image import read_mask
from segvoc.data.voc import MASK_DIR, read_split
from segvoc.errors import SegvocError, exit_on_user_error
from segvoc.files import atomic_write_text
from segvoc.palette import IGNORE_INDEX, default_class_names

log = logging.getLogger(__name__)

WEIGHTINGS = ("median_frequency", "inverse_log")  # the keys of a stats JSON's "weights"
COMMON_SIZES = 5  # most common image sizes listed


def count_masks(paths: Sequence[Path], workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(counts, sizes)`` of the mask files ``paths``: ``counts[i, v]`` the number of pixels of value ``v`` (0..255)
    in mask ``i`` (int64, ``(len(paths), 256)``), ``sizes[i]`` its ``(height, width)``.

    Decodes on ``workers`` threads (None: Python's default). Raises ``SegvocError`` naming the first mask that
    cannot be read.
    """

    def count(path: Path) -> tuple[np.ndarray, tuple[int, int]]:
        mask = read_mask(path)
        return np.bincount(mask.ravel(), minlength=256), mask.shape

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(count, paths))
    counts = np.zeros((len(paths), 256), dtype=np.int64)
    sizes = np.zeros((len(paths), 2), dtype=np.int64)
    for i, (values, shape) in enumerate(results):
        counts[i], sizes[i] = values, shape
    return counts, sizes


def median_frequency_weights(class_pixels: np.ndarray, present_pixels: np.ndarray) -> np.ndarray:
    """Median frequency balancing weights (module docstring): ``class_pixels[c]`` the pixels of class ``c``,
    ``present_pixels[c]`` the labelled pixels of the images in which ``c`` occurs. 0 for a class without pixels."""
    class_pixels = np.asarray(class_pixels, dtype=np.float64)
    present = class_pixels > 0
    weights = np.zeros_like(class_pixels)
    if present.any():
        freq = class_pixels[present] / np.asarray(present_pixels, dtype=np.float64)[present]
        weights[present] = np.median(freq) / freq
    return weights


def inverse_log_weights(class_pixels: np.ndarray) -> np.ndarray:
    """ENet's ``1 / ln(1.02 + p(c))`` with ``p(c)`` class ``c``'s share of the labelled pixels; 0 for a class
    without pixels."""
    class_pixels = np.asarray(class_pixels, dtype=np.float64)
    share = class_pixels / max(class_pixels.sum(), 1.0)
    return np.where(class_pixels > 0, 1.0 / np.log(1.02 + share), 0.0)


def _median(values: np.ndarray) -> int | float:
    median = float(np.median(values))
    return int(median) if median.is_integer() else median


def dataset_stats(
    voc: str | Path,
    split: str,
    num_classes: int = 21,
    ignore_index: int = IGNORE_INDEX,
    class_names: Sequence[str] | None = None,
    mask_dir: str = MASK_DIR,
    workers: int | None = None,
) -> dict[str, Any]:
    """The statistics of ``split`` of the VOC folder ``voc`` (masks in ``voc/<mask_dir>``) as a JSON-ready dict.

    Keys: ``dataset``, ``split``, ``mask_dir``, ``num_classes``, ``ignore_index``, ``classes`` (names; None: VOC's
    or ``class_<i>``), ``images``, ``pixels``, ``ignored_pixels``, ``ignored_share``, ``other_values`` (``{value:
    pixels}`` of mask values neither a class nor ignored; ``{}`` in a clean dataset), per class lists
    ``class_pixels``, ``class_frequency``, ``class_images``, ``weights`` (``{weighting: [one per class]}`` for each
    of ``WEIGHTINGS``), and ``sizes`` (``height`` and ``width`` as ``{min, median, max}``, ``most_common`` as
    ``[{height, width, images}, ...]``). Raises ``SegvocError`` when the split or a mask cannot be read.
    """
    voc = Path(voc)
    start = time.perf_counter()
    ids = read_split(voc, split)
    counts, sizes = count_masks([voc / mask_dir / f"{name}.png" for name in ids], workers)
    class_counts = counts[:, :num_classes]
    labelled_per_image = class_counts.sum(axis=1)
    class_pixels = class_counts.sum(axis=0)
    occurs = class_counts > 0
    present_pixels = (occurs * labelled_per_image[:, None]).sum(axis=0)
    other = [v for v in range(num_classes, 256) if v != ignore_index and counts[:, v].any()]
    total = int(counts.sum())
    ignored = int(counts[:, ignore_index].sum())
    labelled = int(class_pixels.sum())
    common = Counter(map(tuple, sizes.tolist())).most_common(COMMON_SIZES)
    log.info("Counted the %d masks of %s/%s in %.1f s", len(ids), voc, split, time.perf_counter() - start)
    return {
        "dataset": str(voc),
        "split": split,
        "mask_dir": mask_dir,
        "num_classes": num_classes,
        "ignore_index": ignore_index,
        "classes": list(class_names) if class_names is not None else default_class_names(num_classes),
        "images": len(ids),
        "pixels": total,
        "ignored_pixels": ignored,
        "ignored_share": ignored / total if total else 0.0,
        "other_values": {str(v): int(counts[:, v].sum()) for v in other},
        "class_pixels": class_pixels.tolist(),
        "class_frequency": (class_pixels / max(labelled, 1)).tolist(),
        "class_images": occurs.sum(axis=0).tolist(),
        "weights": {
            "median_frequency": median_frequency_weights(class_pixels, present_pixels).tolist(),
            "inverse_log": inverse_log_weights(class_pixels).tolist(),
        },
        "sizes": {
            "height": {"min": int(sizes[:, 0].min()), "median": _median(sizes[:, 0]), "max": int(sizes[:, 0].max())},
            "width": {"min": int(sizes[:, 1].min()), "median": _median(sizes[:, 1]), "max": int(sizes[:, 1].max())},
            "most_common": [{"height": h, "width": w, "images": n} for (h, w), n in common],
        },
    }


def write_stats(stats: dict[str, Any], path: str | Path) -> Path:
    """Write ``stats`` as indented JSON to ``path`` atomically (its folder created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(stats, indent=2) + "\n")


def print_stats(stats: dict[str, Any], console: Console | None = None) -> None:
    """Print ``stats`` (a ``dataset_stats`` result) for a person: a summary, then one table row per class."""
    console = console or Console()
    sizes = stats["sizes"]
    span = {key: "{min} / {median} / {max}".format(**sizes[key]) for key in ("height", "width")}
    common = ", ".join(f"{s['width']}x{s['height']} ({s['images']})" for s in sizes["most_common"])
    console.print(f"[bold]{stats['dataset']}[/bold], split {stats['split']} ({stats['mask_dir']}):")
    console.print(
        f"  {stats['images']} images, {stats['pixels']:,} pixels, {stats['ignored_share']:.2%} ignored "
        f"(value {stats['ignore_index']})"
    )
    console.print(f"  height min / median / max: {span['height']}; width: {span['width']}")
    console.print(f"  most common sizes, WxH (images): {common}")
    if stats["other_values"]:
        console.print(
            f"  [red]pixels of values neither a class nor ignored, left out: {stats['other_values']}[/red] "
            "(python -m segvoc.data.check says which masks)"
        )
    table = Table("#", "class", "pixels", "share", "images", "w med. freq", "w inv. log")
    weights = stats["weights"]
    for c, name in enumerate(stats["classes"]):
        table.add_row(
            str(c),
            name,
            f"{stats['class_pixels'][c]:,}",
            f"{stats['class_frequency'][c]:.2%}",
            str(stats["class_images"][c]),
            f"{weights['median_frequency'][c]:.3f}",
            f"{weights['inverse_log'][c]:.3f}",
        )
    console.print(table)


@hydra.main(version_base="1.3", config_path="../../conf", config_name="stats")
def main(cfg: DictConfig) -> None:
    """Print the statistics of every split of ``cfg.splits`` and write each one's JSON; exit 1 on a user error."""
    data = cfg.data
    try:
        validate_data(cfg)
        voc = Path(str(data.root)).expanduser() / data.get("subdir", VOC_MEMBER)
        splits = list(dict.fromkeys(cfg.splits))
        if cfg.output is not None and len(splits) != 1:
            raise SegvocError(
                f"output={cfg.output} names one file, but {len(splits)} splits were asked for ({', '.join(splits)}); "
                "leave output=null (each split is written to <VOC folder>/stats-<split>.json) or ask for one split."
            )
        for split in splits:
            stats = dataset_stats(
                voc,
                split,
                data.num_classes,
                data.ignore_index,
                data.get("classes"),
                data.get("mask_dir", MASK_DIR),
                cfg.workers,
            )
            print_stats(stats)
            path = write_stats(stats, cfg.output if cfg.output is not None else voc / f"stats-{split}.json")
            print(f"Wrote {path}")
    except Exception as exc:  # a SegvocError is one message and exit 1; anything else a traceback
        exit_on_user_error(exc)


if __name__ == "__main__":
    register_resolvers()  # ${len:...} of data=custom
    main()
