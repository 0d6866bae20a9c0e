"""A dataset of one's own in VOC layout (``data=custom``): its class names, palette and ignore index flow from the
config to training, the metrics, the checkpoint, the validation panels and prediction; ``model.net.init_from``
fine-tunes from a checkpoint with other classes; a config that cannot work is one clear paragraph."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import hydra
import numpy as np
import pytest
import torch
from omegaconf import DictConfig, open_dict
from PIL import Image

from segvoc.checkpoints.format import CLASSIFIER_KEYS, CheckpointError, describe, read_checkpoint
from segvoc.checkpoints.load import build_net
from segvoc.checkpoints.seed import convert_seed_checkpoint
from segvoc.config import ConfigError, validate_config
from segvoc.data.check import DatasetCheckError
from segvoc.data.datamodule import VOCDataModule, pad_collate
from segvoc.models.deeplab import ARCHITECTURES, deeplabv3plus_mobilenet
from segvoc.palette import VOC_CLASSES, colorize
from segvoc.tasks.evaluate import evaluate
from segvoc.tasks.predict import run as predict
from segvoc.tasks.train import train
from tests.conftest import compose_config, run_main
from tests.test_convert import SeedDeepLabV3Plus, _randomise, _seed_checkpoint
from tests.test_train import scalars

CLASSES = ["background", "crack", "rust"]
PALETTE = [[10, 10, 10], [250, 40, 40], [30, 60, 240]]  # none of them a VOC colour
IGNORE = 100  # not VOC's 255: masks, padding, loss, metrics and the check must all use this one


def make_custom_dataset(root: Path, n_train: int = 8, n_val: int = 3, seed: int = 0) -> Path:
    """``root/{JPEGImages, SegmentationClass, ImageSets/Segmentation}``: grey scenes with a red bar (crack) and a
    blue disc (rust), an ``IGNORE`` band around the bar, images of a few different sizes. Train masks are palette
    PNGs in ``PALETTE``, val masks grayscale PNGs; both hold class indices."""
    rng = np.random.default_rng(seed)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    flat_palette = [v for colour in PALETTE for v in colour]
    for split, count in (("train", n_train), ("val", n_val)):
        ids = [f"{split}_{i:02d}" for i in range(count)]
        for i, name in enumerate(ids):
            height, width = 56 + 8 * (i % 3), 64 + 8 * (i % 2)
            image = rng.normal(128, 12, size=(height, width, 3))
            mask = np.zeros((height, width), np.uint8)
            x = int(rng.integers(4, width // 2 - 8))
            cv2.rectangle(mask, (x, 6), (x + 6, height - 6), 1, -1)
            cv2.circle(mask, (int(rng.integers(width // 2 + 8, width - 10)), height // 2), 8, 2, -1)
            band = cv2.dilate((mask == 1).astype(np.uint8), np.ones((3, 3), np.uint8)) - (mask == 1)
            image[mask == 1] = (200, 40, 40)
            image[mask == 2] = (40, 60, 210)
            mask[band.astype(bool) & (mask == 0)] = IGNORE
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
                root / "JPEGImages" / f"{name}.jpg", quality=95
            )
            png = Image.fromarray(mask)
            if split == "train":
                png = png.convert("P")  # L -> P keeps the indices
                png.putpalette(flat_palette)
            png.save(root / "SegmentationClass" / f"{name}.png")
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


@pytest.fixture(scope="module")
def custom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_custom_dataset(tmp_path_factory.mktemp("cracks"))


def custom_cfg(root: Path, run_dir: Path, *overrides: str, classes: list[str] | None = CLASSES) -> DictConfig:
    """The train config with ``data=custom`` on ``root``, shrunk like ``make_cfg`` (CPU, tiny crops, 2 steps)."""
    base = [
        "data=custom",
        f"data.root={root}",
        *([f"data.classes=[{','.join(classes)}]"] if classes is not None else []),
        f"data.palette=[{','.join(f'[{r},{g},{b}]' for r, g, b in PALETTE)}]",
        f"data.ignore_index={IGNORE}",
        "data.num_workers=0",
        "data.batch_size=4",
        "data.val_batch_size=2",
        "data.crop_size=64",
        "model.net.pretrained=false",
        "trainer.accelerator=cpu",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "~callbacks.model_summary",
    ]
    cfg = compose_config(base + list(overrides))
    with open_dict(cfg):
        cfg.output_dir = str(run_dir)
    return cfg


@pytest.fixture(scope="module")
def trained(custom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, float], Path]:
    """``(metrics, run dir)`` of 2 training steps on the custom dataset, val panels saved."""
    run_dir = tmp_path_factory.mktemp("custom_run")
    metrics = train(custom_cfg(custom_root, run_dir, "save_val_results=true"))
    return metrics, run_dir


def test_custom_config_carries_the_dataset_description(custom_root: Path, tmp_path: Path) -> None:
    cfg = custom_cfg(custom_root, tmp_path)
    assert cfg.data.num_classes == 3 and cfg.model.net.num_classes == 3  # derived from data.classes
    assert list(cfg.model.class_names) == CLASSES and cfg.model.ignore_index == IGNORE
    voc = compose_config(["data.root=/data"])  # VOC: its names come from segvoc/palette.py, not the config
    assert voc.data.classes is None and voc.data.num_classes == 21 and voc.data.subdir == "VOCdevkit/VOC2012"


def test_training_logs_the_custom_classes_and_checkpoints_them(trained: tuple[dict[str, float], Path]) -> None:
    metrics, run_dir = trained
    for name in ("crack", "rust"):
        assert f"val/iou/{name}" in metrics
        assert f"val/iou/{name}" in scalars(run_dir)
    assert not any(key.startswith(("val/iou/aeroplane", "val/iou/class_")) for key in metrics)
    meta = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["segvoc"]
    assert meta["class_names"] == CLASSES and meta["palette"] == PALETTE and meta["ignore_index"] == IGNORE
    assert meta["net"]["num_classes"] == 3


def test_val_panels_draw_the_dataset_colours(trained: tuple[dict[str, float], Path], custom_root: Path) -> None:
    _, run_dir = trained
    first_val = (custom_root / "ImageSets/Segmentation/val.txt").read_text().split()[0]
    mask = np.array(Image.open(custom_root / "SegmentationClass" / f"{first_val}.png"))
    picture = np.array(Image.open(run_dir / "val_results" / f"{first_val}.png"))  # named by image id
    width = mask.shape[1]
    assert picture.shape == (mask.shape[0], 4 * width, 3)
    truth, prediction = picture[:, width : 2 * width], picture[:, 2 * width : 3 * width]
    assert np.array_equal(truth, colorize(mask, PALETTE, IGNORE))
    assert tuple(truth[mask == 1][0]) == tuple(PALETTE[1]) and tuple(truth[mask == IGNORE][0]) == (224, 224, 192)
    assert {tuple(c) for c in prediction.reshape(-1, 3)} <= {tuple(c) for c in PALETTE}


def test_evaluation_honours_the_custom_ignore_index_and_palette(
    trained: tuple[dict[str, float], Path], custom_root: Path, tmp_path: Path
) -> None:
    """``train=false`` on custom data: the loss skips the custom ignore label (an index out of the classes' range
    would crash cross-entropy), the figures equal training's validation of the same weights, and the saved panels
    draw the dataset's colours."""
    metrics, run_dir = trained
    cfg = custom_cfg(
        custom_root, tmp_path / "eval", "train=false", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
        "save_val_results=true",
    )  # fmt: skip
    report = evaluate(cfg)
    assert report["mean_iou"] == pytest.approx(metrics["val/mIoU"], abs=1e-6)
    assert [row["name"] for row in report["classes"]] == CLASSES
    first_val = (custom_root / "ImageSets/Segmentation/val.txt").read_text().split()[0]
    mask = np.array(Image.open(custom_root / "SegmentationClass" / f"{first_val}.png"))
    picture = np.array(Image.open(tmp_path / "eval" / "val_results" / f"{first_val}.png"))
    width = mask.shape[1]
    assert np.array_equal(picture[:, width : 2 * width], colorize(mask, PALETTE, IGNORE))


