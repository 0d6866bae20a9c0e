"""Every ``_target_`` of the config is checked against the keys it is given, before anything is read or built."""

from __future__ import annotations

from pathlib import Path

import pytest

from segvoc.config import ConfigError, validate_targets
from segvoc.tasks.train import train
from tests.conftest import CONF_DIR, compose_config, run_main


@pytest.mark.parametrize(
    ("overrides", "key", "target", "valid"),
    [
        (["+optimizer.lrr=0.1"], "optimizer.lrr", "torch.optim.SGD", "lr, momentum"),
        (["optimizer=adamw", "+optimizer.betaz=[0.9,0.99]"], "optimizer.betaz", "torch.optim.AdamW", "betas"),
        (["+scheduler.powr=2"], "scheduler.powr", "torch.optim.lr_scheduler.PolynomialLR", "power"),
        (["+loss.weights=[1]"], "loss.weights", "segvoc.losses.CrossEntropy", "class_weights"),
        (["+model.lr_mult=0.1"], "model.lr_mult", "segvoc.training.module.SegmentationModule", "backbone_lr_mult"),
        (["+model.net.stride=8"], "model.net.stride", "segvoc.checkpoints.load.build_net", "output_stride"),
        (["+data.rooot=/x"], "data.rooot", "segvoc.data.datamodule.VOCDataModule", "root"),
        (["+trainer.max_step=9"], "trainer.max_step", "lightning.pytorch.Trainer", "max_steps"),
        (
            ["+callbacks.model_checkpoint.monitr=val/loss"],
            "callbacks.model_checkpoint.monitr",
            "lightning.pytorch.callbacks.ModelCheckpoint",
            "monitor",
        ),
    ],
)
def test_a_key_its_target_does_not_take_is_one_line_naming_the_valid_ones(
    make_cfg, overrides: list[str], key: str, target: str, valid: str
) -> None:
    cfg = make_cfg(*overrides, "data.root=/nonexistent/data")  # validation must come before the data is looked at
    with pytest.raises(ConfigError) as info:
        train(cfg)
    message = str(info.value)
    assert message.startswith(f"{key} is not a parameter of {target}")
    assert valid in message.split("valid: ")[1] and "\n" not in message
    assert not Path(cfg.output_dir).exists()  # nothing written


def test_a_target_that_takes_keyword_arguments_accepts_any_key() -> None:
    # TensorBoardLogger passes **kwargs on to its SummaryWriter: the key cannot be checked here
    validate_targets(compose_config(["+logger.tensorboard.flush_secs=30"]))


def test_a_target_that_cannot_be_imported_is_named() -> None:
    with pytest.raises(ConfigError, match=r"model\.net\._target_=segvoc\.nowhere\.build cannot be imported"):
        validate_targets(compose_config(["model.net._target_=segvoc.nowhere.build"]))


def _choices() -> list[list[str]]:
    conf = Path(CONF_DIR)
    choices = [[]]
    for group in ("experiment", "model", "optimizer", "scheduler", "loss", "trainer", "data", "logger"):
        choices += [[f"{group}={path.stem}"] for path in sorted((conf / group).glob("*.yaml"))]
    return choices


@pytest.mark.parametrize("overrides", _choices(), ids=lambda o: o[0] if o else "default")
def test_every_shipped_config_passes(overrides: list[str]) -> None:
    extra = ["data.classes=[a,b]", "data.root=/x"] if overrides == ["data=custom"] else []
    validate_targets(compose_config(overrides + extra))


def test_hydra_s_advice_ends_in_one_line_not_a_traceback(tmp_path: Path, monkeypatch, capsys) -> None:
    status, output = run_main("train.py", ["+optimizer.lrr=0.1"], tmp_path, monkeypatch, capsys)
    assert status == 1 and "Traceback" not in output
    expected = "optimizer.lrr is not a parameter of torch.optim.SGD (did you mean optimizer.lr?); valid: params, lr"
    assert expected in output
    assert not (tmp_path / "outputs").exists()  # the refused start left no run directory
