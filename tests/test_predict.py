"""predict.py: masks at the original size for every kind of input image, formats, corrupt files, exported models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segvoc.checkpoints.format import describe
from segvoc.data.demo import make_demo_voc
from segvoc.data.image import read_image
from segvoc.models.deeplab import deeplabv3plus_mobilenet
from segvoc.palette import VOC_CLASSES, colorize
from segvoc.tasks.evaluate import evaluate
from segvoc.tasks.predict import run
from tests.conftest import compose_config, run_script


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = deeplabv3plus_mobilenet(num_classes=21).eval()
    for module in net.modules():  # spread the BN statistics so predictions vary over the image
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "segvoc": describe(net, list(VOC_CLASSES))}, path)
    return path


def make_inputs(folder: Path) -> dict[str, tuple[int, int]]:
    """Images of many kinds; returns stem -> (width, height) as displayed."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    rgb = rng.integers(0, 255, size=(61, 83, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "odd.jpg")
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((61, 83), 128, np.uint8)])).save(folder / "rgba.png")
    Image.fromarray(rgb[..., 1].astype(np.uint16) * 257).save(folder / "deep16.png")
    Image.fromarray(rgb).convert("P").save(folder / "paletted.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif, quality=95)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return {
        "odd": (83, 61),
        "gray": (83, 61),
        "rgba": (83, 61),
        "deep16": (83, 61),
        "paletted": (83, 61),
        "rotated": (61, 83),
    }


def predict_cfg(*overrides: str):
    return compose_config(["num_workers=0", *overrides], config_name="predict")


def test_masks_at_original_size_and_a_corrupt_file_is_skipped(checkpoint: Path, tmp_path: Path) -> None:
    sizes = make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    failed = run(
        predict_cfg(
            f"ckpt={checkpoint}",
            f"input={tmp_path / 'in'}",
            f"output={out}",
            "formats=[index,palette,overlay,voc]",
            "batch_size=3",
        )
    )
    assert failed == 1  # broken.jpg
    for stem, size in sizes.items():
        mask = Image.open(out / f"{stem}.png")
        assert mask.mode == "L" and mask.size == size, stem
        assert np.asarray(mask).max() <= 20
        assert Image.open(out / "palette" / f"{stem}.png").mode == "P"
        assert Image.open(out / "overlay" / f"{stem}.jpg").size == size
        assert (out / "results/VOC2012/Segmentation/comp5_test_cls" / f"{stem}.png").is_file()
    assert not (out / "broken.png").exists()


def test_a_mask_that_cannot_be_written_is_reported_by_name(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sizes = make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    (out / "gray.png").mkdir(parents=True)  # a folder where gray's mask should go: that write fails
    failed = run(predict_cfg(f"ckpt={checkpoint}", f"input={tmp_path / 'in'}", f"output={out}", "batch_size=1"))
    assert failed == 2  # broken.jpg and gray.png
    assert "gray.png: cannot write its mask into" in caplog.text
    assert all((out / f"{stem}.png").is_file() for stem in sizes if stem != "gray")


def test_batched_padding_gives_the_same_masks_as_one_at_a_time(checkpoint: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    (tmp_path / "in").mkdir()
    for i, (h, w) in enumerate([(64, 64), (40, 72), (72, 40)]):
        Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)).save(tmp_path / "in" / f"{i}.png")
    for batch in (1, 3):
        run(
            predict_cfg(
                f"ckpt={checkpoint}",
                f"input={tmp_path / 'in'}",
                f"output={tmp_path / str(batch)}",
                f"batch_size={batch}",
            )
        )
    # The image-pooling branch sees the padding, so a padded batch may differ slightly at object boundaries.
    for i in range(3):
        one = np.asarray(Image.open(tmp_path / "1" / f"{i}.png"))
        three = np.asarray(Image.open(tmp_path / "3" / f"{i}.png"))
        assert one.shape == three.shape and (one == three).mean() > 0.7


def test_exif_rotation_gives_the_mask_of_the_displayed_image(checkpoint: Path, tmp_path: Path) -> None:
    make_inputs(tmp_path / "in")
    upright = tmp_path / "upright"
    upright.mkdir()
    Image.fromarray(read_image(tmp_path / "in" / "rotated.jpg")).save(upright / "rotated.png")
    run(predict_cfg(f"ckpt={checkpoint}", f"input={tmp_path / 'in' / 'rotated.jpg'}", f"output={tmp_path / 'a'}"))
    run(predict_cfg(f"ckpt={checkpoint}", f"input={upright / 'rotated.png'}", f"output={tmp_path / 'b'}"))
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "a" / "rotated.png")), np.asarray(Image.open(tmp_path / "b" / "rotated.png"))
    )


