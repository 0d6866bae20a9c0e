"""The dataset check: every kind of problem found and named with its file, all at once, and its CLI's exit status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from segvoc.data.check import (
    DatasetCheckError,
    Problem,
    bad_ids,
    check_dataset,
    convert_rgb_mask,
    format_report,
    require_usable_dataset,
)
from segvoc.data.demo import make_demo_voc
from segvoc.data.image import read_image
from segvoc.errors import SegvocError
from segvoc.palette import colorize
from tests.conftest import REPO, child_env, run_main

SPLITS = ["train", "val"]


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    """A fresh 4 train + 2 val tree that a test may break."""
    return make_demo_voc(tmp_path / "data", n_train=4, n_val=2, seed=5)


def ids(voc: Path, split: str = "train") -> list[str]:
    return (voc / "ImageSets/Segmentation" / f"{split}.txt").read_text().split()


def image_path(voc: Path, name: str) -> Path:
    return voc / "JPEGImages" / f"{name}.jpg"


def mask_path(voc: Path, name: str) -> Path:
    return voc / "SegmentationClass" / f"{name}.png"


def indices(voc: Path, name: str) -> np.ndarray:
    with Image.open(mask_path(voc, name)) as mask:
        return np.array(mask)


def only(problems: list[Problem], kind: str) -> Problem:
    """The one problem of ``problems``, checked to be of ``kind``."""
    assert [p.kind for p in problems] == [kind], format_report(problems)
    return problems[0]


def test_a_clean_tree_has_no_problems(voc: Path) -> None:
    problems = check_dataset(voc, SPLITS, workers=2)
    assert problems == []
    assert format_report(problems) == "No problems found."
    assert bad_ids(problems) == {}
    assert require_usable_dataset(voc, SPLITS) == {}


def test_missing_and_empty_splits(voc: Path) -> None:
    (voc / "ImageSets/Segmentation/val.txt").unlink()
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n  \n")
    problems = check_dataset(voc, SPLITS)
    assert [(p.kind, p.split) for p in problems] == [("empty_split", "train"), ("missing_split", "val")]
    assert "val.txt does not exist" in problems[1].message and "train" in problems[1].message  # names what exists
    assert bad_ids(problems) == {}


def test_duplicate_ids_name_the_lines(voc: Path) -> None:
    split = voc / "ImageSets/Segmentation/train.txt"
    first = ids(voc)[0]
    split.write_text(split.read_text() + f"{first}\n")
    problem = only(check_dataset(voc, SPLITS), "duplicate_id")
    assert problem.id == first and "2 times (lines 1, 5)" in problem.message and str(split) in problem.message
    assert bad_ids([problem]) == {}  # the sample itself is fine


def test_missing_image_and_missing_mask(voc: Path) -> None:
    name_a, name_b = ids(voc)[:2]
    image_path(voc, name_a).unlink()
    mask_path(voc, name_b).unlink()
    problems = check_dataset(voc, SPLITS)
    assert [(p.kind, p.id) for p in problems] == [("missing_image", name_a), ("missing_mask", name_b)]
    assert problems[0].path == image_path(voc, name_a) and str(image_path(voc, name_a)) in problems[0].message
    assert bad_ids(problems) == {"train": {name_a, name_b}}


def test_truncated_jpeg_is_unreadable_although_opencv_reads_it(voc: Path) -> None:
    name = ids(voc)[0]
    path = image_path(voc, name)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert cv2.imread(str(path)) is not None  # OpenCV alone fills in the missing half: only a full decode notices
    problem = only(check_dataset(voc, SPLITS), "unreadable_image")
    assert problem.id == name and "truncated" in problem.message and str(path) in problem.message


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", "empty"),
        (bytes(range(256)) * 4, "not an image"),
        ("truncate", "truncated"),
    ],
    ids=["empty", "random", "truncated"],
)
def test_unreadable_masks(voc: Path, content: bytes | str, words: str) -> None:
    path = mask_path(voc, ids(voc, "val")[0])
    path.write_bytes(path.read_bytes()[:200] if content == "truncate" else content)
    problem = only(check_dataset(voc, SPLITS), "unreadable_mask")
    assert problem.split == "val" and words in problem.message and str(path) in problem.message


def test_image_and_mask_of_different_sizes(voc: Path) -> None:
    name = ids(voc)[1]
    mask = indices(voc, name)
    Image.fromarray(mask[:-3, :-5]).save(mask_path(voc, name))
    problem = only(check_dataset(voc, SPLITS), "size_mismatch")
    height, width = mask.shape
    assert f"is {width}x{height}" in problem.message and f"is {width - 5}x{height - 3}" in problem.message


def test_exif_rotation_counts_as_training_reads_the_image(voc: Path) -> None:
    """Training's reader applies the EXIF orientation; a mask drawn on the stored pixels no longer fits."""
    name = ids(voc)[0]
    path = image_path(voc, name)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees
    Image.open(path).save(path, exif=exif)
    assert only(check_dataset(voc, SPLITS), "size_mismatch").id == name
    Image.fromarray(np.rot90(indices(voc, name), k=-1).copy()).save(mask_path(voc, name))
    assert read_image(path).shape[:2] == indices(voc, name).shape
    assert check_dataset(voc, SPLITS) == []


