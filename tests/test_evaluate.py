"""Evaluation of a checkpoint without training: figures equal a direct computation, reports, saved panels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from segvoc.checkpoints.load import load_model
from segvoc.data.datamodule import VOCDataModule
from segvoc.data.demo import make_demo_voc
from segvoc.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, val_transform
from segvoc.data.voc import VOCSegmentation
from segvoc.errors import SegvocError
from segvoc.tasks.evaluate import evaluate
from segvoc.tasks.train import train


@pytest.fixture(scope="module")
def trained(voc_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import compose_config

    run = tmp_path_factory.mktemp("trained")
    cfg = compose_config(
        [
            f"data.root={voc_root}",
            "data.download=false",
            "data.num_workers=0",
            "data.batch_size=4",
            "data.crop_size=96",
            "model.net.pretrained=false",
            "trainer.accelerator=cpu",
            "trainer.max_steps=6",
            "trainer.val_check_interval=3",
            "trainer.enable_progress_bar=false",
            "~callbacks.model_summary",
            f"output_dir={run}",
        ]
    )
    train(cfg)
    return run / "checkpoints" / "best.ckpt"


def direct_confusion(ckpt: Path, voc_root: Path) -> np.ndarray:
    net, _ = load_model(ckpt)
    dataset = VOCSegmentation(voc_root / "VOCdevkit" / "VOC2012", "val", val_transform())
    confmat = np.zeros((21, 21), dtype=np.int64)
    with torch.no_grad():
        for image, mask in dataset:
            pred = net(normalize(image[None], IMAGENET_MEAN, IMAGENET_STD)).argmax(1)[0].numpy()
            truth = mask.numpy().astype(np.int64)
            valid = truth != 255
            confmat += np.bincount(21 * truth[valid] + pred[valid], minlength=21 * 21).reshape(21, 21)
    return confmat


def test_evaluation_equals_a_direct_computation(trained: Path, voc_root: Path, make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("train=false", f"ckpt_path={trained}", "data.val_batch_size=3", "save_val_results=true")
    report = evaluate(cfg)
    confmat = direct_confusion(trained, voc_root)
    tp, gt, pred = np.diag(confmat), confmat.sum(1), confmat.sum(0)
    union = gt + pred - tp
    iou = tp[union > 0] / union[union > 0]
    assert report["mean_iou"] == pytest.approx(iou.mean(), abs=1e-6)
    assert report["overall_acc"] == pytest.approx(tp.sum() / confmat.sum(), abs=1e-6)
    assert [c["pixels"] for c in report["classes"]] == gt.tolist()
    saved = json.loads((Path(cfg.output_dir) / "eval.json").read_text())
    assert saved["mean_iou"] == pytest.approx(report["mean_iou"])
    assert len(saved["classes"]) == 21 and saved["classes"][0]["name"] == "background"
    panels = sorted((Path(cfg.output_dir) / "val_results").glob("*.png"))
    assert len(panels) == 4  # one per val image: image | truth | prediction | overlay


def test_tensorboard_gets_sample_panels_and_confusion_matrix(trained: Path) -> None:
    acc = EventAccumulator(str(trained.parent.parent / "tensorboard"))
    acc.Reload()
    images = acc.Tags()["images"]
    assert "val/confusion_matrix" in images and "val/sample_0" in images


def test_tta_and_crop_protocols_run(trained: Path, make_cfg) -> None:
    report = evaluate(
        make_cfg(
            "train=false", f"ckpt_path={trained}", "model.inference.scales=[0.75,1.0,1.25]", "model.inference.flip=true"
        )
    )
    assert report["protocol"]["flip"] and 0.0 <= report["mean_iou"] <= 1.0
    report = evaluate(make_cfg("train=false", f"ckpt_path={trained}", "data.crop_val=true", "data.crop_size=64"))
    assert report["protocol"]["crop_val"]


def test_class_count_mismatch_is_a_clear_error(trained: Path, make_cfg) -> None:
    with pytest.raises(SegvocError, match="21 classes"):
        evaluate(make_cfg("train=false", f"ckpt_path={trained}", "data.num_classes=5"))


def test_checkpoint_is_self_describing_and_loads_weights_only(trained: Path) -> None:
    raw = torch.load(trained, map_location="cpu", weights_only=True)
    meta = raw["segvoc"]
    assert meta["net"] == {"arch": "deeplabv3plus", "num_classes": 21, "output_stride": 16, "stem_padding": 1,
                           "block_padding": "depthwise"}
    assert meta["class_names"][15] == "person" and len(meta["palette"]) == 21 and len(meta["mean"]) == 3


def test_batched_full_resolution_validation_equals_one_image_at_a_time(
    trained: Path, make_cfg, tmp_path: Path
) -> None:
    root = tmp_path / "voc_val"
    make_demo_voc(root, n_train=2, n_val=12, seed=11)
    batched_dm = VOCDataModule(root=root, val_batch_size=5, num_workers=0)
    batched_dm.setup("validate")
    batch_sizes = [len(sizes) for _, _, sizes in batched_dm.val_dataloader()]
    assert max(batch_sizes) > 1 and sum(batch_sizes) == 12  # real batches, every image once
    reports = [
        evaluate(make_cfg("train=false", f"ckpt_path={trained}", f"data.root={root}", f"data.val_batch_size={n}"))
        for n in (1, 5)
    ]
    for report in reports:
        report.pop("checkpoint")
    assert reports[0] == reports[1]  # every figure and per-class pixel count identical
