"""``python -m segvoc.data.prepare sbd``: SBD's masks into VOC2012 as the train_aug split, on a tiny SBD tree with real
MATLAB files (the layout and GTcls struct of SBD's benchmark.tgz) and a generated VOC2012 tree."""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import hydra
import numpy as np
import pytest
import scipy.io
import scipy.sparse
from PIL import Image

from segvoc.data import prepare
from segvoc.data.check import DatasetCheckError
from segvoc.data.demo import make_demo_voc
from segvoc.data.download import DatasetUnavailableError, voc_dir
from segvoc.data.image import read_mask
from segvoc.data.prepare import SBD_TAR_NAME, main, prepare_sbd, read_sbd_mask
from segvoc.data.voc import read_split
from segvoc.palette import voc_palette
from tests.conftest import REPO, compose_config
from tests.test_download import QuietHandler, Server, closed_port_url

SBD_ONLY_TRAIN = ("2011_000001", "2011_000002")  # images only in SBD: copied into JPEGImages
SBD_ONLY_VAL = "2011_000003"  # its image is already in JPEGImages (as all are in the real data): kept as it is


def write_sbd_mat(path: Path, segmentation: np.ndarray, variable: str = "GTcls") -> None:
    """A MATLAB file shaped like SBD's ``dataset/cls/<id>.mat``: a struct with Boundaries, Segmentation and
    CategoriesPresent (``variable="GTinst"`` makes one like ``dataset/inst``)."""
    boundaries = np.empty((20, 1), dtype=object)
    for index in range(20):
        boundaries[index, 0] = scipy.sparse.csc_matrix(segmentation == index + 1)
    present = np.unique(segmentation[(segmentation > 0) & (segmentation < 255)]).astype(np.uint8).reshape(-1, 1)
    struct = {"Boundaries": boundaries, "Segmentation": segmentation, "CategoriesPresent": present}
    scipy.io.savemat(path, {variable: struct}, do_compression=True)


def write_jpeg(path: Path, height: int, width: int, seed: int) -> None:
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    cv2.imwrite(str(path), image)


@dataclass
class Sbd:
    folder: Path  # holds benchmark_RELEASE
    tgz: Path
    md5: str
    train: list[str]
    val: list[str]
    masks: dict[str, np.ndarray]  # SBD's mask of every id
    voc_train: list[str]
    voc_val: list[str]

    @property
    def train_aug(self) -> list[str]:
        """Worked out by hand from ``make_sbd``'s ids (not by the set formula prepare uses): SBD train brings the two
        new ids, VOC train's first (already in) and VOC val's first (left out); SBD val brings SBD_ONLY_VAL and VOC
        val's second (left out); every VOC train id is in."""
        return sorted([*SBD_ONLY_TRAIN, SBD_ONLY_VAL, *self.voc_train])


def pack(folder: Path, tgz: Path) -> tuple[Path, str]:
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(folder / "benchmark_RELEASE", arcname="benchmark_RELEASE")
    return tgz, hashlib.md5(tgz.read_bytes()).hexdigest()


