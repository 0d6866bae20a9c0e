"""Add SBD's masks to VOC2012 as the "trainaug" set (10,582 images): ``python -m segvoc.data.prepare sbd``.

The Semantic Boundaries Dataset (Hariharan et al., ICCV 2011) annotates 11,355 VOC images with class masks stored as
MATLAB files. ``prepare_sbd`` takes its ``benchmark.tgz`` (downloaded and md5-checked, or given by path) or the
``benchmark_RELEASE`` folder extracted from it, and writes into an existing ``<root>/VOCdevkit/VOC2012``:

- ``SegmentationClassAug/<id>.png``: every mask as a VOC palette PNG of class indices; where VOC2012's own
  ``SegmentationClass`` has the mask (its train and val ids) that one is copied instead, so the folder serves val too;
- ``JPEGImages/<id>.jpg`` for SBD images VOC2012 lacks (none with the official files);
- ``ImageSets/Segmentation/train_aug.txt``, last: (SBD train | SBD val | VOC train) - VOC val, sorted.

``data=voc_aug`` (``conf/data/voc_aug.yaml``) trains on it and validates on VOC val.
"""

from __future__ import annotations

import argparse
import filecmp
import logging
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import scipy.io
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)

from segvoc.cli import command, command_parser, run_command
from segvoc.data.check import write_index_mask
from segvoc.data.download import (
    DatasetUnavailableError,
    check_member,
    download_file,
    is_voc_complete,
    md5sum,
    voc_dir,
)
from segvoc.data.voc import AUG_MASK_DIR, AUG_SPLIT, IMAGE_DIR, MASK_DIR, SPLIT_DIR, read_split, split_ids
from segvoc.files import atomic_open, atomic_write_text

log = logging.getLogger(__name__)

SBD_URL = "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz"
SBD_MD5 = "82b4d87ceb2ed10f6038a1cba92111cb"
SBD_TAR_NAME = "benchmark.tgz"
# The official lists: SBD train 8,498 and val 2,857 ids; with VOC2012's train (1,464) and val (1,449) lists the
# trainaug split has 10,582 ids.
SBD_SPLIT_SIZES = {"train": 8_498, "val": 2_857}
TRAIN_AUG_SIZE = 10_582

# The members used, wherever the archive roots them (benchmark_RELEASE/dataset/... in the official one). Ids are
# plain words, so a file name built from one cannot leave its folder.
_MEMBER = re.compile(r"(?:^|/)dataset/(?:(?P<kind>cls|img)/(?P<id>[\w-]+)\.(?:mat|jpg)|(?P<split>train|val)\.txt)$")
_SUFFIX = {"cls": ".mat", "img": ".jpg"}
_WAYS_OUT = (
    f"download {SBD_TAR_NAME} by hand (from any machine or mirror) and pass --tar /path/to/{SBD_TAR_NAME}, or "
    "pass --tar the benchmark_RELEASE folder extracted from it"
)


def read_sbd_mask(path: str | Path) -> np.ndarray:
    """The class indices of an SBD ``dataset/cls/<id>.mat`` file (``GTcls.Segmentation``) as ``(H, W)`` uint8.

    Raises ``DatasetUnavailableError`` naming the file when it is not a readable MATLAB file, has no ``GTcls`` struct
    with a ``Segmentation`` field, or that field is not a 2-D array of values 0..255.
    """
    path = Path(path)
    try:
        # struct_as_record=False: MATLAB structs become objects with attributes; no squeeze_me, so a 1x1 struct is a
        # (1, 1) array and a mask one pixel wide keeps its two dimensions.
        mat = scipy.io.loadmat(path, struct_as_record=False, squeeze_me=False)
    except Exception as exc:  # noqa: BLE001 - scipy raises many types for a bad file; each is this file's fault
        raise DatasetUnavailableError(
            f"Cannot read the SBD mask {path} as a MATLAB file ({type(exc).__name__}: {exc}); it is truncated or "
            f"corrupt. Get {SBD_TAR_NAME} again and rerun `python -m segvoc.data.prepare sbd`."
        ) from exc
    if "GTcls" not in mat:
        fields = ", ".join(k for k in mat if not k.startswith("__")) or "none"
        raise DatasetUnavailableError(
            f"The SBD mask {path} has no GTcls field (its variables: {fields}), so it is not one of SBD's "
            f"dataset/cls files (dataset/inst holds GTinst instead). Pass the official {SBD_TAR_NAME} or the "
            "benchmark_RELEASE folder extracted from it."
        )
    gt = mat["GTcls"]
    record = gt.flat[0] if isinstance(gt, np.ndarray) and gt.size == 1 else gt
    segmentation = getattr(record, "Segmentation", None)
    mask = np.asarray(segmentation if segmentation is not None else [])
    # integral values 0..255 survive the cast to uint8 unchanged; anything else (negative, 256, 1.5, NaN) does not
    if segmentation is None or mask.ndim != 2 or mask.dtype.kind not in "uif" or (mask != mask.astype(np.uint8)).any():
        what = "no Segmentation field" if segmentation is None else f"a Segmentation of {mask.shape} {mask.dtype}"
        raise DatasetUnavailableError(
            f"The GTcls struct of the SBD mask {path} has {what}; SBD's masks are 2-D arrays of class indices "
            f"0..255. Get {SBD_TAR_NAME} again, or remove this file if you added it yourself."
        )
    return mask.astype(np.uint8)


