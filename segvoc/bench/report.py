"""The bench's figures: one ``Result`` each, the probes of device and memory they record, and the ``Report`` that
takes a measurement, prints it, rewrites the JSON file and draws the final table."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import platform
import re
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from segvoc.files import atomic_write_text

log = logging.getLogger(__name__)

MIB = 1024 * 1024

# A measurement's work, as ``Report.measure`` runs it: () -> (value, timed seconds or None, extra settings).
Measurement = Callable[[], tuple[float, float | None, dict[str, Any]]]


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


class Report:
    """The figures of one run in the order they were recorded, with what was skipped and the seconds per section.

    Every figure is printed when it is recorded and, with ``json_path``, the JSON file is rewritten after every
    record (atomically: a crash or an interrupt leaves the last complete version). ``header()`` gives the JSON's
    ``environment`` and ``options``; it is called at every save. ``device`` is the device the measurements run on
    unless they say ``on_device=False``.
    """

    def __init__(
        self, console: Console, device: torch.device, json_path: Path | None, header: Callable[[], dict[str, Any]]
    ) -> None:
        self.console = console
        self.device = device
        self.json_path = json_path
        self.header = header
        self.results: list[Result] = []
        self.skipped: list[dict[str, str]] = []
        self.section_seconds: dict[str, float] = {}
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.clock = time.perf_counter()

    def save(self) -> None:
        """Rewrite the JSON file with everything recorded so far; without a ``json_path`` do nothing."""
        if self.json_path is None:
            return
        document = {
            "benchmark": "segvoc.bench",
            "command": "python -m segvoc.bench " + " ".join(sys.argv[1:]),
            "started": self.started,
            "elapsed_s": round(time.perf_counter() - self.clock, 1),
            **self.header(),
            "results": [asdict(r) for r in self.results],
            "skipped": self.skipped,
            "section_seconds": self.section_seconds,
        }
        # default=str: never lose a run to a value json cannot write
        atomic_write_text(self.json_path, json.dumps(document, indent=2, default=str))

    def skip(self, section: str, what: str, why: str) -> None:
        """Record that ``section`` leaves ``what`` out, and ``why``."""
        self.skipped.append({"section": section, "what": what, "why": why})
        self.console.print(f"[yellow]skipped[/] {section}: {what} ({why})")
        self.save()

    def measure(
        self,
        section: str,
        name: str,
        unit: str,
        run: Measurement,
        settings: dict[str, Any] | None = None,
        on_device: bool = True,
        note: str = "",
    ) -> Result:
        """Run ``run() -> (value, timed seconds, extra settings)`` and record it, or its failure, with the peak
        host and device memory during the run. An exception of ``run`` is recorded, logged and not raised.

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
        return self.record(result)

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
        return self.record(
            Result(section, name, value, unit, device, threads, torch.__version__, dict(settings), note=note)
        )

    def fail(self, section: str, name: str, exc: BaseException) -> Result:
        """Record that ``section``'s ``name`` could not be measured because of ``exc``."""
        device = device_label(self.device)
        return self.record(
            Result(section, name, None, "", device, torch.get_num_threads(), torch.__version__, note=failure(exc))
        )

    def record(self, result: Result) -> Result:
        """Append ``result``, print it and save; return it (callers may add a note and save again)."""
        self.results.append(result)
        shown = "—" if result.value is None else f"{result.value:,.2f} {result.unit}"
        self.console.print(f"[bold]{result.section}[/] {result.name}: {shown} {result.note}".rstrip())
        self.save()
        return result

    def table(self, title: str) -> Table:
        """Every figure recorded, one row each, under ``title``."""
        table = Table(title=title)
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
