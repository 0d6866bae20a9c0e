"""Crash safety: atomic checkpoint writes, ``kill -9`` then resume, Ctrl-C saves ``last.ckpt`` before stopping."""

from __future__ import annotations

import errno
import io
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from omegaconf import open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from segvoc.errors import SegvocError
from segvoc.tasks.train import build_trainer, train
from segvoc.training.checkpoint_io import AtomicCheckpointIO
from tests.conftest import REPO, child_env, compose_config, run_main, shrunk_overrides
from tests.test_sweep import one_compute_thread

# given on every command line here, so the expected learning rates do not depend on the config files' defaults
BASE_LR = 0.02
POWER = 0.8
POLY_STEPS = 100  # scheduler.total_iters, beyond max_steps so that the final learning rate is not 0
SCHEDULE = (f"optimizer.lr={BASE_LR}", f"scheduler.power={POWER}", f"scheduler.total_iters={POLY_STEPS}")
# Validations only write checkpoints here: on 64-pixel centre crops, without Lightning's sanity check before training
CHEAP_VALIDATION = ("data.crop_val=true", "+trainer.num_sanity_val_steps=0")


@pytest.fixture(scope="module", autouse=True)
def _one_compute_thread() -> Iterator[None]:
    """One torch thread in this process and in the training processes it starts; the results do not depend on it."""
    with one_compute_thread():
        yield


def poly_lr(step: int) -> float:
    """Polynomial decay by its definition: ``lr * (1 - step / total) ** power``."""
    return BASE_LR * (1 - step / POLY_STEPS) ** POWER


class PauseAt(L.Callback):
    """At the end of training step ``step``: writes ``path`` (atomically: written, then renamed) and waits there
    until SIGINT arrives (at most 300 s), so that a test can signal a run known to be at that step with nothing
    being written. SIGINT still reaches the handler that was installed (segvoc's SaveOnInterrupt)."""

    def __init__(self, step: int, path: str) -> None:
        self.step, self.path = step, Path(path)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step != self.step:
            return
        interrupted: list[int] = []
        previous = signal.getsignal(signal.SIGINT)

        def note(signum: int, frame: Any) -> None:
            interrupted.append(signum)
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGINT, note)
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(str(trainer.global_step))
        os.replace(temporary, self.path)
        deadline = time.monotonic() + 300
        while not interrupted and time.monotonic() < deadline:  # a SIGKILL ends it here too
            time.sleep(0.05)
        signal.signal(signal.SIGINT, previous)


