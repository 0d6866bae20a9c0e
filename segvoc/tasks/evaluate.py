"""The evaluation task (``python train.py train=false ckpt_path=...``): score a saved model on the validation split
with the same protocol and the same figures as validation during training."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from segvoc.checkpoints.format import CheckpointError
from segvoc.checkpoints.load import load_model
from segvoc.config import validate_config
from segvoc.tasks.train import build_trainer, prepare_and_check, save_val_dir
from segvoc.training.rundir import record_run

log = logging.getLogger(__name__)


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
    prepare_and_check(datamodule, trainer, cfg, cfg.data.val_split)
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
        save_val_dir=save_val_dir(cfg),
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
