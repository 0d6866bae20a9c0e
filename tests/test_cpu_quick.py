"""experiment=cpu_quick: any VOC-layout folder with a train and a val split trains on a CPU, offline."""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import run_main


def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every URL request fails, as on a machine without network (torch.hub downloads through urlopen)."""

    def refuse(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(urllib.request.OpenerDirector, "open", refuse)


@pytest.mark.slow
def test_cpu_quick_trains_on_a_voc_folder_offline(voc_root: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    _offline(monkeypatch)
    args = [
        "experiment=cpu_quick",
        f"data.root={voc_root}",
        "data.num_workers=0",
        "trainer.max_steps=2",  # the recipe's 200 take minutes; the settings, downloads and splits are the same
        "trainer.val_check_interval=2",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    status, output = run_main("train.py", args, tmp_path, monkeypatch, capsys)
    assert status == 0, output
    assert (tmp_path / "run/checkpoints/last.ckpt").is_file()
    assert "1x3x160x160" in output  # its small crops


def test_cpu_quick_names_the_missing_val_split(voc_root: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    _offline(monkeypatch)
    root = tmp_path / "mine"
    shutil.copytree(voc_root, root)
    (root / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").unlink()
    status, output = run_main("train.py", ["experiment=cpu_quick", f"data.root={root}"], tmp_path, monkeypatch, capsys)
    assert status == 1 and "Traceback" not in output
    assert "val.txt does not exist (splits there: train)" in output and "data.val_split" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no run directory left
