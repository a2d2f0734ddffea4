"""Helpers the benchmark scripts share: percentiles, their printing, the machine, the report."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def pct(values: Sequence[float] | np.ndarray, *qs: int) -> dict[str, float]:
    """Percentiles as ``{"p50": ...}``, with the max beside them (NaN for no values)."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {**{f"p{q}": float("nan") for q in qs}, "max": float("nan")}
    return {**{f"p{q}": float(np.percentile(a, q)) for q in qs}, "max": float(a.max())}


def fmt(p: dict[str, float], spec: str = ".2f") -> str:
    """``p50 1.23  p90 4.56  max 7.89``."""
    return "  ".join(f"{k} {v:{spec}}" for k, v in p.items())


def cpus() -> set[int]:
    """The CPUs this process may run on."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else {0}


def machine_info(**extra: Any) -> dict[str, Any]:
    """CPU model, cores (all and usable), platform, Python and numpy, plus ``extra``."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    models = [ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model n")]
    return {
        "cpu": models[0] if models else platform.processor(),
        "cores": os.cpu_count(),
        "usable_cores": len(cpus()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        **extra,
    }


def write_report(report: dict[str, Any], out: Path, started_s: float) -> None:
    """Add the wall time, write the JSON report and say where."""
    report["wall_s"] = time.perf_counter() - started_s
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out} in {report['wall_s']:.1f} s")
