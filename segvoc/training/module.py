"""The LightningModule: loss, optimisation schedule, validation through the shared inference routine, logging."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from torch import nn

from segvoc.checkpoints.format import META_KEY, describe
from segvoc.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize
from segvoc.metrics import SegmentationMetrics
from segvoc.models.inference import crop_to_sizes, infer
from segvoc.palette import IGNORE_INDEX, class_palette, default_class_names
from segvoc.visualize import confusion_image, denormalize, panel


def logged_metric_names(class_names: Sequence[str]) -> list[str]:
    """The names of the metrics a training run logs (``trainer.callback_metrics``), for ``class_names``."""
    return [
        "train/loss", "train/mIoU", "lr", "val/loss", "val/mIoU", "val/acc", "val/mean_acc", "val/fw_iou",
        *(f"val/iou/{name}" for name in class_names),
    ]  # fmt: skip


class SegmentationModule(L.LightningModule):
    """Trains a segmentation network with pixel-wise cross-entropy (``ignore_index`` pixels skipped).

    ``optimizer`` and ``scheduler`` are partials (Hydra ``_partial_: true``) bound to the parameters here: the
    backbone gets ``lr * backbone_lr_mult``, the head ``lr``; the scheduler is stepped every iteration. Validation
    runs ``segvoc.models.inference.infer`` with the ``inference`` options (``scales``, ``flip``, ``window``,
    ``overlap``).
    Logged: ``train/loss``, ``train/mIoU``, ``lr``, ``val/loss``, ``val/mIoU``, ``val/acc``, ``val/mean_acc``,
    ``val/fw_iou``, ``val/iou/<class>``; to TensorBoard also the first ``num_val_images`` validation images as
    image | ground truth | prediction | overlay, and the confusion matrix. With ``save_val_dir`` every validation
    image's panel is written there as ``<index>.png``.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        num_classes: int = 21,
        class_names: Sequence[str] | None = None,
        ignore_index: int = IGNORE_INDEX,
        palette: Sequence[Sequence[int]] | None = None,
        backbone_lr_mult: float = 1.0,
        inference: dict[str, Any] | None = None,
        num_val_images: int = 4,
        save_val_dir: str | None = None,
        channels_last: bool = False,
        compile: bool | dict[str, Any] = False,
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
        self.palette = class_palette(num_classes, palette).tolist()  # None: the VOC colours
        self.backbone_lr_mult = backbone_lr_mult
        self.inference = dict(inference or {})
        self.num_val_images = num_val_images
        self.save_val_dir = Path(save_val_dir) if save_val_dir else None
        self.channels_last = channels_last
        self.compile_net = compile
        self._norm: tuple[torch.Tensor, ...] | None = None
        self._shown_loss: torch.Tensor | None = None
        self.train_metrics = SegmentationMetrics(num_classes, ignore_index)
        self.val_metrics = SegmentationMetrics(num_classes, ignore_index)
        self.val_scores: dict[str, torch.Tensor] = {}
        self._val_panels: list[Any] = []
        self._val_seen = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def configure_model(self) -> None:
        """Apply ``channels_last`` (NHWC weights and inputs: faster convolutions on tensor cores) and ``compile``
        (``nn.Module.compile``: the network is compiled in place, so checkpoint keys do not change). ``compile`` is
        ``True`` for ``torch.compile``'s defaults or a mapping of its keyword arguments (``mode``, ``backend``, ...)."""
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.compile_net and getattr(self.net, "_compiled_call_impl", None) is None:
            options = dict(self.compile_net) if isinstance(self.compile_net, Mapping) else {}
            self.net.compile(**options)

    def on_after_batch_transfer(self, batch: Sequence[Any], dataloader_idx: int) -> Sequence[Any]:
        """On the device: uint8 images -> normalised float (``segvoc.data.transforms.normalize``), uint8 masks ->
        int64, NHWC memory with ``channels_last``. The loader ships uint8, a quarter of the float bytes."""
        images, masks, *rest = batch
        if self._norm is None or self._norm[0].device != images.device:
            self._norm = tuple(torch.tensor(v, device=images.device) for v in self._normalisation())
        images = normalize(images, *self._norm)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return (images, masks.long(), *rest)

    def loss(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The one loss of training, validation and ``segvoc.bench``'s plain loop: the mean pixel-wise
        cross-entropy of ``logits`` (N, C, H, W) against int64 ``masks`` (N, H, W), ``ignore_index`` pixels skipped."""
        return F.cross_entropy(logits, masks, ignore_index=self.ignore_index)

    def _normalisation(self) -> tuple[Sequence[float], Sequence[float]]:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(datamodule, "mean", IMAGENET_MEAN), getattr(datamodule, "std", IMAGENET_STD)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, masks = batch
        logits = self(images)
        loss = self.loss(logits, masks)
        self.train_metrics.update(logits.detach().argmax(dim=1), masks)
        self.log("train/loss", loss, sync_dist=True)  # under DDP: the mean over the processes
        # Lightning reads every progress-bar value with .item() after every step, which makes the host wait for the
        # GPU; the bar gets CPU tensors instead: the loss copied at the logging steps (when the logger reads it
        # anyway) and the learning rate (a Python float would be copied to the GPU, another wait)
        if self._shown_loss is None or (self.global_step + 1) % max(self.trainer.log_every_n_steps, 1) == 0:
            self._shown_loss = loss.detach().float().cpu()
        self.log("loss", self._shown_loss, prog_bar=True, logger=False)
        self.log("lr", torch.tensor(self.optimizers().param_groups[0]["lr"]), prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        # metrics of the confusion matrix summed across processes are the same in each: "max" syncs them exactly
        self.log("train/mIoU", self.train_metrics.compute()["mIoU"].float(), sync_dist=True, reduce_fx="max")
        self.train_metrics.reset()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor, list], batch_idx: int) -> None:
        images, masks, sizes = batch
        logits = infer(self.net, images, **self.inference)
        self.log("val/loss", self.loss(logits, masks), batch_size=images.shape[0], sync_dist=True)
        preds = logits.argmax(dim=1)
        self.val_metrics.update(preds, masks)
        first, self._val_seen = self._val_seen, self._val_seen + images.shape[0]
        if self.save_val_dir is None and first >= self.num_val_images:
            return
        mean, std = self._normalisation()
        crops = zip(crop_to_sizes(images, sizes), crop_to_sizes(masks, sizes), crop_to_sizes(preds, sizes), strict=True)
        for offset, (image, mask, pred) in enumerate(crops):
            picture = panel(
                denormalize(image, mean, std), mask.cpu().numpy(), pred.cpu().numpy(), self.palette, self.ignore_index
            )
            if first + offset < self.num_val_images:
                self._val_panels.append(picture)
            if self.save_val_dir is not None:
                self.save_val_dir.mkdir(parents=True, exist_ok=True)
                rank = f"rank{self.global_rank}_" if self.trainer.world_size > 1 else ""  # each process: its images
                Image.fromarray(picture).save(self.save_val_dir / f"{rank}{first + offset:05d}.png")

    def on_validation_epoch_start(self) -> None:
        self._val_seen = 0

    def on_validation_epoch_end(self) -> None:
        scores = self.val_metrics.compute()  # of the whole split: the confusion matrix is summed across processes
        with self.val_metrics.sync_context():  # the summed matrix for the picture too (compute() restores this one's)
            confmat = self.val_metrics.confmat.clone()
        self.val_metrics.reset()
        self.val_scores = scores
        summary = {f"val/{key}": scores[key].float() for key in ("mIoU", "acc", "mean_acc", "fw_iou")}
        self.log_dict(summary, prog_bar=True, sync_dist=True, reduce_fx="max")  # the same in every process
        per_class = {
            f"val/iou/{name}": scores["iou"][i].float()
            for i, name in enumerate(self.class_names)
            if not torch.isnan(scores["iou"][i])
        }
        self.log_dict(per_class, sync_dist=True, reduce_fx="max")
        panels, self._val_panels = self._val_panels, []
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                step = self.global_step
                for i, picture in enumerate(panels):
                    logger.experiment.add_image(f"val/sample_{i}", picture, step, dataformats="HWC")
                logger.experiment.add_image("val/confusion_matrix", confusion_image(confmat), step, dataformats="HWC")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Make the checkpoint self-describing: network spec, class names, palette, ignore index, normalisation."""
        mean, std = self._normalisation()
        checkpoint[META_KEY] = describe(self.net, self.class_names, mean, std, self.palette, self.ignore_index)

    def configure_optimizers(self) -> dict[str, Any]:
        if self.optimizer_factory is None:
            raise ValueError("SegmentationModule was built without an optimizer; it can validate but not train")
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
