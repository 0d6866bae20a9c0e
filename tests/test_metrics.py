"""Metrics against a confusion matrix computed by hand."""

from __future__ import annotations

import math

import torch

from segvoc.metrics import SegmentationMetrics


def test_metrics_match_a_hand_computed_confusion_matrix() -> None:
    # 4 classes; class 3 is absent from ground truth and prediction; 255 pixels are ignored whatever predicted.
    target = torch.tensor([[0, 0, 0, 1, 1, 2, 255, 255]])
    preds = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 0]])
    metrics = SegmentationMetrics(num_classes=4)
    # two updates: the matrix accumulates over the whole set, it is not an average of per-batch scores
    metrics.update(preds[:, :4], target[:, :4])
    metrics.update(preds[:, 4:], target[:, 4:])
    # rows = ground truth, columns = prediction (valid pixels only)
    #   gt0: pred 0,0,1   gt1: pred 1,2   gt2: pred 2
    expected = torch.tensor([[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(metrics.confmat.cpu(), expected)
    scores = metrics.compute()
    iou = [2 / 3, 1 / 3, 1 / 2]  # TP / (TP + FP + FN)
    assert torch.allclose(scores["iou"][:3], torch.tensor(iou, dtype=torch.float64))
    assert math.isnan(scores["iou"][3])
    assert math.isclose(scores["mIoU"], sum(iou) / 3)  # the absent class does not count
    assert math.isclose(scores["acc"], 4 / 6)
    assert math.isclose(scores["mean_acc"], (2 / 3 + 1 / 2 + 1) / 3)
    assert math.isclose(scores["fw_iou"], 3 / 6 * iou[0] + 2 / 6 * iou[1] + 1 / 6 * iou[2])


def test_class_only_predicted_counts_towards_miou() -> None:
    metrics = SegmentationMetrics(num_classes=3)
    metrics.update(torch.tensor([[0, 2]]), torch.tensor([[0, 0]]))
    scores = metrics.compute()
    assert math.isclose(scores["mIoU"], (1 / 2 + 0) / 2)  # class 2: predicted, never true -> IoU 0


def test_logits_are_accepted_and_reset_clears() -> None:
    metrics = SegmentationMetrics(num_classes=3)
    logits = torch.zeros(1, 3, 2, 2)
    logits[:, 1] = 1.0
    metrics.update(logits, torch.ones(1, 2, 2, dtype=torch.long))
    assert math.isclose(metrics.compute()["mIoU"], 1.0)
    metrics.reset()
    assert metrics.confmat.sum() == 0


def test_sync_free_update_equals_torchmetrics_confusion_matrix() -> None:
    from torchmetrics.classification import MulticlassConfusionMatrix

    generator = torch.Generator().manual_seed(0)
    preds = torch.randint(0, 5, (3, 17, 23), generator=generator)
    target = torch.randint(0, 5, (3, 17, 23), generator=generator)
    target[torch.rand(target.shape, generator=generator) < 0.2] = 255
    ours = SegmentationMetrics(num_classes=5)
    ours.update(preds, target)
    reference = MulticlassConfusionMatrix(num_classes=5, ignore_index=255)
    reference.update(preds, target)
    assert torch.equal(ours.confmat, reference.compute())
