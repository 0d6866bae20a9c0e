"""predict.py: masks at the original size for every kind of input image, formats, corrupt files, exported models."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segvoc.data.demo import make_demo_voc
from segvoc.data.image import read_image
from segvoc.palette import colorize
from segvoc.tasks.evaluate import evaluate
from segvoc.tasks.predict import run
from tests.conftest import ExportedModels, compose_config, run_script


@pytest.fixture(scope="module")
def checkpoint(random_checkpoint: Path) -> Path:
    return random_checkpoint


def voc_colormap() -> np.ndarray:
    """Pascal VOC's colour map from its definition (the devkit's bit interleaving), written here, not segvoc's."""
    colours = np.zeros((256, 3), np.uint8)
    for index in range(256):
        value, rgb = index, [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << (7 - bit)
            value >>= 3
        colours[index] = rgb
    return colours


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
        index = np.asarray(mask)
        for coloured in (
            out / "palette" / f"{stem}.png",
            out / "results/VOC2012/Segmentation/comp5_test_cls" / f"{stem}.png",
        ):
            with Image.open(coloured) as png:  # the index mask's pixels under VOC's colours
                assert png.mode == "P" and np.array_equal(np.asarray(png), index), coloured
                palette = np.asarray(png.getpalette(), np.uint8).reshape(-1, 3)
                assert np.array_equal(palette[:21], voc_colormap()[:21]), coloured
        assert Image.open(out / "overlay" / f"{stem}.jpg").size == size
    assert not (out / "broken.png").exists()
    # the overlay: class colours blended half and half over the image, background left as it was
    index = np.asarray(Image.open(out / "odd.png"))
    image = np.asarray(Image.open(tmp_path / "in" / "odd.jpg").convert("RGB"), np.float32)
    objects = index != 0
    assert objects.any()
    expected = image.copy()
    expected[objects] = 0.5 * image[objects] + 0.5 * voc_colormap()[index[objects]]
    blended = np.asarray(Image.open(out / "overlay" / "odd.jpg"), np.float32)
    assert np.abs(blended - expected).mean() < 8 and np.abs(blended - image).mean() > 20  # noise JPEGs: ~5 off


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


def test_a_batch_gives_the_same_masks_as_one_at_a_time(checkpoint: Path, tmp_path: Path) -> None:
    """Three images of one size share a batch of 3 (BatchNorm in eval mode: no image sees another)."""
    rng = np.random.default_rng(1)
    (tmp_path / "in").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, size=(40, 72, 3), dtype=np.uint8)).save(tmp_path / "in" / f"{i}.png")
    for batch in (1, 3):
        run(
            predict_cfg(
                f"ckpt={checkpoint}",
                f"input={tmp_path / 'in'}",
                f"output={tmp_path / str(batch)}",
                f"batch_size={batch}",
            )
        )
    masks = [np.asarray(Image.open(tmp_path / "1" / f"{i}.png")) for i in range(3)]
    for i in range(3):
        assert np.array_equal(masks[i], np.asarray(Image.open(tmp_path / "3" / f"{i}.png")))
    assert not np.array_equal(masks[0], masks[1])  # the images differ, and so do their masks


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


@pytest.mark.slow  # predict.py's one test in its own process, with a DataLoader worker
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
    for formats, named in (("[jpeg]", "formats=['jpeg'] is not"), ("[]", "formats=[] is not")):
        with pytest.raises(SegvocError, match=re.escape(named)):
            run(
                predict_cfg(f"ckpt={checkpoint}", f"input={tmp_path}", f"formats={formats}", f"output={tmp_path / 'o'}")
            )
    assert not (tmp_path / "o").exists()


def test_inference_options_reach_the_inference_routine(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import segvoc.tasks.predict as predict_task

    calls: list[dict] = []
    real_infer = predict_task.infer

    def recording_infer(net, images, **options):
        calls.append(options)
        return real_infer(net, images, **options)

    monkeypatch.setattr(predict_task, "infer", recording_infer)
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "a.png")
    overrides = ["inference.scales=[0.5,1.0]", "inference.flip=true", "inference.window=32"]
    assert (
        run(predict_cfg(f"ckpt={checkpoint}", f"input={tmp_path / 'a.png'}", f"output={tmp_path / 'o'}", *overrides))
        == 0
    )
    assert calls == [{"scales": [0.5, 1.0], "flip": True, "window": 32}]
    assert Image.open(tmp_path / "o" / "a.png").size == (40, 30)


