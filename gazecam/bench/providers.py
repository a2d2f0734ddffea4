"""``gazecam bench --providers``: the vision models on each provider tier (CPU, CUDA EP, TensorRT
EP, TensorRT engines) over the same keyframe crops, in one run.

The crops are cut once from the replay (as the capture pipeline cuts them); each tier gets its
own perception (``create_perception`` with only that tier, then the CPU), and the tiers take
turns crop by crop, in rotating order, so that a shared machine's load hits them alike. Each
model's session is timed per run, and the whole ``perceive`` per crop. A tier whose sessions do
not all really run on it (``session.get_providers()``: this machine has no such GPU provider,
no engine was built, ...) is not measured: the report says why, never a CPU figure under a GPU
name. The first crop warms every tier up, untimed.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from gazecam.bench.report import percentiles
from gazecam.models import ModelSettings
from gazecam.perception import CombinedPerception, Perception, PerceptionSettings, create_perception
from gazecam.records import Crop
from gazecam.trt.build import in_use
from gazecam.trt.calibrate import source_crops
from gazecam.trt.providers import TIERS, choices, parse_tiers

# Crops per tier: enough for a p90; each costs about 60 ms on 2 CPU cores.
CROPS = 24


class TimedSession:
    """An ONNX Runtime session whose runs are timed into ``times_ms``."""

    def __init__(self, session: Any, times_ms: list[float]) -> None:
        self.session, self.times_ms = session, times_ms

    def run(self, outputs: Any, feed: dict[str, Any]) -> Any:
        """Run the session, timed."""
        start = time.perf_counter()
        result = self.session.run(outputs, feed)
        self.times_ms.append((time.perf_counter() - start) * 1000)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


def _timed(perception: Perception, times: dict[str, list[float]]) -> None:
    """Wrap each model's session of a perception in a TimedSession."""
    assert isinstance(perception, CombinedPerception)
    for part in perception.parts:
        for attr, model in (("det", "ppocr-det"), ("rec", "ppocr-rec"), ("session", "yolox-nano")):
            if hasattr(part, attr):
                setattr(part, attr, TimedSession(getattr(part, attr), times.setdefault(model, [])))
    if perception.classifier is not None:
        times_ms = times.setdefault("efficientnet-lite0", [])
        perception.classifier.session = TimedSession(perception.classifier.session, times_ms)


def tier_perception(
    tier: str, settings: PerceptionSettings, models: ModelSettings
) -> tuple[Perception | None, dict[str, Any]]:
    """A perception whose models all run on ``tier``, and where they run; None (and why not)
    where one would not."""
    perception = create_perception(settings.model_copy(update={"onnx_providers": tier}), models)
    runs_on = {name: choices()[name] for name in in_use(settings)}
    missed = {name: c for name, c in runs_on.items() if c.tier != tier}
    entry: dict[str, Any] = {"runs_on": {name: c.to_json() for name, c in runs_on.items()}}
    if missed:
        name, choice = next(iter(missed.items()))
        why = dict(choice.skipped).get(tier, f"it runs on {choice.tier}")
        entry["not_run"] = f"{name}: {why}"
        return None, entry
    return perception, entry


def bench_providers(
    address: str,
    tiers: str = "auto",
    settings: PerceptionSettings | None = None,
    models: ModelSettings | None = None,
    crops: int = CROPS,
) -> dict[str, Any]:
    """The providers section of the bench report: per tier, where its models ran, the
    percentiles of ``perceive`` and of each model's runs per crop, or why it was not run; and
    each measured tier's p50 speed-up over the CPU."""
    settings = settings or PerceptionSettings()
    models = models or ModelSettings()
    wanted = parse_tiers(tiers)
    samples = asyncio.run(source_crops(address, crops + 1))
    report: dict[str, Any] = {"crops": max(0, len(samples) - 1), "tiers": {}}
    running: dict[str, tuple[Perception, dict[str, list[float]], list[float]]] = {}
    for tier in (t for t in TIERS if t in wanted):
        perception, entry = tier_perception(tier, settings, models)
        report["tiers"][tier] = entry
        if perception is not None:
            running[tier] = (perception, {}, [])
    for i, crop in enumerate(samples):
        names = list(running)
        turn = i % len(names) if names else 0
        for tier in names[turn:] + names[:turn]:
            perception, times, total = running[tier]
            if i == 0:  # warm-up, untimed
                perception.perceive(crop)
                _timed(perception, times)
                continue
            total.append(_perceive_ms(perception, crop))
    for tier, (_, times, total) in running.items():
        entry = report["tiers"][tier]
        entry["perceive_ms"] = percentiles(total)
        entry["models_ms"] = {name: percentiles(values) for name, values in times.items()}
    cpu = report["tiers"].get("cpu", {}).get("perceive_ms")
    report["speedup_vs_cpu"] = {
        tier: round(cpu["p50"] / entry["perceive_ms"]["p50"], 2)
        for tier, entry in report["tiers"].items()
        if cpu and entry.get("perceive_ms")
    }
    return report


def _perceive_ms(perception: Perception, crop: Crop) -> float:
    start = time.perf_counter()
    perception.perceive(crop)
    return (time.perf_counter() - start) * 1000


def format_providers(report: dict[str, Any]) -> str:
    """The providers section as lines: per tier, perceive p50/p90 and the speed-up, or why not."""
    lines = [f"providers ({report['crops']} crops):"]
    for tier, entry in report["tiers"].items():
        if "not_run" in entry:
            lines.append(f"  {tier:9} not run: {entry['not_run']}")
            continue
        p = entry["perceive_ms"]
        speedup = report["speedup_vs_cpu"].get(tier)
        ratio = f", {speedup}x the CPU" if speedup is not None and tier != "cpu" else ""
        lines.append(f"  {tier:9} perceive p50 {p['p50']:.1f} ms, p90 {p['p90']:.1f} ms{ratio}")
    return "\n".join(lines)
