"""A start refused for a config or data error leaves nothing behind; prediction, export and the dataset check write
only what the user asked for (and prediction its log beside it)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from tests.conftest import closed_port, run_main


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_a_config_error_leaves_no_run_directory(tmp_path: Path, monkeypatch, capsys) -> None:
    status, output = run_main("train.py", ["data.crop_size=0"], tmp_path, monkeypatch, capsys)
    assert status == 1 and "data.crop_size=0" in output
    assert _files(tmp_path) == []  # neither outputs/train/<time>/ nor the outputs/train/ made for it


def test_a_data_error_leaves_no_run_directory(voc_root: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    args = [f"data.root={voc_root}", "data.download=false", "data.val_split=missing", "model.net.pretrained=false"]
    status, output = run_main("train.py", args, tmp_path, monkeypatch, capsys)
    assert status == 1 and "missing.txt does not exist" in output
    assert _files(tmp_path) == []


def test_a_mistyped_checkpoint_path_creates_no_run(tmp_path: Path, monkeypatch, capsys) -> None:
    args = ["ckpt_path=outputs/train/nope/checkpoints/last.ckpt"]
    status, output = run_main("train.py", args, tmp_path, monkeypatch, capsys)
    assert status == 1 and "ckpt_path=outputs/train/nope/checkpoints/last.ckpt does not exist" in output
    assert _files(tmp_path) == []  # no outputs/train/nope/.hydra/resume-<time>


def test_a_refused_resume_keeps_the_run_but_not_its_own_record(tmp_path: Path, monkeypatch, capsys) -> None:
    run = tmp_path / "outputs/train/run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints/last.ckpt").write_bytes(b"weights")
    (run / ".hydra").mkdir()
    (run / ".hydra/config.yaml").write_text("the first launch's config\n")
    before = _files(tmp_path)
    status, _ = run_main("train.py", [f"ckpt_path={run}/checkpoints/last.ckpt", "data.crop_size=0"], tmp_path,
                         monkeypatch, capsys)  # fmt: skip
    assert status == 1
    assert sorted(set(_files(tmp_path)) - {"outputs/train/run/train.log"}) == before  # no .hydra/resume-<time>
    assert "data.crop_size=0" in (run / "train.log").read_text()  # the run's log says why the resume stopped


def test_a_mistyped_data_root_is_not_created_when_the_download_fails(tmp_path: Path, monkeypatch, capsys) -> None:
    with closed_port() as port:
        args = ["data.root=dtaa", "data.download=true", f"data.url=http://127.0.0.1:{port}/VOCtrainval.tar"]
        status, output = run_main("train.py", args, tmp_path, monkeypatch, capsys)
    assert status == 1 and "Could not download" in output
    assert _files(tmp_path) == []  # no dtaa/, no run directory


def test_prediction_writes_only_into_its_output_folder(random_checkpoint: Path, tmp_path: Path, monkeypatch,
                                                        capsys) -> None:  # fmt: skip
    Image.new("RGB", (40, 30)).save(tmp_path / "photo.jpg")
    work = tmp_path / "work"
    work.mkdir()
    args = [f"ckpt={random_checkpoint}", f"input={tmp_path / 'photo.jpg'}", "output=masks", "num_workers=0"]
    status, output = run_main("predict.py", args, work, monkeypatch, capsys)
    assert status == 0, output
    assert _files(work) == ["masks", "masks/photo.png", "masks/predict.log"]  # no outputs/predict/<time>/

    status, output = run_main("predict.py", [*args[:1], "input=nothing/*.jpg", "output=failed"], work, monkeypatch,
                              capsys)  # fmt: skip
    assert status == 1 and "names no image files" in output
    assert "failed" not in _files(work)  # a refused start leaves no output folder holding only the log


def test_export_and_the_dataset_check_create_no_folders(voc_root: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    status, output = run_main("segvoc/export.py", ["ckpt=missing.ckpt"], tmp_path, monkeypatch, capsys)
    assert status == 1 and "missing.ckpt" in output
    status, output = run_main("segvoc/data/check.py", [f"data.root={voc_root}"], tmp_path, monkeypatch, capsys)
    assert status == 0, output
    assert _files(tmp_path) == []  # no outputs/export/<time>/, no outputs/check/<time>/, no log files