def test_cli_exit_status_and_summary(checkpoint: Path, tmp_path: Path) -> None:
    make_inputs(tmp_path / "in")
    status, output = run_script(
        "predict.py",
        [f"ckpt={checkpoint}", f"input={tmp_path / 'in'}/*.jpg", f"output={tmp_path / 'out'}", "num_workers=1"],
        cwd=tmp_path,
    )
    assert status == 2, output[-2000:]
    assert "broken.jpg" in output and "could not be read" in output and "Traceback" not in output
    assert (tmp_path / "out" / "odd.png").is_file() and (tmp_path / "out" / "rotated.png").is_file()


def test_no_inputs_and_unknown_format_are_clear_errors(checkpoint: Path, tmp_path: Path) -> None:
    from segvoc.errors import SegvocError

    with pytest.raises(SegvocError, match="names no image files"):
        run(predict_cfg(f"ckpt={checkpoint}", f"input={tmp_path}/nothing/*.jpg", f"output={tmp_path / 'o'}"))
    with pytest.raises(SegvocError, match="formats"):
        run(predict_cfg(f"ckpt={checkpoint}", f"input={tmp_path}", "formats=[jpeg]", f"output={tmp_path / 'o'}"))


def test_onnx_model_gives_the_same_masks(checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from segvoc.checkpoints.load import load_model
    from segvoc.tasks.export import export_onnx

    net, meta = load_model(checkpoint)
    onnx_path = export_onnx(net, meta, tmp_path / "model.onnx")
    make_inputs(tmp_path / "in")
    run(predict_cfg(f"ckpt={checkpoint}", f"input={tmp_path / 'in'}", f"output={tmp_path / 'pt'}"))
    run(predict_cfg(f"ckpt={onnx_path}", f"input={tmp_path / 'in'}", f"output={tmp_path / 'onnx'}"))
    agree = [
        np.mean(np.asarray(Image.open(p)) == np.asarray(Image.open(tmp_path / "onnx" / p.name)))
        for p in (tmp_path / "pt").glob("*.png")
    ]
    assert len(agree) == 6 and min(agree) >= 0.999


def test_predict_gives_exactly_the_validation_prediction_of_every_val_image(
    checkpoint: Path, make_cfg, tmp_path: Path
) -> None:
    """predict.py on a validation image and validation itself read the same pixels and predict the same mask, also
    for images that used to decode differently in the two (EXIF-rotated, greyscale, CMYK, 16-bit)."""
    voc = make_demo_voc(tmp_path / "data", n_train=1, n_val=5, seed=11)
    val = (voc / "ImageSets/Segmentation/val.txt").read_text().split()
    jpeg = [voc / "JPEGImages" / f"{name}.jpg" for name in val]
    upright = np.asarray(Image.open(jpeg[0]).convert("RGB"))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter anticlockwise, displayed upright: its mask fits the displayed image
    Image.fromarray(np.rot90(upright, 1)).save(jpeg[0], exif=exif, quality=95)
    Image.open(jpeg[1]).convert("L").save(jpeg[1])
    Image.open(jpeg[2]).convert("CMYK").save(jpeg[2])
    gray = np.asarray(Image.open(jpeg[3]).convert("L")).astype(np.uint16)
    low = np.random.default_rng(0).integers(0, 256, size=gray.shape, dtype=np.uint16)
    Image.fromarray((gray << 8) | low).save(jpeg[3], format="PNG")  # 16-bit content under the .jpg name

    evaluate(make_cfg("train=false", f"ckpt_path={checkpoint}", f"data.root={voc.parents[1]}",
                      "data.val_batch_size=1", "save_val_results=true"))  # fmt: skip
    run(predict_cfg(f"ckpt={checkpoint}", f"input={voc / 'JPEGImages'}", f"output={tmp_path / 'masks'}"))

    panels = sorted((tmp_path / "run" / "val_results").glob("*.png"))  # image | truth | prediction | overlay
    assert len(panels) == len(val)
    for path, name, panel_path in zip(jpeg, val, panels, strict=True):
        panel = np.asarray(Image.open(panel_path))
        width = panel.shape[1] // 4
        predicted = np.asarray(Image.open(tmp_path / "masks" / f"{name}.png"))
        assert np.array_equal(panel[:, :width], read_image(path)), f"{path.name}: validation saw other pixels"
        assert np.array_equal(panel[:, 2 * width : 3 * width], colorize(predicted)), f"{path.name}: other mask"
