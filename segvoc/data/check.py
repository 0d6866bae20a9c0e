"""Check a VOC-layout dataset before hours of training are spent on it: ``python -m segvoc.data.check data.root=...``.

``check_dataset`` decodes every listed image (with training's own reader, ``segvoc.data.image.read_image``) and
mask in full on a thread pool (Pillow and OpenCV decode without the GIL) and returns every problem at once;
``format_report`` turns them into the text the CLI prints; ``bad_ids`` and ``require_usable_dataset`` are what
training uses to refuse a broken dataset or to leave its bad samples out.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig
from PIL import Image

from segvoc.config import register_resolvers, validate_data
from segvoc.data.download import VOC_MEMBER
from segvoc.data.image import read_image, unreadable_reason
from segvoc.data.voc import AUG_MASK_DIR, AUG_SPLIT, IMAGE_DIR, MASK_DIR, SPLIT_DIR, aug_hint, split_ids
from segvoc.errors import SegvocError, exit_on_user_error
from segvoc.files import atomic_save
from segvoc.palette import IGNORE_INDEX, voc_palette

log = logging.getLogger(__name__)


# Every kind of problem, in report order, with what to do about it.
KINDS: dict[str, str] = {
    "missing_split": "create ImageSets/Segmentation/<split>.txt with one image id per line, or point "
    "data.train_split / data.val_split at a split that exists.",
    "unreadable_split": "the split file must be plain text with one image id per line; re-create it.",
    "empty_split": "list one image id per line in the split file.",
    "missing_mask_dir": "point data.mask_dir at the folder under VOC2012 that holds the masks, or create it.",
    "duplicate_id": "list each id once per split (a repeated id is seen several times per epoch).",
    "missing_image": "put the image at JPEGImages/<id>.jpg, or remove the id from the split file.",
    "missing_mask": "put the mask at <mask folder>/<id>.png (SegmentationClass, or the data.mask_dir folder), or "
    "remove the id from the split file.",
    "unreadable_image": "replace the file with an intact copy (extract or download the dataset again), or remove "
    "the id from the split file.",
    "unreadable_mask": "replace the file with an intact copy (extract or download the dataset again), or remove "
    "the id from the split file.",
    "size_mismatch": "an image and its mask must have the same width and height; resize the mask with "
    "nearest-neighbour interpolation or pair it with the right image.",
    "bad_mask_values": "masks hold class indices 0..num_classes-1 and the ignore label; check data.num_classes "
    "and that the masks were saved as indices, not colours or another dataset's labels.",
    "rgb_mask": "masks must be palette (P) or grayscale (L) PNGs of class indices; rewrite these with "
    "`python -m segvoc.data.check data.root=<root> convert_rgb_masks=true` (maps VOC palette colours to indices).",
    "bad_mask_mode": "masks must be 8-bit palette (P) or grayscale (L) PNGs of class indices; re-save them so.",
}
# Problems of one sample's files: training can leave that sample out (``bad_ids``).
SAMPLE_KINDS = frozenset(
    {
        "missing_image",
        "missing_mask",
        "unreadable_image",
        "unreadable_mask",
        "size_mismatch",
        "bad_mask_values",
        "rgb_mask",
        "bad_mask_mode",
    }
)

_PALETTE = voc_palette()
_PALETTE_CODES = (_PALETTE[:, 0].astype(np.uint32) << 16) | (_PALETTE[:, 1].astype(np.uint32) << 8) | _PALETTE[:, 2]
_CODE_ORDER = np.argsort(_PALETTE_CODES)
_SORTED_CODES = _PALETTE_CODES[_CODE_ORDER]


@dataclass(frozen=True)
class Problem:
    """One problem of a dataset: its kind (a key of ``KINDS``), where it is, and a sentence naming the file."""

    kind: str
    split: str | None
    id: str | None
    path: Path | None
    message: str


class DatasetCheckError(SegvocError):
    """The dataset has problems that training cannot work around; the message is the full report."""


def _rgb_to_indices(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """VOC palette indices of an ``(H, W, 3)`` colour array, and the mask of pixels whose colour is in the palette."""
    rgb = pixels[..., :3].astype(np.uint32)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    pos = np.searchsorted(_SORTED_CODES, codes).clip(max=len(_SORTED_CODES) - 1)
    return _CODE_ORDER[pos].astype(np.uint8), _SORTED_CODES[pos] == codes


def _unknown_colour(path: Path, pixels: np.ndarray, known: np.ndarray) -> str:
    y, x = np.argwhere(~known)[0]
    colour = tuple(int(v) for v in pixels[y, x, :3])
    return (
        f"{int((~known).sum())} pixels of {path} have colours outside the VOC palette, the first (R, G, B) = "
        f"{colour} at x={x}, y={y}, so they cannot be mapped to class indices (anti-aliased edges or JPEG "
        "compression produce such colours). Re-export it as a palette PNG of class indices."
    )


def convert_rgb_mask(path: str | Path) -> np.ndarray:
    """Class indices ``(H, W)`` uint8 of an RGB or RGBA colour mask, each colour mapped to its VOC palette index.

    Raises ``SegvocError`` naming the file when it cannot be decoded, is not RGB/RGBA, has transparent pixels, or
    holds a colour that is not in the VOC palette (naming the colour and where it is).
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            mode, pixels = image.mode, np.asarray(image)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is reported with the file
        raise SegvocError(f"Cannot read the colour mask {path}: {unreadable_reason(path, exc)}.") from exc
    if mode not in ("RGB", "RGBA"):
        raise SegvocError(f"{path} is a {mode} image, not an RGB colour mask; only RGB and RGBA masks are converted.")
    if mode == "RGBA" and (pixels[..., 3] != 255).any():
        raise SegvocError(
            f"The colour mask {path} has transparent pixels, which have no class; save it without transparency "
            "(or as a palette PNG of class indices)."
        )
    indices, known = _rgb_to_indices(pixels)
    if not known.all():
        raise SegvocError(_unknown_colour(path, pixels, known))
    return indices


