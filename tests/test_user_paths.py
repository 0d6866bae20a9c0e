"""What users do that no other test file takes: evaluating seed checkpoints and checkpoints of other classes, every
way a checkpoint file can be unusable, a deeplabv3 (non-plus) model end to end, exported models without their
metadata, and the data options that change what training reads."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict
from PIL import Image

from segvoc.checkpoints.format import CheckpointError, describe
from segvoc.checkpoints.load import build_net, load_model, load_predictor
from segvoc.data.demo import make_demo_voc
from segvoc.errors import SegvocError
from segvoc.models.deeplab import deeplabv3plus_mobilenet
from segvoc.palette import VOC_CLASSES
from segvoc.tasks.evaluate import evaluate
from segvoc.tasks.predict import run as predict
from segvoc.tasks.train import train
from tests.conftest import compose_config
from tests.test_convert import SeedDeepLabV3Plus, _randomise, _seed_checkpoint
from tests.test_custom import custom_cfg, make_custom_dataset, save_segvoc_checkpoint


@pytest.fixture(scope="module")
def seed_pth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint as the seed report's tool writes it (21 VOC classes, no segvoc metadata)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("seed") / "best_deeplabv3plus_mobilenet_voc_os16.pth"
    torch.save(_seed_checkpoint(_randomise(SeedDeepLabV3Plus(output_stride=16))), path)
    return path


# --- evaluation (train=false) --------------------------------------------------------------------------------


def test_evaluation_without_a_checkpoint_says_how_to_give_one(make_cfg) -> None:
    with pytest.raises(CheckpointError, match="give it with ckpt_path="):
        evaluate(make_cfg("train=false"))


def test_evaluation_of_a_seed_checkpoint(make_cfg, seed_pth: Path) -> None:
    cfg = make_cfg("train=false", f"ckpt_path={seed_pth}")
    report = evaluate(cfg)
    assert [row["name"] for row in report["classes"]] == list(VOC_CLASSES)
    assert sum(row["pixels"] for row in report["classes"]) > 0 and 0.0 <= report["mean_iou"] <= 1.0
    written = json.loads(next(Path(cfg.output_dir).glob("eval-*.json")).read_text())
    assert written["mean_iou"] == report["mean_iou"]


def test_evaluation_refuses_a_checkpoint_of_other_classes_that_the_config_check_cannot_see(
    seed_pth: Path, tmp_path: Path
) -> None:
    """A seed checkpoint records no class count, so the start-up check passes; evaluate's own check must refuse
    21 classes on 3-class data."""
    root = make_custom_dataset(tmp_path / "data", n_train=2, n_val=2)
    cfg = custom_cfg(root, tmp_path / "run", "train=false", f"ckpt_path={seed_pth}")
    with pytest.raises(CheckpointError, match="predicts 21 classes but data.num_classes=3"):
        evaluate(cfg)


# --- unusable checkpoint files -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_checkpoint() -> dict:
    net = deeplabv3plus_mobilenet(num_classes=21)
    return {
        "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
        "segvoc": describe(net, list(VOC_CLASSES)),
    }


def _unusable(kind: str, good: dict, path: Path) -> None:
    if kind == "truncated":
        torch.save(good, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "not a dict":
        torch.save([1, 2, 3], path)
    elif kind == "no metadata":
        torch.save({"state_dict": good["state_dict"]}, path)
    elif kind == "unknown architecture":
        meta = copy.deepcopy(good["segvoc"])
        meta["net"]["arch"] = "unet"
        torch.save({"state_dict": good["state_dict"], "segvoc": meta}, path)
    elif kind == "weights that do not fit":
        state = dict(good["state_dict"])
        state["net.backbone.low_level.0.0.weight"] = torch.zeros(3, 3)
        torch.save({"state_dict": state, "segvoc": good["segvoc"]}, path)


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("truncated", "Cannot read the checkpoint {path}"),
        ("not a dict", "{path} holds a list, not a checkpoint dictionary"),
        ("no metadata", "{path} does not describe its network (no 'segvoc' entry)"),
        ("unknown architecture", "{path} names the architecture 'unet'; known: ['deeplabv3', 'deeplabv3plus']"),
        ("weights that do not fit", "The weights in {path} do not fit the network it describes"),
    ],
)
def test_an_unusable_checkpoint_is_named_with_what_is_wrong(
    good_checkpoint: dict, tmp_path: Path, kind: str, words: str
) -> None:
    path = tmp_path / "model.ckpt"
    _unusable(kind, good_checkpoint, path)
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    assert words.format(path=path) in str(info.value)
    assert "\n" not in str(info.value)  # one paragraph


def test_init_from_a_checkpoint_without_weights_is_named(good_checkpoint: dict, tmp_path: Path) -> None:
    path = tmp_path / "empty.ckpt"
    torch.save({"segvoc": good_checkpoint["segvoc"], "state_dict": {}}, path)
    with pytest.raises(CheckpointError, match=f"model.net.init_from={path} holds no network weights"):
        build_net(num_classes=21, init_from=path)


# --- a deeplabv3 (non-plus) model: reloaded, predicted, exported -----------------------------------------------


def test_a_deeplabv3_checkpoint_reloads_predicts_and_exports(tmp_path: Path) -> None:
    from segvoc.tasks.export import export_torchscript

    path = tmp_path / "v3.ckpt"
    state = save_segvoc_checkpoint(path, arch="deeplabv3")
    net, meta = load_model(path)
    assert meta["net"]["arch"] == "deeplabv3" and type(net.head).__name__ == "DeepLabV3Head"
    assert all(torch.equal(value, state[key]) for key, value in net.state_dict().items())

    (tmp_path / "in").mkdir()
    image = np.random.default_rng(0).integers(0, 255, size=(37, 53, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "in" / "a.png")
    cfg = compose_config(
        [f"ckpt={path}", f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}", "num_workers=0"], "predict"
    )
    assert predict(cfg) == 0
    mask = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    assert mask.shape == (37, 53) and mask.max() < 21

    scripted = export_torchscript(net, meta, tmp_path / "v3.pt")
    reloaded, reloaded_meta = load_predictor(scripted)
    assert reloaded_meta["net"]["arch"] == "deeplabv3"
    images = torch.randn(1, 3, 37, 53)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), net(images), rtol=1e-4, atol=1e-4)

    broken = tmp_path / "broken.pt"  # a TorchScript file cut short, as an interrupted copy leaves it
    broken.write_bytes(scripted.read_bytes()[: scripted.stat().st_size // 2])
    with pytest.raises(CheckpointError) as info:
        load_predictor(broken)
    assert str(broken) in str(info.value)


def test_an_onnx_model_without_its_metadata_is_named(onnx_model: Path, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(onnx_model))
    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    with pytest.raises(SegvocError) as info:
        load_predictor(bare)
    assert str(bare) in str(info.value) and "no segvoc meta" in str(info.value)


# --- data options ----------------------------------------------------------------------------------------------


def test_demo_data_is_generated_by_prepare_data_and_never_over_a_real_folder(tmp_path: Path) -> None:
    import hydra

    cfg = compose_config([f"data.root={tmp_path / 'demo'}", "data.demo=true", "data.num_workers=0"])
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    voc = tmp_path / "demo" / "VOCdevkit" / "VOC2012"
    assert (voc / "ImageSets/Segmentation/train.txt").read_text().split()
    datamodule.check_data()

    real = tmp_path / "real" / "VOCdevkit" / "VOC2012"
    (real / "JPEGImages").mkdir(parents=True)
    (real / "JPEGImages" / "mine.jpg").write_bytes(b"someone's image")
    cfg = compose_config([f"data.root={tmp_path / 'real'}", "data.demo=true", "data.num_workers=0"])
    with pytest.raises(Exception) as info:  # noqa: PT011 - the message is what matters
        hydra.utils.instantiate(cfg.data).prepare_data()
    assert str(real) in str(info.value)
    assert (real / "JPEGImages" / "mine.jpg").read_bytes() == b"someone's image"


@pytest.mark.parametrize("scale_range", ["[0.0,1.5]", "[-1,2]", "[2.0,0.5]", "[1.0]"])
def test_scale_range_must_be_positive(make_cfg, scale_range: str) -> None:
    with pytest.raises(SegvocError, match=r"data\.scale_range=.* is not valid"):
        train(make_cfg(f"data.scale_range={scale_range}"))


def test_data_check_false_trains_past_a_broken_file_it_never_reads(make_cfg, voc_root: Path, tmp_path: Path) -> None:
    """With the start-up check off, a broken validation mask is found only if read; 1 step without validation
    never reads it."""
    root = tmp_path / "data"
    shutil.copytree(voc_root, root)
    voc = root / "VOCdevkit" / "VOC2012"
    first_val = (voc / "ImageSets/Segmentation/val.txt").read_text().split()[0]
    (voc / "SegmentationClass" / f"{first_val}.png").write_bytes(b"not a png")
    cfg = make_cfg(f"data.root={root}", "trainer.max_steps=1", "+trainer.limit_val_batches=0")
    from segvoc.data.check import DatasetCheckError

    with pytest.raises(DatasetCheckError):
        train(cfg)
    with open_dict(cfg):
        cfg.data.check = False
    assert "train/loss" in train(cfg)


def test_a_training_set_smaller_than_one_batch_still_trains(make_cfg, tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_demo_voc(root, n_train=3, n_val=2, seed=4)
    metrics = train(make_cfg(f"data.root={root}", "data.batch_size=4", "data.crop_size=64", "trainer.max_steps=2"))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert json.loads((tmp_path / "run" / "result.json").read_text())["global_step"] == 2


def test_training_with_crop_val_without_loggers_or_checkpoints(make_cfg, tmp_path: Path) -> None:
    """``data.crop_val=true`` validates on centre crops; with ``logger`` and segvoc's checkpoint callbacks off the
    run still trains, validates and records its result, without TensorBoard, best.ckpt or last.ckpt."""
    cfg = make_cfg(
        "data.crop_val=true",
        "data.crop_size=64",
        "trainer.max_steps=2",
        "~logger",
        "~callbacks.model_checkpoint",
        "~callbacks.last_checkpoint",
    )
    metrics = train(cfg)
    run = Path(cfg.output_dir)
    assert 0.0 <= metrics["val/mIoU"] <= 1.0
    assert json.loads((run / "result.json").read_text())["global_step"] == 2
    assert not (run / "tensorboard").exists()
    assert not {"best.ckpt", "last.ckpt"} & {p.name for p in run.rglob("*.ckpt")}
