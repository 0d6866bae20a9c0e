"""The LightningModule: loss, optimisation schedule, validation through the shared inference routine, per-image
diagnostics, logging, weight averaging."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from torch import nn

from segvoc.checkpoints.format import META_KEY, describe
from segvoc.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize
from segvoc.files import atomic_write_text
from segvoc.losses import CrossEntropy
from segvoc.metrics import SegmentationMetrics, confusion_matrices, image_scores
from segvoc.models.inference import crop_to_sizes, infer
from segvoc.palette import IGNORE_INDEX, class_palette, default_class_names
from segvoc.visualize import confusion_image, denormalize, diagnostic_panel, panel, present_classes, with_legend

log = logging.getLogger(__name__)


def logged_metric_names(class_names: Sequence[str]) -> list[str]:
    """The names of the metrics a training run logs (``trainer.callback_metrics``), for ``class_names``."""
    return [
        "train/loss", "train/mIoU", "lr", "val/loss", "val/mIoU", "val/acc", "val/mean_acc", "val/fw_iou",
        *(f"val/iou/{name}" for name in class_names),
    ]  # fmt: skip


class SegmentationModule(L.LightningModule):
    """Trains a segmentation network with ``loss`` (a ``segvoc.losses`` module built from ``conf/loss``; None:
    plain cross-entropy), the one loss of training, validation, evaluation and ``segvoc.bench``.

    ``optimizer`` and ``scheduler`` are partials (Hydra ``_partial_: true``) bound to the parameters here: the
    backbone gets ``lr * backbone_lr_mult``, the head ``lr``; the scheduler is stepped every iteration. Validation
    runs ``segvoc.models.inference.infer`` with the ``inference`` options (``scales``, ``flip``, ``window``,
    ``overlap``).
    Logged: ``train/loss``, ``train/mIoU``, ``lr``, ``val/loss``, ``val/mIoU``, ``val/acc``, ``val/mean_acc``,
    ``val/fw_iou``, ``val/iou/<class>``; to TensorBoard also the first ``num_val_images`` validation images as
    image | ground truth | prediction | overlay with a legend of the classes present, and the labelled confusion
    matrix, once per validation. With ``save_val_dir`` every validation image's panel is written there as
    ``<image id>.png``.

    With ``report_dir`` (default: the folder above ``save_val_dir``) every validation also writes the per-image
    report ``<report_dir>/per_image<report_tag>.csv`` (see ``write_per_image``) and the ``num_worst_images``
    images of lowest per-image mIoU as image | truth | prediction | errors panels to
    ``<report_dir>/worst<report_tag>/`` and TensorBoard (``worst/<rank>``).

    ``ema``: ``{"decay": 0.9999, "start_step": 0, "device": None, "average_buffers": False}`` keeps an
    exponential moving average of the weights during ``fit`` (``segvoc.training.ema.EMA``, returned by
    ``configure_callbacks``); ``decay: null`` is off. ``val_confmat`` holds the whole split's confusion matrix of
    the last validation.
    """

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module | None = None,
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
        ema: Mapping[str, Any] | None = None,
        report_dir: str | None = None,
        report_tag: str = "",
        num_worst_images: int = 8,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler", "loss"])
        self.net = net
        self.criterion = loss if loss is not None else CrossEntropy(ignore_index)
        self.ema = {k: v for k, v in (ema or {}).items() if v is not None}
        self.report_dir = Path(report_dir) if report_dir else (Path(save_val_dir).parent if save_val_dir else None)
        self.report_tag = report_tag
        self.num_worst_images = num_worst_images
        self._per_image: list[dict[str, Any]] = []
        self._worst: list[tuple[float, str, np.ndarray, np.ndarray, np.ndarray]] = []
        self.val_confmat: torch.Tensor | None = None
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
        """The one loss of training, validation, evaluation and ``segvoc.bench``'s plain loop: the configured
        ``segvoc.losses`` module applied to ``logits`` (N, C, H, W) and int64 ``masks`` (N, H, W), ``ignore_index``
        pixels skipped."""
        return self.criterion(logits, masks)

    def configure_callbacks(self) -> list[L.Callback]:
        """The EMA callback when ``ema.decay`` is set and the trainer fits (validation alone has nothing to average:
        a checkpoint of an EMA run already holds the averaged weights)."""
        if self.ema.get("decay") is None or self._trainer is None or self.trainer.state.fn != "fit":
            return []
        from segvoc.training.ema import EMA

        return [EMA(**self.ema)]

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

    def _val_ids(self, batch_idx: int, first: int, count: int) -> list[str]:
        """The dataset ids of the images of validation batch ``batch_idx`` (the val dataset's ``ids``, in the order
        of the data module's batch sampler); running numbers ``00000``... for a loader that does not tell."""
        loader = self.trainer.val_dataloaders if self._trainer is not None else None
        ids = getattr(getattr(loader, "dataset", None), "ids", None)
        batches = getattr(getattr(loader, "batch_sampler", None), "batches", None)
        if ids is not None and batches is not None and batch_idx < len(batches) and len(batches[batch_idx]) == count:
            return [str(ids[i]) for i in batches[batch_idx]]
        return [f"{first + k:05d}" for k in range(count)]

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor, list], batch_idx: int) -> None:
        images, masks, sizes = batch
        logits = infer(self.net, images, **self.inference)
        self.log("val/loss", self.loss(logits, masks), batch_size=images.shape[0], sync_dist=True)
        preds = logits.argmax(dim=1)
        self.val_metrics.update(preds, masks)
        first, self._val_seen = self._val_seen, self._val_seen + images.shape[0]
        report = self.report_dir is not None and not self.trainer.sanity_checking
        if not report and self.save_val_dir is None and first >= self.num_val_images:
            return
        ids = self._val_ids(batch_idx, first, images.shape[0])
        mean, std = self._normalisation()
        if report:  # one (C, C) matrix per image, one copy to the host per batch; padding is ignore_index: not counted
            confmats = confusion_matrices(preds, masks, len(self.class_names), self.ignore_index).cpu()
        crops = zip(crop_to_sizes(images, sizes), crop_to_sizes(masks, sizes), crop_to_sizes(preds, sizes), strict=True)
        for offset, (image, mask, pred) in enumerate(crops):
            index, name = first + offset, ids[offset]
            show = index < self.num_val_images
            rgb = truth = guess = None
            if report:
                scores = image_scores(confmats[offset])
                self._per_image.append({"id": name, "size": tuple(sizes[offset]), **scores})
                score = scores["mIoU"]
                kept = self._worst  # sorted, best of the worst last
                if score == score and (len(kept) < self.num_worst_images or (kept and score < kept[-1][0])):
                    rgb, truth, guess = denormalize(image, mean, std), mask.cpu().numpy(), pred.cpu().numpy()
                    self._worst.append((score, name, rgb, truth.astype(np.uint8), guess.astype(np.uint8)))
                    self._worst.sort(key=lambda entry: (entry[0], entry[1]))
                    del self._worst[self.num_worst_images :]
            if not show and self.save_val_dir is None:
                continue
            if rgb is None:
                rgb, truth, guess = denormalize(image, mean, std), mask.cpu().numpy(), pred.cpu().numpy()
            picture = panel(rgb, truth, guess, self.palette, self.ignore_index)
            if show:
                classes = present_classes(truth, guess, num_classes=len(self.class_names))
                self._val_panels.append(with_legend(picture, classes, self.class_names, self.palette))
            if self.save_val_dir is not None:
                self.save_val_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(picture).save(self.save_val_dir / f"{name}.png")

    def on_validation_epoch_start(self) -> None:
        self._val_seen = 0
        self._per_image, self._worst = [], []

    def on_validation_epoch_end(self) -> None:
        scores = self.val_metrics.compute()  # of the whole split: the confusion matrix is summed across processes
        with self.val_metrics.sync_context():  # the summed matrix for the picture too (compute() restores this one's)
            confmat = self.val_metrics.confmat.clone()
        self.val_metrics.reset()
        self.val_scores = scores
        self.val_confmat = confmat.cpu()
        summary = {f"val/{key}": scores[key].float() for key in ("mIoU", "acc", "mean_acc", "fw_iou")}
        self.log_dict(summary, prog_bar=True, sync_dist=True, reduce_fx="max")  # the same in every process
        per_class = {
            f"val/iou/{name}": scores["iou"][i].float()
            for i, name in enumerate(self.class_names)
            if not torch.isnan(scores["iou"][i])
        }
        self.log_dict(per_class, sync_dist=True, reduce_fx="max")
        panels, self._val_panels = self._val_panels, []
        if self.trainer.sanity_checking:
            return
        rows, worst = self._gather_report()
        if not self.trainer.is_global_zero:
            return
        worst_panels = self._write_report(rows, worst)
        if self.save_val_dir is not None:
            log.info("Validation panels (image | truth | prediction | overlay) written to %s", self.save_val_dir)
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                step = self.global_step
                for i, picture in enumerate(panels):
                    logger.experiment.add_image(f"val/sample_{i}", picture, step, dataformats="HWC")
                picture = confusion_image(confmat, self.class_names)
                logger.experiment.add_image("val/confusion_matrix", picture, step, dataformats="HWC")
                for i, picture in enumerate(worst_panels):
                    logger.experiment.add_image(f"worst/{i}", picture, step, dataformats="HWC")

    def _gather_report(self) -> tuple[list[dict[str, Any]], list[tuple]]:
        """Every process's per-image rows and worst-image candidates, in rank 0 (``[]`` without a report)."""
        rows, worst = self._per_image, self._worst
        self._per_image, self._worst = [], []
        if self.report_dir is None:
            return [], []
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, (rows, worst))
            rows = [row for part, _ in gathered for row in part]
            worst = sorted((entry for _, part in gathered for entry in part), key=lambda entry: (entry[0], entry[1]))
        return rows, worst[: self.num_worst_images]

    def _write_report(self, rows: list[dict[str, Any]], worst: list[tuple]) -> list[np.ndarray]:
        """Write ``per_image<tag>.csv`` and the worst images' panels under ``report_dir``; return the panels."""
        if self.report_dir is None:
            return []
        path = self.report_dir / f"per_image{self.report_tag}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, per_image_csv(rows, self.class_names))
        folder = self.report_dir / f"worst{self.report_tag}"
        folder.mkdir(exist_ok=True)
        for old in folder.glob("*.png"):  # the last validation's worst images only
            old.unlink()
        pictures = []
        for rank, (_, name, rgb, truth, guess) in enumerate(worst, start=1):
            picture = diagnostic_panel(rgb, truth, guess, self.class_names, self.palette, self.ignore_index)
            Image.fromarray(picture).save(folder / f"{rank:02d}_{name}.png")
            pictures.append(picture)
        log.info("Per-image report written to %s, the %d worst images to %s", path, len(pictures), folder)
        return pictures

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


