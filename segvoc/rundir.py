"""Where a run writes: resuming from ``<run>/checkpoints/last.ckpt`` continues in ``<run>``."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


def resume_run_dir(ckpt_path: str | None, default: str) -> str:
    """Return the run directory of ``ckpt_path`` when it lies in ``<run>/checkpoints/``, else ``default``.

    Continuing in the same directory keeps one TensorBoard stream per run and lets the checkpoint callback restore
    its best score (Lightning restores it only when the checkpoint folder is unchanged).
    """
    if ckpt_path:
        path = Path(str(ckpt_path))
        if path.parent.name == "checkpoints":
            return str(path.parent.parent)
    return default


def resume_config_subdir(ckpt_path: str | None, stamp: str) -> str:
    """Where Hydra records the config of this launch: ``.hydra``, or ``.hydra/resume-<stamp>`` when resuming in
    the checkpoint's run directory, so the original run's record is kept."""
    return f".hydra/resume-{stamp}" if resume_run_dir(ckpt_path, "") else ".hydra"


def register_resolvers() -> None:
    """Make ``${resume_run_dir:...}`` and ``${resume_config_subdir:...}`` available to configs (idempotent)."""
    for name, resolver in (("resume_run_dir", resume_run_dir), ("resume_config_subdir", resume_config_subdir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


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