class SigintDuring(L.Callback):
    """Sends SIGINT to this process as training step ``step`` starts (global_step counts finished steps)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGINT)


class SaveAt(L.Callback):
    """Saves the training state to ``<folder>/step<N>.ckpt`` at the end of each step N in ``steps``."""

    def __init__(self, steps: list[int], folder: str) -> None:
        self.steps, self.folder = list(steps), Path(folder)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step in self.steps:
            trainer.save_checkpoint(self.folder / f"step{trainer.global_step}.ckpt")


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def lr_of(state: dict[str, Any]) -> float:
    return state["optimizer_states"][0]["param_groups"][0]["lr"]


def train_args(voc_root: Path, *overrides: str, num_workers: int = 0, val_every: int = 3) -> list[str]:
    return [
        f"data.root={voc_root}",
        "data.download=false",
        f"data.num_workers={num_workers}",
        "data.crop_size=64",
        "data.batch_size=2",
        "data.val_batch_size=2",
        "model.net.pretrained=false",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        f"trainer.val_check_interval={val_every}",
        *CHEAP_VALIDATION,
        *SCHEDULE,
        "~callbacks.model_summary",
        "seed=7",
        *overrides,
    ]


def start_train(args: list[str], cwd: Path, log: Path, **popen: Any) -> subprocess.Popen:
    env = child_env()
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env, stdout=out, stderr=out, **popen
        )


def pause_at(step: int, path: Path) -> list[str]:
    return [
        "+callbacks.pause._target_=tests.test_crash.PauseAt",
        f"+callbacks.pause.step={step}",
        f"+callbacks.pause.path={path}",
    ]


def wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Wait until ``path`` exists (``PauseAt`` renames it into place whole): the run is paused at its step."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"training ended before the test could interrupt it:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


def temporary_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name not in ("best.ckpt", "last.ckpt")]


# --- the plugin ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("crash", [RuntimeError, KeyboardInterrupt])
def test_a_write_that_dies_halfway_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash: type[BaseException]
) -> None:
    plugin = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    plugin.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, target)
    previous = target.read_bytes()
    real_save = torch.save

    def dies_halfway(obj: Any, f: Any) -> None:
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        raise crash("killed mid-write")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(crash):
        plugin.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, target)
    assert target.read_bytes() == previous
    assert os.listdir(tmp_path) == ["last.ckpt"]
    assert load(target)["global_step"] == 1


def test_a_temporary_file_left_by_a_kill_is_never_a_ckpt_and_goes_with_the_next_save(tmp_path: Path) -> None:
    stale = tmp_path / ".last.ckpt.0badc0de.tmp"  # what a kill -9 during a write leaves
    stale.write_bytes(b"PK\x03\x04 truncated")
    other = tmp_path / ".best.ckpt.0badc0de.tmp"
    other.write_bytes(b"another file's")
    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, tmp_path / "last.ckpt")
    assert sorted(os.listdir(tmp_path)) == [other.name, "last.ckpt"]
    assert load(tmp_path / "last.ckpt")["global_step"] == 3
    assert oct((tmp_path / "last.ckpt").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_folder_that_cannot_be_made_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    folder = blocker / "checkpoints"
    with pytest.raises(SegvocError, match=re.escape(str(folder))):
        AtomicCheckpointIO().save_checkpoint({"global_step": 1}, folder / "last.ckpt")


def test_training_that_cannot_write_its_checkpoints_stops_with_the_folder(make_cfg, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    folder = blocker / "checkpoints"
    cfg = make_cfg(
        "trainer.max_steps=2",
        *CHEAP_VALIDATION,
        f"callbacks.model_checkpoint.dirpath={folder}",
        f"callbacks.last_checkpoint.dirpath={folder}",
    )
    with pytest.raises(SegvocError, match=re.escape(str(folder))):
        train(cfg)


def test_a_full_disk_is_reported_with_the_folder_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(SegvocError, match=re.escape(str(tmp_path))) as info:
        AtomicCheckpointIO().save_checkpoint({"global_step": 1}, tmp_path / "last.ckpt")
    assert "No space left" in str(info.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(SegvocError, match=re.escape(str(folder))):
            AtomicCheckpointIO().save_checkpoint({"global_step": 1}, folder / "last.ckpt")
    finally:
        folder.chmod(0o700)


OWN_PLUGIN = "trainer.plugins=[{_target_:lightning.pytorch.plugins.environments.LightningEnvironment}]"


@pytest.mark.parametrize("plugins", [None, "trainer.plugins=[]", OWN_PLUGIN])
def test_every_trainer_writes_through_the_atomic_plugin(make_cfg, plugins: str | None) -> None:
    """The crash-safe writer is added by the task, so overriding trainer.plugins cannot drop it."""
    cfg = make_cfg(*([plugins] if plugins else []))
    trainer = build_trainer(cfg, [], [])
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# --- Ctrl-C, in process: the saved state is exactly that of an uninterrupted run at the same step ---------------


MAX_STEPS, VAL_EVERY = 9, 3
COMMON = (
    "data.crop_size=64",
    "data.batch_size=2",
    f"trainer.max_steps={MAX_STEPS}",
    f"trainer.val_check_interval={VAL_EVERY}",
    *CHEAP_VALIDATION,
    *SCHEDULE,
)
# before the first validation, at one, between two (12 images in batches of 2: none at an epoch's last step, 6)
STEPS = [2, 3, 4]


@pytest.fixture(scope="module")
def reference(voc_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run of ``MAX_STEPS`` steps that saves its whole state at each of ``STEPS``:
    ``<folder>/step<N>.ckpt``; every step's parametrisation compares with it."""
    folder = tmp_path_factory.mktemp("reference")
    cfg = compose_config(
        [
            *shrunk_overrides(voc_root),
            *COMMON,
            "+callbacks.save_at._target_=tests.test_crash.SaveAt",
            f"+callbacks.save_at.steps=[{','.join(map(str, STEPS))}]",
            f"+callbacks.save_at.folder={folder}",
        ]
    )
    with open_dict(cfg):
        cfg.output_dir = str(folder / "run")
    train(cfg)
    return folder