def make_sbd(folder: Path, voc: Path, replace: dict[str, dict[str, np.ndarray]] | None = None) -> Sbd:
    """An SBD tree under ``folder/benchmark_RELEASE`` overlapping the VOC tree ``voc``, packed as benchmark.tgz.

    SBD train: two new ids, VOC train's first id (with another mask than VOC's) and VOC val's first id; SBD val: a
    new id whose image VOC2012 already has and VOC val's second id. ``replace[id]`` overrides the .mat variables.
    """
    voc_train, voc_val = read_split(voc, "train"), read_split(voc, "val")
    dataset = folder / "benchmark_RELEASE" / "dataset"
    for sub in ("cls", "img", "inst"):
        (dataset / sub).mkdir(parents=True)
    (folder / "benchmark_RELEASE" / "benchmark_code_RELEASE").mkdir()
    (folder / "benchmark_RELEASE" / "benchmark_code_RELEASE" / "README").write_text("evaluation code\n")
    train = [*SBD_ONLY_TRAIN, voc_train[0], voc_val[0]]
    val = [SBD_ONLY_VAL, voc_val[1]]
    rng = np.random.default_rng(7)
    masks = {}
    for seed, name in enumerate(train + val):
        voc_mask = voc / "SegmentationClass" / f"{name}.png"
        height, width = read_mask(voc_mask).shape if voc_mask.is_file() else (int(rng.integers(20, 40)), 30 + seed)
        masks[name] = rng.integers(0, 21, (height, width), dtype=np.uint8)
        if name in (replace or {}):
            scipy.io.savemat(dataset / "cls" / f"{name}.mat", replace[name])
        else:
            write_sbd_mat(dataset / "cls" / f"{name}.mat", masks[name])
        write_sbd_mat(dataset / "inst" / f"{name}.mat", masks[name], variable="GTinst")
        write_jpeg(dataset / "img" / f"{name}.jpg", height, width, seed)
    (dataset / "train.txt").write_text("\n".join(train) + "\n")
    (dataset / "val.txt").write_text("\n".join(val) + "\n")
    tgz, md5 = pack(folder, folder / SBD_TAR_NAME)
    return Sbd(folder, tgz, md5, train, val, masks, voc_train, voc_val)


@pytest.fixture(scope="session")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Sbd]:
    """A VOC tree (6 train, 3 val) that also holds SBD_ONLY_VAL's image, and an SBD tree over it; never modified."""
    root = tmp_path_factory.mktemp("pristine")
    voc = make_demo_voc(root / "data", n_train=6, n_val=3, seed=5)
    sbd = make_sbd(root / "sbd", voc)
    height, width = sbd.masks[SBD_ONLY_VAL].shape
    write_jpeg(voc / "JPEGImages" / f"{SBD_ONLY_VAL}.jpg", height, width, seed=99)
    return root / "data", sbd


@pytest.fixture
def data(pristine: tuple[Path, Sbd], tmp_path: Path) -> tuple[Path, Sbd]:
    """A fresh copy of the VOC data root for one test, and the shared SBD tree."""
    root, sbd = pristine
    shutil.copytree(root, tmp_path / "data")
    return tmp_path / "data", sbd


@pytest.fixture
def server(pristine: tuple[Path, Sbd]) -> Iterator[Server]:
    """Serves the SBD folder (and its benchmark.tgz) on 127.0.0.1."""
    running = Server(pristine[1].folder, QuietHandler)
    yield running
    running.stop()


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder``: its content."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def pin(folder: Path, links: Path) -> dict[str, Path]:
    """Hard-link every file under ``folder`` into ``links``. While a link holds a file, no new file can get its
    inode, so ``replaced`` sees any file written anew (rename over it, or delete and create), however coarse the
    file system's timestamps are and whatever the content."""
    pinned = {}
    for index, path in enumerate(sorted(p for p in folder.rglob("*") if p.is_file())):
        links.mkdir(parents=True, exist_ok=True)
        pinned[str(path.relative_to(folder))] = links / str(index)
        (links / str(index)).hardlink_to(path)
    return pinned


def replaced(folder: Path, pinned: dict[str, Path]) -> list[str]:
    """The pinned files of ``folder`` that are no longer the file pinned (written anew, or gone)."""
    return sorted(
        name for name, link in pinned.items() if not (folder / name).is_file() or not (folder / name).samefile(link)
    )


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.startswith(".") and p.is_file()) + sorted(
        p.name for p in root.glob(".sbd-extract-*")
    )


