"""Hyper-parameters and results of a run, for comparing runs side by side: TensorBoard's HParams tab (one row per
run, parallel coordinates), the params of MLflow and CSV loggers, and the readable run names a sweep gives its jobs.

``run_hparams(cfg)`` picks what defines a run: the recipe keys in ``RECIPE_KEYS`` and every key overridden on the
command line. ``HParamsLogger`` (added by ``segvoc.tasks.train.train``) logs them when fitting starts, declares the
results in ``RESULT_METRICS`` and keeps them current at every validation, so a run that crashed or is still running
shows what it reached. ``run_name`` names a job of a multirun after the overrides that vary across the sweep
(``lr=0.005,backbone_lr_mult=1.0``); the TensorBoard logger (``conf/logger/tensorboard.yaml``) and the sweep
summary (``segvoc.tasks.sweep``) both use it, so the same job has the same name in both.
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger
from omegaconf import DictConfig, ListConfig, OmegaConf
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from tensorboard.plugins.hparams import summary_v2 as hp

# The recipe keys a user compares across runs; every run logs them, whether or not they were overridden.
RECIPE_KEYS = (
    "optimizer.lr",
    "optimizer.weight_decay",
    "model.backbone_lr_mult",
    "data.batch_size",
    "data.crop_size",
    "model.net.output_stride",
    "trainer.precision",
    "trainer.max_steps",
    "seed",
)
# The results shown beside them: the best validation mIoU so far and the last validation's figures.
BEST_METRIC = "best/val/mIoU"
RESULT_METRICS = (BEST_METRIC, "val/mIoU", "val/acc", "val/loss")
# Overrides that say where or how a job runs, not what it trains: left out of run names (never out of hparams).
NOT_IN_NAME = ("ckpt_path", "data.root", "output_dir", "trainer.accelerator", "trainer.devices", "data.num_workers",
               "trainer.enable_progress_bar", "task_name")  # fmt: skip
MAX_NAME = 96  # characters; a longer name is cut and keeps a short hash of the whole for uniqueness

HParamValue = bool | int | float | str


def _override_key_value(override: str) -> tuple[str, str] | None:
    """``(key, value)`` of a ``key=value`` override (``+key``/``++key`` as ``key``); ``None`` for a deletion."""
    if override.startswith("~") or "=" not in override:
        return None
    key, value = override.split("=", 1)
    return key.lstrip("+"), value


def _is_hydra_key(key: str) -> bool:
    return re.split(r"[./]", key, maxsplit=1)[0] == "hydra"


def _hparam_value(value: Any) -> HParamValue:
    """A value TensorBoard's HParams plugin can show: numbers, booleans and strings as they are, the rest as text
    (``None`` as ``"null"``, lists as ``[0.75, 1.25]``)."""
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    return "null" if value is None else str(value)


def job_overrides() -> list[str]:
    """The command-line overrides of the running Hydra job (``hydra.overrides.task``); ``[]`` outside Hydra (a
    config composed in a test or a notebook)."""
    if not HydraConfig.initialized():
        return []
    return [str(o) for o in HydraConfig.get().overrides.task]


def run_hparams(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, HParamValue]:
    """What defines a run: each key of ``RECIPE_KEYS`` the config has, then each key set by ``overrides`` (default:
    the job's), by its dotted name. A config group choice (``experiment=demo``) is logged as the choice; a key that
    is no config value (``hydra.*``) is left out."""
    params: dict[str, HParamValue] = {}
    for key in RECIPE_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None:
            params[key] = _hparam_value(value)
    for override in job_overrides() if overrides is None else overrides:
        parsed = _override_key_value(override)
        if parsed is None or _is_hydra_key(parsed[0]) or parsed[0] in params:
            continue
        key, raw = parsed
        value = OmegaConf.select(cfg, key, default=None) if "/" not in key else None
        params[key] = _hparam_value(raw if value is None or isinstance(value, DictConfig) else value)
    return params


def swept_keys(sweep_dir: str | Path, sweeper_params: Any = None) -> set[str]:
    """The keys a multirun varies: those of ``sweeper_params`` (``hydra.sweeper.params``: an Optuna search space,
    or the basic sweeper's params) and those given several values on the command line, as recorded in
    ``<sweep_dir>/multirun.yaml`` (the basic sweeper writes it before it launches a job). Empty when neither is
    found."""
    keys = {str(k).lstrip("+") for k in (sweeper_params or {})}
    recorded = Path(sweep_dir) / "multirun.yaml"
    if recorded.is_file():
        task = OmegaConf.select(OmegaConf.load(recorded), "hydra.overrides.task") or []
        parsed = OverridesParser.create().parse_overrides([str(o) for o in task])
        keys |= {o.get_key_element().lstrip("+") for o in parsed if o.is_sweep_override()}
    return keys


def run_name(overrides: list[str], swept: set[str] | None = None) -> str:
    """A short, filesystem-safe name for a job from its ``overrides``: ``key=value`` pairs joined by commas, keys by
    their last part (``optimizer.lr`` -> ``lr``) unless two would read the same. Only the ``swept`` keys are named
    when given (and found among the overrides); otherwise every override but those of ``NOT_IN_NAME``, ``hydra.*``
    and deletions. ``"defaults"`` when nothing is left; names past ``MAX_NAME`` characters are cut and end with a
    hash of the whole, so two jobs never share a name."""
    pairs = [kv for o in overrides if (kv := _override_key_value(o)) and not _is_hydra_key(kv[0])]
    if swept and any(key in swept for key, _ in pairs):
        pairs = [(key, value) for key, value in pairs if key in swept]
    else:
        pairs = [(key, value) for key, value in pairs if key not in NOT_IN_NAME]
    if not pairs:
        return "defaults"
    short = [key.rsplit(".", 1)[-1] for key, _ in pairs]
    names = [s if short.count(s) == 1 else key for s, (key, _) in zip(short, pairs, strict=True)]
    text = ",".join(f"{name}={value}" for name, (_, value) in zip(names, pairs, strict=True))
    text = re.sub(r"[^A-Za-z0-9._=,+@-]+", "_", text).strip("_") or "defaults"
    if len(text) > MAX_NAME:
        text = f"{text[: MAX_NAME - 9]}_{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return text


def run_name_resolver(single: str = "") -> str:
    """``${run_name:}`` in the logger configs: in a multirun, the job's ``run_name`` (the overrides that vary across
    the sweep), which the TensorBoard logger uses as its version folder, so TensorBoard lists
    ``<job>/tensorboard/<name>``; in a single run (or outside Hydra) ``single``, by default empty (the events stay
    in ``<run>/tensorboard``, named after the run folder)."""
    if not HydraConfig.initialized():
        return single
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return single
    return run_name(job_overrides(), swept_keys(str(hydra_cfg.sweep.dir), hydra_cfg.sweeper.get("params")))


def store_dir_resolver(*, _root_: DictConfig) -> str:
    """``${store_dir:}``: the folder a tracking store shared by a sweep lives in: the sweep folder in a multirun,
    the run folder (``output_dir``) otherwise."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return str(Path(str(HydraConfig.get().sweep.dir)).absolute())
    return str(Path(str(_root_.output_dir)).absolute())


def compared_keys() -> set[str]:
    """The keys a run is compared by: in a multirun the keys the sweep varies (``swept_keys``), otherwise (or when
    those are unknown) the keys set on the command line."""
    overridden = {kv[0] for o in job_overrides() if (kv := _override_key_value(o))}
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        hydra_cfg = HydraConfig.get()
        return swept_keys(str(hydra_cfg.sweep.dir), hydra_cfg.sweeper.get("params")) or overridden
    return overridden


def _summary(tag: str, content: plugin_data_pb2.HParamsPluginData) -> summary_pb2.Summary:
    """A summary holding the HParams plugin's ``content``, written as TensorBoard's own ``hparams`` API writes it."""
    content.version = metadata.PLUGIN_DATA_VERSION
    summary = summary_pb2.Summary()
    summary.value.add(tag=tag, metadata=metadata.create_summary_metadata(content), tensor=metadata.NULL_TENSOR)
    return summary


class HParamsLogger(L.Callback):
    """Log a run's hyper-parameters and results for side-by-side comparison.

    When fitting starts, each TensorBoard logger gets the HParams plugin's experiment (the keys of ``hparams`` and
    the metrics of ``RESULT_METRICS``) and session start (the values); every other logger (CSV, MLflow) gets
    ``log_hyperparams(hparams)``. The plugin reads each metric's value from the run's last scalar of that name, so
    after every validation (sanity checks excluded) this callback logs ``best/val/mIoU`` (the best ``val/mIoU``
    so far, the checkpoint callback's record included after a resume) to every logger and flushes TensorBoard:
    a crashed or running job shows what it reached. The session end (success, or failure after an exception) is
    written when the run ends, and an MLflow logger gets the best checkpoint (``val/mIoU``) as the artifact
    ``checkpoints/best.ckpt``. Only the global-zero process writes.
    """

    def __init__(
        self,
        hparams: dict[str, HParamValue],
        metrics: tuple[str, ...] = RESULT_METRICS,
        compared: set[str] | None = None,
    ) -> None:
        self.hparams = dict(hparams)
        self.metrics = metrics
        # marked as differing between runs: TensorBoard lists (and shows at first) those before the others
        self.compared = compared_keys() if compared is None else compared
        self.best: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                experiment = api_pb2.Experiment(
                    hparam_infos=[api_pb2.HParamInfo(name=k, differs=k in self.compared) for k in self.hparams],
                    metric_infos=[
                        api_pb2.MetricInfo(name=api_pb2.MetricName(tag=m), display_name=m) for m in self.metrics
                    ],
                    time_created_secs=time.time(),
                )
                writer = logger.experiment._get_file_writer()
                writer.add_summary(
                    _summary(metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment))
                )
                # the table's "Trial ID": the run's name in a multirun, else its folder's name
                trial = str(logger.version) or Path(logger.save_dir).name
                writer.add_summary(hp.hparams_pb(self.hparams, trial_id=trial))
                writer.flush()
            else:
                logger.log_hyperparams(self.hparams)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        score = trainer.callback_metrics.get("val/mIoU")
        if trainer.sanity_checking or score is None or not trainer.is_global_zero:
            return
        candidates = [float(score)] + ([] if self.best is None else [self.best])
        for callback in trainer.checkpoint_callbacks:  # the record a resumed run brings along
            if isinstance(callback, ModelCheckpoint) and (callback.monitor, callback.mode) == ("val/mIoU", "max"):
                candidates += [] if callback.best_model_score is None else [float(callback.best_model_score)]
        scores = [c for c in candidates if c == c]  # NaN (a diverged validation) never counts as the best
        self.best = max(scores) if scores else float("nan")
        # the step Lightning logs this validation's metrics at, so that the curves line up
        step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
        for logger in trainer.loggers:
            logger.log_metrics({BEST_METRIC: self.best}, step=step)
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.flush()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end(trainer, api_pb2.STATUS_SUCCESS)
        best = self._best_checkpoint(trainer)
        for logger in trainer.loggers if trainer.is_global_zero and best else []:
            if isinstance(logger, MLFlowLogger):  # the model a tracking server should keep: best.ckpt
                logger.experiment.log_artifact(logger.run_id, best, "checkpoints")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._end(trainer, api_pb2.STATUS_FAILURE)

    @staticmethod
    def _best_checkpoint(trainer: L.Trainer) -> str | None:
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.monitor == "val/mIoU" and callback.best_model_path:
                return callback.best_model_path
        return None

    def _end(self, trainer: L.Trainer, status: int) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                end = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
                summary = _summary(
                    metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end)
                )
                logger.experiment._get_file_writer().add_summary(summary)
                logger.experiment.flush()
