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