def _disk_error(folder: Path, exc: OSError) -> DatasetUnavailableError:
    return DatasetUnavailableError(
        f"Could not write into {folder} ({exc.strerror or exc}). Make it writable or free some space there (SBD "
        f"needs about 2 GB while it is prepared: the 1.4 GB {SBD_TAR_NAME}, deleted at the end when it was "
        "downloaded, and a few hundred MB of extracted masks and PNGs), or use another --root."
    )


def _copy_file(src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest`` through a hidden temporary name, so ``dest`` is always complete or absent."""
    try:
        with open(src, "rb") as source, atomic_open(dest) as target:
            shutil.copyfileobj(source, target)
    except OSError as exc:
        raise _disk_error(dest.parent, exc) from exc


def _convert_mask(mat: Path, png: Path) -> None:
    try:
        write_index_mask(png, read_sbd_mask(mat))
    except OSError as exc:
        raise _disk_error(png.parent, exc) from exc


def _remove_stale_temporaries(folder: Path, suffix: str) -> None:
    """Delete the hidden ``.<name><suffix>[.<random>].tmp`` files (``segvoc.files.temp_name``) that an interrupted
    run left in ``folder``."""
    for stale in folder.glob(f".*{suffix}*.tmp"):
        stale.unlink(missing_ok=True)


def _voc_lists(voc: Path) -> tuple[list[str], set[str], set[str]]:
    """VOC2012's train ids, val ids, and the ids of both that have a ``SegmentationClass`` mask."""
    train, val = read_split(voc, "train"), set(read_split(voc, "val"))
    return train, val, {n for n in {*train, *val} if (voc / MASK_DIR / f"{n}.png").is_file()}


def _finished_ids(voc: Path) -> list[str] | None:
    """The ids of ``train_aug.txt`` when it exists and every one (and every VOC val id) has its files; else None."""
    if not (voc / SPLIT_DIR / f"{AUG_SPLIT}.txt").is_file():
        return None
    ids = read_split(voc, AUG_SPLIT)
    masks = [*ids, *read_split(voc, "val")]
    if all((voc / AUG_MASK_DIR / f"{n}.png").is_file() for n in masks) and all(
        (voc / IMAGE_DIR / f"{n}.jpg").is_file() for n in ids
    ):
        return ids
    log.info("%s lists ids whose files are missing; preparing the SBD masks again", voc / SPLIT_DIR / "train_aug.txt")
    return None


def _progress(*columns: ProgressColumn) -> Progress:
    # Without a terminal (CI, pytest, redirected logs) rich skips live updates and prints the final bar.
    return Progress(TextColumn("{task.description}"), BarColumn(), *columns, TimeRemainingColumn())


def _extract(archive: Path, dest: Path, wanted: Callable[[str, str], bool]) -> None:
    """Extract the split lists and the ``cls``/``img`` files that ``wanted(kind, id)`` accepts from ``archive``
    into ``dest/{train.txt, val.txt, cls/, img/}``, reading it once as a stream.

    Every member is checked first (``check_member``): an archive with a member that could land outside the
    extraction folder is refused, whether or not that member is wanted.
    """
    for kind in _SUFFIX:
        (dest / kind).mkdir(parents=True, exist_ok=True)
    log.info("Reading %s (about a minute for the official 1.4 GB archive)", archive)
    try:
        with (
            open(archive, "rb") as fh,
            tarfile.open(fileobj=fh, mode="r|*") as tar,
            _progress(DownloadColumn()) as progress,
        ):
            task = progress.add_task(archive.name, total=archive.stat().st_size)
            for member in tar:
                check_member(member, archive, f"SBD {SBD_TAR_NAME}", SBD_TAR_NAME)
                progress.update(task, completed=fh.tell())
                match = _MEMBER.search(member.name)
                if match is None or not member.isfile():
                    continue
                if match["split"]:
                    target = dest / f"{match['split']}.txt"
                elif wanted(match["kind"], match["id"]):
                    target = dest / match["kind"] / f"{match['id']}{_SUFFIX[match['kind']]}"
                else:
                    continue
                source = tar.extractfile(member)
                assert source is not None  # a regular file always has content to read
                with source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out)
            progress.update(task, completed=progress.tasks[0].total)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise DatasetUnavailableError(
            f"Could not read {archive} as a tar archive ({exc}); it is probably truncated or corrupt. Delete it and "
            f"download {SBD_TAR_NAME} again (run without --tar to let this command do it)."
        ) from exc
    except OSError as exc:
        raise _disk_error(dest, exc) from exc


