"""The bench's ``deploy`` section: batch-1 CPU latency of the deployable forms of the configured network.

A checkpoint of the configured module (``workloads.write_checkpoint``) is exported to fp32 ONNX
(``segvoc.tasks.export.export_onnx``) and quantised to int8 (``segvoc.tasks.quantize.quantize_as_configured`` with the
defaults of ``conf/export.yaml``, calibrated on the bench's training images). Each runtime then runs one normalised
image at ``crop_size`` x ``crop_size`` and at the bench's whole landscape image size, with one CPU thread and with
every core:

- PyTorch eager fp32 (``torch.inference_mode``);
- PyTorch with bf16 autocast and channels_last (the best CPU setting segvoc has);
- ONNX Runtime fp32 and ONNX Runtime int8 (``segvoc.checkpoints.exported.OnnxNet`` on the CPU provider).

A figure is the median latency in ms after warm-up runs, the four runtimes taking turns in blocks of 5 calls (a
drifting machine slows them alike; ``latencies``); its note gives the 95th percentile, and each records the peak
host memory of one more call. Then the speed-ups of int8 over the two PyTorch settings, and the file sizes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import OmegaConf

from segvoc.data.datamodule import default_num_workers

if TYPE_CHECKING:
    from segvoc.bench.runner import Bench

WARMUP = 3
BLOCK = 5  # timed calls of one runtime in a row (after one untimed call), then the next runtime's


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)``; the previous count is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def latencies(
    forwards: Mapping[str, Callable[[], Any]], runs: int, warmup: int = WARMUP, block: int = BLOCK
) -> dict[str, tuple[float, float, float] | Exception]:
    """``{name: (median ms, p95 ms, timed seconds)}`` of ``runs`` calls of each of ``forwards``, after ``warmup``
    untimed calls each. The forwards take turns in blocks of ``block`` timed calls, each block after one untimed
    call, so that a machine whose speed drifts during the run (a shared VM) slows them alike (they are compared as
    ratios), while the thread pool of the runtime before (OpenMP's, ONNX Runtime's) has stopped spinning on the
    cores before a call is timed. A forward that raises during its warm-up is left out, and its exception is its
    entry."""
    timed: dict[str, list[float]] = {}
    failed: dict[str, Exception] = {}
    for name, forward in forwards.items():
        try:
            for _ in range(warmup):
                forward()
            timed[name] = []
        except Exception as exc:  # noqa: BLE001 - one runtime that cannot run must not lose the others' figures
            failed[name] = exc
    for first in range(0, runs, block):
        for name, times in timed.items():
            forwards[name]()
            for _ in range(min(block, runs - first)):
                start = time.perf_counter()
                forwards[name]()
                times.append(time.perf_counter() - start)
    figures: dict[str, tuple[float, float, float] | Exception] = {}
    for name in forwards:
        if name in failed:
            figures[name] = failed[name]
            continue
        ms = np.asarray(timed[name]) * 1000
        figures[name] = (float(np.median(ms)), float(np.percentile(ms, 95)), float(sum(timed[name])))
    return figures


def eager(net: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    """PyTorch eager fp32 forward."""
    with torch.inference_mode():
        return net(image)


def bf16_channels_last(net: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    """PyTorch forward under bf16 autocast; ``net`` and ``image`` are expected in channels_last memory."""
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        return net(image)


def record_latency(
    bench: Bench,
    name: str,
    forward: Callable[[], Any],
    figure: tuple[float, float, float] | Exception,
    threads: int,
    settings: dict[str, Any],
) -> float | None:
    """Record ``figure`` (from ``latencies``) as the median latency ``name``, p95 in its note and settings; the
    peak host memory recorded with it is that of one more call of ``forward`` with ``threads`` torch threads.
    Return the median, None when the runtime failed."""

    def run() -> tuple[float, float, dict[str, Any]]:
        if isinstance(figure, Exception):
            raise figure
        with torch_threads(threads):
            forward()
        median, p95, seconds = figure
        return median, seconds, {"p95_ms": round(p95, 2)}

    result = bench.report.measure("deploy", name, "ms", run, settings, on_device=False, note="median")
    if result.value is not None:
        result.note = f"median; p95 {result.settings['p95_ms']:.1f} ms"
        bench.report.save()
    return result.value


def deploy_files(bench: Bench) -> dict[str, Path]:
    """The checkpoint, fp32 ONNX and int8 ONNX files of the configured network, written under the bench's workdir."""
    from segvoc.bench.workloads import write_checkpoint
    from segvoc.checkpoints.load import load_model
    from segvoc.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from segvoc.tasks.export import export_onnx
    from segvoc.tasks.quantize import calibration_images, quantize_as_configured

    cfg = bench.train_config()
    ckpt = write_checkpoint(cfg, bench.workdir / "deploy.ckpt")
    net, meta = load_model(ckpt)
    fp32 = export_onnx(net, meta, bench.workdir / "deploy.onnx")
    calib = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "export.yaml").calibration
    count = 4 if bench.args.short else int(calib.num_images)
    voc = bench.voc_root / "VOCdevkit" / "VOC2012"
    images = calibration_images(voc, cfg.data.train_split, count, IMAGENET_MEAN, IMAGENET_STD)
    int8 = quantize_as_configured(fp32, bench.workdir / "deploy.int8.onnx", images, calib)
    return {"checkpoint": ckpt, "fp32 ONNX": fp32, "int8 ONNX": int8}