@pytest.mark.parametrize("kind", ["archive", "folder"])
def test_sbd_masks_become_palette_pngs_and_train_aug_is_the_set_arithmetic(data: tuple[Path, Sbd], kind: str) -> None:
    root, sbd = data
    voc = voc_dir(root)
    source = sbd.tgz if kind == "archive" else sbd.folder / "benchmark_RELEASE"
    voc_image = (voc / "JPEGImages" / f"{SBD_ONLY_VAL}.jpg").read_bytes()
    before = snapshot(sbd.folder)

    ids = prepare_sbd(root, source, md5=sbd.md5 if kind == "archive" else None, workers=2)

    assert len(sbd.train_aug) == 9 and ids == sbd.train_aug == read_split(voc, "train_aug")
    assert (voc / "ImageSets/Segmentation/train_aug.txt").read_text() == "".join(f"{n}\n" for n in sbd.train_aug)
    assert sbd.voc_val[0] not in ids and sbd.voc_val[1] not in ids  # VOC val ids listed by SBD stay out
    assert set(sbd.voc_train) <= set(ids) and {*SBD_ONLY_TRAIN, SBD_ONLY_VAL} <= set(ids)
    aug = voc / "SegmentationClassAug"
    for name in (*SBD_ONLY_TRAIN, SBD_ONLY_VAL):
        with Image.open(aug / f"{name}.png") as png:
            assert png.mode == "P" and png.format == "PNG"
            assert np.array_equal(np.asarray(png.getpalette(), np.uint8).reshape(-1, 3), voc_palette())
            assert np.array_equal(np.asarray(png), sbd.masks[name])
    # VOC's own masks win where both exist, and every VOC train/val mask is there, byte for byte
    assert not np.array_equal(read_mask(aug / f"{sbd.voc_train[0]}.png"), sbd.masks[sbd.voc_train[0]])
    for name in sbd.voc_train + sbd.voc_val:
        assert (aug / f"{name}.png").read_bytes() == (voc / "SegmentationClass" / f"{name}.png").read_bytes()
    assert sorted(p.stem for p in aug.iterdir()) == sorted({*ids, *sbd.voc_val})
    # images VOC lacks are copied from SBD; the ones it has are kept
    for name in SBD_ONLY_TRAIN:
        sbd_image = sbd.folder / "benchmark_RELEASE/dataset/img" / f"{name}.jpg"
        assert (voc / "JPEGImages" / f"{name}.jpg").read_bytes() == sbd_image.read_bytes()
    assert (voc / "JPEGImages" / f"{SBD_ONLY_VAL}.jpg").read_bytes() == voc_image
    assert snapshot(sbd.folder) == before  # the archive / folder given is never modified
    assert leftovers(root) == ["VOCdevkit/VOC2012/.segvoc-demo-complete"]


def test_data_voc_aug_trains_on_the_aug_masks_and_validates_on_voc_val(data: tuple[Path, Sbd]) -> None:
    root, sbd = data
    ids = prepare_sbd(root, sbd.tgz, md5=sbd.md5)
    overrides = ["data=voc_aug", f"data.root={root}", "data.download=false", "data.num_workers=0", "data.crop_size=32"]
    cfg = compose_config(overrides)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.check_data()  # decodes every image and mask: sizes and values of the converted masks are right
    datamodule.setup("fit")
    aug = voc_dir(root) / "SegmentationClassAug"
    assert datamodule.train_set.ids == ids and datamodule.val_set.ids == sbd.voc_val
    name = SBD_ONLY_TRAIN[0]
    image_path, mask_path = datamodule.train_set.paths(ids.index(name))
    assert mask_path == aug / f"{name}.png" and image_path == voc_dir(root) / "JPEGImages" / f"{name}.jpg"
    assert np.array_equal(read_mask(mask_path), sbd.masks[name])
    assert datamodule.val_set.paths(0)[1] == aug / f"{sbd.voc_val[0]}.png"
    image, mask = datamodule.train_set[ids.index(name)]
    assert image.shape[-2:] == mask.shape == (cfg.data.crop_size, cfg.data.crop_size)


