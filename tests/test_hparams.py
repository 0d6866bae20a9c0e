"""HParams, run names, the other loggers and early stopping: read back with TensorBoard's, MLflow's and Lightning's
own readers after real (tiny) training runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, metadata

from segvoc.tasks.train import train
from segvoc.training.hparams import RECIPE_KEYS, RESULT_METRICS, run_hparams, run_name
from tests.conftest import compose_config


def hparams_of(event_dir: Path) -> tuple[EventAccumulator, dict, list[str], int | None]:
    """What TensorBoard's HParams plugin reads from a run: its hyper-parameters, declared metrics, end status."""
    acc = EventAccumulator(str(event_dir))
    acc.Reload()
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    values = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    assert sorted(h.name for h in experiment.hparam_infos) == sorted(values)
    end = content.get(metadata.SESSION_END_INFO_TAG)
    status = metadata.parse_session_end_info_plugin_data(end).status if end else None
    return acc, values, [m.name.tag for m in experiment.metric_infos], status


def last(acc: EventAccumulator, tag: str) -> float:
    return acc.Scalars(tag)[-1].value


@pytest.mark.slow
def test_hparams_and_results_reach_tensorboard(make_cfg) -> None:
    cfg = make_cfg("optimizer.lr=0.02")
    metrics = train(cfg)
    run = Path(cfg.output_dir)
    acc, values, metric_names, status = hparams_of(run / "tensorboard")
    assert set(RECIPE_KEYS) <= set(values)
    assert values["optimizer.lr"] == pytest.approx(0.02) and values["data.crop_size"] == 96
    assert values["trainer.precision"] == "32-true" and values["seed"] == 1
    assert metric_names == list(RESULT_METRICS)
    result = json.loads((run / "result.json").read_text())
    # the values the plugin shows: the last scalar of each metric
    assert last(acc, "best/val/mIoU") == pytest.approx(result["best_score"], abs=1e-6)
    assert last(acc, "best/val/mIoU") == pytest.approx(max(e.value for e in acc.Scalars("val/mIoU")), abs=1e-6)
    for name in ("val/mIoU", "val/acc", "val/loss"):
        assert last(acc, name) == pytest.approx(metrics[name], abs=1e-6)
    assert status == api_pb2.STATUS_SUCCESS


class CrashAtStep(L.Callback):
    """Raises before training step ``step`` (after the validations before it)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("crash for the test")


@pytest.mark.slow
def test_a_crashed_run_shows_the_results_it_reached(make_cfg) -> None:
    cfg = make_cfg("+callbacks.crash._target_=tests.test_hparams.CrashAtStep", "+callbacks.crash.step=3")
    with pytest.raises(RuntimeError, match="crash for the test"):
        train(cfg)
    acc, values, _, status = hparams_of(Path(cfg.output_dir) / "tensorboard")
    assert values["trainer.max_steps"] == 4
    assert status == api_pb2.STATUS_FAILURE
    assert len(acc.Scalars("val/mIoU")) == 1  # the validation after step 2
    assert last(acc, "best/val/mIoU") == pytest.approx(last(acc, "val/mIoU"), abs=1e-6)


def test_run_hparams_take_the_recipe_and_every_override(make_cfg) -> None:
    cfg = make_cfg()
    params = run_hparams(cfg, ["experiment=demo", "trainer.val_check_interval=2", "+data.scale_range=[0.5,2.0]",
                               "~callbacks.model_summary", "hydra.job.chdir=true"])  # fmt: skip
    assert set(RECIPE_KEYS) <= set(params)
    assert params["experiment"] == "demo" and params["trainer.val_check_interval"] == 2
    assert params["data.scale_range"] == "[0.5, 2.0]"  # lists as text, which the plugin can show
    assert not any(key.startswith(("hydra", "~", "callbacks")) for key in params)


def test_run_names() -> None:
    overrides = ["experiment=demo", "optimizer.lr=0.005", "model.backbone_lr_mult=1.0", "data.root=/data/voc"]
    assert run_name(overrides, {"optimizer.lr", "model.backbone_lr_mult"}) == "lr=0.005,backbone_lr_mult=1.0"
    # without the swept keys: every override but where and how the job runs
    assert run_name(overrides) == "experiment=demo,lr=0.005,backbone_lr_mult=1.0"
    # two keys ending alike keep their full names; a path is made safe for a folder name
    assert run_name(["optimizer.lr=0.1", "scheduler.lr=0.2"]) == "optimizer.lr=0.1,scheduler.lr=0.2"
    assert run_name(["ckpt_path=/a/b.ckpt", "model.net.init_from=/runs/x y/best.ckpt"]) == (
        "init_from=_runs_x_y_best.ckpt"
    )
    assert run_name([]) == run_name(["data.root=x", "hydra.job.chdir=true"]) == "defaults"
    long = [f"optimizer.lr=0.{'1' * 80}", "seed=1"], [f"optimizer.lr=0.{'1' * 80}", "seed=2"]
    assert len(run_name(long[0])) <= 96 and run_name(long[0]) != run_name(long[1])


def test_logger_choices_compose() -> None:
    targets = {
        name: [c._target_.rsplit(".", 1)[-1] for c in compose_config([f"logger={name}"]).logger.values()]
        for name in ("tensorboard", "csv", "mlflow", "many")
    }
    assert targets == {
        "tensorboard": ["TensorBoardLogger"],
        "csv": ["CSVLogger"],
        "mlflow": ["MLFlowLogger"],
        "many": ["TensorBoardLogger", "CSVLogger"],
    }


@pytest.mark.slow
def test_csv_and_mlflow_loggers(make_cfg) -> None:
    mlflow = pytest.importorskip("mlflow")
    cfg = make_cfg("logger=[csv,mlflow]")
    metrics = train(cfg)
    run = Path(cfg.output_dir)
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    mious = [float(r["val/mIoU"]) for r in rows if r.get("val/mIoU")]
    assert len(mious) == 2 and mious[-1] == pytest.approx(metrics["val/mIoU"], abs=1e-6)
    assert yaml.safe_load((run / "csv" / "hparams.yaml").read_text())["optimizer.lr"] == 0.01

    # MLflow: a local store (SQLite file, artifact folder) in the run folder, read back with MLflow's own client
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(cfg.task_name)
    (found,) = client.search_runs([experiment.experiment_id])
    assert float(found.data.params["optimizer.lr"]) == 0.01 and found.data.params["trainer.precision"] == "32-true"
    for name in ("val/mIoU", "val/loss", "best/val/mIoU"):
        assert found.data.metrics[name] == pytest.approx(metrics[name], abs=1e-6)
    artifacts = [a.path for a in client.list_artifacts(found.info.run_id, "checkpoints")]
    assert artifacts == ["checkpoints/best.ckpt"]
    stored = Path(client.download_artifacts(found.info.run_id, "checkpoints/best.ckpt", str(run / "download")))
    assert stored.read_bytes() == (run / "checkpoints" / "best.ckpt").read_bytes()


@pytest.mark.slow
def test_early_stopping_is_off_by_default_and_stops_a_stalled_run(make_cfg) -> None:
    assert compose_config([]).callbacks.early_stopping.patience is None  # off: train() leaves the entry out
    # min_delta=1: no validation can improve on the first (step 2), so the second after it (step 6) stops the run
    stopping = ["callbacks.early_stopping.patience=2", "callbacks.early_stopping.min_delta=1"]
    stalled = make_cfg("trainer.max_steps=10", *stopping)
    train(stalled)
    assert json.loads((Path(stalled.output_dir) / "result.json").read_text())["global_step"] == 6
