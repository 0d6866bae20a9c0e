"""Sweep summaries: the table and files over a sweep folder, the Hydra callback, and real multiruns of train.py."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import OmegaConf

from segvoc.tasks.sweep import NO_RESULT, SweepSummary, main, summarize, write_summary
from tests.conftest import compose_config, run_main

HYDRA_LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's job_logging default


def fake_job(
    sweep: Path, num: int, overrides: list[str], result: dict | None = None, mode: str = "max", record: str = ".hydra"
) -> Path:
    """A job folder as a multirun leaves it: ``<record>/{overrides,config}.yaml`` and, if given, ``result.json``."""
    job = sweep / str(num)
    (job / record).mkdir(parents=True)
    (job / record / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = {"callbacks": {"model_checkpoint": {"monitor": "val/mIoU", "mode": mode}, "last": {"monitor": None}}}
    (job / record / "config.yaml").write_text(yaml.safe_dump(config))
    if result is not None:
        (job / "result.json").write_text(json.dumps(result))
    return job


def result(score: float, step: int = 40) -> dict:
    return {
        "global_step": step,
        "metrics": {"val/mIoU": score - 0.01, "train/loss": 0.5},
        "monitor": "val/mIoU",
        "best_score": score,
        "best_checkpoint": f"/runs/ckpt-{score}.ckpt",
    }


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Jobs 0 and 1 finished (0.61 and 0.72), job 2 crashed with an error in its log, job 10 left nothing."""
    sweep = tmp_path / "sweep"
    common = ["experiment=demo", "trainer.max_steps=40"]
    fake_job(sweep, 0, ["optimizer.lr=0.01", *common], result(0.61))
    fake_job(sweep, 1, ["optimizer.lr=0.005", *common], result(0.72, step=38))
    crashed = fake_job(sweep, 2, ["optimizer.lr=0.5", *common])
    (crashed / "train.log").write_text(
        "[2025-01-01 10:00:00,000][segvoc.tasks.train][INFO] - Run directory: x\n"
        "[2025-01-01 10:00:09,000][segvoc.tasks.sweep][ERROR] - RuntimeError: CUDA out of memory\n"
        "[2025-01-01 10:00:09,000][segvoc.tasks.sweep][ERROR] - The summary so far: ...\n"
    )
    fake_job(sweep, 10, ["optimizer.lr=0.001", *common])
    # what the basic sweeper records before it launches: the command line's overrides, the swept one among them
    multirun = {"hydra": {"overrides": {"task": ["optimizer.lr=0.01,0.005,0.5,0.001", *common]}}}
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    return sweep


def test_summary_ranks_jobs_and_lists_failed_ones(sweep: Path) -> None:
    results = summarize(sweep)
    assert [job.job for job in results.jobs] == ["1", "0", "2", "10"]
    assert [job.status for job in results.jobs] == ["ok", "ok", "failed", "failed"]
    best = results.jobs[0]
    assert (best.best_score, best.global_step, best.best_checkpoint) == (0.72, 38, "/runs/ckpt-0.72.ckpt")
    assert [job.name for job in results.jobs] == ["lr=0.005", "lr=0.01", "lr=0.5", "lr=0.001"]  # as in TensorBoard
    assert best.overrides == ["optimizer.lr=0.005", "experiment=demo", "trainer.max_steps=40"]
    assert results.jobs[2].error == "RuntimeError: CUDA out of memory"
    assert results.jobs[3].error == NO_RESULT
    assert (results.monitor, results.mode) == ("val/mIoU", "max")
    assert results.common_overrides() == ["experiment=demo", "trainer.max_steps=40"]


def test_summary_files(sweep: Path) -> None:
    paths = write_summary(summarize(sweep))
    assert [p.name for p in paths] == ["summary.csv", "summary.json", "summary.md"]

    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [(r["job"], r["name"], r["status"], r["best_score"], r["global_step"]) for r in rows] == [
        ("1", "lr=0.005", "ok", "0.72", "38"),
        ("0", "lr=0.01", "ok", "0.61", "40"),
        ("2", "lr=0.5", "failed", "", ""),
        ("10", "lr=0.001", "failed", "", ""),
    ]
    assert rows[0]["overrides"] == "optimizer.lr=0.005 experiment=demo trainer.max_steps=40"
    assert rows[2]["error"] == "RuntimeError: CUDA out of memory"

    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["monitor"] == "val/mIoU" and summary["mode"] == "max"
    assert summary["jobs"][0]["metrics"] == {"val/mIoU": 0.71, "train/loss": 0.5}
    assert summary["jobs"][0]["dir"] == str(sweep / "1")

    markdown = (sweep / "summary.md").read_text()
    assert "| 1 | lr=0.005 | ok | 0.7200 | 38 | /runs/ckpt-0.72.ckpt |" in markdown
    assert "Job 2 failed: RuntimeError: CUDA out of memory" in markdown
    assert not list(sweep.glob(".*.tmp"))


