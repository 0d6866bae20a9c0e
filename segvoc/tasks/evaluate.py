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
from segvoc.checkpoints.load import load_predictor
from segvoc.config import validate_config
from segvoc.files import atomic_write_text
from segvoc.metrics import describe_confusion, top_confusions
from segvoc.tasks.train import build_trainer, prepare_and_check, save_val_dir
from segvoc.training.rundir import record_run

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score the checkpoint ``cfg.ckpt_path`` on the validation split without training (``train=false``).

    The network comes from the checkpoint itself (segvoc or seed format); the protocol from the config: whole
    images (default), ``data.crop_val=true`` (513 centre crop), ``model.inference.scales=[...]`` and
    ``model.inference.flip=true`` (multi-scale + flip). Prints the four figures, a per-class table and the top
    confusions; writes the report, with the whole split's confusion matrix, to ``<run>/eval-<protocol>.json``
    (``protocol_name``: one file per protocol, so whole-image and multi-scale results are both kept) and lists it
    under ``evaluations`` in ``<run>/result.json``; writes the per-image report ``<run>/per_image-<protocol>.csv``
    and the worst images' panels to ``<run>/worst-<protocol>/``. Returns the report.
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
    # any saved model: a segvoc or seed checkpoint, an fp32 or int8 .onnx, a TorchScript .pt; its normalisation
    # is the one the model was trained with
    net, meta = load_predictor(cfg.ckpt_path)
    datamodule.mean, datamodule.std = tuple(meta.get("mean", datamodule.mean)), tuple(meta.get("std", datamodule.std))
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
    protocol = protocol_name(cfg)
    model.report_dir, model.report_tag = Path(cfg.output_dir), f"-{protocol}"  # per_image-<protocol>.csv, worst-...
    trainer.validate(model, datamodule=datamodule, verbose=False)

    report = evaluation_report(model.val_scores, class_names, model.val_confmat)
    report["checkpoint"] = str(cfg.ckpt_path)
    report["protocol"] = {
        "name": protocol,
        "crop_val": bool(cfg.data.crop_val),
        **({"crop_size": int(cfg.data.crop_size)} if cfg.data.crop_val else {}),
        **OmegaConf.to_container(cfg.model.inference),
    }
    if not trainer.is_global_zero:  # the scores are those of the whole split in every process
        return report
    path = Path(cfg.output_dir) / f"eval-{protocol}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=2))
    list_evaluation(Path(cfg.output_dir), protocol, path, report)
    print_report(report)
    log.info("Evaluation written to %s (listed in %s)", path, path.with_name("result.json"))
    return report


def protocol_name(cfg: DictConfig) -> str:
    """The evaluation protocol of ``cfg`` as a file-name part: ``whole`` (whole images), ``crop513``
    (``data.crop_val`` at ``data.crop_size``), ``ms0.5-1.75`` (``model.inference.scales``, smallest-largest),
    ``flip``, ``window513`` (sliding window), joined with ``-``: e.g. ``ms0.5-1.75-flip``."""
    inference = cfg.model.inference
    parts = [f"crop{cfg.data.crop_size}"] if cfg.data.crop_val else []
    scales = [float(s) for s in inference.get("scales") or [1.0]]
    if scales != [1.0]:
        parts.append(f"ms{min(scales):g}-{max(scales):g}" if len(scales) > 1 else f"scale{scales[0]:g}")
    if inference.get("flip"):
        parts.append("flip")
    if inference.get("window"):
        parts.append(f"window{inference.window}")
    return "-".join(parts) or "whole"


def list_evaluation(run_dir: Path, protocol: str, path: Path, report: dict[str, Any]) -> Path:
    """Add (or replace) the entry of ``protocol`` under ``evaluations`` in ``<run_dir>/result.json``: the file
    name, the checkpoint and its mean IoU; the rest of ``result.json`` (a training run's figures) is kept."""
    result_path = run_dir / "result.json"
    try:
        result = json.loads(result_path.read_text())
    except (OSError, json.JSONDecodeError):
        result = {}
    result.setdefault("evaluations", {})[protocol] = {
        "file": path.name,
        "checkpoint": report["checkpoint"],
        "mean_iou": report["mean_iou"],
    }
    atomic_write_text(result_path, json.dumps(result, indent=2))
    return result_path


def evaluation_report(
    scores: dict[str, torch.Tensor], class_names: list[str], confmat: torch.Tensor | None = None
) -> dict[str, Any]:
    """The figures of ``SegmentationMetrics.compute()`` as plain JSON-able values, per class by name; with
    ``confmat`` also ``confusion_matrix`` (pixel counts, rows true class, columns predicted, in class order) and
    ``top_confusions`` (``segvoc.metrics.top_confusions``)."""

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
        **(
            {
                "confusion_matrix": confmat.long().tolist(),
                "top_confusions": top_confusions(confmat, class_names),
            }
            if confmat is not None
            else {}
        ),
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
    if report.get("top_confusions"):
        console.print("Top confusions (true -> predicted):")
        for row in report["top_confusions"]:
            console.print(f"  {describe_confusion(row)}")
