"""Evaluation of a checkpoint without training: figures equal a direct computation, reports, saved panels."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
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


def val_ids(voc_root: Path) -> list[str]:
    return (voc_root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").read_text().split()


def direct_prediction(ckpt: Path, voc_root: Path, image_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(truth, prediction) of one val image, computed by hand."""
    net, _ = load_model(ckpt)
    dataset = VOCSegmentation(voc_root / "VOCdevkit" / "VOC2012", "val", val_transform())
    image, mask = dataset[dataset.ids.index(image_id)]
    with torch.no_grad():
        pred = net(normalize(image[None], IMAGENET_MEAN, IMAGENET_STD)).argmax(1)[0].numpy()
    return mask.numpy().astype(np.int64), pred


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
    run = Path(cfg.output_dir)
    saved = json.loads((run / "eval-whole.json").read_text())
    assert saved["mean_iou"] == pytest.approx(report["mean_iou"])
    assert len(saved["classes"]) == 21 and saved["classes"][0]["name"] == "background"
    # the whole split's matrix, rows true and columns predicted: every non-ignored val pixel once
    assert saved["confusion_matrix"] == confmat.tolist()
    val_masks = [np.array(Image.open(p)) for p in sorted((voc_root / "VOCdevkit/VOC2012/SegmentationClass").glob("*"))
                 if p.stem in val_ids(voc_root)]  # fmt: skip
    assert np.sum(saved["confusion_matrix"]) == sum(int((m != 255).sum()) for m in val_masks)
    top = saved["top_confusions"][0]
    off = confmat - np.diag(np.diag(confmat))
    assert top["pixels"] == off.max() and top["true"] == report["classes"][off.argmax() // 21]["name"]
    assert json.loads((run / "result.json").read_text())["evaluations"]["whole"]["file"] == "eval-whole.json"
    # one panel per val image, named by image id: image | truth | prediction | overlay
    assert sorted(p.stem for p in (run / "val_results").glob("*.png")) == sorted(val_ids(voc_root))

    # the per-image report: one row per image, worst first, each as computed from that image alone
    rows = list(csv.DictReader((run / "per_image-whole.csv").open()))
    assert sorted(row["id"] for row in rows) == sorted(val_ids(voc_root))
    assert [float(row["mIoU"]) for row in rows] == sorted(float(row["mIoU"]) for row in rows)
    for row in rows:
        truth, pred = direct_prediction(trained, voc_root, row["id"])
        valid = truth != 255
        assert (int(row["height"]), int(row["width"])) == truth.shape and int(row["pixels"]) == valid.sum()
        assert float(row["pixel_acc"]) == pytest.approx((truth == pred)[valid].mean(), abs=1e-4)
        ious = [((truth == c) & (pred == c)).sum() / ((truth == c) | (pred == c))[valid].sum() for c in
                np.unique(truth[valid])]  # fmt: skip
        assert float(row["mIoU"]) == pytest.approx(np.mean(ious), abs=1e-4)
        for c in range(21):
            assert (row[f"iou/{report['classes'][c]['name']}"] != "") == (c in truth[valid])
    worst = sorted((run / "worst-whole").glob("*.png"))
    assert [p.name for p in worst] == [f"{i:02d}_{row['id']}.png" for i, row in enumerate(rows, start=1)]
    assert Image.open(worst[0]).height >= 256  # image | truth | prediction | errors, readable, with a legend


def test_tensorboard_gets_sample_panels_and_confusion_matrix(trained: Path) -> None:
    acc = EventAccumulator(str(trained.parent.parent / "tensorboard"))
    acc.Reload()
    images = acc.Tags()["images"]
    assert "val/confusion_matrix" in images and "val/sample_0" in images
    # once per validation (2 of them), labelled and readable: 21 classes of 30 px plus the names; panels >= 256 px
    confusion = acc.Images("val/confusion_matrix")
    assert len(confusion) == 2 and confusion[-1].width == confusion[-1].height > 21 * 30
    assert all(panel.height > 256 for panel in acc.Images("val/sample_0"))
    assert not any(tag.startswith("worst/") for tag in images)  # the per-image report only when asked for


def test_tta_and_crop_protocols_run(trained: Path, make_cfg) -> None:
    report = evaluate(
        make_cfg(
            "train=false", f"ckpt_path={trained}", "model.inference.scales=[0.75,1.0,1.25]", "model.inference.flip=true"
        )
    )
    assert report["protocol"]["flip"] and 0.0 <= report["mean_iou"] <= 1.0
    crop = evaluate(make_cfg("train=false", f"ckpt_path={trained}", "data.crop_val=true", "data.crop_size=64"))
    assert crop["protocol"]["crop_val"]
    whole = evaluate(make_cfg("train=false", f"ckpt_path={trained}"))
    # each protocol keeps its own result, listed in the run's result.json
    run = Path(make_cfg().output_dir)
    names = {"ms0.75-1.25-flip": report, "crop64": crop, "whole": whole}
    listed = json.loads((run / "result.json").read_text())["evaluations"]
    assert set(listed) == set(names)
    for name, expected in names.items():
        assert json.loads((run / f"eval-{name}.json").read_text())["mean_iou"] == expected["mean_iou"]
        assert listed[name]["mean_iou"] == expected["mean_iou"] and (run / f"per_image-{name}.csv").is_file()


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