def write_index_mask(path: str | Path, indices: np.ndarray) -> None:
    """Write ``indices`` (``(H, W)`` uint8) to ``path`` as a palette PNG in the VOC colours, replacing it atomically."""
    path = Path(path)
    image = Image.fromarray(np.ascontiguousarray(indices, dtype=np.uint8))
    image.putpalette(_PALETTE.flatten().tolist())  # L -> P, the indices unchanged
    atomic_save(path, lambda f: image.save(f, format="PNG"))


def _value_problem(path: Path, values: np.ndarray, allowed: np.ndarray, num_classes: int, ignore: int) -> str | None:
    """The bad-values sentence for a mask of class indices, or None when every value is allowed."""
    counts = np.bincount(values.ravel(), minlength=256)
    bad = np.flatnonzero((counts > 0) & ~allowed)
    if not len(bad):
        return None
    shown = ", ".join(str(v) for v in bad[:12]) + (", ..." if len(bad) > 12 else "")
    pixels = int(counts[bad].sum())
    return (
        f"The mask {path} holds the values {shown} ({pixels} pixel{'s' * (pixels != 1)}), outside the class indices "
        f"0..{num_classes - 1} and the ignore label {ignore}."
    )


def _check_mask(
    path: Path, allowed: np.ndarray, num_classes: int, ignore: int
) -> tuple[tuple[int, int] | None, list[tuple[str, str]]]:
    """``(size or None, [(kind, message), ...])`` for one mask file that exists."""
    try:
        with Image.open(path) as image:
            image.load()
            mode, size = image.mode, image.size
            pixels = np.asarray(image) if mode in ("P", "L", "RGB", "RGBA") else None
    except Exception as exc:  # noqa: BLE001 - every decoding failure is a problem to report, never a crash
        return None, [("unreadable_mask", f"Cannot decode the mask {path}: {unreadable_reason(path, exc)}.")]
    if mode in ("P", "L"):
        bad = _value_problem(path, pixels, allowed, num_classes, ignore)
        return size, [("bad_mask_values", bad)] if bad else []
    if mode not in ("RGB", "RGBA"):
        return size, [
            ("bad_mask_mode", f"The mask {path} is a {mode} image, not an 8-bit palette (P) or grayscale (L) PNG.")
        ]
    indices, known = _rgb_to_indices(pixels)
    colour_image = f"The mask {path} is an {mode} colour image, not a palette PNG of class indices"
    if mode == "RGBA" and (pixels[..., 3] != 255).any():
        return size, [("rgb_mask", f"{colour_image}, and it has transparent pixels, which have no class.")]
    if not known.all():
        return size, [("rgb_mask", f"{colour_image}. {_unknown_colour(path, pixels, known)}")]
    found = [("rgb_mask", f"{colour_image}; all its colours are VOC palette colours, so it converts to indices.")]
    bad = _value_problem(path, indices, allowed, num_classes, ignore)
    if bad:
        found.append(("bad_mask_values", f"{bad} (its colours read through the VOC palette)"))
    return size, found


