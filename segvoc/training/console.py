"""What a run prints: progress counted in the iterations of ``trainer.max_steps``, the model summary with the real
forward FLOPs, and without the library messages that ask nothing of the user (``quiet_libraries``)."""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBar
from torch.utils.flop_counter import FlopCounterMode

# Messages of Lightning that have nothing for a segvoc user to act on; each matched exactly, nothing else silenced.
# - advertisements for Lightning's cloud services, at Trainer construction;
# - segvoc's SegmentationModule normalises batches in on_after_batch_transfer, with a LightningDataModule, on purpose;
# - Lightning's own use of a torch API that torch deprecated (lightning/pytorch/utilities/_pytree.py);
# - training is counted in iterations across epochs (trainer.max_steps), so a short epoch does not keep
#   trainer.log_every_n_steps from logging: Lightning counts logging steps over the whole run.
LIGHTNING_TIPS = re.compile(r"💡 Tip: ")
LIGHTNING_WARNINGS = (
    r"You have overridden `on_after_batch_transfer` in `LightningModule` but have passed in a `LightningDataModule`",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"The number of training batches \(\d+\) is smaller than the logging interval",
)
# where Lightning's rank_zero_info messages (the tips) are logged
LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not LIGHTNING_TIPS.match(record.getMessage())


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Within the block, drop the messages listed in ``LIGHTNING_WARNINGS`` and Lightning's tips, and nothing else:
    every other warning and log line, among them all that ask the user to do something, still shows.

    (albumentations' update check, a network request at import, is turned off where segvoc imports it:
    ``segvoc.data.transforms``.)
    """
    drop_tips = _DropTips()
    loggers = [logging.getLogger(name) for name in LIGHTNING_INFO_LOGGERS]
    for logger in loggers:
        logger.addFilter(drop_tips)
    try:
        with warnings.catch_warnings():
            for message in LIGHTNING_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop_tips)


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, counting training in iterations: ``Training 1200/30000`` with the rate
    (it/s), the time spent and the time left, over the whole run (``trainer.max_steps``) instead of per epoch;
    a resumed run starts at its step. Validation keeps Lightning's own bar. Without ``trainer.max_steps`` (-1)
    it counts the batches of each epoch, as Lightning's bar does.
    """

    description = "Training"

    def _steps_total(self, trainer: L.Trainer) -> int | None:
        return trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None

    def _get_train_description(self, current_epoch: int) -> str:
        if self._steps_total(self.trainer) is None:
            return super()._get_train_description(current_epoch)
        return f"{self.description:{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._steps_total(trainer) is None or self.train_progress_bar_id is None or self.progress is None:
            super().on_train_epoch_start(trainer, pl_module)  # the first epoch creates the bar
        if self.train_progress_bar_id is not None and self.progress is not None and self._steps_total(trainer):
            self.progress.update(
                self.train_progress_bar_id, total=self._steps_total(trainer), completed=trainer.global_step
            )
            self.refresh()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._steps_total(trainer) is None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        if not self.is_disabled and self.train_progress_bar_id is None:  # resumed in the middle of an epoch
            self.on_train_epoch_start(trainer, pl_module)
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()


def forward_flops(module: L.LightningModule, size: int) -> FlopCounterMode:
    """Count the FLOPs (torch's convention: a multiply-add is 2) of one forward pass of ``module`` on a
    ``1 x 3 x size x size`` image, in total and per submodule (``get_flop_counts()``: ``"Global"`` and
    ``"<Module class>.<submodule path>"``); in eval mode, without gradients, on the module's device and dtype, never
    compiled (torch.compile runs eagerly under the counter). The modules' modes are restored; nothing they hold
    changes."""
    parameter = next(module.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    counter = FlopCounterMode(display=False)
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad(), counter:
            module(torch.zeros(1, 3, size, size, device=device, dtype=dtype))
    finally:
        for m, training in modes.items():
            m.training = training
    return counter


class ModelSummary(RichModelSummary):
    """Lightning's rich model summary with the real forward FLOPs of one ``input_size`` x ``input_size`` image,
    per layer and in total, counted as ``segvoc.bench`` counts them (torch's ``FlopCounterMode``; 34.2 G for
    DeepLabV3+/MobileNetV2 at 513). Lightning counts FLOPs only through a module's ``example_input_array``, which
    SegmentationModule has not (its batches are normalised in ``on_after_batch_transfer``), and would print 0.

    The count runs one forward pass at the start of fitting, on rank 0 only (the summary is printed there).
    """

    def __init__(self, max_depth: int = 1, input_size: int = 513, **summarize_kwargs: Any) -> None:
        super().__init__(max_depth, **summarize_kwargs)
        self.input_size = input_size
        self._counts: dict[str, int] | None = None
        self._prefix = ""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._counts = None
        if self._max_depth and trainer.is_global_zero:
            counter = forward_flops(pl_module, int(self.input_size))
            self._counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
            self._prefix = type(pl_module).__name__
        super().on_fit_start(trainer, pl_module)

    def summarize(
        self,
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        """Print Lightning's summary with the FLOPs counted here in place of Lightning's zeros."""
        from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count
        from rich import get_console

        if self._counts is not None:
            names = dict(summary_data)["Name"]
            flops = [get_human_readable_count(self._counts.get(f"{self._prefix}.{name}", 0)) for name in names]
            summary_data = [(column, flops if column == "FLOPs" else values) for column, values in summary_data]
            total_flops = self._counts.get("Global", 0)
        RichModelSummary.summarize(
            summary_data, total_parameters, trainable_parameters, model_size, total_training_modes, total_flops,
            **summarize_kwargs,
        )  # fmt: skip
        if self._counts is not None:
            size = self.input_size
            get_console().print(f"FLOPs: one forward pass of a 1x3x{size}x{size} image, a multiply-add counting 2")
