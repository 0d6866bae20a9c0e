"""Evaluating a checkpoint without data.root uses the data its run trained on (the run's .hydra/config.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from segvoc.tasks.train import train
from segvoc.training.rundir import use_recorded_data
from tests.conftest import compose_config, run_main


def _fake_run(tmp_path: Path, data: dict, cwd: str = "/home/me/segvoc") -> Path:
    """A run directory with a checkpoint file and Hydra's record of the run's config and working directory."""
    run = tmp_path / "outputs/train/run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints/best.ckpt").write_bytes(b"")
    (run / ".hydra").mkdir()
    recorded = compose_config([f"data.{key}={value}" for key, value in data.items()])
    OmegaConf.save(recorded, run / ".hydra/config.yaml")
    OmegaConf.save({"hydra": {"runtime": {"cwd": cwd}}}, run / ".hydra/hydra.yaml")
    return run / "checkpoints/best.ckpt"


def test_evaluation_takes_the_data_of_the_checkpoint_s_run(tmp_path: Path) -> None:
    ckpt = _fake_run(tmp_path, {"root": "/data/mine", "val_split": "holdout", "crop_val": True})
    cfg = compose_config(["train=false", f"ckpt_path={ckpt}"])
    assert use_recorded_data(cfg, ["train=false", f"ckpt_path={ckpt}"]) == ckpt.parents[1] / ".hydra/config.yaml"
    assert (cfg.data.root, cfg.data.val_split, cfg.data.crop_size) == ("/data/mine", "holdout", 513)
    # the protocol is not inherited: whole images, as an exported file of the same model is scored
    assert cfg.data.crop_val is False
    assert cfg.model.num_classes == 21  # interpolations into data still resolve


def test_the_command_line_chooses_crops_with_the_run_s_crop_size(tmp_path: Path) -> None:
    ckpt = _fake_run(tmp_path, {"root": "/data/mine", "crop_val": True, "crop_size": 160})
    overrides = ["train=false", f"ckpt_path={ckpt}", "data.crop_val=true"]
    cfg = compose_config(overrides)
    use_recorded_data(cfg, overrides)
    assert (cfg.data.crop_val, cfg.data.crop_size) == (True, 160)


def test_the_command_line_s_data_keys_win(tmp_path: Path) -> None:
    ckpt = _fake_run(tmp_path, {"root": "/data/mine", "val_split": "holdout"})
    overrides = ["train=false", f"ckpt_path={ckpt}", "data.val_split=val", "data.root=/copy"]
    cfg = compose_config(overrides)
    assert use_recorded_data(cfg, overrides) is not None
    assert (cfg.data.root, cfg.data.val_split) == ("/copy", "val")


def test_a_relative_data_root_is_the_run_s(tmp_path: Path) -> None:
    ckpt = _fake_run(tmp_path, {"root": "data/demo"}, cwd="/home/me/segvoc")
    cfg = compose_config([f"ckpt_path={ckpt}"])
    use_recorded_data(cfg, [])
    assert cfg.data.root == "/home/me/segvoc/data/demo"


@pytest.mark.parametrize("choice", ["data=voc_aug", "experiment=demo"])
def test_choosing_the_data_on_the_command_line_keeps_the_config(tmp_path: Path, choice: str) -> None:
    ckpt = _fake_run(tmp_path, {"root": "/data/mine"})
    cfg = compose_config([choice, f"ckpt_path={ckpt}"])
    before = OmegaConf.to_container(cfg.data)
    assert use_recorded_data(cfg, [choice]) is None and OmegaConf.to_container(cfg.data) == before


def test_a_checkpoint_outside_a_run_keeps_the_config(tmp_path: Path) -> None:
    (tmp_path / "model.ckpt").write_bytes(b"")
    cfg = compose_config([f"ckpt_path={tmp_path / 'model.ckpt'}"])
    assert use_recorded_data(cfg, []) is None and cfg.data.root == "data"


@pytest.mark.slow
def test_the_documented_evaluation_command_needs_no_data_root(make_cfg, tmp_path: Path, monkeypatch, capsys) -> None:
    cfg = make_cfg("trainer.max_steps=1", "trainer.val_check_interval=1")
    train(cfg)
    run = Path(cfg.output_dir)
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra/config.yaml")  # what Hydra records for a run of train.py
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    args = ["train=false", f"ckpt_path={run}/checkpoints/last.ckpt", "trainer.accelerator=cpu"]
    status, output = run_main("train.py", args, elsewhere, monkeypatch, capsys)
    assert status == 0, output
    assert "Evaluating on the data of the checkpoint's run" in output and "Mean IoU" in output
    assert not (elsewhere / "data").exists()  # nothing downloaded into the default data.root