def _check_sample(
    image_path: Path, mask_path: Path, allowed: np.ndarray, num_classes: int, ignore: int
) -> list[tuple[str, Path, str]]:
    """``[(kind, path, message), ...]`` for one image/mask pair; never raises for anything in the files."""
    found: list[tuple[str, Path, str]] = []
    image_size = mask_size = None
    if not image_path.is_file():
        found.append(("missing_image", image_path, f"The image {image_path} does not exist."))
    else:
        try:  # decoded in full by training's own reader, so its size is the one training sees
            height, width = read_image(image_path).shape[:2]
            image_size = (width, height)
        except SegvocError as exc:  # names the file and says why; a problem to report, never a crash
            found.append(("unreadable_image", image_path, str(exc)))
    if not mask_path.is_file():
        found.append(("missing_mask", mask_path, f"The mask {mask_path} does not exist."))
    else:
        mask_size, mask_found = _check_mask(mask_path, allowed, num_classes, ignore)
        found += [(kind, mask_path, message) for kind, message in mask_found]
    if image_size and mask_size and image_size != mask_size:
        found.append(
            (
                "size_mismatch",
                mask_path,
                f"The image {image_path} is {image_size[0]}x{image_size[1]} (as training reads it, EXIF rotation "
                f"applied) but its mask {mask_path} is {mask_size[0]}x{mask_size[1]}.",
            )
        )
    return found


def _read_split_lines(voc: Path, split: str) -> tuple[list[tuple[int, str]], Problem | None]:
    """``([(line number, id), ...], None)`` from a split file, or ``([], problem)`` when it is missing or unreadable."""
    path = voc / SPLIT_DIR / f"{split}.txt"
    if not path.is_file():
        available = sorted(p.stem for p in (voc / SPLIT_DIR).glob("*.txt"))
        message = f"The split file {path} does not exist (splits there: {', '.join(available) or 'none'})."
        if split == AUG_SPLIT:
            message += f" {aug_hint(voc)}"
        return [], Problem("missing_split", split, None, path, message)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        return [], Problem("unreadable_split", split, None, path, f"Cannot read the split file {path}: {exc}.")
    return split_ids(text), None


