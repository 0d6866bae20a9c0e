"""The one image decoder: every mode read as ``segvoc.data.image`` defines it, EXIF orientations, clear errors.

Each expectation is computed here from the raw values the file was written with (or, for lossy JPEG, from Pillow's
decode of it, which is the definition), never by calling ``read_image`` again.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from segvoc.data.image import displayed_size, read_image
from segvoc.errors import SegvocError

H, W = 13, 17
RNG = np.random.default_rng(4)
RGB = RNG.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, size=(H, W), dtype=np.uint8)
WORDS = RNG.integers(0, 65536, size=(H, W, 3), dtype=np.uint16)  # 16-bit samples
INDICES = RNG.integers(0, 6, size=(H, W), dtype=np.uint8)
PALETTE = RNG.integers(0, 256, size=(6, 3), dtype=np.uint8)


def gray3(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=2)


def paletted() -> Image.Image:
    image = Image.fromarray(INDICES, mode="L").convert("P")  # the indices unchanged
    image.putpalette(PALETTE.flatten().tolist())
    return image


def pillow(path: Path, mode: str | None = None) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert(mode) if mode else image)


def cmyk_to_rgb(path: Path) -> np.ndarray:
    """Pillow's CMYK conversion on the decoded C, M, Y, K samples: ``(255 - K) - round(C * (255 - K) / 255)``."""
    cmyk = pillow(path).astype(np.int64)
    inverse_k = 255 - cmyk[..., 3:]
    return (inverse_k - (cmyk[..., :3] * inverse_k + 127) // 255).astype(np.uint8)


def write(path: Path, image: Image.Image, **params: object) -> Path:
    image.save(path, **params)
    return path


def write_png16_rgb(path: Path) -> Path:
    """A 48-bit RGB PNG (Pillow cannot write one; OpenCV takes BGR)."""
    path.write_bytes(cv2.imencode(".png", WORDS[..., ::-1])[1].tobytes())
    return path


def jpeg_with_trailer(path: Path) -> Path:
    """A JPEG with bytes after its end marker, as some cameras write: read by Pillow rather than OpenCV."""
    clean = io.BytesIO()
    Image.fromarray(RGB).save(clean, format="JPEG", quality=90)
    path.write_bytes(clean.getvalue() + b"\0" * 64)
    return path


def write_mpo(path: Path) -> Path:
    """A multi-picture JPEG (MPO) of two pictures, as phones write."""
    others = [Image.fromarray(RGB[::-1].copy())]
    Image.fromarray(RGB).save(path, format="MPO", save_all=True, append_images=others, quality=90)
    return path


# name -> (write the file into a folder, its expected pixels from what was written)
CASES: dict[str, tuple[Callable[[Path], Path], Callable[[Path], np.ndarray]]] = {
    "rgb_png": (lambda d: write(d / "a.png", Image.fromarray(RGB)), lambda p: RGB),
    "gray_png": (lambda d: write(d / "a.png", Image.fromarray(RGB[..., 0])), lambda p: gray3(RGB[..., 0])),
    "gray_4bit_png": (
        lambda d: write(d / "a.png", Image.fromarray(RGB[..., 0] // 17 * 17), bits=4),
        lambda p: gray3(RGB[..., 0] // 17 * 17),
    ),
    "rgba_png": (lambda d: write(d / "a.png", Image.fromarray(np.dstack([RGB, ALPHA]))), lambda p: RGB),
    "gray_alpha_png": (
        lambda d: write(d / "a.png", Image.fromarray(np.dstack([RGB[..., 0], ALPHA])).convert("LA")),
        lambda p: gray3(RGB[..., 0]),
    ),
    "palette_png": (lambda d: write(d / "a.png", paletted()), lambda p: PALETTE[INDICES]),
    "palette_transparent_png": (
        lambda d: write(d / "a.png", paletted(), transparency=2),
        lambda p: PALETTE[INDICES],  # the transparent entry keeps its colour: alpha is dropped, not composited
    ),
    "bilevel_png": (
        lambda d: write(d / "a.png", Image.fromarray(RGB[..., 0] > 127)),
        lambda p: gray3(np.where(RGB[..., 0] > 127, 255, 0).astype(np.uint8)),
    ),
    "gray16_png": (
        lambda d: write(d / "a.png", Image.fromarray(WORDS[..., 0])),
        lambda p: gray3((WORDS[..., 0] >> 8).astype(np.uint8)),
    ),
    "rgb16_png": (lambda d: write_png16_rgb(d / "a.png"), lambda p: (WORDS >> 8).astype(np.uint8)),
    "gray16_tiff": (
        lambda d: write(d / "a.tif", Image.fromarray(WORDS[..., 0])),
        lambda p: gray3((WORDS[..., 0] >> 8).astype(np.uint8)),
    ),
    "float_tiff": (
        lambda d: write(d / "a.tif", Image.fromarray(WORDS[..., 0].astype(np.float32) / 200 - 20)),
        lambda p: gray3(np.clip(np.rint(WORDS[..., 0].astype(np.float32) / 200 - 20), 0, 255).astype(np.uint8)),
    ),
    "palette_transparent_gif": (lambda d: write(d / "a.gif", paletted(), transparency=2), lambda p: PALETTE[INDICES]),
    "lossless_webp": (lambda d: write(d / "a.webp", Image.fromarray(RGB), lossless=True), lambda p: RGB),
    "bmp": (lambda d: write(d / "a.bmp", Image.fromarray(RGB)), lambda p: RGB),
    "rgb_jpeg": (lambda d: write(d / "a.jpg", Image.fromarray(RGB), quality=90), lambda p: pillow(p, "RGB")),
    "gray_jpeg": (lambda d: write(d / "a.jpg", Image.fromarray(RGB[..., 0])), lambda p: gray3(pillow(p))),
    "cmyk_jpeg": (lambda d: write(d / "a.jpg", Image.fromarray(RGB).convert("CMYK")), cmyk_to_rgb),
    "jpeg_with_trailer": (lambda d: jpeg_with_trailer(d / "a.jpg"), lambda p: pillow(p, "RGB")),
    "multi_picture_jpeg": (lambda d: write_mpo(d / "a.jpg"), lambda p: pillow(p, "RGB")),  # the first picture
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_mode_reads_as_defined(tmp_path: Path, case: str) -> None:
    make, expect = CASES[case]
    path = make(tmp_path)
    image = read_image(path)
    assert image.dtype == np.uint8 and image.shape == (H, W, 3)
    assert image.flags.c_contiguous and image.flags.writeable
    assert np.array_equal(image, expect(path))
    assert displayed_size(path) == (H, W)


def test_a_jpeg_decodes_to_the_same_pixels_with_or_without_bytes_after_its_end(tmp_path: Path) -> None:
    """The two routes through ``read_image`` (OpenCV for a complete JPEG, Pillow for the one with a trailer) agree."""
    trailer = jpeg_with_trailer(tmp_path / "trailer.jpg")
    clean = tmp_path / "clean.jpg"
    clean.write_bytes(trailer.read_bytes()[:-64])
    assert np.array_equal(read_image(trailer), read_image(clean))


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_the_displayed_image(tmp_path: Path, orientation: int, suffix: str) -> None:
    path = tmp_path / f"turned{suffix}"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(RGB).save(path, exif=exif, **({"quality": 95} if suffix == ".jpg" else {}))
    with Image.open(path) as stored:
        expected = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))  # Pillow's own implementation
    image = read_image(path)
    assert image.shape == ((W, H, 3) if orientation in (5, 6, 7, 8) else (H, W, 3))
    assert np.array_equal(image, expected)
    assert displayed_size(path) == image.shape[:2]


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.repeat(np.repeat(RGB, 8, axis=0), 8, axis=1)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.repeat(np.repeat(RGB, 8, axis=0), 8, axis=1)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "does not exist"),
        (b"", "empty"),
        (bytes(range(256)) * 4, "not an image"),
        (lambda: jpeg_bytes()[: len(jpeg_bytes()) // 2], "truncated"),
        (lambda: png_bytes()[: len(png_bytes()) // 2], "truncated"),
        (lambda: b"\0" * 8 + jpeg_bytes()[8:], "not an image"),
    ],
    ids=["missing", "empty", "random", "truncated_jpeg", "truncated_png", "garbled_header"],
)
def test_an_unreadable_file_is_a_clear_error_naming_it(
    tmp_path: Path, content: bytes | Callable[[], bytes] | None, words: str
) -> None:
    path = tmp_path / "photo.jpg"
    if content is not None:
        path.write_bytes(content() if callable(content) else content)
    with pytest.raises(SegvocError, match=words) as error:
        read_image(path)
    assert str(path) in str(error.value)
    assert displayed_size(path) is None or words == "truncated"  # a truncated file still has its header


def test_a_truncated_jpeg_is_an_error_although_opencv_alone_fills_it_in(tmp_path: Path) -> None:
    path = tmp_path / "half.jpg"
    path.write_bytes(jpeg_bytes()[: len(jpeg_bytes()) // 2])
    assert cv2.imread(str(path)) is not None  # OpenCV pads the missing half with grey and says nothing
    with pytest.raises(SegvocError, match="truncated"):
        read_image(path)
