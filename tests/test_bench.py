"""``python -m segvoc.bench``: every section through the real code paths at tiny sizes (slow), the FLOP count against
one written here from the definition of a convolution,
the plain PyTorch loop that Lightning's overhead is measured against doing the same work as ``Trainer.fit`` (with the
module's one loss), and the cheap parts: the training grid, the generated tree, the JSON report, user errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from rich.console import Console
from torch.utils.data import DataLoader

from segvoc.bench.__main__ import main, parse_args
from segvoc.bench.report import Report, device_label
from segvoc.bench.runner import SIZES, Bench, Sizes, write_bench_tree
from segvoc.bench.sections import SECTIONS, measure_data
from segvoc.bench.workloads import (
    FixedSamples,
    TrainSetting,
    lightning_training,
    plain_training,
    throughput,
    training_overrides,
)
from segvoc.cli import command
from segvoc.data.datamodule import default_num_workers
from segvoc.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from segvoc.errors import SegvocError

TINY = Sizes(
    data_pool=4,
    data_items=4,
    loader_images=8,
    loader_epochs=1,
    train_warmup=1,
    train_steps=1,
    val_rounds=1,
    predict_images=3,
)
SMALL_IMAGES = ["--crop-size", "65", "--image-size", "96x72", "--batch-size", "2", "--val-batch-size", "2"]


@pytest.mark.slow  # about 40 s on 2 cores; the cheap checks below cover the tree, the report and the command line
def test_short_cpu_run_records_every_figure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every section at tiny sizes: each figure the bench promises is in the JSON, positive, with its device."""
    monkeypatch.setitem(SIZES, (True, "cpu"), TINY)
    out = tmp_path / "bench.json"
    # the grid's other settings: test_training_grid; channels_last=off: test_plain_loop_does_the_same_work_as_lightning
    grid = ["--precision", "32-true", "--precision", "bf16-mixed", "--channels-last", "on"]
    # 33x33 crops: bf16 training steps emulated on a CPU without native bf16 cost a second each at 65x65
    main(["--short", "--device", "cpu", "--json", str(out), *SMALL_IMAGES, "--crop-size", "33", *grid])

    document = json.loads(out.read_text())
    results = {r["name"]: r for r in document["results"]}
    failed = {name: r["note"] for name, r in results.items() if r["value"] is None}
    assert not failed
    cpu = device_label(torch.device("cpu"))
    assert cpu.startswith("cpu: ")
    assert document["environment"]["device"] == cpu

    grid = [f"{precision} channels_last=on compile=off" for precision in ("32-true", "bf16-mixed")]
    workers = default_num_workers()
    expected = {
        "JPEG decode alone, one process on one core": "images/s",
        "JPEG decode + mask read, one process on one core": "images/s",
        "decode + train augmentation, one process on one core": "images/s",
        "decode + train augmentation / decode + mask read, one process": "x",
        "decode + train augmentation, DataLoader with 1 worker": "images/s",
        f"decode + train augmentation, DataLoader with {workers} workers (one per core)": "images/s",
        **{f"Lightning fit, {label}": "images/s" for label in grid},
        **{f"plain PyTorch loop, {label}": "images/s" for label in grid},
        **{f"Lightning overhead per step, {label}": "%" for label in grid},
        "trainer.validate, whole images": "images/s",
        "prediction.run, JPEG files to mask PNGs, start-up included": "images/s",
        "forward FLOPs (torch: multiply-add = 2)": "GFLOPs",
        "forward multiply-adds (FLOPs / 2)": "GMACs",
        "peak host memory, whole run": "MiB",
    }
    assert set(results) == set(expected)
    for name, unit in expected.items():
        result = results[name]
        assert result["unit"] == unit, name
        assert result["device"] == cpu, name
        assert result["torch"] == torch.__version__
        assert math.isfinite(result["value"]), name
        if unit != "%":  # an overhead may come out below zero: the loops differ by less than the noise
            assert result["value"] > 0, name
        assert result["host_peak_mib"] is None or result["host_peak_mib"] > 0, name
    # the three in-process figures are timed in turns over the same items, and their ratio is theirs
    whole, decode = (
        results[f"{name}, one process on one core"]
        for name in ("decode + train augmentation", "JPEG decode + mask read")
    )
    assert whole["settings"]["images"] == decode["settings"]["images"] == TINY.data_items
    assert whole["settings"]["interleaved_in_blocks_of"] > 0
    ratio = results["decode + train augmentation / decode + mask read, one process"]["value"]
    assert ratio == pytest.approx(whole["value"] / decode["value"])
    assert results["trainer.validate, whole images"]["settings"]["image_sizes"] == [[72, 96], [96, 72]]
    assert results["Lightning fit, 32-true channels_last=on compile=off"]["settings"]["channels_last"] is True
    skipped = {(s["section"], s["what"]) for s in document["skipped"]}
    assert skipped == {("train", "compile=on"), ("memory", "peak device memory")}
    assert set(document["section_seconds"]) == set(SECTIONS)


