"""The bench's sections, one function each, in the order they run (``ALL_SECTIONS``): ``data``, ``train``, ``val``,
``predict``, ``flops`` (``SECTIONS``, the default ones) and ``deploy`` (``segvoc.bench.deploy``, when asked for).
Each times the code path that training, validation or prediction really runs, on the ``Bench``'s data and config,
and records its figures in the bench's report; a figure that fails is recorded with its error and the section goes
on. What a figure times and how to read it: BENCHMARKS.md."""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from segvoc.bench.deploy import measure_deploy
from segvoc.bench.report import Measurement, children_peak_mib
from segvoc.bench.workloads import (
    BatchClock,
    FixedSamples,
    TrainSetting,
    lightning_training,
    plain_training,
    throughput,
    training_overrides,
    write_checkpoint,
)
from segvoc.data.datamodule import VOCDataModule, default_num_workers
from segvoc.data.image import read_image, read_mask

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from segvoc.bench.runner import Bench

# DeepLabV3+/MobileNetV2 at 513x513, 21 classes: the "17.0 GFLOPs" quoted for the seed (BENCHMARKS.md), which is
# torch's count of multiply-adds; the flops section's note says which of torch's two figures it is closer to.
SEED_REPORT_GFLOPS = 17.0


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


# The data and train sections read the training split only: the data module's val set is pointed at it, so that a
# folder with a train split alone (ImageSets/Segmentation/train.txt) can be timed.
TRAIN_SPLIT_ONLY = "data.val_split=${data.train_split}"


# ----------------------------------------------------------------------------------------------------------- data
def decode_in_process(
    dataset: Any, count: int, readers: dict[str, Callable[[Any, int], object]], block: int = 8
) -> dict[str, tuple[float, float, dict[str, Any]]]:
    """Each of ``readers`` (``read(dataset, i)``) over the same ``count`` items of the training ``dataset``, in this
    process with OpenCV on one thread: ``{name: (images/s, seconds, extra)}``.

    The readers take turns, ``block`` items each, so that a machine whose speed drifts during the run (a shared VM)
    slows every figure alike: they are read as ratios of one another. Untimed first: every file the run reads, once
    (the figures read from the file cache, not the disk), and 2 items per reader. OpenCV's thread count is restored
    afterwards."""
    warmup, length = 2, len(dataset.ids)
    seconds = dict.fromkeys(readers, 0.0)
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # one core: OpenCV's own thread pool off (set here, in the main process only)
    try:
        for i in range(min(length, warmup + count)):
            for path in dataset.paths(i):
                path.read_bytes()
        for read in readers.values():
            for i in range(warmup):
                read(dataset, i % length)
        for first in range(warmup, warmup + count, block):
            items = range(first, min(first + block, warmup + count))
            for name, read in readers.items():
                start = time.perf_counter()
                for i in items:
                    read(dataset, i % length)
                seconds[name] += time.perf_counter() - start
    finally:
        cv2.setNumThreads(threads)
    extra = {"images": count, "opencv_threads": 1, "interleaved_in_blocks_of": block}
    return {name: (count / seconds[name], seconds[name], extra) for name in readers}


def read_sample(dataset: Any, index: int) -> object:
    return dataset[index]


def read_image_only(dataset: Any, index: int) -> object:
    return read_image(dataset.paths(index)[0])


def read_image_and_mask(dataset: Any, index: int) -> object:
    image_path, mask_path = dataset.paths(index)
    return read_image(image_path), read_mask(mask_path)


def decode_through_loader(
    datamodule: VOCDataModule, batch_size: int, workers: int, images_per_epoch: int, epochs: int
) -> tuple[float, float, dict[str, Any]]:
    """``epochs`` epochs of ``datamodule.train_dataloader()`` with ``workers`` workers, after one untimed epoch that
    starts them: ``(images/s, seconds, extra)``. An epoch is at least ``images_per_epoch`` images, in whole batches
    for every worker; the training set's ids are restored afterwards."""
    # Workers fork from this process; nothing in them calls cv2.setNumThreads (see seed_worker).
    dataset = datamodule.train_set
    ids = list(dataset.ids)
    datamodule.num_workers = workers
    per_round = batch_size * max(workers, 1)
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
        "batch_size": batch_size,
        "images": images,
        "pin_memory": datamodule.pin_memory,
        "worker_peak_mib": round(children_peak_mib(), 1),
    }
    return images / seconds, seconds, extra