# between two validations in the default run; before the first one and at one with --run-slow
@pytest.mark.parametrize("step", [pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow), 4])
def test_ctrl_c_saves_the_state_of_the_finished_step(
    make_cfg, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: int
) -> None:
    written: list[str] = []
    real_save = AtomicCheckpointIO.save_checkpoint

    def recording_save(self: AtomicCheckpointIO, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
        written.append(Path(path).name)
        real_save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", recording_save)
    sigint_handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's KeyboardInterrupt shutdown
            train(
                make_cfg(
                    *COMMON,
                    "+callbacks.sigint._target_=tests.test_crash.SigintDuring",
                    f"+callbacks.sigint.step={step}",
                )
            )
    finally:
        signal.signal(signal.SIGINT, sigint_handler)  # Lightning leaves SIGINT ignored
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    interrupted = load(last)
    assert interrupted["global_step"] == step
    assert not last.is_symlink() and "last.ckpt" in written

    expected = load(reference / f"step{step}.ckpt")
    assert expected["global_step"] == step
    assert expected["state_dict"].keys() == interrupted["state_dict"].keys()
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(tensor, interrupted["state_dict"][name]), name
    momentum = [s["momentum_buffer"] for s in expected["optimizer_states"][0]["state"].values()]
    momentum_interrupted = [s["momentum_buffer"] for s in interrupted["optimizer_states"][0]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(momentum, momentum_interrupted, strict=True))
    assert interrupted["lr_schedulers"] == expected["lr_schedulers"]
    assert interrupted["lr_schedulers"][0]["last_epoch"] == step
    assert lr_of(interrupted) == pytest.approx(poly_lr(step), rel=1e-9)

    train(make_cfg(*COMMON, f"ckpt_path={last}"))
    assert load(last)["global_step"] == MAX_STEPS
    assert sorted(os.listdir(last.parent)) == ["best.ckpt", "last.ckpt"]  # no versioned last-v1.ckpt
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    # validations after steps 3, 6 and 9 (logged at steps 2, 5, 8): none skipped or repeated across the interruption
    assert [e.step for e in events.Scalars("val/mIoU")] == [2, 5, 8]


# --- real processes --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_then_resume_loses_at_most_one_validation_interval(
    voc_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run, paused, log = tmp_path / "run", tmp_path / "paused", tmp_path / "train.log"
    last = run / "checkpoints" / "last.ckpt"
    args = train_args(voc_root, "trainer.max_steps=9")
    proc = start_train([*args, f"hydra.run.dir={run}", *pause_at(8, paused)], tmp_path, log)
    try:
        wait_for(paused, proc, log)  # at step 8: checkpoints written after the validations at 3 and 6
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    state = load(last)  # complete, not truncated
    assert state["global_step"] == 6  # two steps lost: less than one validation interval
    assert state["lr_schedulers"][0]["last_epoch"] == 6
    assert lr_of(state) == pytest.approx(poly_lr(6), rel=1e-9)
    assert all(name.startswith(".") and name.endswith(".tmp") for name in temporary_files(last.parent))

    # the resume is train.py's answer, in this process (the kill needed a process of its own; the resume does not)
    killed_runs_events = set(run.rglob("events.out.tfevents.*"))
    status, output = run_main("train.py", [*args, f"ckpt_path={last}"], tmp_path, monkeypatch, capsys)
    assert status == 0, output[-3000:]  # it continued in the same run dir: last.ckpt there is the resumed run's
    final = load(last)
    assert final["global_step"] == 9
    assert final["lr_schedulers"][0]["last_epoch"] == 9
    assert lr_of(final) == pytest.approx(poly_lr(9), rel=1e-9)  # what an uninterrupted run ends with
    assert temporary_files(last.parent) == []
    # it went on from step 6, not from the start (which would end with the same step, schedule and learning rate):
    # its own TensorBoard stream holds the one validation left, after step 9
    (resumed_events,) = set(run.rglob("events.out.tfevents.*")) - killed_runs_events
    events = EventAccumulator(str(resumed_events))
    events.Reload()
    assert [e.step for e in events.Scalars("val/mIoU")] == [8]


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_saves_last_ckpt_and_exits(voc_root: Path, tmp_path: Path) -> None:
    run, log = tmp_path / "run", tmp_path / "train.log"
    last = run / "checkpoints" / "last.ckpt"
    paused = tmp_path / "paused"
    args = train_args(
        voc_root, "trainer.max_steps=1000", f"hydra.run.dir={run}", *pause_at(3, paused), num_workers=1, val_every=2
    )
    # its own process group, so that the signal reaches the DataLoader worker too, as a terminal's Ctrl-C does
    proc = start_train(args, tmp_path, log, start_new_session=True)
    try:
        wait_for(paused, proc, log)  # at step 3, after the validation (and checkpoint) at step 2
        validated = 2
        os.killpg(proc.pid, signal.SIGINT)
        returncode = proc.wait(timeout=60)
    finally:
        proc.kill()
    output = log.read_text()
    assert returncode == 1, output[-3000:]
    state = load(last)
    assert state["global_step"] in (3, 4) and state["global_step"] > validated  # the running step is finished
    assert f"saved {last} at step {state['global_step']}" in output
    assert "Traceback" not in output
    assert state["lr_schedulers"][0]["last_epoch"] == state["global_step"]
    assert lr_of(state) == pytest.approx(poly_lr(state["global_step"]), rel=1e-9)
