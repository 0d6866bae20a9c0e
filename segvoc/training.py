"""The training task: from a composed config to a fitted model, linear and without side effects elsewhere."""

from __future__ import annotations

import logging

import hydra
import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Instantiate data module, model, callbacks, loggers and trainer from ``cfg``, fit, and return the metrics.

    The dataset is prepared (found, extracted, downloaded or generated) before the model is built, so a missing
    dataset is reported before anything slow happens. Returns the trainer's last logged metrics as floats, plus
    ``best/val/mIoU`` when a checkpoint callback monitored it.
    """
    L.seed_everything(cfg.seed, workers=True)

    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    model: L.LightningModule = hydra.utils.instantiate(cfg.model)
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text("config", f"```yaml\n{config_yaml}```", global_step=0)
    log.info("Run directory: %s", cfg.output_dir)

    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)

    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.best_model_score is not None:
        metrics[f"best/{checkpoint.monitor}"] = float(checkpoint.best_model_score)
    return metrics