def measure_deploy(bench: Bench) -> None:
    """Batch-1 CPU latency of PyTorch eager fp32, PyTorch bf16 autocast + channels_last, ONNX Runtime fp32 and int8,
    at ``crop_size`` square and at the whole landscape image size, with 1 thread and all cores; file sizes."""
    from segvoc.checkpoints.exported import OnnxNet
    from segvoc.checkpoints.load import load_model

    report = bench.report
    files = deploy_files(bench)
    net, _ = load_model(files["checkpoint"])
    net_cl = load_model(files["checkpoint"])[0].to(memory_format=torch.channels_last)
    runs = 5 if bench.args.short else 20
    width, height = bench.image_size
    shapes = {
        f"{bench.crop_size}x{bench.crop_size}": (bench.crop_size, bench.crop_size),
        f"{width}x{height}": (height, width),
    }
    for threads in dict.fromkeys((1, default_num_workers())):
        onnx = {name: OnnxNet(files[name], threads=threads, device="cpu") for name in ("fp32 ONNX", "int8 ONNX")}
        for label, (h, w) in shapes.items():
            image = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
            runtimes: dict[str, Callable[[], Any]] = {
                "PyTorch eager fp32": partial(eager, net, image),
                "PyTorch bf16 autocast + channels_last": partial(
                    bf16_channels_last, net_cl, image.contiguous(memory_format=torch.channels_last)
                ),
                "ONNX Runtime fp32": partial(onnx["fp32 ONNX"], image),
                "ONNX Runtime int8": partial(onnx["int8 ONNX"], image),
            }
            settings = {"input": [1, 3, h, w], "threads": threads, "runs": runs, "warmup": WARMUP, "interleaved": True}
            with torch_threads(threads):
                figures = latencies(runtimes, runs)
            medians = {
                name: record_latency(
                    bench, f"{name}, {label}, {threads} thread(s)", forward, figures[name], threads, settings
                )
                for name, forward in runtimes.items()
            }
            int8 = medians["ONNX Runtime int8"]
            for reference in ("PyTorch eager fp32", "PyTorch bf16 autocast + channels_last"):
                if int8 and medians[reference]:
                    report.derive(
                        "deploy", f"int8 ONNX speed-up over {reference}, {label}, {threads} thread(s)",
                        medians[reference] / int8, "x", settings, "median latency ratio", on_device=False,
                    )  # fmt: skip
    sizes = {name: path.stat().st_size for name, path in files.items()}
    for name, size in sizes.items():
        report.derive("deploy", f"file size, {name}", size / 1e6, "MB", {"path": files[name].name}, on_device=False)
    ratio = 100 * sizes["int8 ONNX"] / sizes["fp32 ONNX"]
    report.derive("deploy", "int8 ONNX size / fp32 ONNX size", ratio, "%", {}, on_device=False)
