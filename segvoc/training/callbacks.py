"""segvoc's Lightning callbacks: ``last.ckpt`` saved when training is interrupted (Ctrl-C)."""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


class SaveOnInterrupt(L.Callback):
    """On Ctrl-C (SIGINT) during fitting, finish the running step, save ``last.ckpt`` and stop.

    The first Ctrl-C only records the request. ``last.ckpt`` (in the ``ModelCheckpoint``'s folder) is written at the
    end of the running training step, after its optimizer and scheduler updates: the point where weights,
    optimizer, scheduler and step count agree and from which Lightning resumes. A validation due at that step still
    runs (its own ``last.ckpt`` then supersedes this one, so a resume does not skip it); training stops before the
    next step, through Lightning's ``KeyboardInterrupt`` shutdown (exit status 1). A second Ctrl-C stops at once;
    ``last.ckpt`` keeps the latest complete save. DataLoader workers forked while it is installed ignore Ctrl-C, so
    a Ctrl-C in a terminal does not kill them under the step still running. Outside the main thread (where
    signals cannot be caught) or without a ``ModelCheckpoint`` it does nothing.
    """

    def __init__(self) -> None:
        self._requested = False
        self._saved = False
        self._pid = os.getpid()
        self._previous_handler: Any = None

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker: the main process decides when to stop
        if self._requested:
            raise KeyboardInterrupt
        self._requested = True
        log.warning("Ctrl-C: saving last.ckpt after the current training step; press Ctrl-C again to stop at once.")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._requested = self._saved = False
        # before the dataloaders start their workers, which inherit the handler
        if _last_checkpoint_path(trainer) is not None and threading.current_thread() is threading.main_thread():
            self._pid = os.getpid()
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._saved:
            raise KeyboardInterrupt

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._requested or self._saved:
            return
        path = _last_checkpoint_path(trainer)
        assert path is not None  # the handler is installed only when there is one
        # part of the checkpoint: a resume then keeps writing last.ckpt instead of a versioned last-v1.ckpt
        trainer.checkpoint_callback.last_model_path = path
        trainer.save_checkpoint(path)
        self._saved = True
        log.warning("Interrupted: saved %s at step %d; resume with ckpt_path=%s", path, trainer.global_step, path)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handler()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handler()
        if isinstance(exception, KeyboardInterrupt) and not self._saved:
            log.warning("Stopped without saving: last.ckpt holds the state of the last validation.")

    def _restore_handler(self) -> None:
        # Only while ours is installed: Lightning ignores SIGINT during its shutdown and that must stay so.
        if self._previous_handler is not None and signal.getsignal(signal.SIGINT) == self._on_sigint:
            signal.signal(signal.SIGINT, self._previous_handler)
        self._previous_handler = None


def _last_checkpoint_path(trainer: L.Trainer) -> str | None:
    checkpoint_callback = trainer.checkpoint_callback
    if not isinstance(checkpoint_callback, ModelCheckpoint) or checkpoint_callback.dirpath is None:
        return None
    name = checkpoint_callback.CHECKPOINT_NAME_LAST + checkpoint_callback.FILE_EXTENSION
    return os.path.join(checkpoint_callback.dirpath, name)
