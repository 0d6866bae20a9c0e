"""The bench's deploy section: batch-1 CPU latency of PyTorch fp32, bf16 + channels_last, ONNX Runtime fp32 and
int8, the int8 speed-ups and the file sizes, at tiny sizes."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import segvoc.tasks.export
from segvoc.bench.__main__ import main, parse_args
from segvoc.bench.deploy import latencies
from segvoc.bench.sections import SECTIONS
from segvoc.checkpoints.exported import OnnxNet
from segvoc.data.datamodule import default_num_workers
from tests.conftest import ExportedModels

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

RUNTIMES = ("PyTorch eager fp32", "PyTorch bf16 autocast + channels_last", "ONNX Runtime fp32", "ONNX Runtime int8")


def test_latencies_take_turns_and_keep_the_others_when_one_fails() -> None:
    """The runtimes are timed in turns, a block of calls each (a drifting machine slows them alike); one that fails
    in its warm-up is reported with its exception and left out of the rounds."""
    calls: list[str] = []

    def broken() -> None:
        calls.append("broken")
        raise RuntimeError("no such provider")

    forwards = {"a": lambda: calls.append("a"), "broken": broken, "b": lambda: calls.append("b")}
    figures = latencies(forwards, runs=5, warmup=2, block=3)
    # warm-up; then blocks of 3 timed calls (the last one shorter), each after one untimed call
    assert calls == ["a", "a", "broken", "b", "b"] + ["a"] * 4 + ["b"] * 4 + ["a"] * 3 + ["b"] * 3
    assert isinstance(figures["broken"], RuntimeError)
    for name in ("a", "b"):
        median, p95, seconds = figures[name]
        assert 0 <= median <= p95 and seconds >= 0


def test_deploy_runs_only_when_asked_for() -> None:
    assert "deploy" not in parse_args([]).sections and "deploy" not in SECTIONS
    assert parse_args(["--sections", "deploy,flops"]).sections == ["flops", "deploy"]


@pytest.mark.slow  # an int8 quantisation and the latency runs (about 20 s on 2 cores), after the session's export
def test_deploy_section_records_latency_speed_ups_and_sizes(
    exported_models: ExportedModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The section's fp32 export is the session's one (half a minute on 2 cores, checked by test_export.py): the same
    # network (DeepLabV3+, 21 classes, OS16) with trained instead of random weights. Its checkpoint, quantisation,
    # latency runs and file sizes are the section's own.
    exports = []

    def session_export(net: torch.nn.Module, meta: dict, path: str | Path, opset: int | None = 18) -> Path:
        assert meta["net"] == OnnxNet(exported_models.onnx).meta["net"]  # the network the section would export
        exports.append(Path(shutil.copyfile(exported_models.onnx, path)))
        return exports[-1]

    monkeypatch.setattr(segvoc.tasks.export, "export_onnx", session_export)
    out = tmp_path / "bench.json"
    main(["--short", "--device", "cpu", "--sections", "deploy", "--crop-size", "65", "--image-size", "96x72",
          "--json", str(out)])  # fmt: skip
    assert len(exports) == 1  # the section asked for its export, and got the session's
    results = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    failed = {name: r["note"] for name, r in results.items() if r["value"] is None}
    assert not failed
    threads = sorted({1, default_num_workers()})
    for count in threads:
        for size, shape in (("65x65", [1, 3, 65, 65]), ("96x72", [1, 3, 72, 96])):
            for runtime in RUNTIMES:
                result = results[f"{runtime}, {size}, {count} thread(s)"]
                assert result["unit"] == "ms" and result["value"] > 0
                assert result["settings"]["input"] == shape and result["settings"]["threads"] == count
                assert result["settings"]["p95_ms"] >= result["value"]  # the 95th percentile is not below the median
                assert result["host_peak_mib"] > 0
            for reference in RUNTIMES[:2]:
                speed_up = results[f"int8 ONNX speed-up over {reference}, {size}, {count} thread(s)"]
                median = results[f"{reference}, {size}, {count} thread(s)"]["value"]
                int8 = results[f"ONNX Runtime int8, {size}, {count} thread(s)"]["value"]
                assert speed_up["value"] == pytest.approx(median / int8)
    sizes = {name: results[f"file size, {name}"]["value"] for name in ("checkpoint", "fp32 ONNX", "int8 ONNX")}
    assert all(math.isfinite(v) and v > 0 for v in sizes.values())
    ratio = results["int8 ONNX size / fp32 ONNX size"]["value"]
    assert ratio == pytest.approx(100 * sizes["int8 ONNX"] / sizes["fp32 ONNX"]) and ratio < 30