def test_prediction_writes_the_checkpoint_colours(
    trained: tuple[dict[str, float], Path], custom_root: Path, tmp_path: Path
) -> None:
    _, run_dir = trained
    output = tmp_path / "predicted"  # not into the shared run folder
    cfg = compose_config(
        [
            f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}",
            f"input={custom_root / 'JPEGImages' / 'val_*.jpg'}",
            f"output={output}",
            "formats=[index,palette,overlay]",
            "num_workers=0",
        ],
        config_name="predict",
    )
    assert predict(cfg) == 0
    for stem in ("val_00", "val_01", "val_02"):
        index = Image.open(output / f"{stem}.png")
        assert index.mode == "L" and np.asarray(index).max() < len(CLASSES)
        coloured = Image.open(output / "palette" / f"{stem}.png")
        assert coloured.mode == "P" and coloured.getpalette()[:9] == [v for colour in PALETTE for v in colour]
        rgb = np.asarray(coloured.convert("RGB"))
        assert np.array_equal(rgb, np.array(PALETTE, np.uint8)[np.asarray(index)])
        # the overlay: the dataset's colours half over the image where a class other than background is predicted
        image = np.asarray(Image.open(custom_root / "JPEGImages" / f"{stem}.jpg").convert("RGB"), np.float32)
        objects = np.asarray(index) != 0
        expected = image.copy()
        expected[objects] = 0.5 * image[objects] + 0.5 * np.array(PALETTE, np.float32)[np.asarray(index)[objects]]
        blended = np.asarray(Image.open(output / "overlay" / f"{stem}.jpg"), np.float32)
        assert blended.shape == image.shape and np.abs(blended - expected).mean() < 4