def check_dataset(
    voc: str | Path,
    splits: Sequence[str],
    num_classes: int = 21,
    ignore_index: int = IGNORE_INDEX,
    workers: int | None = None,
    mask_dir: str = MASK_DIR,
) -> list[Problem]:
    """Every problem of the VOC folder ``voc`` for the given splits, in split and id order; ``[]`` when it is clean.

    Decodes every listed image and mask in full on ``workers`` threads (None: Python's default). An id listed in
    several splits is checked once and reported under each. Masks are read from ``voc/<mask_dir>``; when that folder
    does not exist, one ``missing_mask_dir`` problem stands for the samples, which are not checked. Raises
    ``SegvocError`` only when ``voc`` is not a folder; a problem in the files is always returned, never raised.
    """
    voc = Path(voc)
    if not voc.is_dir():
        raise SegvocError(
            f"There is no dataset folder at {voc}. Point data.root at the folder that holds VOCdevkit/VOC2012, or "
            "let training download it first (data.download=true)."
        )
    start = time.perf_counter()
    allowed = np.zeros(256, dtype=bool)
    allowed[: min(num_classes, 256)] = True
    if 0 <= ignore_index < 256:
        allowed[ignore_index] = True

    problems: list[Problem] = []
    listed: dict[str, list[str]] = {}
    for split in dict.fromkeys(splits):
        lines, problem = _read_split_lines(voc, split)
        if problem is not None:
            problems.append(problem)
            continue
        path = voc / SPLIT_DIR / f"{split}.txt"
        if not lines:
            problems.append(Problem("empty_split", split, None, path, f"The split file {path} lists no image ids."))
            continue
        seen: dict[str, list[int]] = {}
        for number, name in lines:
            seen.setdefault(name, []).append(number)
        for name, numbers in seen.items():
            if len(numbers) > 1:
                where = ", ".join(str(n) for n in numbers)
                message = f"{path} lists {name} {len(numbers)} times (lines {where})."
                problems.append(Problem("duplicate_id", split, name, path, message))
        listed[split] = list(seen)

    names = list(dict.fromkeys(name for ids in listed.values() for name in ids))
    if names and not (voc / mask_dir).is_dir():  # one problem, not one missing mask per id
        message = f"The mask folder {voc / mask_dir} does not exist."
        if mask_dir == AUG_MASK_DIR:
            message += f" {aug_hint(voc)}"
        problems.append(Problem("missing_mask_dir", None, None, voc / mask_dir, message))
        return problems

    def check(name: str) -> list[tuple[str, Path, str]]:
        return _check_sample(
            voc / IMAGE_DIR / f"{name}.jpg", voc / mask_dir / f"{name}.png", allowed, num_classes, ignore_index
        )

    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = dict(zip(names, pool.map(check, names), strict=True))
    for split, ids in listed.items():
        problems += [Problem(kind, split, name, path, message) for name in ids for kind, path, message in found[name]]
    log.info("Checked %d samples of %s in %.1f s", len(names), voc, time.perf_counter() - start)
    return problems


def format_report(problems: Sequence[Problem], limit_per_kind: int | None = 20) -> str:
    """The problems grouped by kind (each with a count, what to do, and up to ``limit_per_kind`` file messages;
    None lists all), then a total line. ``"No problems found."`` when there are none."""
    if not problems:
        return "No problems found."
    by_kind: dict[str, list[Problem]] = {}
    for problem in sorted(problems, key=lambda p: list(KINDS).index(p.kind) if p.kind in KINDS else len(KINDS)):
        by_kind.setdefault(problem.kind, []).append(problem)
    lines = []
    for kind, items in by_kind.items():
        lines.append(f"{kind} ({len(items)}): {KINDS.get(kind, '')}".rstrip())
        shown = items if limit_per_kind is None else items[:limit_per_kind]
        for problem in shown:
            where = "/".join(part for part in (problem.split, problem.id) if part)
            lines.append(f"  - {where + ': ' if where else ''}{problem.message}")
        if len(items) > len(shown):
            lines.append(f"  ... and {len(items) - len(shown)} more {kind} problems")
    samples = {(p.split, p.id) for p in problems if p.kind in SAMPLE_KINDS}
    counts = ", ".join(f"{n} {kind}" for kind, n in Counter(p.kind for p in problems).items())
    lines.append(f"Total: {len(problems)} problems ({counts}); {len(samples)} samples have unusable files.")
    return "\n".join(lines)


def bad_ids(problems: Iterable[Problem]) -> dict[str, set[str]]:
    """The ids whose image or mask is unusable (kinds in ``SAMPLE_KINDS``), per split; splits without any are absent.

    Split-level problems (a missing or empty split) and duplicate ids are not a sample's fault and are not included.
    """
    ids: dict[str, set[str]] = {}
    for problem in problems:
        if problem.kind in SAMPLE_KINDS and problem.split is not None and problem.id is not None:
            ids.setdefault(problem.split, set()).add(problem.id)
    return ids


