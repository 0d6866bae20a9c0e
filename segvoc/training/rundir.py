"""Where a run writes: resuming from ``<run>/checkpoints/last.ckpt`` continues in ``<run>``, and every process of a
distributed run writes into the run directory of rank 0."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from segvoc.errors import SegvocError

if TYPE_CHECKING:
    import lightning as L
    from lightning.fabric.plugins.environments import ClusterEnvironment
    from torch.distributed import TCPStore


def resume_run_dir(ckpt_path: str | None, default: str) -> str:
    """Return the run directory of ``ckpt_path`` when it lies in ``<run>/checkpoints/``, else ``default``.

    Continuing in the same directory keeps one TensorBoard stream per run and lets the checkpoint callback restore
    its best score (Lightning restores it only when the checkpoint folder is unchanged). A ``ckpt_path`` that is
    not a file gets ``default``: the launch then fails validation and ``discard_failed_start`` removes that folder.
    """
    if ckpt_path:
        path = Path(str(ckpt_path))
        if path.parent.name == "checkpoints" and path.is_file():  # a mistyped path must not create a "run"
            return str(path.parent.parent)
    return default


def resume_config_subdir(ckpt_path: str | None, stamp: str) -> str:
    """Where Hydra records the config of this launch: ``.hydra``, or ``.hydra/resume-<stamp>`` when resuming in
    the checkpoint's run directory, so the original run's record is kept."""
    return f".hydra/resume-{stamp}" if resume_run_dir(ckpt_path, "") else ".hydra"


# What Hydra writes into a run directory before the task starts: the config record and the job's log file
HYDRA_RECORD = ".hydra"


def discard_failed_start() -> list[Path]:
    """After a launch failed before it wrote anything of its own (a config or data error), remove what Hydra made
    for it, so that failed starts leave no run directories behind; return the paths removed.

    A run directory that holds nothing but Hydra's record (``.hydra/``) and the job's log is removed whole, with the
    folders above it inside the working directory that it leaves empty (``outputs/train/``); in a run
    directory that holds more (a resume of an existing run) only this launch's ``.hydra/resume-<time>`` record is
    removed, and the run's log keeps the error. Nothing is removed under ``-m`` (a sweep keeps every job's folder)
    or outside a Hydra run.
    """
    import shutil

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return []
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.RUN or not hydra_cfg.runtime.output_dir:
        return []
    run = Path(hydra_cfg.runtime.output_dir)
    record = run / hydra_cfg.output_subdir if hydra_cfg.output_subdir else None
    log_file = run / f"{hydra_cfg.job.name}.log"
    if not run.is_dir():
        return []
    contents = set(run.iterdir())
    cwd = Path.cwd().resolve()
    if contents <= {run / HYDRA_RECORD, log_file} and run.resolve() != cwd:
        shutil.rmtree(run, ignore_errors=True)
        for parent in run.resolve().parents:  # and the folders made for it (outputs/train/) when now empty
            if parent == cwd or cwd not in parent.parents:
                break
            try:
                parent.rmdir()
            except OSError:  # not empty (other runs), or gone
                break
        return [run]
    if record is not None and record != run / HYDRA_RECORD and record.is_dir():
        shutil.rmtree(record, ignore_errors=True)
        return [record]
    return []


def recorded_config(ckpt_path: str | Path) -> Path | None:
    """``<run>/.hydra/config.yaml``, the config Hydra recorded for the run that wrote ``<run>/checkpoints/<file>``;
    ``None`` for a checkpoint outside such a run, or a run without the record."""
    path = Path(str(ckpt_path)).expanduser()
    config = path.parent.parent / HYDRA_RECORD / "config.yaml"
    return config if path.parent.name == "checkpoints" and config.is_file() else None


# data keys that choose how a model is scored rather than what it is scored on: never taken from a run's record
EVALUATION_PROTOCOL = ("crop_val",)


def use_recorded_data(cfg: DictConfig, overrides: Sequence[str]) -> Path | None:
    """Evaluate a checkpoint on the data its run trained on: replace ``cfg.data`` by the ``data`` recorded with the
    run of ``cfg.ckpt_path`` (``recorded_config``), keeping every ``data.<key>`` the command line sets
    (``overrides``: Hydra's task overrides). Returns the record used, or ``None`` (and leaves ``cfg`` alone) when
    there is none or when the command line chooses the data itself (``data=...`` or ``experiment=...``).

    The record gives the dataset, not the protocol: ``crop_val`` keeps the config's value (whole images unless the
    command line says ``data.crop_val=true``), so a checkpoint whose run validated on crops and its exported
    ``.onnx`` (which has no record) are scored alike by the same command.

    A relative recorded ``data.root`` is taken from the run's working directory (``.hydra/hydra.yaml``), so the
    evaluation finds the data from any folder.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf, open_dict

    record = recorded_config(cfg.ckpt_path) if cfg.get("ckpt_path") else None
    if record is None:
        return None
    given: set[str] = set()
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if key in ("data", "experiment"):
            return None
        if key.startswith("data."):
            given.add(key.split(".")[1])
    recorded = OmegaConf.load(record).get("data")
    if not isinstance(recorded, DictConfig):
        return None
    root = recorded.get("root")
    if "root" not in given and isinstance(root, str) and not Path(root).expanduser().is_absolute():
        hydra_record = record.with_name("hydra.yaml")
        cwd = OmegaConf.select(OmegaConf.load(hydra_record), "hydra.runtime.cwd") if hydra_record.is_file() else None
        if cwd:
            recorded.root = str(Path(cwd) / root)
    for key in given | set(EVALUATION_PROTOCOL):  # the command line's value, or its removal (~data.<key>)
        if key in cfg.data:
            recorded[key] = cfg.data[key]
        else:
            recorded.pop(key, None)
    with open_dict(cfg):
        cfg.data = recorded
    return record