def test_a_minimised_metric_ranks_lowest_first(tmp_path: Path) -> None:
    for num, score in enumerate((0.3, 0.2, 0.4)):
        fake_job(tmp_path, num, [f"optimizer.lr={num}"], {**result(score), "monitor": "val/mIoU"}, mode="min")
    results = summarize(tmp_path)
    assert results.mode == "min"
    assert [job.best_score for job in results.jobs] == [0.2, 0.3, 0.4]


def test_damaged_result_and_evaluation_jobs(tmp_path: Path) -> None:
    (fake_job(tmp_path, 0, ["a=1"]) / "result.json").write_text('{"global_st')  # cut off mid-write
    # a train=false job of checkpoint <run>/checkpoints/best.ckpt records its config in .hydra/resume-<time>
    evaluation = {"mean_iou": 0.8, "overall_acc": 0.9, "checkpoint": "best.ckpt", "classes": []}
    job = fake_job(tmp_path, 1, ["a=2", "train=false"], record=".hydra/resume-2025-01-01_10-00-00")
    (job / "eval-whole.json").write_text(json.dumps(evaluation))
    jobs = summarize(tmp_path).jobs
    assert [(j.job, j.status, j.best_score) for j in jobs] == [("1", "ok", 0.8), ("0", "failed", None)]
    assert jobs[0].overrides == ["a=2", "train=false"] and jobs[0].best_checkpoint == "best.ckpt"
    assert jobs[1].error.startswith("unreadable result")


def test_command_line(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "lr=0.005" in out and "0.7200" in out and "Job 10 failed" in out
    assert (sweep / "summary.csv").is_file()

    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 1
    assert "No jobs under" in capsys.readouterr().out
    assert main([str(tmp_path / "missing")]) == 1  # one paragraph, like every segvoc command
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'missing'} is not a folder") and "Traceback" not in err
    with pytest.raises(SystemExit) as usage:  # argparse's own usage errors keep status 2
        main([])
    assert usage.value.code == 2


