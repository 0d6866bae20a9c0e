"""What the train section runs, and how it is clocked: ``Trainer.fit`` of the configured module, and a plain PyTorch
loop doing the same work per step, against which Lightning's overhead is measured."""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from segvoc.data.transforms import normalize

if TYPE_CHECKING:
    from segvoc.training.module import SegmentationModule

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it covers that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(times: Sequence[float], sizes: Sequence[int], warmup: int, per_step: bool) -> tuple[float, float]:
    """``(images/s, timed seconds)`` of the batches after the first ``warmup``, from the times at the end of each
    batch and the batch sizes.

    ``per_step``: every batch was timed on its own (on a CPU, where nothing runs ahead of the clock), and the rate
    is the median batch over the median batch time, which other processes on a shared machine disturb least.
    Otherwise it is the timed images over the time from the end of batch ``warmup`` to the end of the last.
    """
    if len(times) <= warmup:
        raise RuntimeError(f"only {len(times)} batches ran; {warmup} warm-up batches and at least one more are needed")
    seconds = times[-1] - times[warmup - 1]
    if per_step:
        return float(np.median(sizes[warmup:]) / np.median(np.diff(times[warmup - 1 :]))), seconds
    return sum(sizes[warmup:]) / seconds, seconds


class FixedSamples(Dataset):
    """``length`` items cycling over ``samples``: fixed batches held in memory, so no decoding is timed."""

    def __init__(self, samples: Sequence[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        self.samples = list(samples)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.samples[index % len(self.samples)]


class BatchClock(L.Callback):
    """Records the time at the end of every training or validation batch and the batch's size.

    The device is synchronised before the clock is read after every batch, or, with ``sync_at``, only after the
    batches of those (1-based) counts: the warm-up's last and the run's last, so that the GPU works through the
    timed steps as it does in training, queued ahead of the host.
    """

    def __init__(self, device: torch.device, sync_at: Collection[int] | None = None) -> None:
        self.device = device
        self.sync_at = sync_at
        self.start: float | None = None
        self.times: list[float] = []
        self.sizes: list[int] = []

    def _tick(self, batch: Any) -> None:
        if self.sync_at is None or len(self.times) + 1 in self.sync_at:
            synchronize(self.device)
        self.times.append(time.perf_counter())
        self.sizes.append(int(batch[0].shape[0]))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._tick(batch)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._tick(batch)

    def rate(self, warmup: int) -> tuple[float, float]:
        """``(images/s, timed seconds)`` after the first ``warmup`` batches (``throughput``: per batch on a CPU)."""
        return throughput(self.times, self.sizes, warmup, per_step=self.device.type == "cpu")


class SeedFirstStep(L.Callback):
    """Seeds torch's generator just before the first training step, where ``plain_training`` seeds it too, so
    that both loops draw the same dropout masks."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == 0 and trainer.current_epoch == 0:
            torch.manual_seed(self.seed)


@dataclass
class TrainSetting:
    """One point of the training grid: a Lightning precision, ``model.channels_last`` and ``model.compile``."""

    precision: str
    channels_last: bool
    compile: bool

    @property
    def label(self) -> str:
        """``<precision> channels_last=on|off compile=on|off``: the setting's part of a figure's name."""
        return (
            f"{self.precision} channels_last={'on' if self.channels_last else 'off'} "
            f"compile={'on' if self.compile else 'off'}"
        )


def training_overrides(setting: TrainSetting, steps: int) -> list[str]:
    """The training-config overrides that make ``Trainer.fit`` run ``steps`` steps of ``setting``."""
    return [
        f"trainer.max_steps={steps}",
        f"trainer.precision={setting.precision}",
        f"model.channels_last={setting.channels_last}",
        f"model.compile={setting.compile}",
    ]


def lightning_training(
    cfg: DictConfig, loader: DataLoader, device: torch.device, warmup: int, seed: int = 0
) -> tuple[L.LightningModule, BatchClock]:
    """``Trainer.fit`` of the configured ``SegmentationModule`` over ``loader`` (``cfg.trainer.max_steps`` steps),
    with the configured loggers and no validation or checkpoints. Returns the trained module and its clock, whose
    ``start`` is the time ``fit`` was called."""
    if cfg.model.get("compile"):
        from torch import _dynamo

        _dynamo.reset()  # each compiled run compiles from scratch (Inductor's on-disk caches stay)
    torch.manual_seed(seed)
    module = instantiate(cfg.model)
    steps = cfg.trainer.max_steps
    clock = BatchClock(device, sync_at={warmup, steps})
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer = instantiate(
        cfg.trainer,
        callbacks=[clock, SeedFirstStep(seed)],
        logger=loggers or False,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    clock.start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    return module, clock


def plain_training(
    module: SegmentationModule,
    loader: DataLoader,
    device: torch.device,
    setting: TrainSetting,
    mean: Sequence[float],
    std: Sequence[float],
    warmup: int,
    seed: int = 0,
) -> list[float]:
    """Train ``module.net`` over ``loader`` without Lightning, doing what ``SegmentationModule`` and Lightning's
    loop do per step: batch to the device, normalise (``on_after_batch_transfer``), forward and the module's
    ``loss`` under the precision's autocast, train-metric update, zero_grad, backward (gradient scaling for
    ``16-mixed``), optimizer step and scheduler step. Lightning's logging, callbacks and hooks are what it leaves out.

    ``module`` is built without channels_last/compile; ``setting`` applies them here as
    ``SegmentationModule.configure_model`` does (NHWC weights, ``nn.Module.compile`` in place). Returns the time at
    the end of every step; the device is synchronised after step ``warmup`` and after the last.
    """
    if setting.precision not in PRECISIONS:
        raise ValueError(f"the plain loop does not implement precision {setting.precision}")
    module.to(device).train()
    net = module.net
    if setting.channels_last:
        net.to(memory_format=torch.channels_last)
    if setting.compile:
        net.compile()
    configured = module.configure_optimizers()
    optimizer = configured["optimizer"]
    scheduler = configured.get("lr_scheduler", {}).get("scheduler")
    autocast_dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(setting.precision)
    scaler = torch.amp.GradScaler(device.type) if setting.precision == "16-mixed" else None
    mean_t, std_t = (torch.tensor(v, device=device) for v in (mean, std))
    steps = len(loader)
    times = []
    for step, (images, masks) in enumerate(loader):
        images = normalize(images.to(device, non_blocking=True), mean_t, std_t)  # as Lightning moves a batch
        masks = masks.to(device, non_blocking=True).long()
        if setting.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if step == 0:
            torch.manual_seed(seed)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = net(images)
            loss = module.loss(logits, masks)
        module.train_metrics.update(logits.detach().argmax(dim=1), masks)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        del images, masks, logits, loss  # freed before the next batch, as Lightning's loop frees them
        if step + 1 in (warmup, steps):
            synchronize(device)
        times.append(time.perf_counter())
    return times


def write_checkpoint(cfg: DictConfig, path: Path) -> Path:
    """Save the configured module, freshly built with seed 0, as a checkpoint ``segvoc.tasks.predict`` loads: its
    state dict and what Lightning adds through ``on_save_checkpoint`` (network spec, classes, normalisation)."""
    torch.manual_seed(0)
    module = instantiate(cfg.model)
    checkpoint: dict[str, Any] = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path