def test_voc_aug_without_prepared_files_says_to_run_prepare(data: tuple[Path, Sbd]) -> None:
    root, _ = data
    cfg = compose_config(["data=voc_aug", f"data.root={root}", "data.download=false", "data.num_workers=0"])
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    with pytest.raises(DatasetCheckError) as error:
        datamodule.check_data()
    message = str(error.value)
    assert f"python -m segvoc.data.prepare sbd --root {root}" in message
    assert "train_aug.txt does not exist" in message and "SegmentationClassAug does not exist" in message


def test_experiment_voc_aug_is_the_public_recipe() -> None:
    cfg = compose_config(["experiment=voc_aug", "output_dir=x"])
    assert cfg.data.train_split == "train_aug" and cfg.data.mask_dir == "SegmentationClassAug"
    assert (cfg.data.batch_size, cfg.data.crop_size, cfg.trainer.max_steps) == (16, 513, 30000)
    assert cfg.optimizer._target_ == "torch.optim.SGD" and (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (
        0.01,
        1e-4,
    )
    assert cfg.scheduler.power == 0.9 and cfg.scheduler.total_iters == 30000
    assert cfg.model.net.output_stride == 16 and cfg.data.val_split == "val"


def test_download_over_localhost_then_the_archive_is_deleted(data: tuple[Path, Sbd], server: Server) -> None:
    root, sbd = data
    ids = prepare_sbd(root, url=server.url(SBD_TAR_NAME), md5=sbd.md5)
    assert ids == sbd.train_aug == read_split(voc_dir(root), "train_aug")
    assert not (root / SBD_TAR_NAME).exists() and not (root / f"{SBD_TAR_NAME}.part").exists()
    assert leftovers(root) == ["VOCdevkit/VOC2012/.segvoc-demo-complete"]


def test_downloaded_archive_with_wrong_checksum_is_deleted_and_nothing_written(
    data: tuple[Path, Sbd], server: Server
) -> None:
    root, _ = data
    url = server.url(SBD_TAR_NAME)
    with pytest.raises(DatasetUnavailableError, match="did not match its checksum") as error:
        prepare_sbd(root, url=url, md5="0" * 32)
    assert url in str(error.value) and "--tar /path/to/benchmark.tgz" in str(error.value)
    assert "data.tar_path" not in str(error.value)  # the advice is SBD's, not VOC's
    assert sorted(p.name for p in root.iterdir()) == ["VOCdevkit"]
    assert not (voc_dir(root) / "SegmentationClassAug").exists()


def test_unreachable_server_names_the_url_and_the_tar_option(data: tuple[Path, Sbd]) -> None:
    url = closed_port_url()
    with pytest.raises(DatasetUnavailableError, match="Could not download") as error:
        prepare_sbd(data[0], url=url)
    assert url in str(error.value) and "--tar" in str(error.value)


def test_given_archive_with_wrong_checksum_is_left_untouched(data: tuple[Path, Sbd]) -> None:
    root, sbd = data
    content = sbd.tgz.read_bytes()
    with pytest.raises(DatasetUnavailableError, match="does not match the checksum") as error:
        prepare_sbd(root, sbd.tgz)  # the official MD5
    assert str(sbd.tgz) in str(error.value) and "--md5 none" in str(error.value)
    assert sbd.tgz.read_bytes() == content
    assert not (voc_dir(root) / "SegmentationClassAug").exists()


def test_rerun_skips_finished_work_and_an_interrupted_run_continues(data: tuple[Path, Sbd], tmp_path: Path) -> None:
    root, sbd = data
    voc = voc_dir(root)
    ids = prepare_sbd(root, sbd.tgz, md5=sbd.md5)
    done = snapshot(voc)
    pinned = pin(voc, tmp_path / "links")
    # finished: nothing is read, downloaded or written (the URL has no server)
    assert prepare_sbd(root, url=closed_port_url()) == ids
    assert snapshot(voc) == done and replaced(voc, pinned) == []

    # interrupted while writing the masks
    aug = voc / "SegmentationClassAug"
    (voc / "ImageSets/Segmentation/train_aug.txt").unlink()
    (aug / f"{SBD_ONLY_TRAIN[1]}.png").unlink()
    pinned = pin(voc, tmp_path / "links-2")
    (aug / f".{SBD_ONLY_TRAIN[0]}.png.tmp").write_bytes(b"half a png")  # written before it was renamed
    assert prepare_sbd(root, sbd.tgz, md5=sbd.md5) == ids
    assert snapshot(voc) == done
    # only what was missing is written: every file that was there is still the same file
    assert replaced(voc, pinned) == []
    assert sorted(set(done) - set(pinned)) == [
        "ImageSets/Segmentation/train_aug.txt",
        f"SegmentationClassAug/{SBD_ONLY_TRAIN[1]}.png",
    ]


def test_mask_file_without_gtcls_is_named(data: tuple[Path, Sbd], tmp_path: Path) -> None:
    root, _ = data
    name = SBD_ONLY_TRAIN[1]
    bad = make_sbd(
        tmp_path / "bad", voc_dir(root), replace={name: {"GTinst": {"Segmentation": np.zeros((4, 4), np.uint8)}}}
    )
    with pytest.raises(DatasetUnavailableError, match="has no GTcls field") as error:
        prepare_sbd(root, bad.tgz, md5=bad.md5)
    assert f"{name}.mat" in str(error.value) and "GTinst" in str(error.value)
    assert not (voc_dir(root) / "ImageSets/Segmentation/train_aug.txt").exists()
    assert not list(root.glob(".sbd-extract-*"))


def test_read_sbd_mask_keeps_two_dimensions_and_refuses_bad_values(tmp_path: Path) -> None:
    thin = np.arange(5, dtype=np.uint8).reshape(1, 5)
    write_sbd_mat(tmp_path / "thin.mat", thin)
    assert np.array_equal(read_sbd_mask(tmp_path / "thin.mat"), thin)
    write_sbd_mat(tmp_path / "wide.mat", np.full((3, 3), 300, np.uint16))
    with pytest.raises(DatasetUnavailableError, match=r"wide\.mat has a Segmentation of \(3, 3\) uint16"):
        read_sbd_mask(tmp_path / "wide.mat")
    (tmp_path / "junk.mat").write_bytes(b"not a MATLAB file" * 20)
    with pytest.raises(DatasetUnavailableError, match=r"Cannot read the SBD mask .*junk\.mat as a MATLAB file"):
        read_sbd_mask(tmp_path / "junk.mat")


def _hostile(tgz: Path, name: str, link: str | None) -> None:
    with tarfile.open(tgz, "w:gz") as tar:
        info = tarfile.TarInfo(name)
        if link is None:
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
        else:
            info.type, info.linkname = tarfile.SYMTYPE, link
            tar.addfile(info)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("truncated", "truncated or corrupt"),
        ("not_an_archive", "truncated or corrupt"),
        ("dotdot", "Refusing to extract .* has a path outside"),
        ("symlink", "Refusing to extract .* links to '/etc/passwd'"),
        ("voc_tar", "does not hold SBD's dataset/train.txt"),
    ],
)
def test_corrupt_hostile_or_wrong_archive_is_refused(
    data: tuple[Path, Sbd], tmp_path: Path, case: str, match: str
) -> None:
    root, sbd = data
    tgz = tmp_path / "given" / SBD_TAR_NAME
    tgz.parent.mkdir()
    if case == "truncated":
        tgz.write_bytes(sbd.tgz.read_bytes()[: sbd.tgz.stat().st_size // 2])
    elif case == "not_an_archive":
        tgz.write_bytes(b"<html>Not Found</html>" * 100)
    elif case == "dotdot":
        _hostile(tgz, "benchmark_RELEASE/../../evil.txt", None)
    elif case == "symlink":
        _hostile(tgz, "benchmark_RELEASE/dataset/cls/2011_000001.mat", "/etc/passwd")
    else:
        with tarfile.open(tgz, "w:gz") as tar:
            tar.add(voc_dir(root), arcname="VOCdevkit/VOC2012")
    voc_before = snapshot(voc_dir(root))
    with pytest.raises(DatasetUnavailableError, match=match) as error:
        prepare_sbd(root, tgz, md5=None)
    assert str(tgz) in str(error.value)
    assert sorted(p.name for p in root.iterdir()) == ["VOCdevkit"]  # no extraction folder left, nothing outside
    assert not (tmp_path / "evil.txt").exists() and not (root.parent / "evil.txt").exists()
    assert not (voc_dir(root) / "ImageSets/Segmentation/train_aug.txt").exists()
    assert snapshot(voc_dir(root)) == voc_before


def test_missing_voc2012_says_how_to_get_it(tmp_path: Path, pristine: tuple[Path, Sbd]) -> None:
    with pytest.raises(DatasetUnavailableError, match="Pascal VOC2012 was not found") as error:
        prepare_sbd(tmp_path / "empty", pristine[1].tgz)
    message = str(error.value)
    assert "data.download=true" in message and f"data.root={tmp_path / 'empty'}" in message and "--root" in message


def test_count_warning_only_when_official_lists_give_another_count(
    data: tuple[Path, Sbd], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root, sbd = data
    # pretend this tiny SBD is the official one, whose lists must give TRAIN_AUG_SIZE ids
    monkeypatch.setattr(prepare, "SBD_SPLIT_SIZES", {"train": len(sbd.train), "val": len(sbd.val)})
    monkeypatch.setattr(prepare, "TRAIN_AUG_SIZE", len(sbd.train_aug) + 1)
    with caplog.at_level(logging.INFO, logger="segvoc.data.prepare"):
        prepare_sbd(root, sbd.folder, md5=None)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        warnings and f"has {len(sbd.train_aug)} ids" in warnings[0] and f"give {len(sbd.train_aug) + 1}" in warnings[0]
    )
    assert any(f"{len(sbd.train_aug)} ids = (SBD train" in r.getMessage() for r in caplog.records)

    caplog.clear()
    (voc_dir(root) / "ImageSets/Segmentation/train_aug.txt").unlink()
    monkeypatch.setattr(prepare, "TRAIN_AUG_SIZE", len(sbd.train_aug))
    with caplog.at_level(logging.INFO, logger="segvoc.data.prepare"):
        prepare_sbd(root, sbd.folder, md5=None)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.slow  # python -m segvoc.data.prepare in its own process
def test_help_runs_as_a_module() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "segvoc.data.prepare", "sbd", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for text in (
        "--root",
        "--tar",
        "--url",
        "--workers",
        "--md5",
        "benchmark_RELEASE",
        "train_aug",
        "SegmentationClassAug",
    ):
        assert text in proc.stdout
    assert "usage: python -m segvoc.data.prepare sbd" in proc.stdout


def test_command_line_prepares_and_reports_errors(
    data: tuple[Path, Sbd], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    root, sbd = data
    assert main(["sbd", "--root", str(root), "--tar", str(sbd.tgz), "--md5", sbd.md5, "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert f"lists {len(sbd.train_aug)} training images" in out and "experiment=voc_aug" in out
    assert read_split(voc_dir(root), "train_aug") == sbd.train_aug

    assert main(["sbd", "--root", str(tmp_path / "nothing"), "--tar", str(sbd.tgz), "--md5", "none"]) == 1
    assert capsys.readouterr().err.startswith("error: Pascal VOC2012 was not found")
    with pytest.raises(SystemExit) as exit_info:
        main(["sbd", "--workers", "0"])
    assert exit_info.value.code == 2 and "must be at least 1" in capsys.readouterr().err