def test_callback_logs_a_failed_job_into_its_log_and_updates_the_summary(sweep: Path) -> None:
    job_dir = fake_job(sweep, 11, ["optimizer.lr=2.0"])
    config = OmegaConf.create(
        {"hydra": {"mode": RunMode.MULTIRUN, "sweep": {"dir": str(sweep)}, "runtime": {"output_dir": str(job_dir)}}}
    )
    handler = logging.FileHandler(job_dir / "train.log")  # what Hydra's job logging does during a job
    handler.setFormatter(logging.Formatter(HYDRA_LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    try:
        failed = JobReturn(status=JobStatus.FAILED, _return_value=ValueError("loss is nan\nat step 3"))
        SweepSummary().on_job_end(config, failed)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    rows = {row["job"]: row for row in csv.DictReader((sweep / "summary.csv").open())}
    assert rows["11"]["status"] == "failed" and rows["11"]["error"] == "ValueError: loss is nan at step 3"
    assert rows["1"]["best_score"] == "0.72"


def test_callback_does_nothing_outside_a_multirun(tmp_path: Path) -> None:
    config = OmegaConf.create({"hydra": {"mode": RunMode.RUN, "sweep": {"dir": str(tmp_path)}}})
    SweepSummary().on_job_end(config, JobReturn(status=JobStatus.COMPLETED, _return_value=0.5))
    assert list(tmp_path.iterdir()) == []


def test_callback_is_registered() -> None:
    cfg = compose_config([], return_hydra_config=True)
    assert [c._target_ for c in cfg.hydra.callbacks.values()] == ["segvoc.tasks.sweep.SweepSummary"]


SHRINK = [  # a second or two per job on a CPU: 2 steps on 64-pixel crops, one validation on 64-pixel centre crops
    "data.num_workers=0",
    "data.crop_size=64",
    "data.crop_val=true",
    "data.batch_size=2",
    "data.val_batch_size=2",
    "trainer.accelerator=cpu",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "+trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "~callbacks.model_summary",
]
# the basic launcher's sweep: the reference of tests/test_launchers.py, and tests/test_train.py's multirun
GRID = ["experiment=demo", "optimizer.lr=0.002,0.001", *SHRINK]


@contextlib.contextmanager
def one_compute_thread() -> Iterator[None]:
    """One torch thread in this process, and in the processes it starts (``OMP_NUM_THREADS``), while the block runs.
    On two shared cores two threads of a process wait on each other: a training step took 5x as long as on one. A
    thread count changes the order of float sums, so runs compared to the last digits must have the same count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("OMP_NUM_THREADS", "1")
            yield
    finally:
        torch.set_num_threads(threads)


def basic_multirun(
    voc_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> tuple[Path, str]:
    """``python train.py -m <GRID>`` on Hydra's basic launcher, run once a session (in this process, by the first
    test that asks; the jobs of that launcher run in its process anyway) and shared read-only by the tests of three
    modules: ``(sweep folder, what the command printed)``. One compute thread, as the other launchers' workers of
    tests/test_launchers.py have, whose results must equal these to the last digits."""
    folder = tmp_path_factory.getbasetemp() / "basic_multirun"
    printed = folder / "printed.txt"
    if not printed.is_file():  # a module-level cache would not do: tests/test_*.py are imported twice, by name
        shutil.rmtree(folder, ignore_errors=True)  # what a failed first try left
        folder.mkdir()
        args = ["-m", *GRID, f"data.root={voc_root}", f"hydra.sweep.dir={folder / 'sweep'}"]
        with one_compute_thread():
            status, output = run_main("train.py", args, folder, monkeypatch, capsys)
        assert status == 0, output[-3000:]
        temporary = printed.with_suffix(".tmp")
        temporary.write_text(output)
        os.replace(temporary, printed)
    return folder / "sweep", printed.read_text()


def check_sweep(sweep: Path, output: str, n_jobs: int) -> list[dict]:
    """Every job has a result, the summary lists them all with overrides and a score; returns its jobs."""
    jobs = sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert len(jobs) == n_jobs, output[-3000:]
    assert all((job / "result.json").is_file() and (job / "tensorboard").is_dir() for job in jobs)
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["monitor"] == "val/mIoU"
    assert sorted(job["job"] for job in summary["jobs"]) == [job.name for job in jobs]
    for entry in summary["jobs"]:
        assert entry["status"] == "ok" and 0.0 <= entry["best_score"] <= 1.0 and entry["global_step"] == 2
        assert Path(entry["best_checkpoint"]).is_file()
        assert entry["overrides"] == yaml.safe_load((sweep / entry["job"] / ".hydra" / "overrides.yaml").read_text())
        # the table printed at the end: one line per job with its name (its learning rate) and its score
        lr = next(o for o in entry["overrides"] if o.startswith("optimizer.lr=")).removeprefix("optimizer.")
        score = f"{entry['best_score']:.4f}"
        assert lr in entry["name"].split(","), entry["name"]
        assert any(entry["name"] in line and score in line for line in output.splitlines()), output[-3000:]
        # TensorBoard lists the job under the same name: <job>/tensorboard/<name>
        assert list((sweep / entry["job"] / "tensorboard" / entry["name"]).glob("events.out.tfevents.*"))
    assert "best val/mIoU" in output and "Sweep summary written to" in output
    return summary["jobs"]


@pytest.mark.slow
def test_multirun_writes_results_and_a_summary(
    voc_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sweep, output = basic_multirun(voc_root, tmp_path_factory, monkeypatch, capsys)
    jobs = check_sweep(sweep, output, n_jobs=2)
    assert sorted(o for job in jobs for o in job["overrides"] if o.startswith("optimizer.lr")) == [
        "optimizer.lr=0.001",
        "optimizer.lr=0.002",
    ]
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [row["job"] for row in rows] == [job["job"] for job in jobs]


@pytest.mark.slow
def test_optuna_search_runs_trials_and_summarises_them(
    voc_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    args = ["-m", "+hparams_search=voc_optuna", "experiment=demo", f"data.root={voc_root}", *SHRINK]
    # the objective is the config's optimized_metric (here the last val/loss, minimised), not a fixed best mIoU
    objective = ["optimized_metric=val/loss", "hydra.sweeper.direction=minimize"]
    # in this process: the trials run in the sweeper's process, one after the other, whatever process that is
    with one_compute_thread():
        status, output = run_main(
            "train.py", [*args, *objective, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}"], tmp_path,
            monkeypatch, capsys,
        )  # fmt: skip
    assert status == 0, output[-3000:]
    jobs = check_sweep(sweep, output, n_jobs=2)
    optuna_result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    losses = [json.loads((sweep / str(i) / "result.json").read_text())["metrics"]["val/loss"] for i in range(2)]
    assert optuna_result["best_value"] == pytest.approx(min(losses))
    for job in jobs:
        lr = next(float(o.split("=")[1]) for o in job["overrides"] if o.startswith("optimizer.lr="))
        assert 1e-3 <= lr <= 5e-2


def test_optimized_metric_is_checked_before_training(make_cfg) -> None:
    from segvoc.config import ConfigError, validate_config

    assert compose_config([]).optimized_metric == "best/val/mIoU"
    for name in ("best/val/mIoU", "val/loss", "val/iou/person"):
        validate_config(make_cfg(f"optimized_metric={name}"))
    with pytest.raises(ConfigError, match=r"optimized_metric=val/miou .*best/val/mIoU"):
        validate_config(make_cfg("optimized_metric=val/miou"))


def test_optimized_value_names_what_the_run_logged() -> None:
    from segvoc.config import ConfigError
    from segvoc.tasks.train import optimized_value

    assert optimized_value({"val/mIoU": 0.5, "best/val/mIoU": 0.7}, "val/mIoU") == 0.5
    with pytest.raises(ConfigError, match=r"optimized_metric=best/val/mIoU .* val/mIoU"):
        optimized_value({"val/mIoU": 0.5}, "best/val/mIoU")