def test_mask_values_outside_the_classes_are_listed(voc: Path) -> None:
    name = ids(voc)[0]
    mask = indices(voc, name)
    mask[:2, :3] = 21
    mask[5, 5] = 200
    Image.fromarray(mask).save(mask_path(voc, name))
    problem = only(check_dataset(voc, SPLITS), "bad_mask_values")
    assert "values 21, 200 (7 pixels)" in problem.message and "0..20" in problem.message
    assert check_dataset(voc, SPLITS, num_classes=201) == []  # 21 and 200 are classes then


def test_rgb_masks_are_recognised_and_say_whether_they_convert(voc: Path) -> None:
    name_a, name_b = ids(voc)[:2]
    Image.fromarray(colorize(indices(voc, name_a))).save(mask_path(voc, name_a))
    rgb = colorize(indices(voc, name_b))
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).convert("RGBA").save(mask_path(voc, name_b))
    problems = check_dataset(voc, SPLITS)
    assert [(p.kind, p.id) for p in problems] == [("rgb_mask", name_a), ("rgb_mask", name_b)]
    assert "converts to indices" in problems[0].message
    assert "RGBA" in problems[1].message and "(1, 2, 3) at x=0, y=0" in problems[1].message
    assert "convert_rgb_masks=true" in format_report(problems)


@pytest.mark.parametrize("mode", ["I;16", "1", "LA"])
def test_masks_of_other_modes(voc: Path, mode: str) -> None:
    name = ids(voc)[0]
    Image.fromarray(indices(voc, name)).convert(mode).save(mask_path(voc, name))
    problem = only(check_dataset(voc, SPLITS), "bad_mask_mode")
    assert f"is a {mode} image" in problem.message


def test_convert_rgb_mask_round_trips_a_palette_mask(voc: Path, tmp_path: Path) -> None:
    mask = indices(voc, ids(voc)[0])
    assert {0, 255} < set(np.unique(mask).tolist())
    Image.fromarray(colorize(mask)).save(tmp_path / "rgb.png")
    Image.fromarray(colorize(mask)).convert("RGBA").save(tmp_path / "rgba.png")
    for name in ("rgb.png", "rgba.png"):
        converted = convert_rgb_mask(tmp_path / name)
        assert converted.dtype == np.uint8 and np.array_equal(converted, mask)


def test_convert_rgb_mask_refuses_what_it_cannot_map(voc: Path, tmp_path: Path) -> None:
    rgb = colorize(indices(voc, ids(voc)[0]))
    rgb[7, 4] = (250, 10, 10)
    Image.fromarray(rgb).save(tmp_path / "odd.png")
    with pytest.raises(SegvocError, match=r"odd\.png.*\(250, 10, 10\) at x=4, y=7"):
        convert_rgb_mask(tmp_path / "odd.png")
    with pytest.raises(SegvocError, match=r"mask\.png is a P image"):
        convert_rgb_mask(mask_path(voc, ids(voc)[0]).rename(tmp_path / "mask.png"))


def test_every_problem_is_reported_at_once_with_counts(voc: Path) -> None:
    train, val = ids(voc), ids(voc, "val")
    image_path(voc, train[0]).unlink()
    image_path(voc, train[1]).write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    mask_path(voc, train[2]).unlink()
    Image.fromarray(indices(voc, val[0])[:10]).save(mask_path(voc, val[0]))
    Image.fromarray(colorize(indices(voc, val[1]))).save(mask_path(voc, val[1]))
    split = voc / "ImageSets/Segmentation/train.txt"
    split.write_text(split.read_text() + f"{train[3]}\nghost_00001\n")
    problems = check_dataset(voc, SPLITS)
    report = format_report(problems, limit_per_kind=1)
    for line in (
        "duplicate_id (1):",
        "missing_image (2):",
        "missing_mask (2):",
        "unreadable_image (1):",
        "size_mismatch (1):",
        "rgb_mask (1):",
        "... and 1 more missing_image problems",
        "Total: 8 problems",
        "6 samples have unusable files",
    ):
        assert line in report, report
    assert f"{train[1]}.jpg" in report and "ghost_00001" in format_report(problems)
    assert bad_ids(problems) == {"train": {train[0], train[1], train[2], "ghost_00001"}, "val": {val[0], val[1]}}


