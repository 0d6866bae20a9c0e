"""Distributed training (``trainer=ddp``) with two CPU processes (gloo), started by Lightning, torchrun and srun
as the README says: one run directory, validation metrics of the whole split, the schedule in global steps."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from segvoc.config import ConfigError
from segvoc.tasks.evaluate import evaluate
from segvoc.tasks.train import train
from tests.conftest import REPO, child_env, run_script
from tests.test_sweep import one_compute_thread

FIGURES = ("overall_acc", "mean_acc", "freqw_acc", "mean_iou")


@pytest.fixture(autouse=True)
def _one_compute_thread() -> Iterator[None]:
    """One torch thread for what this process computes itself (the one-process evaluation); the figures do not
    depend on it. (Each training process gets one thread from its launcher, or from ``launch``.)"""
    with one_compute_thread():
        yield


def ddp_args(voc_root: Path, processes: int = 2) -> list[str]:
    """``trainer=ddp`` on ``processes`` CPU processes (no SyncBatchNorm: PyTorch's needs GPUs), tiny data; the
    validation in training (which only writes the checkpoints here) on 64-pixel centre crops, without Lightning's
    sanity check."""
    return [
        "trainer=ddp",
        "trainer.accelerator=cpu",
        f"trainer.devices={processes}",
        "trainer.sync_batchnorm=false",
        f"data.root={voc_root}",
        "data.download=false",
        "data.num_workers=0",
        "data.batch_size=4",
        "data.val_batch_size=2",
        "data.crop_size=64",
        "data.crop_val=true",
        "model.net.pretrained=false",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "+trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false",
        "~callbacks.model_summary",
    ]


def only_child(folder: Path) -> Path:
    children = list(folder.iterdir())
    assert len(children) == 1, f"{folder}: {sorted(p.name for p in children)}"
    return children[0]


def assert_one_run(run: Path) -> None:
    """One TensorBoard stream and one result, written by rank 0; the other process only logs beside it. (A sweep
    job's stream lies in ``tensorboard/<run name>/``, a single run's in ``tensorboard/``.)"""
    assert len(list((run / "tensorboard").rglob("events.out.tfevents.*"))) == 1
    assert [p.relative_to(run) for p in run.rglob("result.json")] == [Path("result.json")]
    assert (run / "train_ddp_process_1.log").is_file()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


LAUNCHERS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launch(command: list[str], cwd: Path, log: Path, **env: str) -> subprocess.Popen:
    """Start ``command`` in ``cwd`` with ``env`` added and its output in ``log``, outside any torchrun or SLURM launch
    this test runs in, one thread a process (as Lightning's own launcher sets it: gloo crawls when the processes
    oversubscribe the cores), in a process group of its own (torchrun's workers are ended with their agent)."""
    base = {
        k: v for k, v in child_env().items() if k not in LAUNCHERS and not k.startswith(("SLURM_", "TORCHELASTIC_"))
    }
    with log.open("w") as out:
        return subprocess.Popen(
            command,
            cwd=cwd,
            env={**base, "OMP_NUM_THREADS": "1", **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def finish(procs: list[subprocess.Popen], logs: list[Path], timeout: float = 300) -> bool:
    """Wait for ``procs`` (their output in ``logs``); False when the rendezvous port was taken by someone else
    meanwhile (then the caller tries another port), else every process must have succeeded. The first process that
    fails ends the others at once: they would wait for it until the rendezvous times out."""
    deadline = time.monotonic() + timeout
    try:
        while None in (codes := [proc.poll() for proc in procs]) and not any(codes):  # all run, none has failed
            assert time.monotonic() < deadline, f"timed out:\n{logs[0].read_text()[-3000:]}"
            time.sleep(0.2)
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):  # the group of one that ended can still hold its workers
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    failed = [(proc, log.read_text()) for proc, log in zip(procs, logs, strict=True) if proc.returncode != 0]
    if any("address already in use" in output.lower() for _, output in failed):
        return False
    if failed:  # the output of the process that failed first, not of one this ended
        proc, output = min(failed, key=lambda failure: failure[0].returncode == -signal.SIGKILL)
        raise AssertionError(f"exit status {proc.returncode}:\n{output[-3000:]}")
    return True


Start = Callable[[int, list[Path]], list[subprocess.Popen]]  # (port, logs) -> the processes, one log each


def run_on_a_free_port(start: Start, output: Path, tries: int = 3) -> None:
    """``start(port, logs)`` the processes (process i writing ``logs[i]``, beside ``output``) and wait for them; a
    port found free can be taken before the processes bind it, so a run that fails on a taken port is started again
    on another one, after clearing ``output``, the folder that the run writes."""
    for attempt in range(tries):
        logs = [output.with_name(f"{output.name}-process{i}-try{attempt}.log") for i in range(2)]
        if finish(start(free_port(), logs), logs):
            return
        shutil.rmtree(output, ignore_errors=True)
    raise AssertionError(f"the rendezvous port was taken {tries} times in a row")


SLURM_TASKS = {  # two tasks as ``srun`` starts them for ``--nodes=1 --ntasks-per-node=2`` (SLURM's variables, no SLURM)
    "SLURM_NTASKS": "2",
    "SLURM_NTASKS_PER_NODE": "2",
    "SLURM_NNODES": "1",
    "SLURM_NODEID": "0",
    "SLURM_NODELIST": "127.0.0.1",
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "segvoc",
}


def srun(args: list[str], cwd: Path, output: Path) -> None:
    """``train.py args`` in ``cwd`` as two SLURM tasks on this machine, started together (rank 1 first), writing the
    folder ``output``; both must succeed."""
    command = [sys.executable, str(REPO / "train.py"), *args]

    def start(port: int, logs: list[Path]) -> list[subprocess.Popen]:
        env = {**SLURM_TASKS, "MASTER_PORT": str(port)}
        return [
            launch(command, cwd, log, **env, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank))
            for rank, log in zip((1, 0), logs, strict=True)
        ]

    run_on_a_free_port(start, output)


def test_sync_batchnorm_on_cpu_is_refused_before_training(make_cfg) -> None:
    with pytest.raises(ConfigError, match="trainer.sync_batchnorm=false"):
        train(make_cfg("trainer=ddp", "trainer.devices=2"))


@pytest.mark.slow
def test_ddp_writes_one_run_and_validates_the_whole_split(voc_root: Path, tmp_path: Path, make_cfg) -> None:
    status, output = run_script("train.py", ddp_args(voc_root), cwd=tmp_path)
    assert status == 0, output[-3000:]
    run = only_child(tmp_path / "outputs" / "train")
    assert_one_run(run)
    # 12 images, global batch 4: 2 per process, 3 steps an epoch; the poly schedule counts global (optimizer) steps
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 2 and state["lr_schedulers"][0]["last_epoch"] == 2
    assert json.loads((run / "result.json").read_text())["global_step"] == 2

    # The 4 validation images (whole, batched by size) are split between the processes; their confusion matrices are
    # summed, so scoring the checkpoint with two processes gives exactly what one process gives. The two processes
    # are started as srun starts them: together, not one after the other as Lightning's launcher does.
    ckpt = shutil.copy(run / "checkpoints" / "last.ckpt", tmp_path / "model.ckpt")
    evaluation = ["train=false", f"ckpt_path={ckpt}", "data.crop_val=false"]
    srun([*ddp_args(voc_root), *evaluation, f"hydra.run.dir={tmp_path / 'eval'}"], tmp_path, tmp_path / "eval")
    two = json.loads((tmp_path / "eval" / "eval-whole.json").read_text())
    one = evaluate(make_cfg(*evaluation))
    assert [row["pixels"] for row in two["classes"]] == [row["pixels"] for row in one["classes"]]
    assert sum(row["pixels"] for row in one["classes"]) > 0
    assert {k: two[k] for k in FIGURES} == pytest.approx({k: one[k] for k in FIGURES}, rel=1e-9)
    assert only_child(tmp_path / "outputs" / "train") == run  # the evaluation wrote only its own folder


@pytest.mark.slow
def test_ddp_sweep_starts_each_jobs_processes_for_that_job(voc_root: Path, tmp_path: Path) -> None:
    # the second job saves validation pictures: the other process writes its share only if it ran that job's config
    args = ["-m", "save_val_results=false,true", *ddp_args(voc_root)]
    status, output = run_script("train.py", args, cwd=tmp_path)
    assert status == 0, output[-3000:]
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["multirun"]
    sweep = only_child(tmp_path / "outputs" / "multirun" / "train")
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for job in ("0", "1"):
        assert_one_run(sweep / job)
    assert not (sweep / "0" / "val_results").exists()
    val_ids = (voc_root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert sorted(p.stem for p in (sweep / "1" / "val_results").iterdir()) == sorted(val_ids)  # both shares, by id
    # the sweep's record and summary are rank 0's alone
    assert OmegaConf.load(sweep / "multirun.yaml").hydra.job.name == "train"
    summary = json.loads((sweep / "summary.json").read_text())
    assert [job["status"] for job in summary["jobs"]] == ["ok", "ok"]


@pytest.mark.slow
def test_torchrun_on_two_nodes(voc_root: Path, tmp_path: Path) -> None:
    """The README's two-node torchrun commands, both nodes on this machine with one process each."""

    def start(port: int, logs: list[Path]) -> list[subprocess.Popen]:
        return [
            launch(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nnodes=2",
                    f"--node_rank={node}",
                    "--nproc_per_node=1",
                    "--master_addr=127.0.0.1",
                    f"--master_port={port}",
                    str(REPO / "train.py"),
                    *ddp_args(voc_root, processes=1),
                    "trainer.num_nodes=2",
                ],
                tmp_path,
                log,
            )
            for node, log in zip((0, 1), logs, strict=True)
        ]

    run_on_a_free_port(start, tmp_path / "outputs")
    run = only_child(tmp_path / "outputs" / "train")
    assert_one_run(run)


@pytest.mark.slow
def test_srun_tasks_share_one_run(voc_root: Path, tmp_path: Path, make_cfg) -> None:
    """Two tasks as ``srun`` starts them for ``--nodes=1 --ntasks-per-node=2`` (SLURM's variables, no SLURM), with
    the weights averaged (``model.ema.decay``): each process keeps the average and validates it."""
    srun([*ddp_args(voc_root), "model.ema.decay=0.5"], tmp_path, tmp_path / "outputs")
    run = only_child(tmp_path / "outputs" / "train")
    assert_one_run(run)
    best = run / "checkpoints" / "best.ckpt"
    state = torch.load(best, map_location="cpu", weights_only=True)
    assert int(state["averaging_state"]["n_averaged"]) == state["global_step"] == 2
    conv = next(k for k, v in state["state_dict"].items() if v.is_floating_point() and v.dim() == 4)
    assert not torch.equal(state["state_dict"][conv], state["current_model_state"][conv])
    # the validation split between the two processes scored the average in both: one process scoring best.ckpt's
    # weights (the average) on the same crops gives the best score the run recorded
    saved = json.loads((run / "result.json").read_text())["best_score"]
    one = evaluate(make_cfg("train=false", f"ckpt_path={best}", "data.crop_val=true", "data.crop_size=64"))
    assert one["mean_iou"] == pytest.approx(saved, abs=1e-6)