def per_image_csv(rows: Sequence[Mapping[str, Any]], class_names: Sequence[str]) -> str:
    """The per-image report as CSV text, worst image (lowest mIoU) first, images without a labelled pixel last.

    Columns: ``id``, ``height``, ``width``, ``pixels`` (not ignored), ``pixel_acc``, ``mIoU`` (over the classes in
    the image's ground truth), ``main_confusion`` (``true -> predicted``, the largest off-diagonal entry of the
    image's confusion matrix), ``confusion_pixels``, then ``iou/<class>`` for every class (empty where the class
    is not in the image's ground truth).
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["id", "height", "width", "pixels", "pixel_acc", "mIoU", "main_confusion", "confusion_pixels"]
        + [f"iou/{name}" for name in class_names]
    )

    def order(row: Mapping[str, Any]) -> tuple[bool, float, str]:
        return (row["mIoU"] != row["mIoU"], row["mIoU"], row["id"])

    def number(value: float) -> str:
        return "" if value != value else f"{value:.4f}"

    for row in sorted(rows, key=order):
        confusion = row["confusion"]
        main = f"{class_names[confusion[0]]} -> {class_names[confusion[1]]}" if confusion else ""
        ious = [number(row["iou"][c]) if c in row["iou"] else "" for c in range(len(class_names))]
        writer.writerow(
            [row["id"], *row["size"], row["pixels"], number(row["acc"]), number(row["mIoU"]), main,
             confusion[2] if confusion else 0, *ious]
        )  # fmt: skip
    return out.getvalue()
