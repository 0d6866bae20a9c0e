"""The training task: from a composed config to a fitted model (``train.py``), and what it shares with evaluation:
the trainer (with the crash-safe checkpoint writer), dataset preparation and the run record."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies import ParallelStrategy
from omegaconf import DictConfig, OmegaConf

from segvoc.config import ConfigError, validate_config
from segvoc.training.checkpoint_io import AtomicCheckpointIO
from segvoc.training.hparams import HParamsLogger, run_hparams
from segvoc.training.rundir import record_result, record_run, share_run_dir

log = logging.getLogger(__name__)


def save_val_dir(cfg: DictConfig) -> str | None:
    return str(Path(cfg.output_dir) / "val_results") if cfg.get("save_val_results") else None


def prepare_and_check(datamodule: L.LightningDataModule, trainer: L.Trainer, cfg: DictConfig, *splits: str) -> None:
    """Prepare and check the dataset up front, once per run: ``prepare_data`` on each node's first process (the
    others wait for it inside ``fit``/``validate``, as Lightning makes them), the full check on rank 0 only, unless
    ``data.skip_bad_samples`` makes its result (which samples to leave out) needed in every process."""
    if trainer.local_rank == 0:
        datamodule.prepare_data()
    if trainer.is_global_zero or cfg.data.get("skip_bad_samples"):
        datamodule.check_data(list(splits) or None)


def _require_gpus_for_sync_batchnorm(cfg: DictConfig, trainer: L.Trainer) -> None:
    # DDP converts BatchNorm to SyncBatchNorm for fitting, which PyTorch refuses on a CPU (with a traceback)
    parallel = isinstance(trainer.strategy, ParallelStrategy)
    if cfg.trainer.get("sync_batchnorm") and parallel and trainer.strategy.root_device.type == "cpu":
        raise ConfigError(
            "trainer.sync_batchnorm=true needs GPUs: PyTorch's SyncBatchNorm does not run on a CPU. Add "
            "trainer.sync_batchnorm=false to train with several CPU processes."
        )


def build_trainer(cfg: DictConfig, callbacks: list[L.Callback], loggers: list[Logger]) -> L.Trainer:
    """The ``cfg.trainer`` Trainer with ``callbacks`` and ``loggers``. Checkpoints are always written crash-safely
    (``AtomicCheckpointIO``): it is added here, not in the config, so overriding ``trainer.plugins`` cannot drop
    it; only a ``CheckpointIO`` plugin of the user's own replaces it. ``trainer.enable_progress_bar=false`` drops
    a configured progress bar (``callbacks.progress_bar``), which Lightning would otherwise refuse."""
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    plugins = [hydra.utils.instantiate(p) for p in cfg.trainer.get("plugins") or []]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins
    )
    _require_gpus_for_sync_batchnorm(cfg, trainer)
    share_run_dir(trainer)
    return trainer


def train(cfg: DictConfig) -> dict[str, float]:
    """Instantiate data module, model, callbacks, loggers and trainer from ``cfg``, fit, and return the metrics.

    The config is validated and the dataset prepared (found, extracted, downloaded or generated) before the model
    is built, so a bad value or a missing dataset is reported before anything slow happens; ``<run>/run.json``
    records the command line, package versions and git commit. Returns the trainer's last logged metrics as floats, plus
    ``best/val/mIoU`` when a checkpoint callback monitored it; the same goes to ``<run>/result.json``.
    """
    validate_config(cfg)
    # an entry is off when null, or when its patience is null (callbacks.early_stopping, off by default)
    entries = [c for c in (cfg.get("callbacks") or {}).values() if c is not None and c.get("patience", 0) is not None]
    callbacks = [hydra.utils.instantiate(c) for c in entries]
    callbacks.append(HParamsLogger(run_hparams(cfg)))  # the HParams tab: recipe keys, overrides and results
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer = build_trainer(cfg, callbacks, loggers)
    L.seed_everything(cfg.seed, workers=True)

    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
    prepare_and_check(datamodule, trainer, cfg)
    if trainer.is_global_zero:  # once the data is usable: a refused start writes nothing of its own
        record_run(cfg.output_dir)
    model: L.LightningModule = hydra.utils.instantiate(cfg.model, save_val_dir=save_val_dir(cfg))

    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text("config", f"```yaml\n{config_yaml}```", global_step=0)
    log.info("Run directory: %s", cfg.output_dir)

    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)

    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    checkpoint = trainer.checkpoint_callback
    result: dict[str, Any] = {"global_step": trainer.global_step, "metrics": metrics}
    if checkpoint is not None and checkpoint.best_model_score is not None:
        metrics[f"best/{checkpoint.monitor}"] = float(checkpoint.best_model_score)
        result.update(
            monitor=checkpoint.monitor,
            best_score=float(checkpoint.best_model_score),
            best_checkpoint=checkpoint.best_model_path,
        )
    if trainer.is_global_zero:
        record_result(cfg.output_dir, result)
    return metrics


def optimized_value(metrics: dict[str, float], name: str) -> float:
    """``metrics[name]``: the figure a sweeper optimises (``optimized_metric``). A name the run did not log is a
    ``ConfigError`` that lists those it did, never a ``None`` handed to the sweeper."""
    if name not in metrics:
        raise ConfigError(
            f"optimized_metric={name} is not a metric of this run; it logged {', '.join(sorted(metrics))}. Choose "
            "one of those (best/<monitor> needs a checkpoint callback that monitors <monitor>)."
        )
    return metrics[name]
