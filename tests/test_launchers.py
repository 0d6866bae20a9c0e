"""Sweeps on Hydra's launchers: the SLURM config's submission (composed, never submitted), jobs run at once by the
submitit and joblib launchers giving the basic launcher's results, and Optuna workers sharing one study."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from segvoc.tasks.sweep import summarize
from tests.conftest import REPO, compose_config, run_main
from tests.test_sweep import GRID, SHRINK, basic_multirun, one_compute_thread


class Submitted(Exception):
    """Raised instead of calling sbatch, carrying the submission file."""


def test_slurm_launcher_submits_one_array_with_a_gpu_per_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    submitit = pytest.importorskip("submitit")
    import hydra

    cfg = compose_config(
        ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "data.num_workers=6", f"hydra.sweep.dir={tmp_path}"],
        return_hydra_config=True,
    )

    def submit(self: submitit.SlurmExecutor, command: str) -> None:
        raise Submitted(self._make_submission_file_text(command, "uid"))

    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # as if srun were here
    monkeypatch.setattr(submitit.SlurmExecutor, "_submit_command", submit)
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    with pytest.raises(Submitted) as submitted:
        launcher.launch([["optimizer.lr=0.01"], ["optimizer.lr=0.005"]], initial_job_idx=0)
    sbatch = submitted.value.args[0]
    for line in (
        "#SBATCH --array=0-1%2",  # one job array for the sweep, both jobs at once
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --cpus-per-task=6",  # from data.num_workers
        "#SBATCH --time=1440",
        "#SBATCH --partition=gpu",
        "#SBATCH --mem=32GB",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --nodes=1",
    ):
        assert line in sbatch.splitlines(), sbatch
    assert f"{tmp_path}/.submitit/" in sbatch  # logs beside the jobs


def job_results(sweep: Path) -> dict[str, dict]:
    """Each job's result.json by its run name (the name the summary and TensorBoard give it)."""
    results = summarize(sweep)
    assert all(job.status == "ok" for job in results.jobs), [job.error for job in results.jobs]
    return {job.name: json.loads((Path(job.dir) / "result.json").read_text()) for job in results.jobs}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One compute thread in every job: joblib's workers get one (cores / jobs) and a thread count changes the order
    of float sums, so the launchers' results would differ in their last digits, and then after a few steps more.
    (The basic launcher's sweep, ``basic_multirun``, runs its jobs on one thread too.)"""
    with one_compute_thread():
        yield


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher",
    [
        ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"],
        # two worker processes, each given its own "GPU" by GpuPerJob (the runs themselves stay on the CPU)
        ["hydra/launcher=joblib_gpus", "hydra.launcher.n_jobs=2", "hydra.callbacks.gpu_per_job.gpus=[5,6]"],
    ],
    ids=["submitit_local", "joblib"],
)
def test_parallel_launchers_give_the_basic_launchers_results(
    launcher: list[str],
    voc_root: Path,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    basic_sweep = job_results(basic_multirun(voc_root, tmp_path_factory, monkeypatch, capsys)[0])
    sweep = tmp_path / "sweep"
    args = ["-m", *GRID, *launcher, f"data.root={voc_root}", f"hydra.sweep.dir={sweep}"]
    # the sweep's own process is this one; the launcher runs each job in a process it starts (the thing tested)
    status, output = run_main("train.py", args, tmp_path, monkeypatch, capsys)
    assert status == 0, output[-3000:]
    results = job_results(sweep)
    assert sorted(results) == sorted(basic_sweep) == ["lr=0.001", "lr=0.002"]
    for name, result in results.items():
        expected = basic_sweep[name]
        assert result["global_step"] == expected["global_step"] == 2
        assert result["best_score"] == pytest.approx(expected["best_score"], abs=1e-5)
        for metric in ("val/mIoU", "val/loss", "val/acc"):
            assert result["metrics"][metric] == pytest.approx(expected["metrics"][metric], abs=1e-5), (name, metric)
    summary = json.loads((sweep / "summary.json").read_text())  # written again when the sweep ends
    assert sorted(job["name"] for job in summary["jobs"]) == ["lr=0.001", "lr=0.002"]
    assert all(job["status"] == "ok" for job in summary["jobs"])
    for job in summary["jobs"]:  # TensorBoard's run for the job has the same name
        assert list((Path(job["dir"]) / "tensorboard" / job["name"]).glob("events.out.tfevents.*"))
    if "joblib_gpus" in launcher[0]:
        logs = "".join(p.read_text() for p in sweep.glob("*/train.log"))
        gpus = sorted(line.split("runs on GPU ")[1][0] for line in logs.splitlines() if "runs on GPU" in line)
        assert gpus == ["5", "6"], logs[-2000:]


@pytest.mark.slow
def test_optuna_workers_share_one_study(voc_root: Path, tmp_path: Path) -> None:
    optuna = pytest.importorskip("optuna")
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    # created once before the workers start (the command line: optuna create-study), so they never race to
    optuna.create_study(study_name="demo", storage=storage, direction="maximize")
    search = ["hydra.sweeper.n_trials=2", f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=demo"]
    common = ["-m", "+hparams_search=voc_optuna", "experiment=demo", f"data.root={voc_root}", *SHRINK, *search]
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                str(REPO / "train.py"),
                *common,
                f"hydra.sweeper.sampler.seed={seed}",
                f"hydra.sweep.dir={tmp_path / 'sweep' / f'worker{seed}'}",
            ],  # fmt: skip
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for seed in (1, 2)
    ]
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]

    trials = optuna.load_study(study_name="demo", storage=storage).trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    points = {tuple(sorted(t.params.items())) for t in trials}
    assert len(points) == 4  # no trial repeated: each worker samples with its own seed
    # every trial is a job of one of the workers' sweep folders, with the value Optuna recorded
    results = summarize(tmp_path / "sweep")
    assert len(results.jobs) == 4 and all(job.status == "ok" for job in results.jobs)
    assert sorted(round(job.best_score, 6) for job in results.jobs) == sorted(round(t.value, 6) for t in trials)
    for job in results.jobs:
        lr = float(next(o for o in job.overrides if o.startswith("optimizer.lr=")).split("=")[1])
        assert any(t.params["optimizer.lr"] == pytest.approx(lr) for t in trials)
        assert yaml.safe_load((Path(job.dir) / ".hydra" / "overrides.yaml").read_text()) == job.overrides
