"""Fuzzing: the dataset check and predict.py fed hundreds of corrupted images and masks (seeded, so reproducible).

Each test prints how many inputs it tried and what happened to them (run pytest with ``-s`` to see the tables).
Corruptions that are certain to break a file (truncation well before its end, random bytes, an empty file, a garbled
signature, a header declaring billions of pixels, a wrong size or mode) must be caught; random byte flips inside the
compressed data may or may not be visible to any decoder, so for them only "no crash, no hang" is asserted.
"""

from __future__ import annotations

import contextlib
import io
import signal
import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from segvoc.data.check import bad_ids, check_dataset, format_report
from segvoc.data.demo import make_demo_voc
from segvoc.palette import colorize
from segvoc.tasks.predict import run
from tests.conftest import compose_config

SEED = 5
TIME_LIMIT_S = 90  # a hang fails the test instead of stalling the suite

Rng = np.random.Generator


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Raise ``TimeoutError`` in the main thread when the block runs longer than ``seconds``."""

    def alarm(signum: int, frame: object) -> None:
        raise TimeoutError(f"did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


# Byte-level corruptions of an encoded file: each returns the new content.
def truncated(data: bytes, rng: Rng) -> bytes:
    return data[: int(rng.integers(0, int(len(data) * 0.9)))]  # cuts into the pixel data, not only the trailer


def random_bytes(data: bytes, rng: Rng) -> bytes:
    return rng.bytes(int(rng.integers(1, 4096)))


def empty(data: bytes, rng: Rng) -> bytes:
    return b""


def garbled_header(data: bytes, rng: Rng) -> bytes:
    return rng.bytes(8) + data[8:]


def bitflips(data: bytes, rng: Rng) -> bytes:
    out = bytearray(data)
    for at in rng.integers(len(data) // 5, len(data) * 4 // 5, size=int(rng.integers(1, 8))):
        out[at] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def huge_dims(data: bytes, rng: Rng) -> bytes:
    """The same file with a header that declares billions of pixels (its CRC fixed for PNG)."""
    if data.startswith(b"\x89PNG"):
        ihdr = data[12:16] + struct.pack(">II", 100_000, 100_000) + data[24:29]
        return data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]
    at = 2  # JPEG: walk the marker segments to the start of frame, patch its height and width
    while data[at + 1] not in (0xC0, 0xC1, 0xC2):
        at += 2 + struct.unpack(">H", data[at + 2 : at + 4])[0]
    return data[: at + 5] + b"\xff\xff\xff\xff" + data[at + 9 :]


BYTE_CORRUPTIONS: dict[str, Callable[[bytes, Rng], bytes]] = {
    "truncated": truncated,
    "random_bytes": random_bytes,
    "empty": empty,
    "garbled_header": garbled_header,
    "huge_dims": huge_dims,
}


def _read_mask(path: Path) -> np.ndarray:
    with Image.open(path) as mask:
        return np.array(mask)


def corrupt_sample(voc: Path, name: str, corruption: str, rng: Rng) -> None:
    """Apply ``corruption`` (a key of CHECK_CASES) to the image or mask of sample ``name``."""
    target, _, what = corruption.partition("_")
    path = (
        voc
        / ("JPEGImages" if target == "image" else "SegmentationClass")
        / f"{name}.{'jpg' if target == 'image' else 'png'}"
    )
    if what in BYTE_CORRUPTIONS or what == "bitflips":
        path.write_bytes((BYTE_CORRUPTIONS.get(what) or bitflips)(path.read_bytes(), rng))
    elif what == "missing":
        path.unlink()
    elif corruption == "image_wrong_size":
        image = cv2.imread(str(path))
        cv2.imwrite(str(path), cv2.resize(image, (image.shape[1] + int(rng.integers(1, 30)), image.shape[0])))
    elif corruption == "image_png_content":
        Image.open(path).convert("RGB").save(path, format="PNG")
    elif corruption == "image_gray_jpeg":
        Image.open(path).convert("L").save(path, format="JPEG")
    else:
        mask = _read_mask(path)
        if corruption == "mask_wrong_size":
            mask = mask[: -int(rng.integers(1, 20))]
        elif corruption == "mask_bad_values":
            top, left = int(rng.integers(0, mask.shape[0] - 8)), int(rng.integers(0, mask.shape[1] - 8))
            mask[top : top + 8, left : left + 8] = rng.integers(21, 255, size=(8, 8))
        modes = {"mask_rgb": "RGB", "mask_rgba": "RGBA", "mask_i16": "I;16", "mask_1bit": "1", "mask_la": "LA"}
        image = Image.fromarray(colorize(mask) if corruption in ("mask_rgb", "mask_rgba") else mask)
        image.convert(modes.get(corruption, "L")).save(path, format="PNG")


# corruption -> (how many samples get it, the problem kind it must raise, or None: must pass, or "any": not asserted)
CHECK_CASES: dict[str, tuple[int, str | None]] = {
    **{f"image_{what}": (6, "unreadable_image") for what in BYTE_CORRUPTIONS},
    **{f"mask_{what}": (6, "unreadable_mask") for what in BYTE_CORRUPTIONS},
    "image_missing": (3, "missing_image"),
    "mask_missing": (3, "missing_mask"),
    "image_wrong_size": (4, "size_mismatch"),
    "mask_wrong_size": (4, "size_mismatch"),
    "mask_bad_values": (5, "bad_mask_values"),
    "mask_rgb": (4, "rgb_mask"),
    "mask_rgba": (3, "rgb_mask"),
    "mask_i16": (3, "bad_mask_mode"),
    "mask_1bit": (3, "bad_mask_mode"),
    "mask_la": (3, "bad_mask_mode"),
    "image_bitflips": (8, "any"),
    "mask_bitflips": (8, "any"),
    "image_png_content": (3, None),
    "image_gray_jpeg": (3, None),
    "mask_l_mode": (3, None),
    "clean": (3, None),
}


def outcome_table(title: str, outcomes: dict[str, Counter]) -> str:
    lines = [title] + [f"  {case:<22} {sum(c.values()):>3} tried: {dict(c)}" for case, c in outcomes.items()]
    return "\n".join(lines)


def test_check_flags_every_corrupted_sample(tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    rng = np.random.default_rng(SEED)
    cases = [case for case, (count, _) in CHECK_CASES.items() for _ in range(count)]
    ghosts = [f"ghost_{i}" for i in range(4)]
    n_val = 20
    voc = make_demo_voc(tmp_path / "data", n_train=len(cases) - n_val, n_val=n_val, seed=SEED)
    names = [
        line for split in ("train", "val") for line in (voc / f"ImageSets/Segmentation/{split}.txt").read_text().split()
    ]
    assigned = dict(zip(names, rng.permutation(cases), strict=True))
    for name, case in assigned.items():
        if case != "clean":
            corrupt_sample(voc, name, case, rng)
    train_split = voc / "ImageSets/Segmentation/train.txt"
    train_split.write_text(train_split.read_text() + "\n".join(ghosts) + "\n")

    start = time.perf_counter()
    with deadline(TIME_LIMIT_S):
        problems = check_dataset(voc, ["train", "val"], workers=4)
    elapsed = time.perf_counter() - start
    report = format_report(problems, limit_per_kind=None)

    flagged = set().union(*bad_ids(problems).values())
    kinds: dict[str, set[str]] = {}
    for problem in problems:
        kinds.setdefault(problem.id, set()).add(problem.kind)
    outcomes: dict[str, Counter] = {case: Counter() for case in [*CHECK_CASES, "ghost_id"]}
    for name, case in [*assigned.items(), *((ghost, "ghost_id") for ghost in ghosts)]:
        outcomes[case]["+".join(sorted(kinds.get(name, ()))) or "passed"] += 1
        expected = "missing_image" if case == "ghost_id" else CHECK_CASES[case][1]
        if expected is None:
            assert name not in flagged, f"{case} {name} wrongly flagged:\n{report}"
        elif expected != "any":
            assert expected in kinds.get(name, ()), f"{case} {name} not flagged as {expected}:\n{report}"
    assert flagged <= set(names) | set(ghosts)
    table = outcome_table(f"dataset check: {len(assigned) + len(ghosts)} samples in {elapsed:.2f} s", outcomes)
    print(table)
    record_property("check_outcomes", table)


def make_predict_inputs(folder: Path, rng: Rng) -> dict[Path, tuple[int, int] | None]:
    """Write about 100 images into ``folder``; return their displayed ``(width, height)``, None for the unreadable.

    Byte-flipped JPEGs (24 x 24 pixels, no EXIF) are written too but left out of the answer: whether they decode is up
    to the decoder.
    """
    folder.mkdir()
    expected: dict[Path, tuple[int, int] | None] = {}

    def add(kind: str, suffix: str, content: bytes) -> Path:
        path = folder / f"{len(list(folder.iterdir())):03d}_{kind}{suffix}"
        path.write_bytes(content)
        return path

    def rgb(height: int, width: int) -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))

    readable: dict[str, tuple[str, Callable[[Image.Image], bytes]]] = {
        "rgb_jpeg": (".jpg", lambda im: encode(im, "JPEG", quality=90)),
        "gray_jpeg": (".jpg", lambda im: encode(im.convert("L"), "JPEG")),
        "cmyk_jpeg": (".jpg", lambda im: encode(im.convert("CMYK"), "JPEG")),
        "rgb_png": (".png", lambda im: encode(im, "PNG")),
        "rgba_png": (".png", lambda im: encode(im.convert("RGBA"), "PNG")),
        "la_png": (".png", lambda im: encode(im.convert("LA"), "PNG")),
        "p_png": (".png", lambda im: encode(im.convert("P"), "PNG")),
        "p_transparent_png": (".png", lambda im: encode(im.convert("P"), "PNG", transparency=0)),
        "1bit_png": (".png", lambda im: encode(im.convert("1"), "PNG")),
        "i16_png": (".png", lambda im: encode(im.convert("L").convert("I;16"), "PNG")),
        "float_tiff": (".tif", lambda im: encode(im.convert("F"), "TIFF")),
        "rgb_tiff": (".tiff", lambda im: encode(im, "TIFF")),
        "bmp": (".bmp", lambda im: encode(im, "BMP")),
        "gif": (".gif", lambda im: encode(im, "GIF")),
        "webp": (".webp", lambda im: encode(im, "WEBP")),
    }
    for _ in range(4):
        for kind, (suffix, write) in readable.items():
            height, width = (int(v) for v in rng.integers(1, 25, size=2))
            expected[add(kind, suffix, write(rgb(height, width)))] = (width, height)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees
    for _ in range(3):
        height, width = (int(v) for v in rng.integers(8, 25, size=2))
        expected[add("exif_rotated", ".jpg", encode(rgb(height, width), "JPEG", exif=exif))] = (height, width)

    for _ in range(6):
        for what, corrupt in BYTE_CORRUPTIONS.items():
            suffix = str(rng.choice([".jpg", ".png"]))
            clean = encode(rgb(40, 40), "JPEG" if suffix == ".jpg" else "PNG")
            expected[add(what, suffix, corrupt(clean, rng))] = None
    expected[add("text_file", ".png", b"this is a text file, not an image\n")] = None
    for _ in range(6):
        add("bitflips", ".jpg", bitflips(encode(rgb(24, 24), "JPEG"), rng))
    return expected


@pytest.fixture(scope="module")
def checkpoint(random_checkpoint: Path) -> Path:
    return random_checkpoint


def test_predict_skips_every_unreadable_image_and_masks_the_rest(
    checkpoint: Path, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    rng = np.random.default_rng(SEED + 1)
    expected = make_predict_inputs(tmp_path / "in", rng)
    inputs = sorted((tmp_path / "in").iterdir())
    flipped = [path for path in inputs if path not in expected]  # a mask, if any, is 24 x 24: how they were made

    cfg = compose_config(
        [
            "num_workers=0",
            "batch_size=8",
            f"ckpt={checkpoint}",
            f"input={tmp_path / 'in'}",
            f"output={tmp_path / 'out'}",
        ],
        config_name="predict",
    )
    start = time.perf_counter()
    with deadline(TIME_LIMIT_S):
        failed = run(cfg)
    elapsed = time.perf_counter() - start

    outcomes: dict[str, Counter] = {}
    for path in inputs:
        mask_file = tmp_path / "out" / f"{path.stem}.png"
        outcome = "skipped as unreadable"
        size = (24, 24) if path in flipped else expected[path]
        if mask_file.is_file():
            with Image.open(mask_file) as mask:
                outcome = "mask written"
                assert mask.mode == "L" and mask.size == size, f"{path.name}: {mask.mode} {mask.size}"
        assert outcome != "skipped as unreadable" or path in flipped or size is None, f"{path.name} is readable"
        outcomes.setdefault(path.stem.split("_", 1)[1], Counter())[outcome] += 1
    unreadable = sum(size is None for size in expected.values())
    assert failed == unreadable + sum(not (tmp_path / "out" / f"{path.stem}.png").is_file() for path in flipped)
    table = outcome_table(f"predict: {len(inputs)} files in {elapsed:.2f} s, run() returned {failed}", outcomes)
    print(table)
    record_property("predict_outcomes", table)