def test_dataset_check_uses_the_custom_ignore_index(tmp_path: Path) -> None:
    root = make_custom_dataset(tmp_path / "data", n_train=2, n_val=1)
    datamodule = VOCDataModule(root=root, subdir="", num_classes=3, ignore_index=IGNORE, num_workers=0)
    datamodule.check_data()  # the IGNORE bands are fine
    mask_path = root / "SegmentationClass" / "val_00.png"
    mask = np.array(Image.open(mask_path))
    mask[0, 0] = 255  # VOC's ignore label is just a wrong value here
    Image.fromarray(mask).save(mask_path)
    with pytest.raises(DatasetCheckError, match=f"holds the values 255 .*ignore label {IGNORE}"):
        datamodule.check_data()


def test_validation_batches_are_padded_with_the_custom_ignore_index() -> None:
    small = (torch.zeros(3, 2, 3), torch.zeros(2, 3, dtype=torch.long))
    large = (torch.zeros(3, 4, 5), torch.ones(4, 5, dtype=torch.long))
    _, masks, sizes = pad_collate([small, large], ignore_index=IGNORE)
    assert sizes == [(2, 3), (4, 5)] and masks[1].eq(1).all()
    assert masks[0, 2:].eq(IGNORE).all() and masks[0, :, 3:].eq(IGNORE).all() and masks[0, :2, :3].eq(0).all()


