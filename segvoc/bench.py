"""Throughput and memory benchmarks: ``python -m segvoc.bench [--short] [--device auto|cpu|cuda] [--json out.json]``.

A fixed set of measurements, each through the code path that training, validation or prediction really runs
(BENCHMARKS.md says what each one times, how to read it, and what was measured where):

``data``     decode + train augmentation of VOC-size JPEGs into ``crop_size`` crops (``VOCDataModule``'s training
             set): in this process on one core, then through the training DataLoader the data module builds, with one
             worker and with one worker per core.
``train``    training steps at ``crop_size`` through Lightning (the configured ``SegmentationModule`` and
             ``Trainer.fit``) for every precision the device supports, ``channels_last`` off/on and ``torch.compile``
             off/on; for the eager settings also through a plain PyTorch loop doing the same work, and Lightning's
             overhead per step over it.
``val``      whole VOC-size images (landscape and portrait) through ``trainer.validate``.
``predict``  JPEG files on disk to mask PNGs on disk through ``segvoc.prediction.run``.
``flops``    FLOPs of one forward pass at ``1 x 3 x crop_size x crop_size`` counted by ``torch.utils.flop_counter``.
``memory``   (always, last) the peak host memory of the whole run and the largest peak device memory.

Every figure records its device (CPU model or GPU name), torch version and threads, and the peak host memory
(resident set of this process) and peak device memory during that measurement. Without ``--data-root`` the images are
generated in a temporary VOC-layout tree. With ``--json`` the file is rewritten after every measurement, so a crash
or an interrupt keeps everything measured before it; a measurement that fails is recorded with its error and the
others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import math
import os
import platform
import re
import resource
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose, initialize
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from segvoc.config import register_config_resolvers
from segvoc.data.datamodule import default_num_workers
from segvoc.data.demo import make_scene
from segvoc.data.transforms import normalize
from segvoc.palette import voc_palette

log = logging.getLogger(__name__)

SECTIONS = ("data", "train", "val", "predict", "flops")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
SEED_REPORT_GFLOPS = 17.0  # what the seed report's tool prints for DeepLabV3+/MobileNetV2 at 513x513
MIB = 1024 * 1024


@dataclass(frozen=True)
class Sizes:
    """How much each section measures; ``--short`` picks the small set."""

    data_pool: int  # distinct generated training images (the split repeats them)
    data_items: int  # items timed in one process, and through the one-worker DataLoader
    loader_images: int  # at least this many images per timed epoch of the all-workers DataLoader
    loader_epochs: int  # timed loader epochs, after one warm-up epoch
    train_warmup: int  # steps before timing (the first steps pick kernels, allocate, compile)
    train_steps: int  # timed steps
    val_rounds: int  # timed pairs of validation batches (one landscape, one portrait) after one warm-up pair
    predict_images: int


SIZES = {
    # (short, device type) -> sizes
    (True, "cpu"): Sizes(8, 48, 192, 2, 1, 3, 1, 16),
    (False, "cpu"): Sizes(32, 128, 512, 2, 2, 8, 4, 48),
    (True, "cuda"): Sizes(16, 64, 256, 1, 5, 20, 3, 64),
    (False, "cuda"): Sizes(64, 256, 1024, 2, 10, 50, 12, 400),
}


@dataclass
class Result:
    """One figure. ``value`` is None when the measurement failed; ``note`` then says why."""

    section: str
    name: str
    value: float | None
    unit: str
    device: str
    threads: int
    torch: str
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None  # length of the timed span
    host_peak_mib: float | None = None  # peak resident set of this process during the measurement
    device_peak_mib: float | None = None  # torch.cuda.max_memory_allocated during the measurement
    note: str = ""


def failure(exc: BaseException) -> str:
    """``failed: <type>: <first line of the message>``."""
    message = str(exc).splitlines()[0] if str(exc) else ""
    return f"failed: {type(exc).__name__}: {message}"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_label(device: torch.device) -> str:
    """``cpu: <model name>`` or ``cuda: <GPU name>``."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {cpu_name()}"


def reset_host_peak() -> bool:
    """Reset this process's peak resident set (Linux: ``/proc/self/clear_refs``), so that ``host_peak_mib``
    reports the peak from now on. False where that is not possible (the peak then counts from the start)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def host_peak_mib() -> float:
    """Peak resident set size of this process in MiB: ``VmHWM`` (since the last ``reset_host_peak``) where
    ``/proc`` has it, else ``ru_maxrss`` (since the start)."""
    with contextlib.suppress(OSError, AttributeError):
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def children_peak_mib() -> float:
    """The largest peak resident set of the child processes (DataLoader workers) reaped so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024


def mean_kib(paths: Sequence[Path]) -> float:
    """Mean file size of ``paths`` in KiB."""
    return round(float(np.mean([p.stat().st_size for p in paths])) / 1024, 1)


