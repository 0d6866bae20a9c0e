"""Config validation at start-up, refusal of checkpoints that would run code, reproducibility and run records."""

from __future__ import annotations

import json
import platform
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import lightning
import pytest
import torch

from segvoc.checkpoints.format import CheckpointError, read_checkpoint
from segvoc.checkpoints.load import load_model
from segvoc.config import ConfigError
from segvoc.tasks.evaluate import evaluate
from segvoc.tasks.train import train
from tests.conftest import run_main
from tests.test_train import scalars


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("data.crop_size=0", "data.crop_size=0"),
        ("data.batch_size=-2", "data.batch_size=-2"),
        ("data.val_batch_size=1.5", "data.val_batch_size=1.5"),
        ("optimizer.lr=0", "optimizer.lr=0"),
        ("trainer.max_steps=0", "trainer.max_steps=0"),
        ("model.net.output_stride=32", "model.net.output_stride=32"),
        ("model.num_classes=5", "model.num_classes=5"),
        ("ckpt_path=/nonexistent/last.ckpt", "ckpt_path=/nonexistent/last.ckpt"),
    ],
)
def test_bad_config_values_are_one_clear_line(make_cfg, override: str, names: str, tmp_path: Path) -> None:
    cfg = make_cfg(override, "data.root=/nonexistent/data")  # would fail later: validation must come first
    with pytest.raises(ConfigError) as info:
        train(cfg)
    message = str(info.value)
    assert names in message and "\n" not in message


def test_bad_value_on_the_command_line_exits_1_without_traceback(tmp_path: Path, monkeypatch, capsys) -> None:
    status, output = run_main("train.py", ["data.crop_size=0"], tmp_path, monkeypatch, capsys)
    assert status == 1 and "data.crop_size=0" in output and "Traceback" not in output


class Payload:
    """Unpickling this writes a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.fixture
def malicious(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "segvoc": {"net": {"arch": "deeplabv3plus"}}, "x": Payload(marker)}, path)
    return path, marker


def test_checkpoint_with_pickled_objects_is_refused(malicious: tuple[Path, Path]) -> None:
    path, marker = malicious
    for load in (read_checkpoint, load_model):
        with pytest.raises(CheckpointError, match="pickled Python objects"):
            load(path)
    assert not marker.exists()


def test_training_resume_and_evaluation_refuse_a_malicious_checkpoint(make_cfg, malicious) -> None:
    path, marker = malicious
    with pytest.raises(CheckpointError, match="pickled"):
        train(make_cfg(f"ckpt_path={path}"))
    with pytest.raises(CheckpointError, match="pickled"):
        evaluate(make_cfg("train=false", f"ckpt_path={path}"))
    assert not marker.exists()


def test_prediction_refuses_a_malicious_checkpoint(malicious, tmp_path: Path, monkeypatch, capsys) -> None:
    from PIL import Image

    path, marker = malicious
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    argv = [f"ckpt={path}", f"input={tmp_path / 'a.png'}", f"output={tmp_path / 'out'}"]
    status, output = run_main("predict.py", argv, tmp_path, monkeypatch, capsys)
    assert status == 1 and "pickled" in output and "Traceback" not in output
    assert not marker.exists()


def test_same_seed_gives_identical_runs(make_cfg, tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        cfg = make_cfg("seed=7", "trainer.max_steps=4")
        cfg.output_dir = str(tmp_path / name)
        train(cfg)
        runs.append(scalars(Path(cfg.output_dir)))
    assert runs[0]["train/loss"] == runs[1]["train/loss"]
    assert runs[0]["val/mIoU"] == runs[1]["val/mIoU"] and runs[0]["val/loss"] == runs[1]["val/loss"]


def test_run_directory_records_command_versions_and_commit(make_cfg) -> None:
    cfg = make_cfg("trainer.max_steps=2")
    train(cfg)
    record = json.loads((Path(cfg.output_dir) / "run.json").read_text())
    # what pip installed (the wheels' metadata) and what the running interpreter imported: both must agree
    assert record["packages"]["torch"] == version("torch") == torch.__version__.split("+")[0]
    assert record["packages"]["lightning"] == version("lightning") == lightning.__version__
    assert record["python"] == platform.python_version()
    assert record["command"][0] == sys.executable
    assert "git_commit" in record and (record["git_commit"] is None or len(record["git_commit"]) == 40)


@pytest.fixture
def broken_root(voc_root: Path, tmp_path: Path) -> Path:
    """A copy of the tiny VOC tree with one truncated training JPEG."""
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(voc_root, root)
    voc = root / "VOCdevkit" / "VOC2012"
    first = (voc / "ImageSets/Segmentation/train.txt").read_text().split()[0]
    jpeg = voc / "JPEGImages" / f"{first}.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    return root


def test_training_refuses_a_broken_dataset_before_the_first_step(make_cfg, broken_root: Path) -> None:
    from segvoc.data.check import DatasetCheckError

    cfg = make_cfg(f"data.root={broken_root}")
    with pytest.raises(DatasetCheckError) as info:
        train(cfg)
    assert "data.skip_bad_samples=true" in str(info.value)
    assert not (Path(cfg.output_dir) / "checkpoints").exists()  # nothing trained


class RecordTrainIds(lightning.Callback):
    """Writes the ids of the training set that ``fit`` uses to ``path`` (JSON) as training starts."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_start(self, trainer: lightning.Trainer, *args: Any) -> None:
        self.path.write_text(json.dumps(list(trainer.datamodule.train_set.ids)))


def test_skip_bad_samples_trains_without_them(
    make_cfg, broken_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    record = tmp_path / "ids.json"
    metrics = train(
        make_cfg(
            f"data.root={broken_root}",
            "data.skip_bad_samples=true",
            "trainer.max_steps=1",
            "+callbacks.ids._target_=tests.test_safety.RecordTrainIds",
            f"+callbacks.ids.path={record}",
        )
    )
    train_ids = (broken_root / "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt").read_text().split()
    assert "Skipping 1 bad samples" in caplog.text and "train/loss" in metrics
    assert json.loads(record.read_text()) == train_ids[1:]  # the truncated first image is left out, no other


def test_unknown_choice_lists_the_available_ones(tmp_path: Path, monkeypatch, capsys) -> None:
    status, output = run_main("train.py", ["model=deeplabv4"], tmp_path, monkeypatch, capsys)
    assert status == 1 and "deeplabv3plus" in output and "Traceback" not in output