def _read_sbd_list(dataset: Path, split: str, origin: Path) -> list[str]:
    path = dataset / f"{split}.txt"
    if not path.is_file() or not (dataset / "cls").is_dir():
        raise DatasetUnavailableError(
            f"{origin} does not hold SBD's dataset/{split}.txt and dataset/cls folder, so it is not SBD's "
            f"{SBD_TAR_NAME} or the benchmark_RELEASE folder extracted from it (the VOC2012 tar is a different "
            "file). Pass one of those with --tar, or drop --tar to download the archive."
        )
    return [name for _, name in split_ids(path.read_text())]


def _first(names: Iterable[str], limit: int = 10) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _build(voc: Path, dataset: Path, origin: Path, workers: int | None) -> list[str]:
    """Fill ``voc`` from the SBD ``dataset`` folder (``train.txt``, ``val.txt``, ``cls/``, ``img/``); return the ids.

    Files already in place are kept (a VOC mask copy is refreshed when it differs); ``train_aug.txt`` is written
    last, so it exists only when everything it lists does.
    """
    sbd = {split: _read_sbd_list(dataset, split, origin) for split in SBD_SPLIT_SIZES}
    voc_train, voc_val, voc_masks = _voc_lists(voc)
    ids = sorted(({*sbd["train"], *sbd["val"], *voc_train}) - voc_val)
    aug = voc / AUG_MASK_DIR
    try:
        aug.mkdir(exist_ok=True)
        _remove_stale_temporaries(aug, ".png")
        _remove_stale_temporaries(voc / IMAGE_DIR, ".jpg")
    except OSError as exc:
        raise _disk_error(aug, exc) from exc

    sbd_masks = [n for n in ids if n not in voc_masks and not (aug / f"{n}.png").is_file()]
    images = [n for n in ids if not (voc / IMAGE_DIR / f"{n}.jpg").is_file()]
    lacking = [
        f"{len(names)} have no {what}, neither in {voc / folder} nor as dataset/{sbd_path} in {origin} "
        f"({_first(names)})"
        for names, what, folder, sbd_path in (
            ([n for n in sbd_masks if not (dataset / "cls" / f"{n}.mat").is_file()], "mask", MASK_DIR, "cls/<id>.mat"),
            ([n for n in images if not (dataset / "img" / f"{n}.jpg").is_file()], "image", IMAGE_DIR, "img/<id>.jpg"),
        )
        if names
    ]
    if lacking:
        raise DatasetUnavailableError(
            f"Of the {len(ids)} ids of the {AUG_SPLIT} split, {' and '.join(lacking)}. Check that {origin} is the "
            f"complete, official {SBD_TAR_NAME} (or the folder extracted from it) and {voc} VOC2012 trainval."
        )

    refreshed = 0
    for name in sorted(voc_masks):  # VOC's own masks win over SBD's, and serve the val split from the same folder
        src, dest = voc / MASK_DIR / f"{name}.png", aug / f"{name}.png"
        if not dest.is_file() or not filecmp.cmp(src, dest, shallow=False):
            _copy_file(src, dest)
            refreshed += 1
    log.info(
        "Copied %d of VOC2012's %d train/val masks into %s (the others were there)", refreshed, len(voc_masks), aug
    )

    if sbd_masks:
        with ThreadPoolExecutor(max_workers=workers) as pool, _progress(MofNCompleteColumn()) as progress:
            task = progress.add_task("SBD masks to PNG", total=len(sbd_masks))
            futures = [pool.submit(_convert_mask, dataset / "cls" / f"{n}.mat", aug / f"{n}.png") for n in sbd_masks]
            try:
                for future in as_completed(futures):
                    future.result()
                    progress.advance(task)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    earlier = len(ids) - len(sbd_masks) - len(voc_masks.intersection(ids))
    log.info("Converted %d SBD masks (%d were there from an earlier run)", len(sbd_masks), earlier)
    for name in images:
        _copy_file(dataset / "img" / f"{name}.jpg", voc / IMAGE_DIR / f"{name}.jpg")
    if images:
        log.info("Copied %d SBD images that VOC2012 lacks into %s", len(images), voc / IMAGE_DIR)

    split_file = voc / SPLIT_DIR / f"{AUG_SPLIT}.txt"
    try:
        atomic_write_text(split_file, "".join(f"{name}\n" for name in ids))
    except OSError as exc:
        raise _disk_error(split_file.parent, exc) from exc
    counts = {split: len(set(names)) for split, names in sbd.items()}
    log.info(
        "Wrote %s: %d ids = (SBD train %d | SBD val %d | VOC train %d) - VOC val %d",
        split_file, len(ids), counts["train"], counts["val"], len(set(voc_train)), len(voc_val),
    )  # fmt: skip
    if counts == SBD_SPLIT_SIZES and len(ids) != TRAIN_AUG_SIZE:
        log.warning(
            "The %s split has %d ids, but SBD's official lists with VOC2012's official train/val lists give %d; "
            "check that %s holds the unmodified VOC2012 trainval split files.",
            AUG_SPLIT, len(ids), TRAIN_AUG_SIZE, voc / SPLIT_DIR,
        )  # fmt: skip
    return ids