def _noisy(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``net`` with every float tensor moved away from its initial value, so no tensor equals a fresh one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in net.state_dict().values():
            if value.is_floating_point():
                value.add_(torch.rand(value.shape, generator=generator) + 0.1)
    return net


def save_segvoc_checkpoint(path: Path, arch: str = "deeplabv3plus", num_classes: int = 21) -> dict[str, torch.Tensor]:
    """Write a segvoc checkpoint of ``arch`` for ``num_classes`` classes to ``path``; return its network state."""
    net = _noisy(ARCHITECTURES[arch](num_classes=num_classes), seed=1)
    names = list(VOC_CLASSES) if num_classes == 21 else [f"c{i}" for i in range(num_classes)]
    torch.save(
        {"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "segvoc": describe(net, names)}, path
    )
    return net.state_dict()


def assert_fine_tuned(net: torch.nn.Module, source: dict[str, torch.Tensor], fresh: torch.nn.Module) -> None:
    """Every tensor of ``net`` is the source's except the classifier's, which is that of the fresh network."""
    state, fresh_state = net.state_dict(), fresh.state_dict()
    for key, value in state.items():
        expected = fresh_state[key] if key in CLASSIFIER_KEYS else source[key]
        assert torch.equal(value, expected), key
    assert not torch.equal(state[CLASSIFIER_KEYS[1]], source[CLASSIFIER_KEYS[1]][:3])


def test_init_from_a_voc_checkpoint_reinitialises_only_the_classifier(
    custom_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "voc.ckpt"
    source = save_segvoc_checkpoint(path)

    def no_imagenet(*args: object) -> None:
        raise AssertionError("init_from must not fetch the ImageNet weights it replaces")

    monkeypatch.setattr("segvoc.models.backbone._load_imagenet_state", no_imagenet)
    cfg = custom_cfg(custom_root, tmp_path / "run", f"model.net.init_from={path}", "model.net.pretrained=true")
    validate_config(cfg)
    torch.manual_seed(0)
    fresh = deeplabv3plus_mobilenet(num_classes=3)
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="segvoc.checkpoints.load"):
        net = hydra.utils.instantiate(cfg.model.net)
    assert_fine_tuned(net, source, fresh)
    total = len(source)
    assert f"init_from {path}: 21 -> 3 classes, classifier re-initialised; {total - 2} of {total} tensors loaded" in (
        caplog.text
    )
    assert net.spec == {
        "arch": "deeplabv3plus",
        "num_classes": 3,
        "output_stride": 16,
        "stem_padding": 1,
        "block_padding": "depthwise",
    }


def test_init_from_with_the_same_classes_loads_everything(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "same.ckpt"
    source = save_segvoc_checkpoint(path, num_classes=3)
    with caplog.at_level(logging.INFO, logger="segvoc.checkpoints.load"):
        net = build_net(num_classes=3, output_stride=8, init_from=path)  # OS is not in the weights
    assert all(torch.equal(value, source[key]) for key, value in net.state_dict().items())
    assert f"all {len(source)} tensors loaded (3 classes)" in caplog.text


def test_init_from_a_seed_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    seed_checkpoint = _seed_checkpoint(_randomise(SeedDeepLabV3Plus(output_stride=16)))
    torch.save(seed_checkpoint, tmp_path / "best_deeplabv3plus_mobilenet_voc_os16.pth")
    source = {k[len("net.") :]: v for k, v in convert_seed_checkpoint(seed_checkpoint)["state_dict"].items()}
    torch.manual_seed(0)
    fresh = deeplabv3plus_mobilenet(num_classes=3)
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="segvoc.checkpoints.load"):
        net = build_net(num_classes=3, init_from=tmp_path / "best_deeplabv3plus_mobilenet_voc_os16.pth")
    assert_fine_tuned(net, source, fresh)
    assert "21 -> 3 classes" in caplog.text and "stem convolution with padding 0" in caplog.text


def test_init_from_another_architecture_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "v3.ckpt"
    save_segvoc_checkpoint(path, arch="deeplabv3")
    with pytest.raises(CheckpointError) as info:
        build_net(num_classes=3, init_from=path)
    message = str(info.value)
    assert "deeplabv3 network that does not fit model.net (deeplabv3plus)" in message and "\n" not in message
    assert "head.low_project" in message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.palette=[[0,0,0],[255,0,0]]"], "data.palette has 2 colours for 3 classes"),
        (["data.palette=[[0,0,0],[255,0,0],[0,0,256]]"], "data.palette[2]=[0, 0, 256] is not a colour"),
        (["data.classes=[background,crack,crack]"], "data.classes lists 'crack' more than once"),
        (["data.classes=[]"], "data.classes=[] is not a list of class names"),
        (["data.num_classes=4"], "data.classes names 3 classes but data.num_classes=4"),
        (["data.ignore_index=2"], "data.ignore_index=2 is not valid"),
        (["data.ignore_index=300"], "data.ignore_index=300 is not valid"),
        (["+data.tar_path=/dl/VOC.tar"], "data.tar_path=/dl/VOC.tar puts Pascal VOC2012 into"),
        (["model.net.init_from=/nonexistent/voc.ckpt"], "model.net.init_from=/nonexistent/voc.ckpt does not exist"),
        (["model.ignore_index=0"], "model.ignore_index=0 disagrees with data.ignore_index=100"),
    ],
)
def test_bad_custom_config_is_one_clear_paragraph(
    custom_root: Path, tmp_path: Path, overrides: list[str], expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(custom_cfg(custom_root, tmp_path, *overrides))
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_missing_classes_and_missing_folder_are_clear_errors(custom_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.classes is not set.*data.classes=\[background,crack,rust\]"):
        validate_config(custom_cfg(custom_root, tmp_path, classes=None))
    with pytest.raises(ConfigError, match="lacks JPEGImages, SegmentationClass, ImageSets/Segmentation"):
        validate_config(custom_cfg(tmp_path / "nothing", tmp_path))


def test_bad_custom_config_on_the_command_line_exits_1_without_traceback(
    custom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["data=custom", f"data.root={custom_root}", "data.classes=[background,rust,rust]"]
    status, output = run_main("train.py", argv, tmp_path, monkeypatch, capsys)
    assert status == 1 and "data.classes lists 'rust' more than once" in output and "Traceback" not in output
