"""Jetson health in /metrics: GPU load, temperatures and power rails, read from ``tegrastats``.

``tegrastats`` (Jetson Linux's own tool, in the container mapped in from the host) prints one
line of statistics per interval for as long as it runs. A background thread reads the lines as
they come and keeps the newest sample only, so the pipe never fills and a scrape reports the
state of at most an interval ago. Where there is no ``tegrastats`` (any machine but a Jetson)
there are no Jetson metrics and nothing is logged; where it dies, stalls or prints a line that
does not parse, one line is logged, the Jetson metrics go away and the service runs on.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger("gazecam.server")

INTERVAL_MS = 1000
# A sample older than this is not reported: tegrastats has stalled.
STALE_S = 10 * INTERVAL_MS / 1000
# A line is a few hundred bytes; a longer one is not tegrastats' (and is read no further).
_MAX_LINE_BYTES = 8192
# The GPU engine's load: "GR3D_FREQ 12%" (JetPack 6), "GR3D_FREQ 12%@[1300,1300]" (JetPack 7).
_GPU_LOAD = re.compile(r"\bGR3D_FREQ (\d+)%")
# "tj@43.343C", "cpu@52.968C/52.968C" (JetPack 7 adds the maximum); -256C: the sensor is off.
_TEMPERATURE = re.compile(r"\b(\w+)@(-?\d+(?:\.\d+)?)C\b")
_SENSOR_OFF_C = -256.0
# "VDD_GPU_SOC 1995mW/1995mW": the rail's present and average power (JetPack 7 adds the maximum).
_POWER = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)mW/\d+mW")


@dataclass(frozen=True)
class TegrastatsSample:
    """One tegrastats line: the GPU's load, each thermal zone's temperature, each rail's power."""

    gpu_load_ratio: float
    temperatures_c: Mapping[str, float]
    power_w: Mapping[str, float]


def parse_tegrastats(line: str) -> TegrastatsSample | None:
    """The sample in a tegrastats line of a Jetson Orin (JetPack 6 or 7); None where the line
    has no GPU load (not a tegrastats line gazecam can read)."""
    load = _GPU_LOAD.search(line)
    if load is None:
        return None
    temperatures = {
        zone: float(value)
        for zone, value in _TEMPERATURE.findall(line)
        if float(value) != _SENSOR_OFF_C
    }
    power = {rail: int(mw) / 1000 for rail, mw in _POWER.findall(line)}
    return TegrastatsSample(int(load.group(1)) / 100, temperatures, power)


class Tegrastats:
    """``tegrastats`` running in the background, its newest sample kept."""

    def __init__(self, executable: str, interval_ms: int = INTERVAL_MS) -> None:
        self._process = subprocess.Popen(
            [executable, "--interval", str(interval_ms)], stdout=subprocess.PIPE
        )
        self._newest: tuple[float, TegrastatsSample] | None = None
        self._stopping = False
        self._reader = threading.Thread(target=self._read, name="tegrastats", daemon=True)
        self._reader.start()

    def newest(self) -> TegrastatsSample | None:
        """The newest sample, unless tegrastats has ended or stalled."""
        newest = self._newest
        if newest is None or time.monotonic() - newest[0] > STALE_S:
            return None
        return newest[1]

    def stop(self) -> None:
        """End tegrastats and its reader."""
        self._stopping = True
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        # A child of tegrastats' that kept the pipe open would keep the reader waiting: it is a
        # daemon thread, and shutting down does not wait for it.
        self._reader.join(timeout=5)

    def _read(self) -> None:
        stdout = self._process.stdout
        assert stdout is not None  # stdout=PIPE
        with stdout:
            while raw := stdout.readline(_MAX_LINE_BYTES):
                sample = parse_tegrastats(raw.decode(errors="replace"))
                if sample is None:
                    self._newest = None
                    logger.warning(
                        "tegrastats printed a line gazecam cannot read (%r): no Jetson metrics",
                        raw[:120],
                    )
                    self._process.kill()
                    return
                self._newest = (time.monotonic(), sample)
        self._newest = None
        status = self._process.wait()
        if not self._stopping:
            logger.warning("tegrastats ended (exit %s): no Jetson metrics", status)


class TegrastatsCollector(Collector):
    """The newest tegrastats sample as ``gazecam_jetson_*`` gauges; none without a sample."""

    def __init__(self, tegrastats: Tegrastats) -> None:
        self._tegrastats = tegrastats

    def collect(self) -> Iterable[Metric]:
        sample = self._tegrastats.newest()
        if sample is None:
            return
        yield GaugeMetricFamily(
            "gazecam_jetson_gpu_load_ratio",
            "The Jetson GPU's load (tegrastats GR3D_FREQ), 0 to 1.",
            value=sample.gpu_load_ratio,
        )
        yield _labelled(
            "gazecam_jetson_temperature_celsius",
            "Each thermal zone's temperature (tegrastats; tj: the hottest junction).",
            "zone",
            sample.temperatures_c,
        )
        yield _labelled(
            "gazecam_jetson_power_watts",
            "Each power rail's present power (tegrastats, e.g. VDD_GPU_SOC, VIN_SYS_5V0).",
            "rail",
            sample.power_w,
        )


def _labelled(name: str, documentation: str, label: str, values: Mapping[str, float]) -> Metric:
    """A gauge with one sample per ``values`` key, that key as its ``label``."""
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


@contextmanager
def jetson_health(registry: CollectorRegistry) -> Iterator[None]:
    """Jetson metrics in ``registry`` while the block runs, where ``tegrastats`` is on PATH."""
    executable = shutil.which("tegrastats")
    if executable is None:  # not a Jetson: nothing to report, nothing to say
        yield
        return
    try:
        tegrastats = Tegrastats(executable)
    except OSError as exc:
        logger.warning("tegrastats did not start (%s): no Jetson metrics", exc)
        yield
        return
    collector = TegrastatsCollector(tegrastats)
    registry.register(collector)
    try:
        yield
    finally:
        registry.unregister(collector)
        tegrastats.stop()
