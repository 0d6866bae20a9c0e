"""What a run prints: progress in iterations of trainer.max_steps, the real FLOPs, and none of the library noise."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count
from torch.utils.flop_counter import FlopCounterMode

from segvoc.models.deeplab import deeplabv3plus_mobilenet
from segvoc.training.console import quiet_libraries
from tests.conftest import child_env, run_main

# One line of each message that a run printed before, with nothing in it for the user to act on
NOISE = (
    "💡 Tip:",
    "litlogger",
    "litmodels",
    "Trainer already configured with model summary callbacks",
    "You have overridden `on_after_batch_transfer`",
    "LeafSpec",
    "is smaller than the logging interval",
    "Epoch ",  # Lightning's "Epoch 49/-2": training is counted in iterations
    "Total FLOPs: 0",
)


@pytest.mark.slow
def test_a_short_training_run_counts_steps_shows_the_real_flops_and_no_noise(
    voc_root: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    args = [
        f"data.root={voc_root}",
        "data.download=false",
        "data.num_workers=0",
        "data.batch_size=4",  # 3 batches per epoch, fewer than log_every_n_steps=10
        "data.val_batch_size=2",
        "data.crop_size=96",
        "model.net.pretrained=false",
        "trainer.accelerator=cpu",
        "trainer.max_steps=5",  # two epochs
        "trainer.val_check_interval=5",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        status, output = run_main("train.py", args, tmp_path, monkeypatch, capsys)
    assert status == 0, output
    printed = output + "\n".join(str(w.message) for w in shown)
    for noise in NOISE:
        assert noise not in printed, noise
    assert "Training" in output and "5/5" in output and "it/s" in output  # steps of max_steps, with the rate

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        deeplabv3plus_mobilenet(num_classes=21).eval()(torch.zeros(1, 3, 96, 96))
    assert f"Total FLOPs: {get_human_readable_count(counter.get_total_flops())}" in output
    assert "1x3x96x96" in output


def test_quiet_libraries_drops_only_the_listed_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    noise = [
        "You have overridden `on_after_batch_transfer` in `LightningModule` but have passed in a "
        "`LightningDataModule`. It will use the implementation from `LightningModule` instance.",
        "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()`.",
        "The number of training batches (5) is smaller than the logging interval Trainer(log_every_n_steps=10).",
    ]
    kept = "The 'train_dataloader' does not have many workers which may be a bottleneck. Consider increasing them."
    # read Lightning's info lines where they are logged, whatever earlier tests did to propagation or levels (the
    # bench's main, run in-process by test_bench, sets the lightning loggers to WARNING)
    info = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    monkeypatch.setattr(info, "disabled", False)
    level = info.level
    info.setLevel(logging.INFO)  # setLevel, not the attribute: logging caches each logger's enabled levels
    lines: list[str] = []
    catcher = logging.Handler()
    catcher.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    info.addHandler(catcher)
    try:
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            with quiet_libraries():
                for message in [*noise, kept]:
                    warnings.warn(message, UserWarning, stacklevel=1)
                rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
                rank_zero_info("GPU available: False, used: False")
            warnings.warn(noise[0], UserWarning, stacklevel=1)  # outside the block: shown again
    finally:
        info.removeHandler(catcher)
        info.setLevel(level)
    assert [str(w.message) for w in shown] == [kept, noise[0]]
    assert lines == ["GPU available: False, used: False"]


@pytest.mark.slow
def test_importing_segvoc_does_not_ask_pypi_for_albumentations_updates() -> None:
    # every network request fails loudly in the child; albumentations' update check would make one at import
    code = (
        "import urllib.request\n"
        "def refuse(*args, **kwargs):\n"
        "    print('NETWORK REQUEST', flush=True); raise OSError('offline')\n"
        "urllib.request.OpenerDirector.open = refuse\n"
        "import segvoc.data.transforms\n"
        "print('imported')\n"
    )
    env = {k: v for k, v in child_env().items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "imported" in output, output
    assert "NETWORK REQUEST" not in output and "Error fetching version info" not in output