def require_usable_dataset(
    voc: str | Path,
    splits: Sequence[str],
    num_classes: int = 21,
    ignore_index: int = IGNORE_INDEX,
    skip_bad: bool = False,
    workers: int | None = None,
    skip_option: str = "data.skip_bad_samples=true",
    mask_dir: str = MASK_DIR,
) -> dict[str, set[str]]:
    """Check the dataset before training and return the ids to leave out per split (``{}`` when it is clean).

    Raises ``DatasetCheckError`` with the full report when there is any problem, unless ``skip_bad`` is true and
    every problem is a sample's (``SAMPLE_KINDS``) or a duplicate id, and each split keeps at least one sample; then
    logs a warning with the report and the number of samples skipped. ``skip_option`` is the setting the error
    message tells the user to pass to skip bad samples; masks are read from the ``mask_dir`` folder of ``voc``.
    """
    problems = check_dataset(voc, splits, num_classes, ignore_index, workers, mask_dir)
    if not problems:
        return {}
    report = format_report(problems)
    skip = bad_ids(problems)
    count = sum(map(len, skip.values()))
    fatal = sorted({p.kind for p in problems if p.kind not in SAMPLE_KINDS | {"duplicate_id"}})
    emptied = [split for split, ids in skip.items() if _listed_count(voc, split) <= len(ids)]
    if fatal:
        hint = f"Problems of the kinds {', '.join(fatal)} cannot be skipped: fix them before training."
    elif emptied:
        hint = f"Leaving the bad samples out would empty the {', '.join(emptied)} split: fix them before training."
    else:
        hint = f"Fix them, or pass {skip_option} to train without the {count} bad samples."
    if not skip_bad or fatal or emptied:
        raise DatasetCheckError(f"The dataset check of {voc} found problems:\n{report}\n{hint}")
    summary = "; ".join(f"{split}: {', '.join(sorted(ids))}" for split, ids in skip.items()) or "none"
    log.warning("Skipping %d bad samples (%s), as %s asks:\n%s", count, summary, skip_option, report)
    return skip


def _listed_count(voc: str | Path, split: str) -> int:
    lines, _ = _read_split_lines(Path(voc), split)
    return len({name for _, name in lines})


def _convert_rgb_masks(problems: Sequence[Problem]) -> int:
    """Rewrite every convertible RGB mask among ``problems`` as a palette PNG; return how many were converted."""
    converted = 0
    for path in dict.fromkeys(p.path for p in problems if p.kind == "rgb_mask" and p.path is not None):
        try:
            write_index_mask(path, convert_rgb_mask(path))
        except SegvocError as exc:
            log.warning("Not converted: %s", exc)
            continue
        converted += 1
    return converted


@hydra.main(version_base="1.3", config_path="../../conf", config_name="check")
def main(cfg: DictConfig) -> None:
    """Print the report of ``data.root``; exit 0 when the dataset is clean and 1 when it has problems."""
    data = cfg.data
    splits = [data.train_split, data.val_split]
    mask_dir = data.get("mask_dir", MASK_DIR)
    try:
        validate_data(cfg)  # classes, ignore index, and that a dataset of one's own (data=custom) is there
        voc = Path(data.root) / data.get("subdir", VOC_MEMBER)
        problems = check_dataset(voc, splits, data.num_classes, data.ignore_index, cfg.workers, mask_dir=mask_dir)
        if cfg.convert_rgb_masks and any(p.kind == "rgb_mask" for p in problems):
            log.info("Converted %d RGB masks to palette PNGs of class indices", _convert_rgb_masks(problems))
            problems = check_dataset(voc, splits, data.num_classes, data.ignore_index, cfg.workers, mask_dir=mask_dir)
    except Exception as exc:
        exit_on_user_error(exc)
    print(f"Dataset check of {voc} (splits: {', '.join(dict.fromkeys(splits))}, {data.num_classes} classes):")
    print(format_report(problems, cfg.limit_per_kind))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    register_resolvers()  # ${len:...} of data=custom
    main()
