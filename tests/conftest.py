"""Shared fixtures: a generated VOC-layout tree and Hydra configs shrunk to run in seconds on a CPU."""

from __future__ import annotations

import contextlib
import logging
import os
import runpy
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from segvoc.checkpoints.format import describe
from segvoc.config import register_resolvers
from segvoc.data.demo import make_demo_voc
from segvoc.models.deeplab import deeplabv3plus_mobilenet
from segvoc.palette import VOC_CLASSES

register_resolvers()
REPO = Path(__file__).resolve().parents[1]
CONF_DIR = str(REPO / "conf")
# Lightning's seed_everything exports these; a test or a child process must not see what an earlier test left.
SEED_VARIABLES = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow", action="store_true", help="also run tests marked slow (processes, seconds of training); CI does"
    )
    parser.addoption("--run-long", action="store_true", help="also run tests marked long (minutes each on a CPU)")


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``-n 2``: one worker per core) each worker and the processes it starts use one torch
    thread: two workers of two threads each on two cores would fight over them."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder ``name`` that ``build(folder)`` filled, built once for the whole test run: under pytest-xdist the
    workers share it (the first builds it under a lock, the others wait and reuse it), so a session fixture that
    trains or exports costs its time once, not once per worker."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's folder, above each worker's own
    folder, done = base / f"shared-{name}", base / f"shared-{name}.done"
    with FileLock(str(base / f"shared-{name}.lock")):
        if not done.exists():
            folder.mkdir(exist_ok=True)
            build(folder)
            done.touch()
    return folder


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` run with ``--run-slow`` (or ``-m slow``), ``long`` ones with ``--run-long``."""
    run_slow = config.getoption("--run-slow") or "slow" in (config.getoption("-m") or "")
    for item in items:
        if "long" in item.keywords and not config.getoption("--run-long"):
            item.add_marker(pytest.mark.skip(reason="long: run with --run-long"))
        elif "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with --run-slow (CI does)"))


@pytest.fixture(autouse=True)
def _no_seed_left_in_the_environment() -> Iterator[None]:
    """Every test starts and ends without Lightning's seed variables, whatever ran before it."""
    for name in SEED_VARIABLES:
        os.environ.pop(name, None)
    yield
    for name in SEED_VARIABLES:
        os.environ.pop(name, None)


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: this one without Lightning's seed variables, the repo on the path."""
    base = {k: v for k, v in os.environ.items() if k not in SEED_VARIABLES}
    return {**base, "PYTHONPATH": str(REPO), **extra}


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound (so no one else takes it) but never listening, for as
    long as the block runs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A segvoc checkpoint of a seeded random DeepLabV3+ (21 VOC classes) whose BatchNorm statistics are spread, so
    its predictions vary over an image. Read-only: tests write their outputs elsewhere."""
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = deeplabv3plus_mobilenet(num_classes=21).eval()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) * 1.5 + 0.5)
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "segvoc": describe(net, list(VOC_CLASSES))}, path)
    return path


@pytest.fixture(scope="session")
def voc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small VOC-layout tree (12 train, 4 val images) under ``<root>/VOCdevkit/VOC2012``. Read-only."""
    return built_once(tmp_path_factory, "voc", lambda root: make_demo_voc(root, n_train=12, n_val=4, seed=3))


@dataclass(frozen=True)
class ExportedModels:
    """``trained_checkpoint`` exported once for the session: the checkpoint, its fp32 ONNX file, the int8 ONNX file
    the accuracy gate let through, and what the export command printed."""

    ckpt: Path
    onnx: Path
    int8: Path
    log: str


@pytest.fixture(scope="session")
def trained_checkpoint(voc_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DeepLabV3+ trained for 6 steps on ``voc_root``'s tiny tree: what the exported-model and int8 tests export
    and score. Its val mIoU (about 0.18) is the background class's: in eval mode it predicts background on every
    pixel of the demo images, so tests that compare its exports check logits, not only masks. Read-only."""
    from segvoc.tasks.train import train

    def build(run: Path) -> None:
        cfg = compose_config(
            [
                f"data.root={voc_root}", "data.download=false", "data.num_workers=0", "data.batch_size=4",
                "data.crop_size=96", "model.net.pretrained=false", "trainer.accelerator=cpu", "trainer.max_steps=6",
                "trainer.val_check_interval=3", "trainer.enable_progress_bar=false", "~callbacks.model_summary",
                "optimizer=adamw", "optimizer.lr=2e-3", f"output_dir={run}",
            ]
        )  # fmt: skip
        train(cfg)

    return built_once(tmp_path_factory, "trained", build) / "checkpoints" / "last.ckpt"


def export_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``python -m segvoc.export args`` in ``cwd`` as a user would; stdout and stderr captured as text."""
    command = [sys.executable, "-m", "segvoc.export", *args]
    return subprocess.run(command, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def exported_models(
    trained_checkpoint: Path, voc_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> ExportedModels:
    """``trained_checkpoint`` through the export command once for the session (an ONNX export takes half a minute
    on 2 cores): ``python -m segvoc.export ... quantize=int8`` writes the fp32 ONNX file after its parity check on
    the default ``check_shapes``, then the int8 file after the accuracy gate. Read-only: tests write elsewhere."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")

    def build(cwd: Path) -> None:
        result = export_cli(
            f"ckpt={trained_checkpoint}", f"output={cwd / 'exported' / 'model.onnx'}", "quantize=int8",
            f"data.root={voc_root}", "data.download=false", "data.num_workers=0", "calibration.num_images=4", cwd=cwd,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        (cwd / "export.log").write_text(result.stdout + result.stderr)

    cwd = built_once(tmp_path_factory, "export", build)
    output, log = cwd / "exported" / "model.onnx", (cwd / "export.log").read_text()
    return ExportedModels(trained_checkpoint, output, output.with_suffix(".int8.onnx"), log)


@pytest.fixture(scope="session")
def onnx_model(exported_models: ExportedModels) -> Path:
    """The session's fp32 ONNX file (``exported_models``), for tests that need any exported model. Read-only."""
    return exported_models.onnx


def compose_config(overrides: list[str], config_name: str = "train", return_hydra_config: bool = False) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with ``overrides`` through Hydra's compose API."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=return_hydra_config)


def shrunk_overrides(voc_root: Path) -> list[str]:
    """Overrides that shrink the train config to ``voc_root``'s tiny tree on the CPU: tiny crops, 4 steps."""
    return [
        f"data.root={voc_root}",
        "data.download=false",
        "data.num_workers=0",
        "data.batch_size=4",
        "data.val_batch_size=2",
        "data.crop_size=96",
        "model.net.pretrained=false",
        "trainer.accelerator=cpu",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "~callbacks.model_summary",
    ]


@pytest.fixture
def make_cfg(voc_root: Path, tmp_path: Path) -> Callable[..., DictConfig]:
    """Return ``make_cfg(*overrides)``: the train config on the tiny tree, CPU, tiny crops, run dir in tmp."""

    def factory(*overrides: str) -> DictConfig:
        cfg = compose_config(shrunk_overrides(voc_root) + list(overrides))
        with open_dict(cfg):
            cfg.output_dir = str(tmp_path / "run")
        return cfg

    return factory


def run_script(script: str, args: list[str], cwd: Path, timeout: int = 600) -> tuple[int, str]:
    """Run ``<repo>/<script> args`` as a user would, in ``cwd``; return the exit status and stdout + stderr
    (Hydra's log handler writes to stdout)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout + proc.stderr


def run_main(
    script: str, args: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    """Run ``python <repo>/<script> args`` (``script`` a ``.py`` file) or ``python -m <script> args`` (a module
    name) in ``cwd`` inside this process, as ``__main__`` so that Hydra finds the config folder as it does for the
    command; return the exit status and what it wrote (stdout + stderr). The cheap stand-in for ``run_script``
    where the test is about the entry point's answer, not about the process."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [str(REPO / script) if script.endswith(".py") else script, *args])
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    capsys.readouterr()
    try:
        if script.endswith(".py"):
            runpy.run_path(str(REPO / script), run_name="__main__")
        else:
            runpy.run_module(script, run_name="__main__", alter_sys=True)
        status = 0
    except SystemExit as exit_info:
        status = exit_info.code if isinstance(exit_info.code, int) else 1
    finally:  # Hydra configured logging for the job and keeps global state: undo both for the next test
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:], root.level = handlers, level
        GlobalHydra.instance().clear()
    out, err = capsys.readouterr()
    return status, out + err