def test_two_inputs_with_one_stem_are_warned_about(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "in" / "same.png")
    Image.fromarray(np.zeros((24, 30, 3), np.uint8)).save(tmp_path / "in" / "same.jpg")
    assert run(predict_cfg(f"ckpt={checkpoint}", f"input={tmp_path / 'in'}", f"output={tmp_path / 'o'}")) == 0
    assert "share a file name stem" in caplog.text
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["same.png"]


def test_onnx_model_gives_the_same_masks(
    exported_models: ExportedModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """predict.py with the session's ONNX export of the tiny trained model writes the masks its checkpoint writes,
    from the same normalised batches (mean and std read from the .onnx file) and logits within 1e-3: the tiny model
    predicts background almost everywhere, so the masks alone would agree for many wrong logits."""
    import segvoc.tasks.predict as predict_task

    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_infer = predict_task.infer

    def recording_infer(net, images, **options):
        logits = real_infer(net, images, **options)
        calls.append((images.clone(), logits.clone()))
        return logits

    monkeypatch.setattr(predict_task, "infer", recording_infer)
    make_inputs(tmp_path / "in")
    batches = {}
    for kind, model in (("pt", exported_models.ckpt), ("onnx", exported_models.onnx)):
        run(predict_cfg(f"ckpt={model}", f"input={tmp_path / 'in'}", f"output={tmp_path / kind}"))
        batches[kind] = calls.copy()
        calls.clear()
    agree = [
        np.mean(np.asarray(Image.open(p)) == np.asarray(Image.open(tmp_path / "onnx" / p.name)))
        for p in (tmp_path / "pt").glob("*.png")
    ]
    assert len(agree) == 6 and min(agree) >= 0.999
    assert len(batches["onnx"]) == len(batches["pt"]) > 0
    for (images, logits), (onnx_images, onnx_logits) in zip(batches["pt"], batches["onnx"], strict=True):
        assert torch.equal(onnx_images, images)
        assert onnx_logits.shape == logits.shape and float((onnx_logits - logits).abs().max()) < 1e-3


def test_torchscript_model_gives_the_same_masks(checkpoint: Path, tmp_path: Path) -> None:
    from segvoc.checkpoints.load import load_model
    from segvoc.tasks.export import export_torchscript

    net, meta = load_model(checkpoint)
    scripted = export_torchscript(net, meta, tmp_path / "model.pt")
    (tmp_path / "in").mkdir()
    rng = np.random.default_rng(2)
    for name, (h, w) in {"a": (40, 56), "b": (33, 47)}.items():
        Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)).save(tmp_path / "in" / f"{name}.png")
    formats = "formats=[index,palette]"
    run(predict_cfg(f"ckpt={checkpoint}", f"input={tmp_path / 'in'}", f"output={tmp_path / 'ckpt'}", formats))
    assert run(predict_cfg(f"ckpt={scripted}", f"input={tmp_path / 'in'}", f"output={tmp_path / 'pt'}", formats)) == 0
    for name in ("a", "b"):
        for sub in ("", "palette/"):
            mine = Image.open(tmp_path / "pt" / f"{sub}{name}.png")
            assert np.array_equal(np.asarray(mine), np.asarray(Image.open(tmp_path / "ckpt" / f"{sub}{name}.png")))
        assert np.array_equal(np.asarray(mine.getpalette(), np.uint8).reshape(-1, 3)[:21], voc_colormap()[:21])


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

    panels = [tmp_path / "run" / "val_results" / f"{name}.png" for name in val]  # image | truth | prediction | overlay
    assert sorted((tmp_path / "run" / "val_results").glob("*.png")) == sorted(panels)  # named by image id
    for path, name, panel_path in zip(jpeg, val, panels, strict=True):
        panel = np.asarray(Image.open(panel_path))
        width = panel.shape[1] // 4
        predicted = np.asarray(Image.open(tmp_path / "masks" / f"{name}.png"))
        assert np.array_equal(panel[:, :width], read_image(path)), f"{path.name}: validation saw other pixels"
        assert np.array_equal(panel[:, 2 * width : 3 * width], colorize(predicted)), f"{path.name}: other mask"
