"""The LightningModule: loss, optimisation schedule, and the metrics logged to TensorBoard."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from segvoc.metrics import SegmentationMetrics
from segvoc.palette import IGNORE_INDEX, VOC_CLASSES


def default_class_names(num_classes: int) -> list[str]:
    """VOC's names for 21 classes, ``class_<i>`` otherwise."""
    return list(VOC_CLASSES) if num_classes == len(VOC_CLASSES) else [f"class_{i}" for i in range(num_classes)]


class SegmentationModule(L.LightningModule):
    """Trains a segmentation network with pixel-wise cross-entropy (``ignore_index`` pixels skipped).

    ``optimizer`` and ``scheduler`` are partials (Hydra ``_partial_: true``) bound to the parameters here: the
    backbone gets ``lr * backbone_lr_mult``, the head ``lr``; the scheduler is stepped every iteration.
    Logged: ``train/loss``, ``train/mIoU``, ``lr``, ``val/loss``, ``val/mIoU``, ``val/acc``, ``val/mean_acc``,
    ``val/fw_iou`` and ``val/iou/<class>``.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        num_classes: int = 21,
        class_names: Sequence[str] | None = None,
        ignore_index: int = IGNORE_INDEX,
        backbone_lr_mult: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.class_names = list(class_names) if class_names is not None else default_class_names(num_classes)
        if len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names given for num_classes={num_classes}")
        self.ignore_index = ignore_index
        self.backbone_lr_mult = backbone_lr_mult
        self.train_metrics = SegmentationMetrics(num_classes, ignore_index)
        self.val_metrics = SegmentationMetrics(num_classes, ignore_index)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def _loss(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, masks, ignore_index=self.ignore_index)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, masks = batch
        logits = self(images)
        loss = self._loss(logits, masks)
        self.train_metrics.update(logits.detach().argmax(dim=1), masks)
        self.log("train/loss", loss, prog_bar=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"], prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("train/mIoU", self.train_metrics.compute()["mIoU"].float())
        self.train_metrics.reset()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, masks = batch
        logits = self(images)
        self.log("val/loss", self._loss(logits, masks), batch_size=images.shape[0])
        self.val_metrics.update(logits.argmax(dim=1), masks)

    def on_validation_epoch_end(self) -> None:
        scores = self.val_metrics.compute()
        self.val_metrics.reset()
        summary = {f"val/{key}": scores[key].float() for key in ("mIoU", "acc", "mean_acc", "fw_iou")}
        self.log_dict(summary, prog_bar=True)
        per_class = {
            f"val/iou/{name}": scores["iou"][i].float()
            for i, name in enumerate(self.class_names)
            if not torch.isnan(scores["iou"][i])
        }
        self.log_dict(per_class)

    def configure_optimizers(self) -> dict[str, Any]:
        backbone = getattr(self.net, "backbone", None)
        backbone_params = {id(p) for p in backbone.parameters()} if backbone is not None else set()
        head = [p for p in self.net.parameters() if id(p) not in backbone_params]
        groups: list[dict[str, Any]] = [{"params": head}]
        if backbone is not None:
            groups.append({"params": list(backbone.parameters()), "lr_mult": self.backbone_lr_mult})
        optimizer = self.optimizer_factory(groups)
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * group.pop("lr_mult", 1.0)
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
