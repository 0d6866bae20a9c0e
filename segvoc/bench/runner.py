"""``Bench``: one run of the bench. It resolves the command line's options (device, sizes, batch sizes, the training
grid), provides what every section shares (the generated VOC tree, the composed training and prediction configs)
and runs the chosen sections in order, recording their figures in its ``Report``."""

from __future__ import annotations

import argparse
import logging
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from hydra import compose, initialize
from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf import DictConfig, open_dict
from rich.console import Console
from rich.table import Table

from segvoc.bench.report import Report, Result, cpu_name, device_label, host_peak_mib
from segvoc.bench.workloads import PRECISIONS, TrainSetting
from segvoc.config import register_resolvers
from segvoc.data.datamodule import default_num_workers
from segvoc.data.demo import make_scene, write_voc_tree
from segvoc.data.download import VOC_MEMBER, root_too_deep
from segvoc.errors import SegvocError

log = logging.getLogger(__name__)


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


def compose_config(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """``conf/<config_name>.yaml`` composed with ``overrides``, as the entry points compose it. An override that
    does not apply (unknown key or choice, bad syntax) is a ``SegvocError`` naming it."""
    register_resolvers()  # ${len:...} of conf/data/custom.yaml
    with initialize(version_base="1.3", config_path="../../conf"):
        try:
            return compose(config_name=config_name, overrides=list(overrides))
        except (ConfigCompositionException, OverrideParseException) as exc:
            raise SegvocError(f"conf/{config_name}.yaml with the overrides {list(overrides)}: {exc}") from exc


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


def write_bench_tree(root: Path, splits: dict[str, int], size: tuple[int, int], seed: int = 0) -> Path:
    """Write the bench's images in the VOC layout under ``root/VOCdevkit/VOC2012`` (``write_voc_tree``) and return
    that folder.

    ``splits`` maps a split name to its number of images; ``size`` is ``(width, height)`` of the landscape images.
    Landscape and portrait (``height x width``) images alternate within each split, so that validation batches,
    grouped by size, alternate too. Textured scenes (``textured_scene``), JPEGs at quality 90.
    """
    width, height = size

    def scene(rng: np.random.Generator, index: int) -> tuple[np.ndarray, np.ndarray]:
        return textured_scene(rng, *((width, height) if index % 2 else (height, width)))

    return write_voc_tree(root / "VOCdevkit" / "VOC2012", splits, scene, seed=seed, prefix="bench", jpeg_quality=90)


class Bench:
    """One run: the options of ``args`` resolved, the sections run in order, every figure in ``report``.

    Construction composes the training config with the command line's overrides, so an override that does not
    apply fails here, before anything is measured. ``workdir`` holds the generated data, checkpoint and outputs;
    the caller owns it (and removes it).
    """

    def __init__(self, args: argparse.Namespace, workdir: Path, console: Console) -> None:
        self.args = args
        self.console = console
        self.workdir = workdir
        requested = args.device
        if requested == "auto":
            requested = "cuda" if torch.cuda.is_available() else "cpu"
        if requested == "cuda" and not torch.cuda.is_available():
            raise SegvocError("--device cuda: this torch sees no CUDA device (torch.cuda.is_available() is False).")
        self.device = torch.device(requested)
        self.sizes = SIZES[(args.short, self.device.type)]
        defaults = compose_config("train", list(args.overrides)).data
        self.batch_size = args.batch_size or (2 if args.short and self.device.type == "cpu" else 8)
        self.loader_batch_size = args.batch_size or defaults.batch_size
        self.crop_size = args.crop_size
        self.val_batch_size = args.val_batch_size or defaults.val_batch_size
        self.image_size = args.image_size
        self._voc_root: Path | None = Path(args.data_root).expanduser() if args.data_root else None
        if self._voc_root is not None and not (self._voc_root / VOC_MEMBER).is_dir():
            too_deep = root_too_deep(self._voc_root)
            raise SegvocError(
                f"--data-root {args.data_root}: there is no {VOC_MEMBER} folder in it. Give the folder that holds "
                f"{VOC_MEMBER} (with JPEGImages, SegmentationClass and ImageSets/Segmentation/train.txt)"
                + (f", here {too_deep[1]}." if too_deep else ".")
            )
        json_path = Path(args.json) if args.json else None
        self.report = Report(console, self.device, json_path, self.header)

    # ----------------------------------------------------------------------------------------------- description
    def environment(self) -> dict[str, Any]:
        """The machine and versions: device, CPU, cores, load average now, threads, library versions (CUDA: the
        cuDNN and matmul settings)."""
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
        """The options as resolved (defaults filled in), with the sizes they picked."""
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

    def header(self) -> dict[str, Any]:
        """The JSON file's ``environment`` and ``options`` (``Report.save`` asks at every save)."""
        return {"environment": self.environment(), "options": self.options()}

    def table(self) -> Table:
        """The report's table, titled with the device, versions, cores, training batch and crop."""
        env = self.environment()
        return self.report.table(
            f"segvoc.bench on {env['device']} — torch {env['torch']}, lightning {env['lightning']}, "
            f"{env['cpu_cores']} CPU cores, training batch {self.batch_size}, crop {self.crop_size}"
        )

    # ----------------------------------------------------------------------------------------------- resolved options
    @property
    def rate_from(self) -> str:
        """How the training and validation rates are taken from the batch times (see ``throughput``)."""
        return "median batch time" if self.device.type == "cpu" else "mean over the timed batches"

    @property
    def compile_choice(self) -> str:
        """``--compile``, defaulting to ``off`` with ``--short`` and ``both`` without."""
        return self.args.compile or ("off" if self.args.short else "both")

    @property
    def val_batches(self) -> int:
        """Validation batches run: a warm-up pair (one of each orientation) and ``val_rounds`` timed pairs."""
        return 2 * (1 + self.sizes.val_rounds)

    def train_settings(self) -> list[TrainSetting]:
        """The grid of training settings this device and these options allow, eager before compiled; what is
        left out goes to the report's ``skipped`` with the reason."""
        precisions = []
        for precision in self.args.precision or PRECISIONS:
            if precision == "bf16-mixed" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
                why = f"{torch.cuda.get_device_name(self.device)} does not support bfloat16"
                self.report.skip("train", precision, why)
            elif precision == "16-mixed" and self.device.type == "cpu":
                why = "Lightning runs float16 mixed precision on CUDA only (CPU: bf16-mixed)"
                self.report.skip("train", precision, why)
            else:
                precisions.append(precision)
        layouts = {"off": [False], "on": [True], "both": [False, True]}[self.args.channels_last]
        compiles = {"off": [False], "on": [True], "both": [False, True]}[self.compile_choice]
        if self.compile_choice == "off" and self.args.compile is None:
            self.report.skip(
                "train",
                "compile=on",
                "--short: torch.compile takes minutes per setting on a CPU; run without --short, or --compile on",
            )
        return [TrainSetting(p, cl, c) for c in compiles for cl in layouts for p in precisions]

    # ----------------------------------------------------------------------------------------------- shared set-up
    @property
    def voc_root(self) -> Path:
        """The data root: ``--data-root``, or a generated tree (once) with train and val splits."""
        if self._voc_root is None:
            root = self.workdir / "data"
            val_images = self.val_batches * self.val_batch_size
            write_bench_tree(root, {"train": self.sizes.data_pool, "val": val_images}, self.image_size)
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

    def predict_config(self, *overrides: str) -> DictConfig:
        """The prediction config (conf/predict.yaml) with ``overrides``; the command line's apply to training only."""
        return compose_config("predict", overrides)

    def record_memory(self) -> None:
        """The run's totals: the peak host memory of this process and the largest peak device memory."""
        results = self.report.results
        # resetting the peak for each measurement resets ru_maxrss too: the whole run's is the largest of theirs
        host = max([host_peak_mib()] + [r.host_peak_mib for r in results if r.host_peak_mib is not None])
        cpu = device_label(torch.device("cpu"))
        threads = torch.get_num_threads()
        self.report.record(
            Result("memory", "peak host memory, whole run", host, "MiB", cpu, threads, torch.__version__)
        )
        if self.device.type != "cuda":
            self.report.skip(
                "memory", "peak device memory", "the device is the CPU: its memory is the host memory above"
            )
            return
        peaks = [r.device_peak_mib for r in results if r.device_peak_mib is not None]
        if peaks:
            largest = max(results, key=lambda r: r.device_peak_mib or -1.0)
            name = "peak device memory, largest measurement"
            result = Result("memory", name, max(peaks), "MiB", device_label(self.device), threads, torch.__version__)
            result.note = f"{largest.section}: {largest.name}"
            self.report.record(result)
