"""Dataset statistics: the counts against a hand-made tree and a brute-force count, the class weights from their
definitions (an absent class gets 0, never inf or NaN), and the command's JSON, which the losses read."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segvoc.data.demo import make_demo_voc
from segvoc.data.stats import dataset_stats, inverse_log_weights, median_frequency_weights
from segvoc.errors import SegvocError
from segvoc.losses import CrossEntropy
from segvoc.palette import voc_palette
from tests.conftest import REPO, run_main


def write_tree(voc: Path, masks: dict[str, np.ndarray], split: str = "train") -> Path:
    """Masks (alternately grayscale and palette PNGs) and the split file listing them, in the VOC layout."""
    (voc / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    (voc / "ImageSets/Segmentation").mkdir(parents=True, exist_ok=True)
    for i, (name, mask) in enumerate(masks.items()):
        image = Image.fromarray(mask.astype(np.uint8))
        if i % 2:
            image.putpalette(voc_palette().flatten().tolist())
        image.save(voc / "SegmentationClass" / f"{name}.png")
    (voc / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(masks) + "\n")
    return voc


def test_a_hand_made_tree(tmp_path: Path) -> None:
    """Four classes; class 3 never occurs, 255 is ignored, 9 is neither."""
    voc = write_tree(
        tmp_path,
        {"a": np.array([[0, 0, 1], [1, 255, 0]]), "b": np.array([[0, 2], [2, 2], [255, 9]])},
    )
    stats = dataset_stats(voc, "train", num_classes=4, class_names=["bg", "x", "y", "z"], workers=2)
    assert stats["images"] == 2 and stats["pixels"] == 12
    assert stats["ignored_pixels"] == 2 and stats["ignored_share"] == pytest.approx(2 / 12)
    assert stats["other_values"] == {"9": 1}
    assert stats["classes"] == ["bg", "x", "y", "z"]
    assert stats["class_pixels"] == [4, 2, 3, 0]
    assert stats["class_frequency"] == pytest.approx([4 / 9, 2 / 9, 3 / 9, 0])  # of the 9 labelled pixels
    assert stats["class_images"] == [2, 1, 1, 0]
    # freq(c) over the labelled pixels of the images holding c (a: 5, b: 4): 4/9, 2/5, 3/4; median 4/9
    median = 4 / 9
    assert stats["weights"]["median_frequency"] == pytest.approx([1.0, median / (2 / 5), median / (3 / 4), 0.0])
    assert stats["weights"]["inverse_log"] == pytest.approx(
        [1 / math.log(1.02 + 4 / 9), 1 / math.log(1.02 + 2 / 9), 1 / math.log(1.02 + 3 / 9), 0.0]
    )
    assert stats["sizes"]["height"] == {"min": 2, "median": 2.5, "max": 3}
    assert stats["sizes"]["width"] == {"min": 2, "median": 2.5, "max": 3}
    assert stats["sizes"]["most_common"] == [
        {"height": 2, "width": 3, "images": 1},
        {"height": 3, "width": 2, "images": 1},
    ]
    json.dumps(stats, allow_nan=False)  # JSON-ready, no inf or NaN


def test_weights_of_absent_classes_and_of_an_empty_split_are_0() -> None:
    assert median_frequency_weights(np.zeros(3), np.zeros(3)).tolist() == [0.0, 0.0, 0.0]
    assert inverse_log_weights(np.zeros(3)).tolist() == [0.0, 0.0, 0.0]
    weights = median_frequency_weights(np.array([10, 0, 30]), np.array([100, 0, 100]))
    assert weights.tolist() == pytest.approx([2.0, 0.0, 2 / 3])  # median of 0.1 and 0.3 is 0.2


def test_the_counts_match_a_brute_force_count(voc_root: Path) -> None:
    voc = voc_root / "VOCdevkit/VOC2012"
    stats = dataset_stats(voc, "train")
    names = (voc / "ImageSets/Segmentation/train.txt").read_text().split()
    masks = [np.array(Image.open(voc / "SegmentationClass" / f"{name}.png")) for name in names]
    pixels = [sum(int((m == c).sum()) for m in masks) for c in range(21)]
    images = [sum(1 for m in masks if (m == c).any()) for c in range(21)]
    ignored = sum(int((m == 255).sum()) for m in masks)
    assert stats["class_pixels"] == pixels and stats["class_images"] == images
    assert stats["ignored_pixels"] == ignored > 0 and stats["pixels"] == sum(m.size for m in masks)
    assert 0 in pixels  # an absent class, whose weights must be 0
    labelled = [int((m < 21).sum()) for m in masks]
    present = [c for c in range(21) if pixels[c]]
    freq = {c: pixels[c] / sum(n for m, n in zip(masks, labelled, strict=True) if (m == c).any()) for c in present}
    median = float(np.median(list(freq.values())))
    expected = [median / freq[c] if c in freq else 0.0 for c in range(21)]
    assert stats["weights"]["median_frequency"] == pytest.approx(expected)
    share = [p / sum(pixels) for p in pixels]
    expected = [1 / math.log(1.02 + s) if s else 0.0 for s in share]
    assert stats["weights"]["inverse_log"] == pytest.approx(expected)
    heights = sorted(m.shape[0] for m in masks)
    assert stats["sizes"]["height"]["min"] == heights[0] and stats["sizes"]["height"]["max"] == heights[-1]
    assert sum(s["images"] for s in stats["sizes"]["most_common"]) <= len(masks)
    assert stats["sizes"]["most_common"][0]["images"] == max(
        sum(1 for m in masks if m.shape == shape) for shape in {m.shape for m in masks}
    )


def test_a_missing_mask_names_the_file(tmp_path: Path) -> None:
    voc = write_tree(tmp_path, {"a": np.zeros((2, 2))})
    (voc / "ImageSets/Segmentation/train.txt").write_text("a\nb\n")
    with pytest.raises(SegvocError, match=r"b\.png"):
        dataset_stats(voc, "train")


def run_cli(
    *overrides: str, run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    """``python -m segvoc.data.stats overrides`` in this process: the command's exit status and output. (A process
    of its own spent ~10 s importing torch, torchvision and Lightning to count a few masks in milliseconds.)"""
    monkeypatch.setenv("COLUMNS", "120")  # rich's table at a known width: class names not cut
    return run_main("segvoc.data.stats", [*overrides, f"hydra.run.dir={run_dir}"], REPO, monkeypatch, capsys)


def test_the_command_prints_and_writes_the_json_that_the_losses_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    voc = make_demo_voc(tmp_path / "data", n_train=4, n_val=2, seed=5)
    args = [f"data.root={voc.parents[1]}", "splits=[train,val]"]
    status, output = run_cli(*args, run_dir=tmp_path / "run", monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, output
    assert "background" in output and f"Wrote {voc / 'stats-val.json'}" in output
    for split in ("train", "val"):
        written = json.loads((voc / f"stats-{split}.json").read_text())
        assert written == json.loads(json.dumps(dataset_stats(voc, split)))
    weights = json.loads((voc / "stats-train.json").read_text())["weights"]["inverse_log"]
    loss = CrossEntropy(class_weights=str(voc / "stats-train.json"), weighting="inverse_log")
    assert len(weights) == 21 and loss.weight.tolist() == pytest.approx(weights)


def test_the_command_writes_output_and_refuses_one_output_for_two_splits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    voc = make_demo_voc(tmp_path / "data", n_train=4, n_val=2, seed=5)
    root, fixtures = f"data.root={voc.parents[1]}", {"monkeypatch": monkeypatch, "capsys": capsys}
    status, output = run_cli(root, f"output={tmp_path / 'out/s.json'}", run_dir=tmp_path / "a", **fixtures)
    assert status == 0, output
    assert json.loads((tmp_path / "out/s.json").read_text())["split"] == "train"
    status, output = run_cli(
        root, "splits=[train,val]", f"output={tmp_path / 'x.json'}", run_dir=tmp_path / "b", **fixtures
    )
    assert status == 1 and "names one file" in output and "Traceback" not in output
    assert not (tmp_path / "x.json").exists()