def measure_data(bench: Bench) -> None:
    """Decode + train augmentation: the training dataset in this process on one core, timed in turns with the JPEG
    decode alone and with decode + mask read (and their ratio), then the training DataLoader as the data module
    builds it, with one worker and with one worker per core."""
    cfg = bench.train_config(f"data.batch_size={bench.loader_batch_size}", TRAIN_SPLIT_ONLY)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    dataset = datamodule.train_set
    jpegs = [dataset.paths(i)[0] for i in range(len(dataset.ids))]
    common = {
        "crop_size": bench.crop_size,
        "jpeg_kib_mean": mean_kib(jpegs),
        "image_sizes": image_sizes(jpegs),
        "distinct_images": len(jpegs),
    }
    sizes, batch, report = bench.sizes, bench.loader_batch_size, bench.report
    all_workers = default_num_workers() if cfg.data.num_workers is None else cfg.data.num_workers
    # the whole training sample, timed in turns with what it is weighed against: the decoding alone
    in_process = {
        "JPEG decode alone": read_image_only,
        "JPEG decode + mask read": read_image_and_mask,
        "decode + train augmentation": read_sample,
    }
    rates: dict[str, tuple[float, float, dict[str, Any]]] = {}

    def timed_in_turns(name: str) -> Measurement:
        def run() -> tuple[float, float, dict[str, Any]]:
            if not rates:  # the first figure times all three
                rates.update(decode_in_process(dataset, sizes.data_items, in_process))
            return rates[name]

        return run

    for name in in_process:
        report.measure("data", f"{name}, one process on one core", "images/s", timed_in_turns(name), common, False)
    if rates:
        whole, decode = rates["decode + train augmentation"][0], rates["JPEG decode + mask read"][0]
        report.derive(
            "data", "decode + train augmentation / decode + mask read, one process", whole / decode, "x",
            common, "images/s ratio, timed in turns", on_device=False,
        )  # fmt: skip
    loaders: list[tuple[str, Measurement]] = [
        ("DataLoader with 1 worker", lambda: decode_through_loader(datamodule, batch, 1, sizes.data_items, 1)),
        (
            f"DataLoader with {all_workers} workers (one per core)",
            lambda: decode_through_loader(datamodule, batch, all_workers, sizes.loader_images, sizes.loader_epochs),
        ),
    ]
    for name, run in loaders:
        report.measure("data", f"decode + train augmentation, {name}", "images/s", run, common, False)


# ----------------------------------------------------------------------------------------------------------- train
def measure_train(bench: Bench) -> None:
    """Training steps through Lightning, per setting, and for the eager settings through a plain loop doing
    the same work and Lightning's overhead per step over it.

    The batches are real training crops of the data module, decoded once and held in host memory; a DataLoader
    without workers collates them every step, so these figures time the training step, not the input pipeline
    (``measure_data`` times that)."""
    sizes, report = bench.sizes, bench.report
    warmup, steps = sizes.train_warmup, sizes.train_warmup + sizes.train_steps
    datamodule = instantiate(bench.train_config(TRAIN_SPLIT_ONLY).data)
    datamodule.setup("fit")
    samples = [datamodule.train_set[i % len(datamodule.train_set)] for i in range(bench.batch_size)]
    mean, std = datamodule.mean, datamodule.std
    del datamodule

    def loader() -> DataLoader:
        return DataLoader(FixedSamples(samples, steps * bench.batch_size), batch_size=bench.batch_size)

    baseline: float | None = None  # Lightning fit, 32-true channels_last=off compile=off
    for setting in bench.train_settings():
        cfg = bench.train_config(*training_overrides(setting, steps))
        settings = {
            **asdict(setting),
            "batch_size": bench.batch_size,
            "crop_size": bench.crop_size,
            "warmup_steps": warmup,
            "timed_steps": sizes.train_steps,
            "rate_from": bench.rate_from,
        }

        def lightning_run(cfg: DictConfig = cfg) -> tuple[float, float, dict[str, Any]]:
            _, clock = lightning_training(cfg, loader(), bench.device, warmup)
            rate, seconds = clock.rate(warmup)
            # fit's start to the warm-up's end: set-up, first steps, and torch.compile where it is on
            return rate, seconds, {"warmup_seconds": round(clock.times[warmup - 1] - clock.start, 1)}

        def plain_run(setting: TrainSetting = setting) -> tuple[float, float, dict[str, Any]]:
            torch.manual_seed(0)
            module = instantiate(bench.train_config(f"trainer.max_steps={steps}").model)  # as built, no options
            times = plain_training(module, loader(), bench.device, setting, mean, std, warmup)
            rate, seconds = throughput(times, [bench.batch_size] * len(times), warmup, bench.device.type == "cpu")
            return rate, seconds, {}

        lightning = report.measure("train", f"Lightning fit, {setting.label}", "images/s", lightning_run, settings)
        if baseline is None and setting == TrainSetting("32-true", False, False):
            baseline = lightning.value
        elif baseline and lightning.value:
            lightning.settings["speedup_over_fp32_eager"] = round(lightning.value / baseline, 2)
            lightning.note = f"{lightning.value / baseline:.2f}x 32-true channels_last=off compile=off"
            report.save()
        if setting.compile:
            continue  # the loop's overhead does not depend on the kernels: measured on the eager settings
        plain = report.measure("train", f"plain PyTorch loop, {setting.label}", "images/s", plain_run, settings)
        if lightning.value and plain.value:
            overhead = (plain.value / lightning.value - 1.0) * 100  # step time: Lightning's over the plain loop's
            name = f"Lightning overhead per step, {setting.label}"
            report.derive("train", name, overhead, "%", settings, "step time over the plain loop's")


