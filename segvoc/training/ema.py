"""Exponential moving average of the weights (``model.ema.decay``), on top of Lightning's ``EMAWeightAveraging``.

Lightning 2.6's callback already does what a training run needs: a ``torch.optim.swa_utils.AveragedModel`` of the
whole module, updated after every optimizer step (so with
``trainer.accumulate_grad_batches=N`` once per N batches); the averaged weights swapped in for every validation
(``val/*`` scores, hence the best checkpoint, are the EMA's) and copied into the module when training ends;
checkpoints whose ``state_dict`` is the averaged model (what ``segvoc.checkpoints.load``, export and prediction
read) with the raw weights in ``current_model_state`` and the averaging count in ``averaging_state``, from which a
resumed run continues exactly. Under DDP every process keeps its own average of the same (synchronised) weights.

The BatchNorm statistics (buffers) travel with the average but are not averaged by default: at every update the
average takes the live model's, as ``AveragedModel(use_buffers=False)`` and mmseg's EMA hook do. Averaging them
(``average_buffers=True``, Lightning's default) was measured to break a from-scratch run: on the demo with decay
0.99 the averaged running variances lagged the live ones by up to 98 % and the EMA model predicted background only
(val mIoU 0.151 at every validation against 0.985 without EMA), while the same averaged weights with the live
statistics predicted like the raw model.

Before the first update (``start_step`` > 0) there is no average yet: Lightning's callback would validate,
checkpoint and, if training ends that early, keep the initial weights that the average starts as. Here the live
weights stand in until the first update: validation scores them, checkpoints carry them as ``state_dict`` (the
averaging state, 0 updates, beside them, so a resume starts the average where it should), and a run that ends before
``start_step`` keeps what it trained.

What this subclass changes besides: the average lives on the training device from the start (Lightning's ``setup`` runs
before the module is moved there, which would keep the average on the CPU and copy every weight to it after every
step), and the warning about ``configure_model`` is not shown: the module's ``configure_model`` only sets the memory
format and compiles in place, it creates no layers.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging


class EMA(EMAWeightAveraging):
    """``EMAWeightAveraging`` with ``decay`` (0.9999 averages over about the last 10,000 steps), updated after every
    optimizer step from ``start_step`` on (0: from the first; the average starts as a copy of the weights), kept on
    ``device`` (None: the training device; "cpu" saves accelerator memory at the cost of a copy per step). The
    BatchNorm statistics are the live model's at the last update unless ``average_buffers`` (see the module doc)."""

    def __init__(
        self, decay: float = 0.9999, start_step: int = 0, device: str | None = None, average_buffers: bool = False
    ) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"model.ema.decay={decay} must lie strictly between 0 and 1 (0.9999 is usual)")
        super().__init__(device=device, use_buffers=average_buffers, decay=decay, update_starting_at_step=start_step)
        self.decay = decay
        self._swapped = False  # whether the current validation runs on the average (swapped in at its start)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(decay=self.decay)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self._device is None:
            self._device = trainer.strategy.root_device
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*WeightAveraging callback with a model that overrides")
            super().setup(trainer, pl_module, stage)

    def averaging(self) -> bool:
        """Whether the average exists: fit has started and the weights were averaged at least once."""
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swapped = self.averaging()
        if self._swapped:
            self._swap_models(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._swapped:
            self._swap_models(pl_module)
        self._swapped = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.averaging():
            super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._average_model is not None and not self.averaging():
            checkpoint["state_dict"] = checkpoint["current_model_state"]  # no average yet: the live weights

    def averaged_state(self) -> dict[str, torch.Tensor]:
        """The averaged module's ``state_dict`` (keys as the module's), for tests and inspection."""
        assert self._average_model is not None, "the average exists once fit() has started"
        return {k[len("module.") :]: v for k, v in self._average_model.state_dict().items() if k.startswith("module.")}
