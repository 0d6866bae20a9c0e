"""The one implementation of the segmentation metrics: a confusion matrix accumulated over a whole split."""

from __future__ import annotations

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