def test_an_id_in_two_splits_is_reported_under_each(voc: Path) -> None:
    name = ids(voc)[0]
    (voc / "ImageSets/Segmentation/val.txt").write_text(f"{name}\n")
    image_path(voc, name).unlink()
    assert bad_ids(check_dataset(voc, SPLITS)) == {"train": {name}, "val": {name}}


def test_training_refuses_a_broken_dataset_unless_told_to_skip(voc: Path, caplog: pytest.LogCaptureFixture) -> None:
    name = ids(voc)[0]
    image_path(voc, name).unlink()
    with pytest.raises(DatasetCheckError, match=rf"(?s){name}\.jpg does not exist.*data\.skip_bad_samples=true"):
        require_usable_dataset(voc, SPLITS)
    assert require_usable_dataset(voc, SPLITS, skip_bad=True) == {"train": {name}}
    assert f"Skipping 1 bad samples (train: {name})" in caplog.text
    for other in ids(voc, "val"):
        mask_path(voc, other).unlink()
    with pytest.raises(DatasetCheckError, match="would empty the val split"):
        require_usable_dataset(voc, SPLITS, skip_bad=True)


def test_a_missing_split_cannot_be_skipped(voc: Path) -> None:
    (voc / "ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(DatasetCheckError, match=r"(?s)val\.txt does not exist.*missing_split cannot be skipped"):
        require_usable_dataset(voc, SPLITS, skip_bad=True)


def test_a_missing_folder_is_an_error_not_a_problem(tmp_path: Path) -> None:
    with pytest.raises(SegvocError, match="no dataset folder"):
        check_dataset(tmp_path / "nothing", SPLITS)


def run_cli(*overrides: str, run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "segvoc.data.check", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow  # python -m segvoc.data.check's one test in its own process
def test_cli_reports_problems_converts_rgb_masks_and_exits_1(voc: Path, tmp_path: Path) -> None:
    train, val = ids(voc), ids(voc, "val")
    image_path(voc, train[0]).unlink()
    mask = indices(voc, val[0])
    Image.fromarray(colorize(mask)).save(mask_path(voc, val[0]))
    proc = run_cli(f"data.root={voc.parents[1]}", "convert_rgb_masks=true", run_dir=tmp_path / "run")
    output = proc.stdout + proc.stderr  # Hydra's log handler writes to stdout
    assert proc.returncode == 1, output
    assert f"{train[0]}.jpg does not exist" in output and "Total: 1 problems" in output and "Traceback" not in output
    assert "Converted 1 RGB masks" in output and Image.open(mask_path(voc, val[0])).mode == "P"
    assert np.array_equal(indices(voc, val[0]), mask)
    assert not (tmp_path / "run" / ".hydra").exists()


def test_cli_exits_0_on_a_clean_tree_and_1_without_a_dataset(voc: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    def check(*overrides: str, run_dir: Path) -> tuple[int, str]:
        argv = [*overrides, f"hydra.run.dir={run_dir}"]
        return run_main("segvoc.data.check", argv, REPO, monkeypatch, capsys)

    status, output = check(f"data.root={voc.parents[1]}", "data.num_classes=21", run_dir=tmp_path / "a")
    assert status == 0 and "No problems found." in output, output
    status, output = check(f"data.root={tmp_path / 'nothing'}", run_dir=tmp_path / "b")
    assert status == 1 and "no dataset folder" in output and "Traceback" not in output


def test_an_unreadable_split_file_is_named(voc: Path) -> None:
    split = voc / "ImageSets/Segmentation/train.txt"
    split.write_bytes(b"\xff\xfe\x00 not text \x80\x81")
    problems = check_dataset(voc, SPLITS)
    assert [p.kind for p in problems] == ["unreadable_split"]
    assert f"Cannot read the split file {split}" in format_report(problems)


def test_the_check_reads_images_like_training(voc: Path) -> None:
    """A PNG saved under a .jpg name and a grayscale JPEG are fine for training's reader, so fine here."""
    train = ids(voc)
    rgb = read_image(image_path(voc, train[0]))
    Image.fromarray(rgb).save(image_path(voc, train[0]), format="PNG")
    cv2.imwrite(str(image_path(voc, train[1])), cv2.cvtColor(read_image(image_path(voc, train[1])), cv2.COLOR_RGB2GRAY))
    Image.fromarray(indices(voc, train[2])).save(mask_path(voc, train[2]))  # L instead of P
    assert check_dataset(voc, SPLITS) == []
