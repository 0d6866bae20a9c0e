"""Start-up validation of a composed config: every value a user can get wrong, one clear line each, before any
data is read or any model is built."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from segvoc.errors import SegvocError


class ConfigError(SegvocError):
    """A config value that cannot work."""


def _positive(cfg: DictConfig, key: str, kind: type = int) -> None:
    value = cfg
    for part in key.split("."):
        value = value.get(part) if isinstance(value, DictConfig) else None
    if value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or value <= 0
        or (kind is int and value != int(value))
    ):
        what = "a positive whole number" if kind is int else "a positive number"
        raise ConfigError(f"{key}={value} is not valid: it must be {what}.")


def validate_config(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` for the first value of ``cfg`` (the train config) that cannot work.

    Checks sizes, learning rate, steps, output stride, class counts (data vs model, and vs the checkpoint when
    resuming or evaluating) and that a given ``ckpt_path`` exists and is a safe checkpoint.
    """
    for key in (
        "data.crop_size",
        "data.batch_size",
        "data.val_batch_size",
        "data.num_classes",
        "trainer.max_steps",
        "trainer.val_check_interval",
    ):
        _positive(cfg, key)
    _positive(cfg, "optimizer.lr", float)
    net = cfg.model.get("net") or {}
    stride = net.get("output_stride")
    if stride is not None and stride not in (8, 16):
        raise ConfigError(f"model.net.output_stride={stride} is not supported: use 16 (ASPP rates 6/12/18) or 8.")
    num_classes = cfg.data.num_classes
    for key, value in (
        ("model.num_classes", cfg.model.get("num_classes")),
        ("model.net.num_classes", net.get("num_classes")),
    ):
        if value is not None and value != num_classes:
            raise ConfigError(
                f"{key}={value} disagrees with data.num_classes={num_classes}; leave it at ${{data.num_classes}}."
            )
    if cfg.get("ckpt_path"):
        from segvoc.checkpoint import read_checkpoint

        path = Path(str(cfg.ckpt_path)).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"ckpt_path={cfg.ckpt_path} does not exist; give the path of a .ckpt file (e.g. "
                "outputs/train/<run>/checkpoints/last.ckpt) or leave ckpt_path unset."
            )
        meta = read_checkpoint(path).get("segvoc") or {}
        ckpt_classes = (meta.get("net") or {}).get("num_classes")
        if ckpt_classes is not None and ckpt_classes != num_classes:
            raise ConfigError(
                f"{path} was trained for {ckpt_classes} classes but data.num_classes={num_classes}; "
                "use data with the checkpoint's classes."
            )
