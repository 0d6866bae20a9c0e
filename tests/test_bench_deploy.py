"""The bench's deploy section: batch-1 CPU latency of PyTorch fp32, bf16 + channels_last, ONNX Runtime fp32 and
int8, the int8 speed-ups and the file sizes, at tiny sizes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from segvoc.bench.__main__ import main, parse_args
from segvoc.bench.sections import SECTIONS
from segvoc.data.datamodule import default_num_workers

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

RUNTIMES = ("PyTorch eager fp32", "PyTorch bf16 autocast + channels_last", "ONNX Runtime fp32", "ONNX Runtime int8")


def test_deploy_runs_only_when_asked_for() -> None:
    assert "deploy" not in parse_args([]).sections and "deploy" not in SECTIONS
    assert parse_args(["--sections", "deploy,flops"]).sections == ["flops", "deploy"]


@pytest.mark.slow  # an ONNX export and an int8 quantisation (about a minute on 2 cores)
def test_deploy_section_records_latency_speed_ups_and_sizes(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    main(["--short", "--device", "cpu", "--sections", "deploy", "--crop-size", "65", "--image-size", "96x72",
          "--json", str(out)])  # fmt: skip
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
