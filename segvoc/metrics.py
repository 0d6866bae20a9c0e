"""The one implementation of the segmentation metrics: a confusion matrix accumulated over a whole split."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics.classification import MulticlassJaccardIndex

from segvoc.palette import IGNORE_INDEX


class SegmentationMetrics(MulticlassJaccardIndex):
    """Overall Acc, Mean Acc, FreqW Acc, Mean IoU and per-class IoU from one confusion matrix.

    ``update(preds, target)`` takes class indices ``(N, H, W)`` or logits ``(N, C, H, W)`` and targets ``(N, H, W)``
    in which ``ignore_index`` pixels are skipped. The matrix lives on the module's device and is summed across
    processes. ``compute()`` returns a dict of scalars (``acc``, ``mean_acc``, ``fw_iou``, ``mIoU``) plus
    ``iou``, ``class_acc`` and ``gt_pixels`` vectors; a class counts towards the means only if it occurs in the
    ground truth (accuracies, frequency weights) or in the ground truth or prediction (mIoU).
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__(num_classes=num_classes, average="none", ignore_index=ignore_index, validate_args=False)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:  # type: ignore[override]
        """Add a batch to the confusion matrix without a host-device synchronisation (torchmetrics' own update
        selects the non-ignored pixels by boolean indexing, which waits for the GPU at every training step).

        Ignored pixels, and labels outside ``0..C-1``, which the dataset check refuses up front, are counted in a
        spill bin that is dropped.
        """
        if preds.dim() == target.dim() + 1:
            preds = preds.argmax(dim=1)
        n = self.num_classes
        target = target.long()
        index = torch.where((target >= 0) & (target < n), target * n + preds.long(), n * n).flatten()
        if torch.are_deterministic_algorithms_enabled() and index.is_cuda:
            counts = torch.bincount(index, minlength=n * n + 1)  # deterministic on CUDA, at the cost of a sync
        else:
            counts = torch.zeros(n * n + 1, dtype=self.confmat.dtype, device=index.device)
            counts.index_add_(0, index, torch.ones((), dtype=counts.dtype, device=index.device).expand(index.numel()))
        self.confmat += counts[:-1].view(n, n).to(self.confmat.dtype)

    def compute(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        # Once per epoch, a (C, C) copy to the host: float64 keeps pixel counts of a whole split exact.
        confmat = self.confmat.to("cpu", torch.float64)  # rows: ground truth, columns: prediction
        tp = confmat.diag()
        gt = confmat.sum(dim=1)
        pred = confmat.sum(dim=0)
        union = gt + pred - tp
        total = confmat.sum()
        present = union > 0
        in_gt = gt > 0
        iou = torch.where(present, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        class_acc = torch.where(in_gt, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
        freq = gt / total.clamp(min=1)
        return {
            "acc": tp.sum() / total.clamp(min=1),
            "mean_acc": class_acc[in_gt].mean() if in_gt.any() else tp.new_tensor(0.0),
            "fw_iou": (freq[in_gt] * iou[in_gt]).sum(),
            "mIoU": iou[present].mean() if present.any() else tp.new_tensor(0.0),
            "iou": iou,
            "class_acc": class_acc,
            "gt_pixels": gt,
        }


def confusion_matrices(
    preds: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """One ``(C, C)`` pixel-count confusion matrix per image of a batch: ``(N, C, C)`` int64 on the input's device,
    rows ground truth, columns prediction. ``preds`` and ``target`` are ``(N, H, W)`` class indices; pixels whose
    target is ``ignore_index`` (or outside ``0..C-1``) are not counted. One ``bincount`` for the whole batch."""
    n, c = target.shape[0], num_classes
    target = target.long().flatten(1)
    valid = (target >= 0) & (target < c) & (target != ignore_index)
    image = torch.arange(n, device=target.device)[:, None]
    index = torch.where(valid, image * c * c + target * c + preds.long().flatten(1), n * c * c)
    return torch.bincount(index.flatten(), minlength=n * c * c + 1)[:-1].view(n, c, c)


def image_scores(confmat: torch.Tensor) -> dict[str, Any]:
    """The diagnostic figures of one image from its ``(C, C)`` confusion matrix (rows truth, columns prediction).

    ``pixels``: the non-ignored pixels; ``acc``: their share predicted right; ``iou``: ``{class index: IoU}`` for
    each class present in the image's ground truth; ``mIoU``: their mean (NaN when every pixel is ignored);
    ``confusion``: ``(true class, predicted class, pixels)`` of the largest off-diagonal entry, or None when no
    pixel is wrong.
    """
    counts = confmat.to("cpu", torch.float64)
    tp, gt, pred = counts.diag(), counts.sum(dim=1), counts.sum(dim=0)
    total = float(gt.sum())
    present = torch.nonzero(gt > 0).flatten().tolist()
    iou = {c: float(tp[c] / (gt[c] + pred[c] - tp[c])) for c in present}
    off = counts.clone()
    off.fill_diagonal_(0)
    worst = int(off.argmax())
    true, predicted = divmod(worst, counts.shape[1])
    wrong = int(off[true, predicted])
    return {
        "pixels": int(total),
        "acc": float(tp.sum() / total) if total else math.nan,
        "iou": iou,
        "mIoU": sum(iou.values()) / len(iou) if iou else math.nan,
        "confusion": (true, predicted, wrong) if wrong else None,
    }


def top_confusions(confmat: torch.Tensor, class_names: Sequence[str], k: int = 10) -> list[dict[str, Any]]:
    """The ``k`` largest off-diagonal entries of a whole-split confusion matrix (rows truth, columns prediction),
    largest first: ``{"true", "predicted", "pixels", "share"}``, ``share`` being the part of the true class's pixels
    that went to the predicted class. Entries of 0 pixels are left out."""
    counts = confmat.to("cpu", torch.float64)
    gt = counts.sum(dim=1)
    off = counts.clone()
    off.fill_diagonal_(0)
    values, flat = off.flatten().topk(min(k, off.numel()))
    rows = []
    for value, index in zip(values.tolist(), flat.tolist(), strict=True):
        if value <= 0:
            break
        true, predicted = divmod(index, counts.shape[1])
        rows.append(
            {
                "true": class_names[true],
                "predicted": class_names[predicted],
                "pixels": int(value),
                "share": value / float(gt[true]),
            }
        )
    return rows


def describe_confusion(row: dict[str, Any]) -> str:
    """``"chair -> background: 1.2 M px, 31 % of chair"`` for a ``top_confusions`` row."""
    pixels = row["pixels"]
    amount = f"{pixels / 1e6:.1f} M" if pixels >= 1e6 else f"{pixels / 1e3:.1f} k" if pixels >= 1e3 else f"{pixels}"
    return f"{row['true']} -> {row['predicted']}: {amount} px, {100 * row['share']:.0f} % of {row['true']}"
