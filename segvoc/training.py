"""The training and evaluation tasks: from a composed config to a fitted model or a scored checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies import ParallelStrategy
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from segvoc.checkpoint import CheckpointError, load_model
from segvoc.checkpoint_io import AtomicCheckpointIO
from segvoc.config import ConfigError, validate_config
from segvoc.rundir import record_result, record_run, share_run_dir

log = logging.getLogger(__name__)


def _save_val_dir(cfg: DictConfig) -> str | None:
    return str(Path(cfg.output_dir) / "val_results") if cfg.get("save_val_results") else None


def _prepare_and_check(datamodule: L.LightningDataModule, trainer: L.Trainer, cfg: DictConfig, *splits: str) -> None:
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
    it; only a ``CheckpointIO`` plugin of the user's own replaces it."""
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
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer = build_trainer(cfg, callbacks, loggers)
    if trainer.is_global_zero:
        record_run(cfg.output_dir)
    L.seed_everything(cfg.seed, workers=True)

    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
    _prepare_and_check(datamodule, trainer, cfg)
    model: L.LightningModule = hydra.utils.instantiate(cfg.model, save_val_dir=_save_val_dir(cfg))

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


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score the checkpoint ``cfg.ckpt_path`` on the validation split without training (``train=false``).

    The network comes from the checkpoint itself (segvoc or seed format); the protocol from the config: whole
    images (default), ``data.crop_val=true`` (513 centre crop), ``model.inference.scales=[...]`` and
    ``model.inference.flip=true`` (multi-scale + flip). Prints the four figures and a per-class table, writes them
    to ``<run>/eval.json`` and returns that report.
    """
    if not cfg.ckpt_path:
        raise CheckpointError("train=false evaluates a checkpoint: give it with ckpt_path=/path/to/model.ckpt.")
    validate_config(cfg)
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer = build_trainer(cfg, [], loggers)
    if trainer.is_global_zero:
        record_run(cfg.output_dir)
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
    _prepare_and_check(datamodule, trainer, cfg, cfg.data.val_split)
    net, meta = load_model(cfg.ckpt_path)
    class_names = list(meta["class_names"])
    if len(class_names) != cfg.data.num_classes:
        raise CheckpointError(
            f"{cfg.ckpt_path} predicts {len(class_names)} classes but data.num_classes={cfg.data.num_classes}; "
            "evaluate it on data with the same classes, or set data.num_classes to match."
        )
    # the model config as in training (ignore index, palette, inference protocol, speed options: data.* flows in
    # through it), with the checkpoint's network and class names, and nothing to optimise
    model: L.LightningModule = hydra.utils.instantiate(
        cfg.model,
        net=net,
        class_names=class_names,
        palette=cfg.model.get("palette") or meta.get("palette"),
        optimizer=None,
        scheduler=None,
        save_val_dir=_save_val_dir(cfg),
    )
    trainer.validate(model, datamodule=datamodule, verbose=False)

    report = evaluation_report(model.val_scores, class_names)
    report["checkpoint"] = str(cfg.ckpt_path)
    report["protocol"] = {
        "crop_val": bool(cfg.data.crop_val),
        **OmegaConf.to_container(cfg.model.inference),
    }
    if not trainer.is_global_zero:  # the scores are those of the whole split in every process
        return report
    path = Path(cfg.output_dir) / "eval.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print_report(report)
    log.info("Evaluation written to %s", path)
    return report


def evaluation_report(scores: dict[str, torch.Tensor], class_names: list[str]) -> dict[str, Any]:
    """The figures of ``SegmentationMetrics.compute()`` as plain JSON-able values, per class by name."""

    def number(value: torch.Tensor) -> float | None:
        value = float(value)
        return None if value != value else value  # NaN (class absent) -> null

    return {
        "overall_acc": number(scores["acc"]),
        "mean_acc": number(scores["mean_acc"]),
        "freqw_acc": number(scores["fw_iou"]),
        "mean_iou": number(scores["mIoU"]),
        "classes": [
            {
                "name": name,
                "iou": number(scores["iou"][i]),
                "acc": number(scores["class_acc"][i]),
                "pixels": int(scores["gt_pixels"][i]),
            }
            for i, name in enumerate(class_names)
        ],
    }


def print_report(report: dict[str, Any]) -> None:
    """Print the four figures and the per-class table."""
    console = Console()
    for label, key in (("Overall Acc", "overall_acc"), ("Mean Acc", "mean_acc"), ("FreqW Acc", "freqw_acc"),
                       ("Mean IoU", "mean_iou")):  # fmt: skip
        console.print(f"{label}: {report[key]:.6f}")
    table = Table("class", "IoU", "accuracy", "pixels")
    for row in report["classes"]:
        fmt = [("-" if row[k] is None else f"{row[k]:.4f}") for k in ("iou", "acc")]
        table.add_row(row["name"], *fmt, f"{row['pixels']:,}")
    console.print(table)