def record_run(output_dir: str | Path, argv: list[str] | None = None) -> Path:
    """Write ``<output_dir>/run.json``: command line, Python and package versions, and the git commit of the code.

    Hydra already keeps the composed config in ``<output_dir>/.hydra``; this adds what is needed to rerun it.
    """
    import json
    import platform
    import subprocess
    import sys
    from datetime import datetime, timezone
    from importlib.metadata import PackageNotFoundError, version

    packages = {}
    for name in (
        "segvoc",
        "torch",
        "torchvision",
        "lightning",
        "hydra-core",
        "omegaconf",
        "torchmetrics",
        "albumentations",
        "numpy",
        "opencv-python-headless",
    ):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    code_dir = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=code_dir, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    record = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, *(sys.argv if argv is None else argv)],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": packages,
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
    }
    path = Path(output_dir) / "run.json"
    if path.exists():  # a resumed run keeps the first launch's record and adds this one beside it
        path = path.with_name(f"run-{record['started'].replace(':', '-')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    return path


def record_result(output_dir: str | Path, result: dict) -> Path:
    """Write ``<output_dir>/result.json`` when training ends: ``global_step``, the last logged ``metrics`` and, when
    a checkpoint callback monitored a metric, ``monitor``, ``best_score`` and ``best_checkpoint``.

    Sweep summaries read it; a resumed run overwrites it with the figures of the whole run.
    """
    import json

    path = Path(output_dir) / "result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path


# How long ranks > 0 started by torchrun / srun wait for rank 0 to announce its run directory (torch.distributed's
# default timeout).
FOLLOW_TIMEOUT = timedelta(minutes=30)
_stores: dict[tuple[str, int], TCPStore] = {}  # rank 0's store server must outlive the announcement


def external_launch() -> ClusterEnvironment | None:
    """The cluster environment when torchrun or SLURM's srun started this process as one of several, else ``None``.

    Detected as Lightning detects them (torchrun first: it also runs inside SLURM jobs). The processes that
    Lightning's own launcher starts for ``trainer.devices=N`` are not included: Lightning gives them their run
    directory on the command line.
    """
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    for kind in (TorchElasticEnvironment, SLURMEnvironment):
        if kind.detect():
            environment = kind()
            return environment if environment.world_size() > 1 else None
    return None


def _launch_store(environment: ClusterEnvironment) -> TCPStore:
    """The key-value store at the launch's main address and port, the one ``torch.distributed`` uses next.

    torchrun's agent serves it (``TORCHELASTIC_USE_AGENT_STORE``); otherwise rank 0 starts the server, shared
    (``multi_tenant``) with the one ``torch.distributed`` starts on the same port in the same process.
    """
    from torch.distributed import TCPStore

    address, port = environment.main_address, environment.main_port
    if (address, port) not in _stores:
        serve = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and environment.global_rank() == 0
        _stores[address, port] = TCPStore(
            address, port, is_master=serve, timeout=FOLLOW_TIMEOUT, multi_tenant=True, wait_for_workers=False
        )
    return _stores[address, port]


def _announcement_key() -> str:
    # torchrun restarts failed workers with a new restart count; each attempt announces its own directory
    return f"segvoc/run_dir/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _hydra_dir_override() -> str:
    """``hydra.run.dir=<this run's directory>``, or ``hydra.sweep.dir=<this sweep's directory>`` under ``-m``
    (absolute, quoted as Lightning quotes it)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from hydra.utils import to_absolute_path

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return f'hydra.sweep.dir="{to_absolute_path(hydra_cfg.sweep.dir)}"'
    return f'hydra.run.dir="{hydra_cfg.runtime.output_dir}"'


def follow_rank_zero(argv: list[str]) -> list[str]:
    """The command line to run: ``argv``, plus, on ranks > 0 started by torchrun or srun, the overrides that put
    them into rank 0's run directory. Call it before Hydra reads the command line.

    Every such process composes its own ``${now:...}`` directory name; ranks > 0 instead wait (``FOLLOW_TIMEOUT``)
    for rank 0 to announce its directory (``share_run_dir``) through the launch's key-value store, then get what
    Lightning gives the processes it starts itself: rank 0's ``hydra.run.dir`` (``hydra.sweep.dir`` under ``-m``,
    whose jobs they run in step with rank 0), ``hydra.output_subdir=null`` (rank 0 alone records the config) and
    ``hydra.job.name=train_ddp_process_<rank>`` (their log file, beside rank 0's ``train.log``).
    """
    environment = external_launch()
    if environment is None or environment.global_rank() == 0:
        return argv
    rank = environment.global_rank()
    try:
        override = _launch_store(environment).get(_announcement_key()).decode()
    except RuntimeError as exc:  # torch's DistStoreError: no store there, or no announcement in time
        raise SegvocError(
            f"Process {rank} of {environment.world_size()} found no run directory from rank 0 at "
            f"{environment.main_address}:{environment.main_port} within {FOLLOW_TIMEOUT} ({exc}). Rank 0 stopped "
            "before its run started (see its output) or never started; with srun, add --kill-on-bad-exit=1 so "
            "that the other processes stop with it."
        ) from exc
    return [*argv, override, "hydra.output_subdir=null", f"hydra.job.name=train_ddp_process_{rank}"]


def share_run_dir(trainer: L.Trainer) -> None:
    """Make the other processes of a distributed run write into this run's directory. Call it in every process
    once the trainer exists, before ``fit``/``validate`` and before anything slow. Does nothing in a single run of
    a single process.

    Started by torchrun or srun, rank 0 announces its ``hydra.run.dir`` (``hydra.sweep.dir`` under ``-m``) to
    ``follow_rank_zero`` of the other ranks. Lightning's own launcher (``trainer.devices=N``) starts the other
    processes itself, re-running ``sys.argv`` with this run's ``hydra.run.dir`` added; under ``-m`` rank 0 makes
    that this job's command line and folder (``_launch_this_job``).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if trainer.global_rank != 0 or not HydraConfig.initialized():
        return
    environment = external_launch()
    if environment is not None:
        _launch_store(environment).set(_announcement_key(), _hydra_dir_override())
    elif HydraConfig.get().mode == RunMode.MULTIRUN:
        _launch_this_job(trainer.world_size)


# What Lightning's launcher sets in rank 0's environment when it starts the other processes
_LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
_environ_before_launch: dict[str, str | None] = {}


def _launch_this_job(world_size: int) -> None:
    """Under ``-m``, have Lightning's launcher start this job's other processes for this job alone.

    The previous job's processes are gone: its process group is closed and the environment restored to what it
    was before Lightning's first launch (else Lightning would take this job for one launched from outside and start
    nobody, and a single-process job would sync its metrics with the dead). With ``world_size`` > 1, ``sys.argv``
    becomes this job's command line (Hydra's flags but ``-m``, the job's overrides instead of the sweep's;
    ``run.json`` records it) and Hydra's ``run.dir`` the job's folder: the new processes run the job as a single
    run there, leaving the sweep (``multirun.yaml``, the summary, an Optuna study) to this process.
    """
    import torch.distributed as dist
    from hydra._internal.utils import get_args_parser
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import read_write

    if not _environ_before_launch:
        _environ_before_launch.update({name: os.environ.get(name) for name in _LAUNCH_VARIABLES})
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for name, value in _environ_before_launch.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if world_size == 1:
        return

    hydra_cfg = HydraConfig.get()
    given = get_args_parser().parse_args(sys.argv[1:]).overrides
    flags = [arg for arg in sys.argv[1:] if arg not in ("-m", "--multirun") and arg not in given]
    job = [o for o in hydra_cfg.overrides.hydra if not o.startswith("hydra.mode=")] + list(hydra_cfg.overrides.task)
    sys.argv[1:] = [*flags, *job]
    with read_write(hydra_cfg.run):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir  # what Lightning passes on as hydra.run.dir
