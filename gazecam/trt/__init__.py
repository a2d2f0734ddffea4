"""TensorRT for the vision models: engines built on the device, cached, checked, and the runtime's
provider chain (TensorRT engine, ONNX Runtime's TensorRT EP, CUDA EP, CPU).

- ``cache``: what an engine is keyed by (model sha256, TensorRT version, GPU compute capability,
  precision, input shapes), its JSON sidecar, and the check that refuses a stale, foreign or
  corrupt engine. An engine runs through ONNX Runtime's TensorRT EP, wrapped in an "EPContext"
  ONNX model, so the runtime needs neither the ``tensorrt`` package nor torch or cuda-python.
- ``build``: ``gazecam engines build``: the ``tensorrt`` Python API, 10.x (weakly typed, precision
  builder flags) or 11.x (strongly typed: precision from the ONNX graph, an FP16 or Q/DQ one).
- ``graphs``: the FP16 and Q/DQ ONNX graphs TensorRT builds from, and each model's precision.
- ``calibrate``: INT8 calibration inputs, the models' own inputs on crops of a source.
- ``command``: the ``gazecam engines`` command line.
- ``providers``: which tier each ONNX Runtime session really runs on, and why the better ones
  were skipped.

This package is the runtime's (the top-level ``engines/`` is build-time conversion code that the
runtime must not need); ``tensorrt`` and ``onnx`` are imported only to build.
"""

from __future__ import annotations

import ctypes
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gazecam.errors import GazecamError

Precision = Literal["fp32", "fp16", "int8", "best"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16", "int8", "best")
# The oldest TensorRT we build with or load engines of: 10.0 (JetPack 6 has 10.3).
MIN_TENSORRT = (10, 0)
# Jetson modules have no PCI GPU for nvidia-smi to query; their SoC says which GPU it is.
TEGRA_COMPUTE_CAPABILITY = {"nvidia,tegra234": "8.7", "nvidia,tegra194": "7.2"}
DEVICE_TREE = Path("/proc/device-tree/compatible")
# ONNX Runtime's execution providers that gazecam chooses between, fastest first.
TRT_EP, CUDA_EP, CPU_EP = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)
# TensorRT's core library as ONNX Runtime's TensorRT EP loads it (10.x; 11.x for TensorRT 11).
NVINFER_SONAMES = ("libnvinfer.so.10", "libnvinfer.so.11")

log = logging.getLogger(__name__)


class EngineError(GazecamError):
    """A TensorRT engine cannot be built, or a cached one cannot be used."""


@dataclass(frozen=True, slots=True)
class Platform:
    """What this machine offers the vision models: probed once (``probe_platform``); tests pass
    their own (a fake GPU) to check the dispatch without one."""

    ort_providers: tuple[str, ...]  # onnxruntime.get_available_providers()
    compute_capability: str | None  # "8.7"; None: no NVIDIA GPU found
    gpu_name: str | None
    tensorrt_version: str | None  # the tensorrt package's; None: not importable (or no GPU)
    # The libnvinfer that loads (the TensorRT EP needs it); None: none, or not probed (no GPU)
    tensorrt_libs: str | None

    @property
    def gpu(self) -> str:
        """The GPU as one phrase for messages: "NVIDIA H100 (sm 9.0)"."""
        return f"{self.gpu_name or 'GPU'} (sm {self.compute_capability})"


def tensorrt_too_old(version: str) -> bool:
    """Whether a TensorRT version is below ``MIN_TENSORRT``."""
    numbers = [int(n) for n in re.findall(r"\d+", version)[:2]]
    return tuple(numbers) < MIN_TENSORRT


def _nvidia_smi() -> tuple[str | None, str | None]:
    """(compute capability, name) of GPU 0 from nvidia-smi, or the Jetson SoC's; Nones if none."""
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=compute_cap,name", "--format=csv,noheader"]
        try:
            out = subprocess.run(query, capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("nvidia-smi failed (%s): no GPU assumed", exc)
        else:
            first = out.stdout.strip().splitlines()[:1]
            if first and "," in first[0]:
                smi_cc, smi_name = (part.strip() for part in first[0].split(",", 1))
                if re.fullmatch(r"\d+\.\d+", smi_cc):
                    return smi_cc, smi_name
    try:
        compatible = DEVICE_TREE.read_bytes().split(b"\0")
    except OSError:
        return None, None
    for soc in compatible:
        cc = TEGRA_COMPUTE_CAPABILITY.get(soc.decode(errors="replace"))
        if cc is not None:
            return cc, f"Jetson {soc.decode()}"
    return None, None


def probe_platform() -> Platform:
    """This machine's ONNX Runtime providers, GPU and TensorRT version (imported only where a
    GPU was found: the import loads TensorRT's libraries)."""
    import onnxruntime as ort

    cc, name = _nvidia_smi()
    version = libs = None
    if cc is not None:
        try:
            import tensorrt  # loads the pip package's libnvinfer, which the probe below finds

            version = str(tensorrt.__version__)
        except ImportError:
            version = None
        libs = nvinfer()
    return Platform(tuple(ort.get_available_providers()), cc, name, version, libs)


def nvinfer() -> str | None:
    """The soname of the TensorRT library that loads here, None where none does.

    onnxruntime-gpu lists its TensorRT EP whether or not TensorRT is installed; without
    libnvinfer the EP fails at every session, so the tier is skipped with this reason instead.
    """
    for soname in NVINFER_SONAMES:
        try:
            ctypes.CDLL(soname)
        except OSError:
            continue
        return soname
    return None