def _download(root: Path, url: str, md5: str | None) -> Path:
    archive = root / SBD_TAR_NAME
    if archive.is_file() and (md5 is None or md5sum(archive) == md5.lower()):
        log.info("Reusing the finished download %s", archive)
        return archive
    return download_file(url, archive, md5, ways_out=_WAYS_OUT)


def _check_given_archive(archive: Path, md5: str | None) -> None:
    if not archive.is_file():
        raise DatasetUnavailableError(
            f"--tar points at {archive}, which does not exist. Pass the path of the downloaded {SBD_TAR_NAME} or of "
            "the benchmark_RELEASE folder extracted from it, or drop --tar to download the archive."
        )
    if md5 is not None and (got := md5sum(archive)) != md5.lower():
        raise DatasetUnavailableError(
            f"The archive {archive} (--tar) does not match the checksum of SBD's {SBD_TAR_NAME} (expected MD5 {md5}, "
            f"got {got}); it is probably an incomplete download or a different file. It was left untouched. Download "
            "it again or drop --tar to let this command download it; pass --md5 none to use this copy anyway."
        )


def prepare_sbd(
    root: str | Path = "data",
    source: str | Path | None = None,
    url: str = SBD_URL,
    md5: str | None = SBD_MD5,
    workers: int | None = None,
) -> list[str]:
    """Add SBD's masks to ``<root>/VOCdevkit/VOC2012`` as the ``train_aug`` split and return its sorted ids.

    ``source`` is SBD's ``benchmark.tgz`` (checked against ``md5`` unless that is None, never modified) or the
    ``benchmark_RELEASE`` folder extracted from it; None downloads the archive from ``url`` to ``<root>`` (resuming,
    md5-checked; a finished download there is reused) and deletes it once everything is written. Only the needed
    members are extracted, into a hidden temporary folder under ``root`` that is always removed. A finished
    ``train_aug`` split is returned without touching anything; an interrupted run continues where it stopped.
    ``workers`` threads convert the masks (None: Python's default). Raises ``DatasetUnavailableError`` (one
    paragraph on what to do) when VOC2012 is missing, on a bad checksum, a corrupt or hostile archive, a mask file
    without ``GTcls``, ids without mask or image, and disk errors.
    """
    root = Path(root).expanduser()
    voc = voc_dir(root)
    if not is_voc_complete(voc):
        raise DatasetUnavailableError(
            f"Pascal VOC2012 was not found under {voc}; the SBD masks are added to an existing VOC2012 folder. "
            "Download it first by running training once with data.download=true (`python train.py "
            f"experiment=voc_aug data.root={root} data.download=true` downloads VOC2012, 2 GB, then stops and asks "
            "for this command), or pass --root the folder that already holds VOCdevkit/VOC2012 (the data.root you "
            "train with)."
        )
    finished = _finished_ids(voc)
    if finished is not None:
        log.info("%s already holds the %s split (%d ids) and its masks; nothing to do", voc, AUG_SPLIT, len(finished))
        return finished

    source = Path(source).expanduser() if source is not None else None
    if source is not None and source.is_dir():
        for dataset in (source, source / "dataset", source / "benchmark_RELEASE" / "dataset"):
            if (dataset / "cls").is_dir():
                return _build(voc, dataset, source, workers)
        return _build(voc, source, source, workers)  # raises: names what is missing

    if source is not None:
        _check_given_archive(source, md5)
        archive = source
    else:
        archive = _download(root, url, md5)
    _, voc_val, voc_masks = _voc_lists(voc)
    voc_images = {entry.name[:-4] for entry in os.scandir(voc / IMAGE_DIR) if entry.name.endswith(".jpg")}

    def wanted(kind: str, name: str) -> bool:
        """Whether ``_build`` will need this SBD file: the same rules, decided before the split lists are read."""
        if name in voc_val:
            return False  # never trained on; its val mask is VOC's
        if kind == "img":
            return name not in voc_images
        return name not in voc_masks and not (voc / AUG_MASK_DIR / f"{name}.png").is_file()

    try:
        tmp = Path(tempfile.mkdtemp(prefix=".sbd-extract-", dir=root))
    except OSError as exc:
        raise _disk_error(root, exc) from exc
    try:
        _extract(archive, tmp, wanted)
        ids = _build(voc, tmp, archive, workers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if source is None:
        archive.unlink()
        log.info("Deleted the downloaded %s (1.4 GB); everything needed from it is in %s", archive, voc)
    return ids


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


@command
def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (1 with a message on stderr for a user error)."""
    parser = command_parser(
        "segvoc.data.prepare",
        "Add extra training data to a VOC2012 folder.",
        ["python -m segvoc.data.prepare sbd --root data", "python -m segvoc.data.prepare sbd --help"],
    )
    datasets = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    sbd = datasets.add_parser(
        "sbd",
        help="SBD's masks as the train_aug split (10,582 images), for data=voc_aug",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Convert the masks of the Semantic Boundaries Dataset (SBD) into VOC palette PNGs and write the\n"
            "train_aug split (10,582 ids) into an existing <root>/VOCdevkit/VOC2012:\n"
            "  SegmentationClassAug/<id>.png           SBD masks; VOC2012's own masks where both exist (val too)\n"
            "  ImageSets/Segmentation/train_aug.txt    (SBD train | SBD val | VOC train) - VOC val\n"
            "Without --tar, downloads benchmark.tgz (1.4 GB, md5-checked, resumable) into <root> and deletes it\n"
            "at the end. A finished run is not repeated; an interrupted one continues.\n\n"
            "examples:\n"
            "  python -m segvoc.data.prepare sbd --root data\n"
            "  python -m segvoc.data.prepare sbd --root data --tar ~/Downloads/benchmark.tgz\n"
            "  python -m segvoc.data.prepare sbd --root data --tar ~/datasets/benchmark_RELEASE\n"
            "then: python train.py experiment=voc_aug data.root=data"
        ),
    )
    sbd.add_argument(
        "--root",
        type=Path,
        default=Path("data"),
        help="the folder holding VOCdevkit/VOC2012, i.e. training's data.root (default: data)",
    )
    sbd.add_argument(
        "--tar",
        type=Path,
        metavar="PATH",
        help=f"an already downloaded {SBD_TAR_NAME}, or the benchmark_RELEASE folder extracted from it; nothing is "
        "downloaded",
    )
    sbd.add_argument("--url", default=SBD_URL, help=f"where to download {SBD_TAR_NAME} from (default: %(default)s)")
    sbd.add_argument(
        "--md5",
        default=SBD_MD5,
        help="the MD5 the archive must have, downloaded or given with --tar; 'none' skips the check "
        "(default: %(default)s, the official archive)",
    )
    sbd.add_argument(
        "--workers",
        type=_positive,
        metavar="N",
        help="threads converting masks (default: Python's default, the CPU cores + 4, at most 32)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    md5 = None if args.md5.lower() == "none" else args.md5
    ids = prepare_sbd(args.root, args.tar, args.url, md5, args.workers)
    print(
        f"{voc_dir(args.root) / SPLIT_DIR / AUG_SPLIT}.txt lists {len(ids)} training images with masks in "
        f"{voc_dir(args.root) / AUG_MASK_DIR}. Train on them with: python train.py experiment=voc_aug "
        f"data.root={args.root}"
    )
    return 0


if __name__ == "__main__":
    run_command(main)