# ----------------------------------------------------------------------------------------------------------- val
def measure_val(bench: Bench) -> None:
    """Whole images through trainer.validate: the configured module, data module and val loader."""
    # num_val_images=0: no TensorBoard panels, which are drawn for the first 4 images of a validation only
    cfg = bench.train_config("model.num_val_images=0", f"data.val_batch_size={bench.val_batch_size}")
    warmup = 2  # the first batch of each orientation: kernels picked, memory allocated for both shapes

    def run() -> tuple[float, float, dict[str, Any]]:
        torch.manual_seed(0)
        datamodule = instantiate(cfg.data)
        module = instantiate(cfg.model)
        clock = BatchClock(bench.device)
        trainer = instantiate(
            cfg.trainer,
            callbacks=[clock],
            logger=False,
            limit_val_batches=bench.val_batches,
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
        "val_batch_size": bench.val_batch_size,
        "warmup_batches": warmup,
        "rate_from": bench.rate_from,
        "inference": OmegaConf.to_container(cfg.model.inference),
    }
    bench.report.measure("val", "trainer.validate, whole images", "images/s", run, settings)


# ----------------------------------------------------------------------------------------------------------- predict
def link_folder(path: Path, files: Sequence[Path]) -> Path:
    """Make ``path`` a new folder of symbolic links to ``files``, numbered so that repeated files stay distinct."""
    path.mkdir()
    for i, file in enumerate(files):
        (path / f"{i:05d}_{file.name}").symlink_to(file.resolve())
    return path


def measure_predict(bench: Bench) -> None:
    """JPEG files to mask PNGs through segvoc.tasks.predict.run, with a checkpoint the configured module writes; one
    untimed call on two images first."""
    from segvoc.tasks.predict import run as predict

    cfg = bench.train_config()
    ckpt = write_checkpoint(cfg, bench.workdir / "bench.ckpt")
    datamodule = instantiate(cfg.data)
    datamodule.setup("validate")
    dataset = datamodule.val_set
    jpegs = [dataset.paths(i % len(dataset))[0] for i in range(bench.sizes.predict_images)]

    warm_in = link_folder(bench.workdir / "predict_warmup", jpegs[:2])
    timed_in = link_folder(bench.workdir / "predict_in", jpegs)
    out = bench.workdir / "predict_out"
    overrides = [f"ckpt={ckpt}", f"device={bench.device.type}"]
    if bench.args.predict_batch_size:
        overrides.append(f"batch_size={bench.args.predict_batch_size}")
    warm_cfg = bench.predict_config(*overrides, f"input={warm_in}", f"output={bench.workdir / 'warm_out'}")
    cfg = bench.predict_config(*overrides, f"input={timed_in}", f"output={out}")

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

    bench.report.measure("predict", "prediction.run, JPEG files to mask PNGs, start-up included", "images/s", run)


# ----------------------------------------------------------------------------------------------------------- flops
def measure_flops(bench: Bench) -> None:
    """FLOPs of one forward pass of the configured network, counted by torch's FlopCounterMode, and the
    multiply-adds (half of them)."""
    cfg = bench.train_config()
    net = instantiate(cfg.model.net).eval()
    shape = (1, 3, bench.crop_size, bench.crop_size)
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
    report = bench.report
    flops = report.measure("flops", "forward FLOPs (torch: multiply-add = 2)", "GFLOPs", count, settings, False)
    if flops.value is None:
        return
    gmacs = counted["flops"] / 2e9
    note = ""
    if shape[-1] == 513 and cfg.data.num_classes == 21:
        closer = "GMACs" if abs(gmacs - SEED_REPORT_GFLOPS) < abs(flops.value - SEED_REPORT_GFLOPS) else "GFLOPs"
        note = f"the seed report's {SEED_REPORT_GFLOPS} 'GFLOPs' is torch's {closer}"
    report.derive("flops", "forward multiply-adds (FLOPs / 2)", gmacs, "GMACs", settings, note, on_device=False)


SECTIONS: dict[str, Callable[[Bench], None]] = {
    "data": measure_data,
    "train": measure_train,
    "val": measure_val,
    "predict": measure_predict,
    "flops": measure_flops,
}
# every section --sections accepts, in the order they run: the default ones, then deploy (export, int8 quantisation
# and latency: minutes on a CPU, so it runs when asked for, `--sections deploy`)
ALL_SECTIONS: dict[str, Callable[[Bench], None]] = {**SECTIONS, "deploy": measure_deploy}


def run(bench: Bench, sections: Sequence[str]) -> None:
    """Run ``sections`` of ``bench`` in order, then record the memory totals. A section whose set-up fails is
    recorded as failed and the next one runs."""
    for section in sections:
        bench.console.rule(section)
        start = time.perf_counter()
        try:
            ALL_SECTIONS[section](bench)
        except Exception as exc:  # noqa: BLE001 - a broken section set-up must not lose the other sections
            log.exception("section %s failed", section)
            bench.report.fail(section, "set-up", exc)
        bench.report.section_seconds[section] = round(time.perf_counter() - start, 1)
    bench.record_memory()
