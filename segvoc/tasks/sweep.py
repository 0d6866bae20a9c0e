"""Sweep summaries: one row per job of a multirun (its name, overrides, best score, final step, best checkpoint),
printed as a table, best first, and written to ``<sweep dir>/summary.csv``, ``summary.json`` and ``summary.md``. A
job's name is the one its TensorBoard run has (``segvoc.training.hparams.run_name``: the overrides that vary).

``SweepSummary`` is the Hydra callback that does it at the end of ``python train.py -m ...`` (registered in
``conf/hydra/default.yaml``); ``python -m segvoc.sweep <sweep dir>`` does it again for a finished, interrupted or
still running sweep. Everything is read from disk: each job's ``.hydra/overrides.yaml`` and the ``result.json``
that training writes when it ends (``eval-<protocol>.json`` for ``train=false`` jobs), so jobs that run at once (the
joblib and submitit launchers) and finish in any order are summarised alike. A job without either is listed as failed,
with the last error of its log when there is one.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from segvoc.cli import command, command_parser, run_command
from segvoc.errors import SegvocError
from segvoc.files import atomic_write_text
from segvoc.training.hparams import run_name, swept_keys

log = logging.getLogger(__name__)

SUMMARY_FILES = ("summary.csv", "summary.json", "summary.md")
NO_RESULT = "no result.json: the job failed, was killed, or is still running"
CSV_FIELDS = ("job", "name", "status", "overrides", "monitor", "best_score", "global_step", "best_checkpoint", "error",
              "dir")  # fmt: skip


@dataclass
class JobSummary:
    """One job of a sweep: ``status`` is ``ok`` (it wrote its result) or ``failed`` (it did not)."""

    job: str
    status: str
    overrides: list[str]
    dir: str
    name: str = ""  # the overrides that vary across the sweep, as TensorBoard shows the job (segvoc.training.hparams)
    monitor: str | None = None
    best_score: float | None = None
    global_step: int | None = None
    best_checkpoint: str | None = None
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class SweepResults:
    """The jobs of one sweep, best first (by ``mode`` of the monitored metric), failed jobs last."""

    sweep_dir: str
    monitor: str | None
    mode: str
    jobs: list[JobSummary]

    def common_overrides(self) -> list[str]:
        """Overrides every job shares (only when there are two jobs or more: one job's overrides all vary)."""
        if len(self.jobs) < 2:
            return []
        shared = set.intersection(*(set(job.overrides) for job in self.jobs))
        return [o for o in self.jobs[0].overrides if o in shared]


def summarize(sweep_dir: str | Path) -> SweepResults:
    """Read every job folder under ``sweep_dir`` (a folder whose ``.hydra`` holds an ``overrides.yaml``) and rank
    the jobs.

    Jobs with a score come first, best first by the ``mode`` of the checkpoint callback that monitored the score
    in the jobs' config (``max`` when none is found), then jobs without a score, then failed ones; ties keep the
    job order.
    """
    sweep_dir = Path(sweep_dir)
    records = {p.parent for p in sweep_dir.glob("**/.hydra") if _hydra_record(p.parent, "overrides.yaml")}
    job_dirs = sorted(records, key=_natural_key)
    jobs = [_read_job(sweep_dir, job_dir) for job_dir in job_dirs]
    for job, job_dir in zip(jobs, job_dirs, strict=True):
        job.name = run_name(job.overrides, swept_keys(sweep_dir, _sweeper_params(job_dir)))
    monitor = next((job.monitor for job in jobs if job.monitor), None)
    mode = next((m for job_dir in job_dirs if (m := _monitor_mode(job_dir, monitor))), "max")
    sign = -1.0 if mode == "max" else 1.0

    def rank(job: JobSummary) -> tuple[int, float]:
        if job.status != "ok":
            return 2, 0.0
        return (1, 0.0) if job.best_score is None else (0, sign * job.best_score)

    return SweepResults(str(sweep_dir), monitor, mode, sorted(jobs, key=rank))


def write_summary(results: SweepResults) -> list[Path]:
    """Write ``summary.csv`` (one row per job, overrides joined by spaces), ``summary.json`` (everything, with each
    job's last logged metrics) and ``summary.md`` (the printed table) into the sweep folder; return their paths.

    Each file is replaced atomically, so a reader never sees half a file.
    """
    sweep_dir = Path(results.sweep_dir)
    rows = io.StringIO()
    writer = csv.DictWriter(rows, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for job in results.jobs:
        writer.writerow({**asdict(job), "overrides": " ".join(job.overrides)})
    texts = {
        "summary.csv": rows.getvalue(),
        "summary.json": json.dumps({**asdict(results), "common_overrides": results.common_overrides()}, indent=2),
        "summary.md": _markdown(results),
    }
    paths = []
    for name in SUMMARY_FILES:
        path = sweep_dir / name
        atomic_write_text(path, texts[name])
        paths.append(path)
    return paths


def print_summary(results: SweepResults, console: Console | None = None) -> None:
    """Print the jobs as a table, best first, then the overrides all jobs share and why each failed job failed."""
    console = console or Console()
    if not results.jobs:
        console.print(f"No jobs under {results.sweep_dir} (no <job>/.hydra/overrides.yaml).")
        return
    table = Table(title=f"Sweep {results.sweep_dir}")
    for header in _headers(results):
        table.add_column(header, overflow="fold", justify="right" if header == "step" else "left")
    for cells in _cells(results):
        table.add_row(*cells)
    if not console.is_terminal:  # a log or a pipe: as wide as the table needs, paths not broken across lines
        console.width = max(console.width, console.measure(table, options=console.options.update_width(1000)).maximum)
    console.print(table)
    if common := results.common_overrides():
        console.print(f"All jobs: {' '.join(common)}", soft_wrap=True)
    for job in results.jobs:
        if job.status != "ok":
            console.print(f"Job {job.job} failed: {job.error}", soft_wrap=True)


class SweepSummary(Callback):
    """Hydra callback that keeps ``<sweep dir>/summary.*`` up to date during a multirun and prints the table at the end.

    After every job (with the basic launcher jobs run in this process) the summary files are rewritten, so a sweep
    that stops early still leaves a summary; a job that raised has its exception logged to its own log, where the
    summary finds it. In single-run mode it does nothing. It never raises: Hydra turns a callback's exception into a
    warning.
    """

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if OmegaConf.select(config, "hydra.mode") != RunMode.MULTIRUN:
            return
        sweep_dir = str(config.hydra.sweep.dir)
        if job_return.status == JobStatus.FAILED:
            exc = job_return._return_value  # the exception; the public accessor re-raises it
            log.error("%s: %s", type(exc).__name__, str(exc).strip().replace("\n", " "))
            log.error("The summary so far: python -m segvoc.sweep %s", sweep_dir)
        # jobs of the joblib and submitit launchers end in their own processes, at any time: one writer at a time
        with _summary_lock(Path(sweep_dir)):
            write_summary(summarize(sweep_dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        results = summarize(str(config.hydra.sweep.dir))
        paths = write_summary(results) if results.jobs else []
        print_summary(results)
        if paths:
            log.info("Sweep summary written to %s", ", ".join(str(p) for p in paths))


class GpuPerJob(Callback):
    """Hydra callback that gives each process running jobs of a multirun a GPU of its own, for launchers that run
    several jobs at once on one machine (``hydra/launcher=joblib_gpus``).

    Before its first job a process claims the first free GPU of ``gpus`` (default: every GPU this machine shows) by
    locking ``<sweep dir>/.gpus/<gpu>.lock``, waiting while all are taken, and sets ``CUDA_VISIBLE_DEVICES`` to it
    before anything touches CUDA. It keeps that GPU for its later jobs (CUDA, once started, cannot change device)
    until it exits, when the system drops the lock. Start at most one job per GPU at once
    (``hydra.launcher.n_jobs``). Single runs, and machines without a GPU (``gpus`` empty), are left alone.
    """

    def __init__(self, gpus: list[int | str] | None = None, poll_s: float = 1.0) -> None:
        self.gpus = gpus
        self.poll_s = poll_s

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _claimed_gpu
        if OmegaConf.select(config, "hydra.mode") != RunMode.MULTIRUN:
            return
        if _claimed_gpu is not None:
            log.info("Job %s runs on GPU %s", config.hydra.job.num, _claimed_gpu[0])
            return
        gpus = [str(g) for g in (self.gpus if self.gpus is not None else _machine_gpus())]
        if not gpus:
            return
        folder = Path(str(config.hydra.sweep.dir)) / ".gpus"
        folder.mkdir(parents=True, exist_ok=True)
        while _claimed_gpu is None:
            for gpu in gpus:
                lock = open(folder / f"{gpu}.lock", "a")  # noqa: SIM115 (held until the process exits)
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    lock.close()
                    continue
                _claimed_gpu = (gpu, lock)
                break
            else:
                time.sleep(self.poll_s)
        os.environ["CUDA_VISIBLE_DEVICES"] = _claimed_gpu[0]
        log.info("Job %s runs on GPU %s (CUDA_VISIBLE_DEVICES)", config.hydra.job.num, _claimed_gpu[0])


_claimed_gpu: tuple[str, IO[str]] | None = None  # this process's GPU and the open file that holds its lock


def _machine_gpus() -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` when set, otherwise every GPU PyTorch counts
    (counting does not start CUDA)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


@command
def main(argv: list[str] | None = None) -> int:
    """``python -m segvoc.sweep <sweep dir>``: print and write the summary; exit status 1 when no job was found."""
    parser = command_parser(
        "segvoc.sweep",
        "Summarise a multirun: one row per job (overrides, best score, final step, best checkpoint), best first;\n"
        "writes summary.csv, summary.json and summary.md into the sweep folder.",
        ["python -m segvoc.sweep outputs/multirun/train/2026-12-02_10-00-00"],
    )
    parser.add_argument("sweep_dir", type=Path, help="the sweep folder, e.g. outputs/multirun/train/<date>_<time>")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        raise SegvocError(
            f"{args.sweep_dir} is not a folder; give the sweep folder that a multirun printed (it holds one "
            "numbered folder per job), e.g. outputs/multirun/train/<date>_<time>."
        )
    results = summarize(args.sweep_dir)
    print_summary(results)
    if not results.jobs:
        return 1
    paths = write_summary(results)
    print(f"Written: {', '.join(str(p) for p in paths)}")
    return 0


def _read_job(sweep_dir: Path, job_dir: Path) -> JobSummary:
    overrides = [str(o) for o in OmegaConf.to_container(OmegaConf.load(_hydra_record(job_dir, "overrides.yaml")))]
    job = JobSummary(job=job_dir.relative_to(sweep_dir).as_posix(), status="ok", overrides=overrides, dir=str(job_dir))
    try:
        result = json.loads((job_dir / "result.json").read_text()) if (job_dir / "result.json").is_file() else {}
        if "metrics" in result:  # a training job (an evaluation job's result.json lists only its evaluations)
            job.monitor, job.best_checkpoint = result.get("monitor"), result.get("best_checkpoint")
            job.best_score, job.global_step = _number(result.get("best_score")), result.get("global_step")
            job.metrics = result.get("metrics") or {}
            return job
        evaluations = sorted(job_dir.glob("eval-*.json"), key=lambda path: path.stat().st_mtime)
        if evaluations:  # python train.py -m train=false ckpt_path=... (an evaluation sweep): the latest protocol
            report = json.loads(evaluations[-1].read_text())
            job.monitor, job.best_checkpoint = "val/mIoU", report.get("checkpoint")
            job.best_score = _number(report.get("mean_iou"))
            job.metrics = {k: report[k] for k in ("overall_acc", "mean_acc", "freqw_acc", "mean_iou") if k in report}
            return job
        job.error = _first_error(job_dir) or NO_RESULT
    except (OSError, ValueError, AttributeError) as exc:  # damaged or half-written: list the job, say why
        job.error = f"unreadable result: {exc}"
    job.status = "failed"
    return job


def _number(value: Any) -> float | None:
    """A score as a float; NaN (a diverged run) and missing as ``None``."""
    return None if value is None or value != value else float(value)


_ERROR_LINE = re.compile(r"\]\[ERROR\] - (.*)")


def _first_error(job_dir: Path) -> str | None:
    """The first ERROR record of the job's Hydra log (``<job>/<task>.log``): where it went wrong."""
    for log_file in sorted(job_dir.glob("*.log")):
        try:
            text = log_file.read_text(errors="replace")
        except OSError:
            continue
        if match := _ERROR_LINE.search(text):
            return match.group(1).strip()
    return None


def _monitor_mode(job_dir: Path, monitor: str | None) -> str | None:
    """``mode`` of the job config's callback that monitors ``monitor`` (Lightning's default ``min`` when unset)."""
    config = _hydra_record(job_dir, "config.yaml")
    if monitor is None or config is None:
        return None
    callbacks = OmegaConf.load(config).get("callbacks") or {}
    for callback in callbacks.values():
        if isinstance(callback, DictConfig) and callback.get("monitor") == monitor:
            return str(callback.get("mode", "min"))
    return None


@contextlib.contextmanager
def _summary_lock(sweep_dir: Path) -> Iterator[None]:
    """Hold ``<sweep dir>/.summary.lock`` (an advisory lock that the system drops if the holder dies)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / ".summary.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _sweeper_params(job_dir: Path) -> Any:
    """``hydra.sweeper.params`` of the job's recorded Hydra config (an Optuna search space), or ``None``."""
    record = _hydra_record(job_dir, "hydra.yaml")
    try:
        return OmegaConf.select(OmegaConf.load(record), "hydra.sweeper.params") if record else None
    except (OSError, ValueError):
        return None


def _hydra_record(job_dir: Path, name: str) -> Path | None:
    """``<job>/.hydra/<name>``, or the latest ``<job>/.hydra/resume-<time>/<name>`` when the job resumed from a
    checkpoint (Hydra then records its config there, see conf/hydra/default.yaml)."""
    first = job_dir / ".hydra" / name
    if first.is_file():
        return first
    resumes = sorted((job_dir / ".hydra").glob(f"resume-*/{name}"))
    return resumes[-1] if resumes else None


def _natural_key(path: Path) -> list[Any]:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", path.as_posix())]


def _headers(results: SweepResults) -> list[str]:
    return ["job", "run", "status", f"best {results.monitor or 'score'}", "step", "best checkpoint"]


def _cells(results: SweepResults) -> list[list[str]]:
    """Table cells: the run names (as TensorBoard shows them), checkpoints relative to the sweep folder when inside."""
    sweep_dir = Path(results.sweep_dir).resolve()
    rows = []
    for job in results.jobs:
        checkpoint = job.best_checkpoint or ""
        if checkpoint and Path(checkpoint).is_relative_to(sweep_dir):
            checkpoint = str(Path(checkpoint).relative_to(sweep_dir))
        rows.append([
            job.job,
            job.name,
            job.status,
            "" if job.best_score is None else f"{job.best_score:.4f}",
            "" if job.global_step is None else str(job.global_step),
            checkpoint,
        ])  # fmt: skip
    return rows


def _markdown(results: SweepResults) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") or " " for c in cells) + " |\n"

    text = f"Sweep `{results.sweep_dir}`\n\n" + line(_headers(results)) + line(["---"] * 6)
    text += "".join(line(cells) for cells in _cells(results))
    if common := results.common_overrides():
        text += f"\nAll jobs: `{' '.join(common)}`\n"
    for job in results.jobs:
        if job.status != "ok":
            text += f"\nJob {job.job} failed: {job.error}\n"
    return text


if __name__ == "__main__":
    run_command(main)