def test_data_section_times_a_folder_with_a_train_split_only(
    voc_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A VOC folder with train.txt alone (as the official sample pairs come) is timed: the section reads only the
    training split."""
    monkeypatch.setitem(SIZES, (True, "cpu"), TINY)
    root = tmp_path / "voc"
    shutil.copytree(voc_root, root)
    (root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").unlink()
    args = parse_args(
        ["--short", "--device", "cpu", "--data-root", str(root), "--crop-size", "65", "data.num_workers=1"]
    )
    bench = Bench(args, tmp_path / "work", Console(quiet=True))
    measure_data(bench)
    results = {r.name: r for r in bench.report.results}
    assert not {name: r.note for name, r in results.items() if r.value is None}
    ratio = results["decode + train augmentation / decode + mask read, one process"].value
    assert 0 < ratio < 1  # the whole sample costs more than its decoding
    assert results["decode + train augmentation, one process on one core"].settings["distinct_images"] == 12


def test_training_grid(tmp_path: Path) -> None:
    """Every precision the device supports x channels_last off/on x compile off/on, eager first; on a CPU no
    float16 (Lightning runs it on CUDA only), and --short leaves compile out unless asked for."""

    def grid(*argv: str) -> tuple[list[str], set[tuple[str, str]]]:
        b = Bench(parse_args(["--device", "cpu", *argv]), tmp_path, Console(quiet=True))
        return [s.label for s in b.train_settings()], {(s["section"], s["what"]) for s in b.report.skipped}

    labels, skipped = grid("--short")
    assert labels == [
        "32-true channels_last=off compile=off",
        "bf16-mixed channels_last=off compile=off",
        "32-true channels_last=on compile=off",
        "bf16-mixed channels_last=on compile=off",
    ]
    assert skipped == {("train", "16-mixed"), ("train", "compile=on")}
    labels, skipped = grid()
    assert len(labels) == 8 and all("compile=off" in label for label in labels[:4])
    assert all("compile=on" in label for label in labels[4:])
    assert skipped == {("train", "16-mixed")}
    labels, _ = grid("--short", "--compile", "on", "--channels-last", "on", "--precision", "32-true")
    assert labels == ["32-true channels_last=on compile=on"]


def conv_macs(net: torch.nn.Module, images: torch.Tensor) -> int:
    """Multiply-adds of every convolution in one forward pass, from the definition: each output value of a
    ``k_h x k_w`` convolution over ``in_channels / groups`` input channels takes that many multiply-adds (bias and
    the parameter-free resizing, pooling and activations are not multiply-adds of weights)."""
    total = 0

    def count(module: torch.nn.Conv2d, inputs: object, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += output.numel() * (module.in_channels // module.groups) * kh * kw

    hooks = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            net(images)
    finally:
        for hook in hooks:
            hook.remove()
    return total


def test_flops_are_the_convolutions_multiply_adds(tmp_path: Path) -> None:
    """The bench's FLOPs are twice the multiply-adds counted here from the definition, for the default network."""
    from segvoc.models.deeplab import deeplabv3plus_mobilenet

    out = tmp_path / "flops.json"
    main(["--device", "cpu", "--sections", "flops", "--crop-size", "129", "--json", str(out)])

    results = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    flops = results["forward FLOPs (torch: multiply-add = 2)"]
    macs = results["forward multiply-adds (FLOPs / 2)"]
    assert flops["unit"] == "GFLOPs" and macs["unit"] == "GMACs"
    assert flops["settings"]["input"] == [1, 3, 129, 129]
    expected = conv_macs(deeplabv3plus_mobilenet(num_classes=21, output_stride=16).eval(), torch.zeros(1, 3, 129, 129))
    assert flops["value"] == pytest.approx(2 * expected / 1e9, rel=1e-9)
    assert macs["value"] == pytest.approx(expected / 1e9, rel=1e-9)
    assert flops["device"].startswith("cpu: ")


def test_plain_loop_does_the_same_work_as_lightning(tmp_path: Path) -> None:
    """From the same initial weights, batches and dropout seed, three steps of ``Trainer.fit`` and of the plain loop
    end with the same weights, BatchNorm statistics and train-metric counts."""
    args = parse_args(["--device", "cpu", *SMALL_IMAGES])
    b = Bench(args, tmp_path, Console(quiet=True))
    steps = 3
    setting = TrainSetting("32-true", channels_last=False, compile=False)
    cfg = b.train_config(*training_overrides(setting, steps))
    generator = torch.Generator().manual_seed(0)
    samples = [
        (torch.randint(0, 256, (3, 65, 65), dtype=torch.uint8, generator=generator), torch.randint(0, 21, (65, 65)))
        for _ in range(2 * steps)
    ]
    samples = [(image, mask.to(torch.uint8)) for image, mask in samples]

    def loader() -> DataLoader:
        return DataLoader(FixedSamples(samples, len(samples)), batch_size=2)

    lightning, clock = lightning_training(cfg, loader(), torch.device("cpu"), warmup=1)
    torch.manual_seed(0)  # the initial weights lightning_training's module got
    plain = instantiate(b.train_config(f"trainer.max_steps={steps}").model)
    with mock.patch.object(plain, "loss", wraps=plain.loss) as loss:
        times = plain_training(plain, loader(), torch.device("cpu"), setting, IMAGENET_MEAN, IMAGENET_STD, warmup=1)

    assert len(clock.times) == len(times) == loss.call_count == steps  # the module's one loss, once a step
    assert lightning.trainer.global_step == steps
    for (name, mine), (_, theirs) in zip(
        lightning.net.state_dict().items(), plain.net.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5, msg=name)
    # the train metric saw the same predictions (Lightning's module logged it and reset it at the epoch's end)
    mine = lightning.trainer.callback_metrics["train/mIoU"]
    torch.testing.assert_close(mine, plain.train_metrics.compute()["mIoU"].float())


def test_throughput_uses_the_median_batch_per_step() -> None:
    times = [0.0, 1.0, 2.0, 12.0, 13.0]  # one batch disturbed by another process
    rate, seconds = throughput(times, [2] * 5, warmup=1, per_step=True)
    assert rate == pytest.approx(2.0) and seconds == pytest.approx(13.0)
    rate, _ = throughput(times, [2] * 5, warmup=1, per_step=False)
    assert rate == pytest.approx(8 / 13)
    with pytest.raises(RuntimeError, match="warm-up"):
        throughput(times[:1], [2], warmup=1, per_step=True)


def test_bench_tree_alternates_landscape_and_portrait(tmp_path: Path) -> None:
    """The generated tree is VOC's layout; within each split landscape and portrait images alternate, so that
    validation batches grouped by size alternate too."""
    voc = write_bench_tree(tmp_path, {"train": 3, "val": 4}, (96, 72))
    assert voc == tmp_path / "VOCdevkit" / "VOC2012"
    for split, count in (("train", 3), ("val", 4)):
        ids = (voc / "ImageSets/Segmentation" / f"{split}.txt").read_text().split()
        assert len(ids) == count
        sizes = []
        for name in ids:
            with (
                Image.open(voc / "JPEGImages" / f"{name}.jpg") as image,
                Image.open(voc / "SegmentationClass" / f"{name}.png") as mask,
            ):
                assert mask.mode == "P" and mask.size == image.size
                sizes.append(image.size)
        assert sizes == [(96, 72), (72, 96), (96, 72), (72, 96)][:count]


def test_report_keeps_the_json_whole_and_records_a_failure(tmp_path: Path) -> None:
    """Every record rewrites the JSON (header, results, skipped, section seconds) without leaving a temporary
    file; a measurement that raises is recorded with its error instead of raising."""
    out = tmp_path / "runs" / "bench.json"
    report = Report(Console(quiet=True), torch.device("cpu"), out, lambda: {"environment": {}, "options": {"x": 1}})
    good = report.measure("data", "fine", "images/s", lambda: (2.0, 1.0, {"images": 2}), {"crop_size": 65}, False)
    assert json.loads(out.read_text())["results"][0]["value"] == 2.0

    def broken() -> tuple[float, float, dict]:
        raise ValueError("no images\nsecond line")

    bad = report.measure("val", "broken", "images/s", broken)
    report.skip("memory", "peak device memory", "CPU")
    document = json.loads(out.read_text())
    assert list(document) == [
        "benchmark", "command", "started", "elapsed_s", "environment", "options", "results", "skipped",
        "section_seconds",
    ]  # fmt: skip
    assert good.settings == {"crop_size": 65, "images": 2} and good.host_peak_mib > 0
    assert bad.value is None and bad.note == "failed: ValueError: no images"
    assert [r["name"] for r in document["results"]] == ["fine", "broken"]
    assert document["skipped"] == [{"section": "memory", "what": "peak device memory", "why": "CPU"}]
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"]


def test_user_errors_are_one_paragraph(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """An override that does not apply, or a --data-root without VOCdevkit/VOC2012, fails before anything is
    measured, as ``error: ...`` with status 1 from the command line; a bad option is argparse's usage error."""
    with pytest.raises(SegvocError, match="nosuch.key"):
        main(["--device", "cpu", "--sections", "flops", "nosuch.key=1"])
    assert command(main)(["--device", "cpu", "--sections", "flops", "nosuch.key=1"]) == 1
    assert capsys.readouterr().err.startswith("error: conf/train.yaml with the overrides ['nosuch.key=1']")
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for name in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / name).mkdir(parents=True)
    for given in (voc, voc.parent):  # the VOC2012 folder itself, VOCdevkit
        with pytest.raises(SegvocError, match=f"there is no VOCdevkit/VOC2012 folder in it.*, here {tmp_path}\\."):
            main(["--device", "cpu", "--sections", "data", "--data-root", str(given)])
    with pytest.raises(SegvocError, match="there is no VOCdevkit/VOC2012 folder in it.*train.txt\\)\\.$"):
        main(["--device", "cpu", "--sections", "data", "--data-root", str(tmp_path / "elsewhere")])
    for bad in (["--sections", "data,nope"], ["--batch-size", "0"], ["--image-size", "96"]):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(bad)
        assert exit_info.value.code == 2
