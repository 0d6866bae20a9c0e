"""Shared fixtures: a generated VOC-layout tree and Hydra configs shrunk to run in seconds on a CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from segvoc.config import register_resolvers
from segvoc.data.demo import make_demo_voc

register_resolvers()
REPO = Path(__file__).resolve().parents[1]
CONF_DIR = str(REPO / "conf")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-long", action="store_true", help="also run tests marked long (minutes each on a CPU)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-long"):
        return
    skip = pytest.mark.skip(reason="long: run with --run-long")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def voc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small VOC-layout tree (12 train, 4 val images) under ``<root>/VOCdevkit/VOC2012``."""
    root = tmp_path_factory.mktemp("voc")
    make_demo_voc(root, n_train=12, n_val=4, seed=3)
    return root


def compose_config(overrides: list[str], config_name: str = "train", return_hydra_config: bool = False) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with ``overrides`` through Hydra's compose API."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=return_hydra_config)


@pytest.fixture
def make_cfg(voc_root: Path, tmp_path: Path) -> Callable[..., DictConfig]:
    """Return ``make_cfg(*overrides)``: the train config on the tiny tree, CPU, tiny crops, run dir in tmp."""

    def factory(*overrides: str) -> DictConfig:
        base = [
            f"data.root={voc_root}",
            "data.download=false",
            "data.num_workers=0",
            "data.batch_size=4",
            "data.val_batch_size=2",
            "data.crop_size=96",
            "model.net.pretrained=false",
            "trainer.accelerator=cpu",
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
            "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false",
            "~callbacks.model_summary",
        ]
        cfg = compose_config(base + list(overrides))
        with open_dict(cfg):
            cfg.output_dir = str(tmp_path / "run")
        return cfg

    return factory


def run_script(script: str, args: list[str], cwd: Path, timeout: int = 600) -> tuple[int, str]:
    """Run ``<repo>/<script> args`` as a user would, in ``cwd``; return the exit status and stdout + stderr
    (Hydra's log handler writes to stdout)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    return proc.returncode, proc.stdout + proc.stderr