def image_sizes(paths: Sequence[Path]) -> list[list[int]]:
    """The distinct ``[width, height]`` of the images ``paths``."""
    sizes = set()
    for path in paths:
        with Image.open(path) as image:
            sizes.add(image.size)
    return [list(size) for size in sorted(sizes)]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it covers that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compose_config(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """``conf/<config_name>.yaml`` composed with ``overrides``, as the entry points compose it."""
    register_config_resolvers()  # ${len:...} of conf/data/custom.yaml
    with initialize(version_base="1.3", config_path="../conf"):
        return compose(config_name=config_name, overrides=list(overrides))


def textured_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A demo scene (``segvoc.data.demo.make_scene``) with multi-scale luminance texture added, so that at JPEG
    quality 90 a 500x375 image takes about as many bytes as a VOC photograph, and decodes in about as long."""
    image, mask = make_scene(rng, height, width)
    texture = np.zeros((height, width), np.float32)
    cells = 8
    while cells <= 2 * max(height, width):
        grid = rng.normal(0.0, 1.0, size=(max(cells * height // max(height, width), 1), cells)).astype(np.float32)
        if width < height:
            grid = grid.T.copy()
        texture += cv2.resize(grid, (width, height), interpolation=cv2.INTER_LINEAR) * 30.0 * (8 / cells) ** 0.1
        cells *= 2
    return np.clip(image + texture[..., None], 0, 255).astype(np.uint8), mask


def write_voc_tree(root: Path, splits: dict[str, int], size: tuple[int, int], seed: int = 0) -> Path:
    """Write a VOC-layout tree under ``root/VOCdevkit/VOC2012`` and return that folder.

    ``splits`` maps a split name to its number of images; ``size`` is ``(width, height)`` of the landscape images.
    Portrait (``height x width``) and landscape images alternate, so that validation batches, grouped by size,
    alternate too. JPEGs at quality 90, palette masks.
    """
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    palette = voc_palette().flatten().tolist()
    width, height = size
    for split, count in splits.items():
        ids = [f"{split}_{i:05d}" for i in range(count)]
        for i, name in enumerate(ids):
            image, mask = textured_scene(rng, *((width, height) if i % 2 else (height, width)))
            cv2.imwrite(str(voc / "JPEGImages" / f"{name}.jpg"), image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
            png = Image.fromarray(mask, mode="P")
            png.putpalette(palette)
            png.save(voc / "SegmentationClass" / f"{name}.png")
        (voc / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return voc


def throughput(times: Sequence[float], sizes: Sequence[int], warmup: int, per_step: bool) -> tuple[float, float]:
    """``(images/s, timed seconds)`` of the batches after the first ``warmup``, from the times at the end of each
    batch and the batch sizes.

    ``per_step``: every batch was timed on its own (on a CPU, where nothing runs ahead of the clock), and the rate
    is the median batch over the median batch time, which other processes on a shared machine disturb least.
    Otherwise it is the timed images over the time from the end of batch ``warmup`` to the end of the last.
    """
    if len(times) <= warmup:
        raise RuntimeError(f"only {len(times)} batches ran; {warmup} warm-up batches and at least one more are needed")
    seconds = times[-1] - times[warmup - 1]
    if per_step:
        return float(np.median(sizes[warmup:]) / np.median(np.diff(times[warmup - 1 :]))), seconds
    return sum(sizes[warmup:]) / seconds, seconds


class FixedSamples(Dataset):
    """``length`` items cycling over ``samples``: fixed batches held in memory, so no decoding is timed."""

    def __init__(self, samples: Sequence[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        self.samples = list(samples)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.samples[index % len(self.samples)]


class BatchClock(L.Callback):
    """Records the time at the end of every training or validation batch and the batch's size.

    The device is synchronised before the clock is read after every batch, or, with ``sync_at``, only after the
    batches of those (1-based) counts: the warm-up's last and the run's last, so that the GPU works through the
    timed steps as it does in training, queued ahead of the host.
    """

    def __init__(self, device: torch.device, sync_at: Collection[int] | None = None) -> None:
        self.device = device
        self.sync_at = sync_at
        self.start: float | None = None
        self.times: list[float] = []
        self.sizes: list[int] = []

    def _tick(self, batch: Any) -> None:
        if self.sync_at is None or len(self.times) + 1 in self.sync_at:
            synchronize(self.device)
        self.times.append(time.perf_counter())
        self.sizes.append(int(batch[0].shape[0]))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._tick(batch)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._tick(batch)

    def rate(self, warmup: int) -> tuple[float, float]:
        """``(images/s, timed seconds)`` after the first ``warmup`` batches (``throughput``: per batch on a CPU)."""
        return throughput(self.times, self.sizes, warmup, per_step=self.device.type == "cpu")


class SeedFirstStep(L.Callback):
    """Seeds torch's generator just before the first training step, where ``plain_training`` seeds it too, so
    that both loops draw the same dropout masks."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == 0 and trainer.current_epoch == 0:
            torch.manual_seed(self.seed)


@dataclass
class TrainSetting:
    precision: str
    channels_last: bool
    compile: bool

    @property
    def label(self) -> str:
        return (
            f"{self.precision} channels_last={'on' if self.channels_last else 'off'} "
            f"compile={'on' if self.compile else 'off'}"
        )


def training_overrides(setting: TrainSetting, steps: int) -> list[str]:
    """The training-config overrides that make ``Trainer.fit`` run ``steps`` steps of ``setting``."""
    return [
        f"trainer.max_steps={steps}",
        f"trainer.precision={setting.precision}",
        f"model.channels_last={setting.channels_last}",
        f"model.compile={setting.compile}",
    ]


def lightning_training(
    cfg: DictConfig, loader: DataLoader, device: torch.device, warmup: int, seed: int = 0
) -> tuple[L.LightningModule, BatchClock]:
    """``Trainer.fit`` of the configured ``SegmentationModule`` over ``loader`` (``cfg.trainer.max_steps`` steps),
    with the configured loggers and no validation or checkpoints. Returns the trained module and its clock, whose
    ``start`` is the time ``fit`` was called."""
    if cfg.model.get("compile"):
        from torch import _dynamo

        _dynamo.reset()  # each compiled run compiles from scratch (Inductor's on-disk caches stay)
    torch.manual_seed(seed)
    module = instantiate(cfg.model)
    steps = cfg.trainer.max_steps
    clock = BatchClock(device, sync_at={warmup, steps})
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer = instantiate(
        cfg.trainer,
        callbacks=[clock, SeedFirstStep(seed)],
        logger=loggers or False,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    clock.start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    return module, clock


def plain_training(
    module: L.LightningModule,
    loader: DataLoader,
    device: torch.device,
    setting: TrainSetting,
    mean: Sequence[float],
    std: Sequence[float],
    warmup: int,
    seed: int = 0,
) -> list[float]:
    """Train ``module.net`` over ``loader`` without Lightning, doing what ``SegmentationModule`` and Lightning's
    loop do per step: batch to the device, normalise (``on_after_batch_transfer``), forward and loss under the
    precision's autocast, train-metric update, zero_grad, backward (gradient scaling for ``16-mixed``), optimizer
    step and scheduler step. Lightning's logging, callbacks and hooks are what it leaves out.

    ``module`` is built without channels_last/compile; ``setting`` applies them here as
    ``SegmentationModule.configure_model`` does (NHWC weights, ``nn.Module.compile`` in place). Returns the time at
    the end of every step; the device is synchronised after step ``warmup`` and after the last.
    """
    if setting.precision not in PRECISIONS:
        raise ValueError(f"the plain loop does not implement precision {setting.precision}")
    module.to(device).train()
    net = module.net
    if setting.channels_last:
        net.to(memory_format=torch.channels_last)
    if setting.compile:
        net.compile()
    configured = module.configure_optimizers()
    optimizer = configured["optimizer"]
    scheduler = configured.get("lr_scheduler", {}).get("scheduler")
    autocast_dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(setting.precision)
    scaler = torch.amp.GradScaler(device.type) if setting.precision == "16-mixed" else None
    mean_t, std_t = (torch.tensor(v, device=device) for v in (mean, std))
    steps = len(loader)
    times = []
    for step, (images, masks) in enumerate(loader):
        images = normalize(images.to(device, non_blocking=True), mean_t, std_t)  # as Lightning moves a batch
        masks = masks.to(device, non_blocking=True).long()
        if setting.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if step == 0:
            torch.manual_seed(seed)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = net(images)
            loss = F.cross_entropy(logits, masks, ignore_index=module.ignore_index)
        module.train_metrics.update(logits.detach().argmax(dim=1), masks)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        del images, masks, logits, loss  # freed before the next batch, as Lightning's loop frees them
        if step + 1 in (warmup, steps):
            synchronize(device)
        times.append(time.perf_counter())
    return times


class Bench:
    """Runs the sections and records every figure in ``results`` (and the JSON file, when given)."""

    def __init__(self, args: argparse.Namespace, workdir: Path, console: Console) -> None:
        self.args = args
        self.console = console
        self.workdir = workdir
        requested = args.device
        if requested == "auto":
            requested = "cuda" if torch.cuda.is_available() else "cpu"
        if requested == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: this torch sees no CUDA device (torch.cuda.is_available() is False).")
        self.device = torch.device(requested)
        self.sizes = SIZES[(args.short, self.device.type)]
        defaults = compose_config("train", list(args.overrides)).data
        self.batch_size = args.batch_size or (2 if args.short and self.device.type == "cpu" else 8)
        self.loader_batch_size = args.batch_size or defaults.batch_size
        self.crop_size = args.crop_size
        self.val_batch_size = args.val_batch_size or defaults.val_batch_size
        self.image_size = args.image_size
        self.json_path = Path(args.json) if args.json else None
        self.results: list[Result] = []
        self.skipped: list[dict[str, str]] = []
        self.section_seconds: dict[str, float] = {}
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.clock = time.perf_counter()
        self._voc_root: Path | None = Path(args.data_root).expanduser() if args.data_root else None

    # ----------------------------------------------------------------------------------------------- recording
    def environment(self) -> dict[str, Any]:
        import lightning

        env = {
            "device": device_label(self.device),
            "cpu": cpu_name(),
            "cpu_cores": default_num_workers(),
            "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "torch_threads": torch.get_num_threads(),
            "opencv_threads": cv2.getNumThreads(),
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "opencv": cv2.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
        }
        if self.device.type == "cuda":
            env["cuda"] = torch.version.cuda
            env["cudnn"] = torch.backends.cudnn.version()
            env["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
            env["cudnn_benchmark"] = torch.backends.cudnn.benchmark
            env["float32_matmul_precision"] = torch.get_float32_matmul_precision()
        return env

    def options(self) -> dict[str, Any]:
        return {
            "short": self.args.short,
            "batch_size": self.batch_size,
            "loader_batch_size": self.loader_batch_size,
            "crop_size": self.crop_size,
            "image_size": list(self.image_size),
            "val_batch_size": self.val_batch_size,
            "sections": list(self.args.sections),
            "precisions": list(self.args.precision or PRECISIONS),
            "channels_last": self.args.channels_last,
            "compile": self.compile_choice,
            "overrides": list(self.args.overrides),
            "data_root": str(self._voc_root) if self.args.data_root else None,
            "sizes": asdict(self.sizes),
        }

    @property
    def rate_from(self) -> str:
        """How the training and validation rates are taken from the batch times (see ``throughput``)."""
        return "median batch time" if self.device.type == "cpu" else "mean over the timed batches"

    @property
    def compile_choice(self) -> str:
        """``--compile``, defaulting to ``off`` with ``--short`` and ``both`` without."""
        return self.args.compile or ("off" if self.args.short else "both")

    def save(self) -> None:
        """Rewrite the JSON file with everything recorded so far (write, then rename over the old one)."""
        if self.json_path is None:
            return
        document = {
            "benchmark": "segvoc.bench",
            "command": "python -m segvoc.bench " + " ".join(sys.argv[1:]),
            "started": self.started,
            "elapsed_s": round(time.perf_counter() - self.clock, 1),
            "environment": self.environment(),
            "options": self.options(),
            "results": [asdict(r) for r in self.results],
            "skipped": self.skipped,
            "section_seconds": self.section_seconds,
        }
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.json_path.with_name(self.json_path.name + ".tmp")
        tmp.write_text(json.dumps(document, indent=2, default=str))  # default: never lose a run to an odd value
        os.replace(tmp, self.json_path)

    def skip(self, section: str, what: str, why: str) -> None:
        self.skipped.append({"section": section, "what": what, "why": why})
        self.console.print(f"[yellow]skipped[/] {section}: {what} ({why})")
        self.save()

    def measure(
        self,
        section: str,
        name: str,
        unit: str,
        run: Callable[[], tuple[float, float | None, dict[str, Any]]],
        settings: dict[str, Any] | None = None,
        on_device: bool = True,
        note: str = "",
    ) -> Result:
        """Run ``run() -> (value, timed seconds, extra settings)`` and record it, or its failure, with the peak
        host and device memory during the run.

        ``on_device`` false: the work runs on the host CPU whatever ``--device`` is (data loading, FLOP counting).
        """
        device = self.device if on_device else torch.device("cpu")
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        reset_host_peak()
        result = Result(
            section,
            name,
            None,
            unit,
            device_label(device),
            torch.get_num_threads(),
            torch.__version__,
            dict(settings or {}),
            note=note,
        )
        try:
            value, seconds, extra = run()
            result.value, result.seconds = float(value), seconds
            result.settings.update(extra)
        except Exception as exc:  # noqa: BLE001 - one failed measurement must not lose the others
            log.exception("%s / %s failed", section, name)
            result.note = failure(exc)
        result.host_peak_mib = round(host_peak_mib(), 1)
        if device.type == "cuda":
            result.device_peak_mib = round(torch.cuda.max_memory_allocated(device) / MIB, 1)
        return self._record(result)

    def derive(
        self,
        section: str,
        name: str,
        value: float,
        unit: str,
        settings: dict[str, Any],
        note: str = "",
        on_device: bool = True,
    ) -> Result:
        """Record a figure computed from others (no memory of its own)."""
        device = device_label(self.device if on_device else torch.device("cpu"))
        threads = torch.get_num_threads()
        return self._record(
            Result(section, name, value, unit, device, threads, torch.__version__, dict(settings), note=note)
        )

    def fail(self, section: str, name: str, exc: BaseException) -> Result:
        """Record that ``section``'s ``name`` could not be measured because of ``exc``."""
        device = device_label(self.device)
        return self._record(
            Result(section, name, None, "", device, torch.get_num_threads(), torch.__version__, note=failure(exc))
        )

    def _record(self, result: Result) -> Result:
        self.results.append(result)
        shown = "—" if result.value is None else f"{result.value:,.2f} {result.unit}"
        self.console.print(f"[bold]{result.section}[/] {result.name}: {shown} {result.note}".rstrip())
        self.save()
        return result

    def table(self) -> Table:
        env = self.environment()
        table = Table(
            title=f"segvoc.bench on {env['device']} — torch {env['torch']}, lightning {env['lightning']}, "
            f"{env['cpu_cores']} CPU cores, training batch {self.batch_size}, crop {self.crop_size}"
        )
        for column in (
            "section",
            "measurement",
            "value",
            "unit",
            "device",
            "host peak MiB",
            "device peak MiB",
            "note",
        ):
            table.add_column(column, justify="right" if column == "value" or "MiB" in column else "left")
        for r in self.results:
            table.add_row(
                r.section,
                r.name,
                "—" if r.value is None else f"{r.value:,.2f}",
                r.unit,
                r.device,
                "" if r.host_peak_mib is None else f"{r.host_peak_mib:,.0f}",
                "" if r.device_peak_mib is None else f"{r.device_peak_mib:,.0f}",
                r.note,
            )
        return table

    # ----------------------------------------------------------------------------------------------- shared set-up
    @property
    def val_batches(self) -> int:
        """Validation batches run: a warm-up pair (one of each orientation) and ``val_rounds`` timed pairs."""
        return 2 * (1 + self.sizes.val_rounds)

    @property
    def voc_root(self) -> Path:
        """The data root: ``--data-root``, or a generated tree (once) with train and val splits."""
        if self._voc_root is None:
            root = self.workdir / "data"
            val_images = self.val_batches * self.val_batch_size
            write_voc_tree(root, {"train": self.sizes.data_pool, "val": val_images}, self.image_size)
            self._voc_root = root
        return self._voc_root

    def train_config(self, *overrides: str) -> DictConfig:
        """The training config (conf/train.yaml) on the bench's data, device and sizes, plus the command line's
        overrides and ``overrides``."""
        cfg = compose_config(
            "train",
            [
                f"data.root={self.voc_root}",
                "data.download=false",
                "data.check=false",
                f"data.batch_size={self.batch_size}",
                f"data.crop_size={self.crop_size}",
                "model.net.pretrained=false",
                f"trainer.accelerator={self.device.type}",
                "trainer.devices=1",
                "trainer.enable_progress_bar=false",
                *self.args.overrides,
                *overrides,
            ],
        )
        with open_dict(cfg):
            cfg.output_dir = str(self.workdir / "runs")
        return cfg

    # ----------------------------------------------------------------------------------------------- sections
    def bench_data(self) -> None:
        """Decode + train augmentation: the training dataset in this process on one core, then the training
        DataLoader as the data module builds it, with one worker and with one worker per core."""
        cfg = self.train_config(f"data.batch_size={self.loader_batch_size}")
        datamodule = instantiate(cfg.data)
        datamodule.setup("fit")
        dataset = datamodule.train_set
        ids = list(dataset.ids)
        common = {
            "crop_size": self.crop_size,
            "jpeg_kib_mean": mean_kib([dataset.paths(i)[0] for i in range(len(ids))]),
            "image_sizes": image_sizes([dataset.paths(i)[0] for i in range(len(ids))]),
            "distinct_images": len(ids),
        }

        def one_process() -> tuple[float, float, dict[str, Any]]:
            warmup, count = 2, self.sizes.data_items
            threads = cv2.getNumThreads()
            cv2.setNumThreads(1)  # one core: OpenCV's own thread pool off (set here, in the main process only)
            try:
                for i in range(warmup):
                    dataset[i % len(ids)]
                start = time.perf_counter()
                for i in range(warmup, warmup + count):
                    dataset[i % len(ids)]
                seconds = time.perf_counter() - start
            finally:
                cv2.setNumThreads(threads)
            return count / seconds, seconds, {"images": count, "opencv_threads": 1}

        self.measure(
            "data", "decode + train augmentation, one process on one core", "images/s", one_process, common, False
        )

        def loader_run(workers: int, images_per_epoch: int, epochs: int) -> tuple[float, float, dict[str, Any]]:
            # Workers fork from this process; nothing in them calls cv2.setNumThreads (see seed_worker).
            datamodule.num_workers = workers
            per_round = self.loader_batch_size * max(workers, 1)
            rounds = math.ceil(images_per_epoch / per_round)
            dataset.ids = [ids[i % len(ids)] for i in range(per_round * rounds)]  # whole batches, even per worker
            try:
                loader = datamodule.train_dataloader()
                for _ in loader:  # warm-up epoch: starts the (persistent) workers
                    pass
                images = 0
                start = time.perf_counter()
                for _ in range(epochs):
                    for batch in loader:
                        images += int(batch[0].shape[0])
                seconds = time.perf_counter() - start
                del loader, batch
                gc.collect()  # ends the persistent workers, so that their peak memory is known
            finally:
                dataset.ids = ids
            extra = {
                "num_workers": workers,
                "batch_size": self.loader_batch_size,
                "images": images,
                "pin_memory": datamodule.pin_memory,
                "worker_peak_mib": round(children_peak_mib(), 1),
            }
            return images / seconds, seconds, extra

        all_workers = default_num_workers() if cfg.data.num_workers is None else cfg.data.num_workers
        self.measure(
            "data",
            "decode + train augmentation, DataLoader with 1 worker",
            "images/s",
            lambda: loader_run(1, self.sizes.data_items, 1),
            common,
            False,
        )
        self.measure(
            "data",
            f"decode + train augmentation, DataLoader with {all_workers} workers (one per core)",
            "images/s",
            lambda: loader_run(all_workers, self.sizes.loader_images, self.sizes.loader_epochs),
            common,
            False,
        )

    def train_settings(self) -> list[TrainSetting]:
        """The grid of training settings this device and these options allow, eager before compiled; what is
        left out goes to ``skipped`` with the reason."""
        precisions = []
        for precision in self.args.precision or PRECISIONS:
            if precision == "bf16-mixed" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
                self.skip("train", precision, f"{torch.cuda.get_device_name(self.device)} does not support bfloat16")
            elif precision == "16-mixed" and self.device.type == "cpu":
                self.skip("train", precision, "Lightning runs float16 mixed precision on CUDA only (CPU: bf16-mixed)")
            else:
                precisions.append(precision)
        layouts = {"off": [False], "on": [True], "both": [False, True]}[self.args.channels_last]
        compiles = {"off": [False], "on": [True], "both": [False, True]}[self.compile_choice]
        if self.compile_choice == "off" and self.args.compile is None:
            self.skip(
                "train",
                "compile=on",
                "--short: torch.compile takes minutes per setting on a CPU; run without --short, or --compile on",
            )
        return [TrainSetting(p, cl, c) for c in compiles for cl in layouts for p in precisions]

    def bench_train(self) -> None:
        """Training steps through Lightning, per setting, and for the eager settings through a plain loop doing
        the same work and Lightning's overhead per step over it.

        The batches are real training crops of the data module, decoded once and held in host memory; a DataLoader
        without workers collates them every step, so these figures time the training step, not the input pipeline
        (``bench_data`` times that)."""
        sizes = self.sizes
        warmup, steps = sizes.train_warmup, sizes.train_warmup + sizes.train_steps
        base = self.train_config()
        datamodule = instantiate(base.data)
        datamodule.setup("fit")
        samples = [datamodule.train_set[i % len(datamodule.train_set)] for i in range(self.batch_size)]
        mean, std = datamodule.mean, datamodule.std
        del datamodule

        def loader() -> DataLoader:
            return DataLoader(FixedSamples(samples, steps * self.batch_size), batch_size=self.batch_size)

        baseline: float | None = None  # Lightning fit, 32-true channels_last=off compile=off
        for setting in self.train_settings():
            cfg = self.train_config(*training_overrides(setting, steps))
            settings = {
                **asdict(setting),
                "batch_size": self.batch_size,
                "crop_size": self.crop_size,
                "warmup_steps": warmup,
                "timed_steps": sizes.train_steps,
                "rate_from": self.rate_from,
            }

            def lightning_run(cfg: DictConfig = cfg) -> tuple[float, float, dict[str, Any]]:
                _, clock = lightning_training(cfg, loader(), self.device, warmup)
                rate, seconds = clock.rate(warmup)
                # fit's start to the warm-up's end: set-up, first steps, and torch.compile where it is on
                return rate, seconds, {"warmup_seconds": round(clock.times[warmup - 1] - clock.start, 1)}

            def plain_run(setting: TrainSetting = setting) -> tuple[float, float, dict[str, Any]]:
                torch.manual_seed(0)
                module = instantiate(self.train_config(f"trainer.max_steps={steps}").model)  # as built, no options
                times = plain_training(module, loader(), self.device, setting, mean, std, warmup)
                rate, seconds = throughput(times, [self.batch_size] * len(times), warmup, self.device.type == "cpu")
                return rate, seconds, {}

            lightning = self.measure("train", f"Lightning fit, {setting.label}", "images/s", lightning_run, settings)
            if baseline is None and setting == TrainSetting("32-true", False, False):
                baseline = lightning.value
            elif baseline and lightning.value:
                lightning.settings["speedup_over_fp32_eager"] = round(lightning.value / baseline, 2)
                lightning.note = f"{lightning.value / baseline:.2f}x 32-true channels_last=off compile=off"
                self.save()
            if setting.compile:
                continue  # the loop's overhead does not depend on the kernels: measured on the eager settings
            plain = self.measure("train", f"plain PyTorch loop, {setting.label}", "images/s", plain_run, settings)
            if lightning.value and plain.value:
                overhead = (plain.value / lightning.value - 1.0) * 100  # step time: Lightning's over the plain loop's
                name = f"Lightning overhead per step, {setting.label}"
                self.derive("train", name, overhead, "%", settings, "step time over the plain loop's")

    def bench_val(self) -> None:
        """Whole images through trainer.validate: the configured module, data module and val loader."""
        # num_val_images=0: no TensorBoard panels, which are drawn for the first 4 images of a validation only
        cfg = self.train_config("model.num_val_images=0", f"data.val_batch_size={self.val_batch_size}")
        warmup = 2  # the first batch of each orientation: kernels picked, memory allocated for both shapes

        def run() -> tuple[float, float, dict[str, Any]]:
            torch.manual_seed(0)
            datamodule = instantiate(cfg.data)
            module = instantiate(cfg.model)
            clock = BatchClock(self.device)
            trainer = instantiate(
                cfg.trainer,
                callbacks=[clock],
                logger=False,
                limit_val_batches=self.val_batches,
                enable_model_summary=False,
            )
            trainer.validate(module, datamodule=datamodule, verbose=False)
            rate, seconds = clock.rate(warmup)
            paths = [datamodule.val_set.paths(i)[0] for i in range(min(len(datamodule.val_set), sum(clock.sizes)))]
            extra = {
                "images": sum(clock.sizes[warmup:]),
                "batches": len(clock.sizes) - warmup,
                "image_sizes": image_sizes(paths),
                "num_workers": datamodule.num_workers,
                "jpeg_kib_mean": mean_kib(paths),
            }
            return rate, seconds, extra

        settings = {
            "precision": cfg.trainer.precision,
            "val_batch_size": self.val_batch_size,
            "warmup_batches": warmup,
            "rate_from": self.rate_from,
            "inference": OmegaConf.to_container(cfg.model.inference),
        }
        self.measure("val", "trainer.validate, whole images", "images/s", run, settings)

    def bench_predict(self) -> None:
        """JPEG files to mask PNGs through segvoc.prediction.run, with a checkpoint the configured module writes."""
        from segvoc.prediction import run as predict

        cfg = self.train_config()
        torch.manual_seed(0)
        module = instantiate(cfg.model)
        checkpoint: dict[str, Any] = {"state_dict": module.state_dict()}
        module.on_save_checkpoint(checkpoint)  # what Lightning adds: the network spec, classes, normalisation
        ckpt = self.workdir / "bench.ckpt"
        torch.save(checkpoint, ckpt)
        del module, checkpoint

        datamodule = instantiate(cfg.data)
        datamodule.setup("validate")
        dataset = datamodule.val_set
        jpegs = [dataset.paths(i % len(dataset))[0] for i in range(self.sizes.predict_images)]

        def folder(name: str, files: Sequence[Path]) -> Path:
            path = self.workdir / name
            path.mkdir()
            for i, file in enumerate(files):
                (path / f"{i:05d}_{file.name}").symlink_to(file.resolve())
            return path

        warm_in, timed_in = folder("predict_warmup", jpegs[:2]), folder("predict_in", jpegs)
        out = self.workdir / "predict_out"
        overrides = [f"ckpt={ckpt}", f"device={self.device.type}"]
        if self.args.predict_batch_size:
            overrides.append(f"batch_size={self.args.predict_batch_size}")
        warm_cfg = compose_config("predict", [*overrides, f"input={warm_in}", f"output={self.workdir / 'warm_out'}"])
        cfg = compose_config("predict", [*overrides, f"input={timed_in}", f"output={out}"])

        def run() -> tuple[float, float, dict[str, Any]]:
            with contextlib.redirect_stdout(io.StringIO()):  # the progress bar
                predict(warm_cfg)
                start = time.perf_counter()
                failed = predict(cfg)
                seconds = time.perf_counter() - start
            written = len(list(out.glob("*.png")))
            if failed or written != len(jpegs):
                raise RuntimeError(f"prediction wrote {written} masks for {len(jpegs)} images ({failed} failed)")
            workers = default_num_workers() if cfg.num_workers is None else cfg.num_workers
            extra = {
                "images": len(jpegs),
                "batch_size": cfg.batch_size,
                "num_workers": workers,
                "formats": list(cfg.formats),
                "image_sizes": image_sizes(jpegs),
                "jpeg_kib_mean": mean_kib(jpegs),
            }
            return len(jpegs) / seconds, seconds, extra

        self.measure("predict", "prediction.run, JPEG files to mask PNGs, start-up included", "images/s", run)

    def bench_flops(self) -> None:
        """FLOPs of one forward pass of the configured network, counted by torch's FlopCounterMode."""
        cfg = self.train_config()
        net = instantiate(cfg.model.net).eval()
        shape = (1, 3, self.crop_size, self.crop_size)
        counted: dict[str, float] = {}

        def count() -> tuple[float, None, dict[str, Any]]:
            counter = FlopCounterMode(display=False)
            with torch.no_grad(), counter:
                net(torch.zeros(shape))
            counted["flops"] = counter.get_total_flops()
            by_op = {str(op): flops for op, flops in counter.get_flop_counts().get("Global", {}).items()}
            params = sum(p.numel() for p in net.parameters())
            return counted["flops"] / 1e9, None, {"input": list(shape), "parameters": params, "by_op": by_op}

        settings = {"arch": cfg.model.net._target_.rsplit(".", 1)[-1], "output_stride": cfg.model.net.output_stride}
        flops = self.measure("flops", "forward FLOPs (torch: multiply-add = 2)", "GFLOPs", count, settings, False)
        if flops.value is None:
            return
        gmacs = counted["flops"] / 2e9
        note = ""
        if shape[-1] == 513 and cfg.data.num_classes == 21:
            closer = "GMACs" if abs(gmacs - SEED_REPORT_GFLOPS) < abs(flops.value - SEED_REPORT_GFLOPS) else "GFLOPs"
            note = f"the seed report's {SEED_REPORT_GFLOPS} 'GFLOPs' is torch's {closer}"
        self.derive("flops", "forward multiply-adds (FLOPs / 2)", gmacs, "GMACs", settings, note, on_device=False)

    def record_memory(self) -> None:
        """The run's totals: the peak host memory of this process and the largest peak device memory."""
        # resetting the peak for each measurement resets ru_maxrss too: the whole run's is the largest of theirs
        host = max([host_peak_mib()] + [r.host_peak_mib for r in self.results if r.host_peak_mib is not None])
        cpu = device_label(torch.device("cpu"))
        threads = torch.get_num_threads()
        self._record(Result("memory", "peak host memory, whole run", host, "MiB", cpu, threads, torch.__version__))
        if self.device.type != "cuda":
            self.skip("memory", "peak device memory", "the device is the CPU: its memory is the host memory above")
            return
        peaks = [r.device_peak_mib for r in self.results if r.device_peak_mib is not None]
        label = device_label(self.device)
        if peaks:
            largest = max(self.results, key=lambda r: r.device_peak_mib or -1.0)
            name = "peak device memory, largest measurement"
            result = Result("memory", name, max(peaks), "MiB", label, threads, torch.__version__)
            result.note = f"{largest.section}: {largest.name}"
            self._record(result)

    def run(self) -> None:
        """Run the selected sections in order, then record the memory totals."""
        for section in self.args.sections:
            self.console.rule(section)
            start = time.perf_counter()
            try:
                getattr(self, f"bench_{section}")()
            except Exception as exc:  # noqa: BLE001 - a broken section set-up must not lose the other sections
                log.exception("section %s failed", section)
                self.fail(section, "set-up", exc)
            self.section_seconds[section] = round(time.perf_counter() - start, 1)
        self.record_memory()


def image_size(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` -> ``(width, height)``."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 500x375") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be positive")
    return width, height


def sections(text: str) -> list[str]:
    """A comma-separated list of section names, in the bench's order."""
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown sections {unknown}; choose from {','.join(SECTIONS)}")
    return [s for s in SECTIONS if s in chosen]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m segvoc.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides of conf/train.yaml for every section, e.g. model=deeplabv3 trainer.benchmark=true",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--short",
        action="store_true",
        help="fewer steps and images, no torch.compile, training batch 2 on a CPU (under 5 minutes on 2 cores)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="training batch, also the DataLoader's in the data section (default 8; training 2 with --short on CPU)",
    )
    parser.add_argument("--crop-size", type=int, default=513, help="training crop and FLOP-count input size")
    parser.add_argument(
        "--image-size",
        type=image_size,
        default=(500, 375),
        help="WIDTHxHEIGHT of the generated landscape images; every other one is portrait (HEIGHTxWIDTH)",
    )
    parser.add_argument("--sections", type=sections, default=list(SECTIONS), help=",".join(SECTIONS))
    parser.add_argument(
        "--precision",
        action="append",
        choices=PRECISIONS,
        default=None,
        help="a training precision to measure (repeatable; default: each one the device supports)",
    )
    parser.add_argument("--channels-last", choices=("both", "off", "on"), default="both", help="training grid")
    parser.add_argument(
        "--compile", choices=("both", "off", "on"), default=None, help="training grid (default both; off with --short)"
    )
    parser.add_argument("--json", default=None, help="write the results to this file (rewritten as they come)")
    parser.add_argument(
        "--data-root", default=None, help="a folder holding VOCdevkit/VOC2012 to read instead of generated images"
    )
    parser.add_argument("--val-batch-size", type=int, default=None, help="default: the config's data.val_batch_size")
    parser.add_argument("--predict-batch-size", type=int, default=None, help="default: conf/predict.yaml's batch_size")
    args = parser.parse_args(argv)
    for key in ("batch_size", "crop_size", "val_batch_size", "predict_batch_size"):
        value = getattr(args, key)
        if value is not None and value < 1:
            parser.error(f"--{key.replace('_', '-')} must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> Bench:
    """Run the bench with command-line ``argv``; print the table and return the bench with its results."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in (
        ".*does not have many workers.*",
        ".*smaller than the logging interval.*",
        ".*defined a `validation_step` but have no `val_dataloader`.*",
        ".*overridden `on_after_batch_transfer` in `LightningModule` but have passed in a `LightningDataModule`.*",
        ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
    ):
        warnings.filterwarnings("ignore", message)
    console = Console() if sys.stdout.isatty() else Console(width=240)  # a log file gets the table unwrapped
    with tempfile.TemporaryDirectory(prefix="segvoc-bench-") as workdir:
        bench = Bench(args, Path(workdir), console)
        env = bench.environment()
        console.print(
            f"segvoc.bench on {env['device']} ({env['cpu_cores']} CPU cores, {env['torch_threads']} torch "
            f"threads, load average {env['load_average']}), torch {env['torch']}, lightning {env['lightning']}"
        )
        try:
            bench.run()
        finally:
            bench.save()
            console.print(bench.table())
            for skipped in bench.skipped:
                console.print(f"skipped: {skipped['section']} {skipped['what']}: {skipped['why']}")
            console.print(
                f"wall time {time.perf_counter() - bench.clock:.0f} s"
                + (f"; results in {bench.json_path}" if bench.json_path else "")
            )
    return bench


if __name__ == "__main__":
    main()
