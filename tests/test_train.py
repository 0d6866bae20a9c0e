"""The training task end to end: composed configs, real training steps, checkpoints, resume, TensorBoard."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from segvoc.models.backbone import InputPaddedBlock
from segvoc.tasks.train import train
from tests.conftest import closed_port, compose_config, run_main
from tests.test_sweep import basic_multirun, one_compute_thread


@pytest.fixture(scope="module", autouse=True)
def _one_compute_thread() -> Iterator[None]:
    """One torch thread for the training in this process (a third of the time on two shared cores)."""
    with one_compute_thread():
        yield


def scalars(run_dir: Path) -> dict[str, list[float]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_fast_dev_run(make_cfg) -> None:
    metrics = train(make_cfg("+trainer.fast_dev_run=true"))
    assert "val/mIoU" in metrics and 0.0 <= metrics["val/mIoU"] <= 1.0


def test_training_logs_checkpoints_and_tensorboard(make_cfg) -> None:
    cfg = make_cfg("optimizer.lr=0.02")  # given here: the expected first learning rate does not come from a YAML
    metrics = train(cfg)
    run = Path(cfg.output_dir)
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    logged = scalars(run)
    for tag in (
        "train/loss",
        "lr",
        "val/loss",
        "val/mIoU",
        "val/acc",
        "val/mean_acc",
        "val/fw_iou",
        "val/iou/background",
    ):
        assert tag in logged, f"{tag} not in TensorBoard: {sorted(logged)}"
    assert len(logged["val/mIoU"]) == 2  # every 2 of 4 steps
    assert metrics["best/val/mIoU"] == pytest.approx(max(logged["val/mIoU"]), abs=1e-6)
    # poly decay stepped every iteration: lr strictly decreasing from the given 0.02
    lrs = logged["lr"]
    assert lrs[0] == pytest.approx(0.02) and all(lrs[i] > lrs[i + 1] for i in range(len(lrs) - 1))
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert "config/text_summary" in acc.Tags()["tensors"]


def test_resume_continues_steps_and_keeps_best_score(make_cfg) -> None:
    first = make_cfg("trainer.max_steps=4")
    train(first)
    run = Path(first.output_dir)
    last = run / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["global_step"] == 4
    best = next(v for k, v in state["callbacks"].items() if "val/mIoU" in k)["best_model_score"]
    metrics = train(make_cfg("trainer.max_steps=6", f"ckpt_path={last}"))
    resumed = torch.load(last, map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 6
    assert metrics["best/val/mIoU"] >= float(best)
    # the scheduler resumed at step 4 of 6, not from the start
    assert resumed["lr_schedulers"][0]["last_epoch"] == 6
    # one TensorBoard stream: validation at steps 2, 4 (first run) and 6 (resumed)
    assert len(scalars(run)["val/mIoU"]) == 3


def test_resume_continues_in_the_checkpoint_run_directory(tmp_path: Path) -> None:
    run = tmp_path / "outputs/train/2026-01-01_00-00-00"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    cfg = compose_config([f"ckpt_path={run}/checkpoints/last.ckpt", "output_dir=x"], return_hydra_config=True)
    assert cfg.hydra.run.dir == str(run)
    assert cfg.hydra.output_subdir.startswith(".hydra/resume-")
    # a mistyped checkpoint path is not a run directory to create (the launch fails validation instead)
    missing = tmp_path / "outputs/train/nope/checkpoints/last.ckpt"
    cfg = compose_config([f"ckpt_path={missing}", "output_dir=x"], return_hydra_config=True)
    assert cfg.hydra.run.dir.startswith("outputs/train/") and cfg.hydra.output_subdir == ".hydra"
    cfg = compose_config(["ckpt_path=/somewhere/model.ckpt", "output_dir=x"], return_hydra_config=True)
    assert cfg.hydra.run.dir.startswith("outputs/train/")


def test_backbone_lr_multiplier_and_adamw(make_cfg) -> None:
    import hydra

    cfg = make_cfg("optimizer=adamw", "model.backbone_lr_mult=0.1", "scheduler=step")
    model = hydra.utils.instantiate(cfg.model)
    optimizer = model.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3, 1e-4])
    n_backbone = sum(p.numel() for p in optimizer.param_groups[1]["params"])
    assert n_backbone == sum(p.numel() for p in model.net.backbone.parameters())


@pytest.mark.parametrize("arch", ["deeplabv3plus", "deeplabv3"])
def test_each_model_choice_trains(make_cfg, arch: str) -> None:
    metrics = train(make_cfg(f"model={arch}", "trainer.max_steps=2"))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_experiments_compose_as_documented() -> None:
    seed = compose_config(["experiment=seed_report", "output_dir=x"])
    assert seed.data.train_split == "train" and seed.data.batch_size == 8 and seed.data.crop_size == 513
    assert seed.trainer.max_steps == 35000 and seed.trainer.val_check_interval == 100
    assert seed.optimizer.lr == 0.01 and seed.optimizer.weight_decay == 1e-4
    assert seed.scheduler._target_.endswith("PolynomialLR") and seed.scheduler.total_iters == 35000
    assert seed.model.net.output_stride == 16
    demo = compose_config(["experiment=demo", "output_dir=x"])
    assert demo.data.demo and not demo.model.net.pretrained
    OmegaConf.resolve(demo)


def test_seed_report_builds_the_seed_tools_network() -> None:
    cfg = compose_config(["experiment=seed_report", "output_dir=x", "model.net.pretrained=false"])
    net = cfg.model.net
    assert (net.stem_padding, net.block_padding, net.backbone_bn_momentum) == (0, "input", 0.01)
    built = hydra.utils.instantiate(net)
    assert built.spec["stem_padding"] == 0 and built.spec["block_padding"] == "input"
    assert all(isinstance(b, InputPaddedBlock) for b in [*built.backbone.low_level[1:], *built.backbone.high_level])
    backbone_bns = [m for m in built.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert backbone_bns and {m.momentum for m in backbone_bns} == {0.01}
    # trainer=ddp converts BatchNorm to SyncBatchNorm; the momentum must survive it
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(built.backbone)
    assert {m.momentum for m in synced.modules() if isinstance(m, nn.SyncBatchNorm)} == {0.01}


def test_learning_lowers_the_loss_on_a_few_images(make_cfg) -> None:
    """20 seeded steps on 4 images at crop 64: the training loss of the last steps is well below that of the first."""
    cfg = make_cfg(
        "seed=1",
        "data.train_split=val",
        "data.scale_range=[1.0,1.0]",
        "data.crop_size=64",
        "optimizer=adamw",
        "optimizer.lr=3e-3",
        "scheduler.total_iters=20",
        "trainer.max_steps=20",
        "trainer.val_check_interval=20",
    )
    train(cfg)
    losses = scalars(Path(cfg.output_dir))["train/loss"]
    assert len(losses) == 20
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.6 * first, losses


def test_train_without_data_or_network_ends_with_a_clear_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # train.py's answer, in this process (its own process is started by tests/test_crash.py and tests/test_ddp.py)
    with closed_port() as port:
        url = f"http://127.0.0.1:{port}/VOCtrainval_11-May-2012.tar"
        args = [f"data.root={tmp_path / 'data'}", f"data.url={url}"]
        status, output = run_main("train.py", args, tmp_path, monkeypatch, capsys)
    assert status == 1
    assert "data.root" in output and "data.tar_path" in output
    assert "Traceback" not in output


@pytest.mark.slow
def test_multirun_writes_one_directory_per_job(
    voc_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # the two-job sweep of tests/test_sweep.py, run once for this test, that one and tests/test_launchers.py
    sweep, _ = basic_multirun(voc_root, tmp_path_factory, monkeypatch, capsys)
    jobs = sorted(p.parent.parent for p in sweep.rglob("checkpoints/last.ckpt"))
    assert len(jobs) == 2 and jobs[0] != jobs[1]
    assert sorted(job.relative_to(sweep).as_posix() for job in jobs) == ["0", "1"]  # one folder of the sweep each
    assert all((job / "tensorboard").is_dir() for job in jobs)
