"""Metrics against a confusion matrix computed by hand."""

from __future__ import annotations

import math

import torch

from segvoc.metrics import SegmentationMetrics, confusion_matrices, describe_confusion, image_scores, top_confusions


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


def test_per_image_confusion_matrices_add_up_to_the_split_matrix() -> None:
    torch.manual_seed(0)
    target = torch.randint(0, 4, (3, 5, 6))
    target[0, 0] = 255  # ignored: counted nowhere
    target[2] = 255  # an image without a labelled pixel
    preds = torch.randint(0, 4, (3, 5, 6))
    per_image = confusion_matrices(preds, target, 4)
    for i in range(3):
        whole = SegmentationMetrics(num_classes=4)
        whole.update(preds[i : i + 1], target[i : i + 1])
        assert torch.equal(per_image[i], whole.confmat)
    assert per_image[2].sum() == 0 and per_image.sum() == (target != 255).sum()


def test_image_scores_of_a_hand_made_image() -> None:
    # truth 0,0,0,0 | 1,1,1 | ignored; predicted 0,0,0,1 | 0,0,2 | 1 (class 2 only predicted)
    target = torch.tensor([[[0, 0, 0, 0, 1, 1, 1, 255]]])
    preds = torch.tensor([[[0, 0, 0, 1, 0, 0, 2, 1]]])
    scores = image_scores(confusion_matrices(preds, target, 3)[0])
    assert scores["pixels"] == 7 and math.isclose(scores["acc"], 3 / 7)
    # class 0: tp 3, truth 4, predicted 5 -> 3 / 6; class 1: tp 0 -> 0; class 2 is not in the truth: not averaged
    assert scores["iou"] == {0: 0.5, 1: 0.0} and math.isclose(scores["mIoU"], 0.25)
    assert scores["confusion"] == (1, 0, 2)  # the largest wrong entry: 2 px of class 1 taken for class 0
    right = image_scores(confusion_matrices(target, target, 3)[0])
    assert right["confusion"] is None and right["mIoU"] == 1.0
    assert math.isnan(image_scores(torch.zeros(3, 3, dtype=torch.long))["mIoU"])


def test_top_confusions_and_their_wording() -> None:
    confmat = torch.tensor([[900, 50, 0], [1_200_000, 2_670_000, 30_000], [0, 0, 10]])
    rows = top_confusions(confmat, ["background", "chair", "sofa"], k=3)
    assert [(r["true"], r["predicted"], r["pixels"]) for r in rows] == [
        ("chair", "background", 1_200_000), ("chair", "sofa", 30_000), ("background", "chair", 50)
    ]  # fmt: skip
    assert describe_confusion(rows[0]) == "chair -> background: 1.2 M px, 31 % of chair"
    assert describe_confusion(rows[1]) == "chair -> sofa: 30.0 k px, 1 % of chair"
    assert len(top_confusions(torch.eye(3, dtype=torch.long), ["a", "b", "c"])) == 0  # nothing confused
