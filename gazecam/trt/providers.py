"""The runtime's provider chain: each vision model's ONNX Runtime session on the best tier the
settings allow and this machine has, and a record of the tier it REALLY runs on.

Tiers, best first: ``engine`` (the model's TensorRT engine from ``gazecam engines build``, run
by ONNX Runtime's TensorRT EP through its EPContext wrapper), ``tensorrt`` (ONNX Runtime's
TensorRT EP building its own engines, cached with their timing caches under the model cache),
``cuda`` (the CUDA EP), ``cpu``. ``GAZECAM_ONNX_PROVIDERS`` names the tiers to try ('auto': all
four); the CPU is always the last resort. A tier is skipped with a one-line reason (no GPU, no
such provider in this onnxruntime, no or a too-old tensorrt, no engine, a stale, foreign or
corrupt engine, a provider that failed to start); which provider a session runs on is taken
from ``session.get_providers()``, so an ONNX Runtime that quietly drops to the CPU is reported
as CPU. Each choice is logged once per process and kept for ``/v1/status``, ``gazecam models
list`` and the bench report (``choices``).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gazecam.errors import first_line
from gazecam.models import ModelError, ModelSettings
from gazecam.settings import comma_names
from gazecam.trt import (
    CPU_EP,
    CUDA_EP,
    NVINFER_SONAMES,
    TRT_EP,
    EngineError,
    Platform,
    probe_platform,
    tensorrt_too_old,
)
from gazecam.trt.build import runtime_profiles
from gazecam.trt.cache import InputProfile, check_engine, engine_key, has_engine
from gazecam.trt.graphs import FP16_BREAKS

if TYPE_CHECKING:
    from gazecam.perception import PerceptionSettings

TIERS = ("engine", "tensorrt", "cuda", "cpu")
PROVIDER_OF = {"engine": TRT_EP, "tensorrt": TRT_EP, "cuda": CUDA_EP, "cpu": CPU_EP}
# What a setting may name: a tier, or (as before tiers) an ONNX Runtime provider.
TIER_OF_NAME = {**{t: t for t in TIERS}, TRT_EP: "tensorrt", CUDA_EP: "cuda", CPU_EP: "cpu"}
EP_CACHE_DIR = "trt-ep-cache"

log = logging.getLogger(__name__)
_lock = threading.Lock()
_choices: dict[str, ProviderChoice] = {}
_logged: set[str] = set()


@dataclass(frozen=True, slots=True)
class ProviderChoice:
    """Where one model's session runs, and why each better tier was not used."""

    model: str
    tier: str  # engine, tensorrt, cuda or cpu: what the session really runs on
    providers: tuple[str, ...]  # the session's get_providers()
    skipped: tuple[tuple[str, str], ...]  # (tier, reason), best tier first

    def to_json(self) -> dict[str, Any]:
        """For /v1/status and the bench report."""
        return {
            "tier": self.tier,
            "providers": list(self.providers),
            "skipped": {tier: why for tier, why in self.skipped},
        }

    def summary(self) -> str:
        """One line: the tier and, grouped by reason, the tiers skipped."""
        by_reason: dict[str, list[str]] = {}
        for tier, why in self.skipped:
            by_reason.setdefault(why, []).append(tier)
        skipped = "; ".join(
            f"{', '.join(tiers)} skipped: {why}" for why, tiers in by_reason.items()
        )
        return f"{self.tier}" + (f" ({skipped})" if skipped else "")


def parse_tiers(spec: str) -> list[str]:
    """The tiers a setting names, best first, the CPU last; ConfigError for an unknown name."""
    if spec.strip() == "auto":
        return list(TIERS)
    known = (
        f"unknown (known: auto, {', '.join(TIERS)}, or the ONNX Runtime providers {TRT_EP}, "
        f"{CUDA_EP}, {CPU_EP})"
    )
    names = comma_names(spec, "onnx_providers", TIER_OF_NAME, known)
    tiers = list(dict.fromkeys(TIER_OF_NAME[n] for n in names))
    return tiers if "cpu" in tiers else [*tiers, "cpu"]


def unavailable(tier: str, platform: Platform) -> str | None:
    """Why this machine cannot run a tier at all; None where it may."""
    if tier == "cpu":
        return None
    if platform.compute_capability is None:
        return "no NVIDIA GPU found"
    provider = PROVIDER_OF[tier]
    if provider not in platform.ort_providers:
        return (
            f"this onnxruntime has no {provider} (install onnxruntime-gpu, or NVIDIA's "
            "onnxruntime wheel on a Jetson)"
        )
    if tier == "engine":
        if platform.tensorrt_version is None:
            return "the tensorrt package is not installed (pip install 'gazecam[trt]')"
        if tensorrt_too_old(platform.tensorrt_version):
            return f"TensorRT {platform.tensorrt_version} is too old (10.0 or newer needed)"
    if tier != "cuda" and platform.tensorrt_libs is None:
        return (
            f"TensorRT's libraries are not found ({' or '.join(NVINFER_SONAMES)}: install "
            "TensorRT, e.g. pip install 'gazecam[trt]')"
        )
    return None


@functools.cache
def this_platform() -> Platform:
    """This machine's platform, probed once per process."""
    return probe_platform()


def _profile_option(profiles: tuple[InputProfile, ...], which: str) -> str:
    return ",".join(
        f"{p.name}:{'x'.join(map(str, getattr(p, which)))}" for p in profiles if not p.fixed
    )


def _providers(
    tier: str,
    path: Path,
    model: str | None,
    settings: PerceptionSettings,
    models: ModelSettings,
    platform: Platform,
    cpu_path: Path | None,
) -> tuple[Path, list[Any]]:
    """The model file and the providers (with options) of a tier; EngineError where the tier
    has no valid engine for the model."""
    cpu: list[Any] = [CPU_EP]
    if tier == "cpu":
        return cpu_path or path, cpu
    profiles: tuple[InputProfile, ...] = ()
    if model is not None and has_engine(model):
        from gazecam.settings import CaptureSettings

        profiles = runtime_profiles(model, CaptureSettings().crop_size_px, settings)
    # cuDNN's exhaustive search for the fastest convolution (the CUDA EP's default) runs again
    # for each new input shape: with the recogniser's line widths, 354 ms per crop on an H200
    # instead of 18 ms on its CPU. A model whose input shape varies takes cuDNN's heuristic.
    search = "EXHAUSTIVE" if profiles and all(p.fixed for p in profiles) else "HEURISTIC"
    cuda: list[Any] = (
        [(CUDA_EP, {"cudnn_conv_algo_search": search})] if CUDA_EP in platform.ort_providers else []
    )
    if tier == "cuda":
        return path, cuda + cpu
    if tier == "engine":
        if model is None or not has_engine(model):
            raise EngineError(f"{path.name}: gazecam builds no TensorRT engine for it")
        key = engine_key(model, path, platform, settings.trt_precision, profiles)
        return check_engine(models.models_dir, key), [TRT_EP]
    cache = models.models_dir / EP_CACHE_DIR / (model or path.stem)
    options: dict[str, Any] = {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
        # INT8 needs a calibrated (Q/DQ) graph: that is the engine tier's; the EP runs FP16
        # where it does not break the model.
        "trt_fp16_enable": settings.trt_precision != "fp32" and model not in FP16_BREAKS,
    }
    if any(not p.fixed for p in profiles):
        options |= {
            "trt_profile_min_shapes": _profile_option(profiles, "min_shape"),
            "trt_profile_opt_shapes": _profile_option(profiles, "opt_shape"),
            "trt_profile_max_shapes": _profile_option(profiles, "max_shape"),
        }
    return path, [(TRT_EP, options), *cuda, *cpu]


def open_session(
    path: Path,
    model: str | None,
    settings: PerceptionSettings,
    models: ModelSettings | None = None,
    platform: Platform | None = None,
    create: Callable[..., Any] | None = None,
    cpu_path: Path | None = None,
) -> Any:
    """A session for a model file on the best tier available (see the module's docstring);
    ModelError where not even the CPU can load it. ``cpu_path``: the file the CPU tier loads
    instead (a graph quantized for the CPU). ``platform`` and ``create`` (the
    ``InferenceSession`` class) are this machine's unless given (a test's fakes)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.onnx_threads
    # Idle worker threads sleep instead of spinning: the models run one after another, and a
    # session's spinning threads would take the cores from the next one (on 2 cores here, a
    # 448 crop took 60-160 ms with spinning, 35 ms without).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session, choice = _open(
        path,
        model,
        settings,
        models or ModelSettings(),
        platform or this_platform(),
        functools.partial(create or ort.InferenceSession, sess_options=options),
        cpu_path,
    )
    _record(choice)
    return session


class _Planned:
    """What ``plan`` opens instead of a session: the providers it was given."""

    def __init__(self, target: str, providers: list[Any]) -> None:
        self.providers = [p if isinstance(p, str) else p[0] for p in providers]

    def get_providers(self) -> list[str]:
        return self.providers


def plan(
    path: Path,
    model: str | None,
    settings: PerceptionSettings,
    models: ModelSettings | None = None,
    platform: Platform | None = None,
) -> ProviderChoice:
    """The tier a model's session would get, without loading the model (``gazecam models
    list``): the same checks as ``open_session`` but a provider failing to start."""
    planned = _open(
        path,
        model,
        settings,
        models or ModelSettings(),
        platform or this_platform(),
        lambda target, providers: _Planned(target, providers),
        None,
    )
    return planned[1]


def _open(
    path: Path,
    model: str | None,
    settings: PerceptionSettings,
    models: ModelSettings,
    platform: Platform,
    create: Callable[..., Any],
    cpu_path: Path | None,
) -> tuple[Any, ProviderChoice]:
    """The session of the best tier that starts, and the choice made."""
    skipped: list[tuple[str, str]] = []
    for tier in parse_tiers(settings.onnx_providers):
        why = unavailable(tier, platform)
        if why is None:
            try:
                target, providers = _providers(
                    tier, path, model, settings, models, platform, cpu_path
                )
                session = create(str(target), providers=providers)
            except EngineError as exc:
                why = str(exc)
            # ONNX Runtime's own errors (InvalidProtobuf, NoSuchFile, ...) derive from Exception.
            except Exception as exc:
                if tier == "cpu":
                    raise ModelError(
                        f"{cpu_path or path}: ONNX Runtime cannot load it ({first_line(exc)})"
                    ) from exc
                why = f"ONNX Runtime could not start it ({first_line(exc)})"
            else:
                actual = tuple(session.get_providers())
                real = next((t for t in TIERS[1:] if actual and PROVIDER_OF[t] == actual[0]), "cpu")
                if tier == "engine" and real == "tensorrt":
                    real = "engine"
                if real != tier:
                    skipped.append((tier, f"ONNX Runtime started {actual[0]} instead"))
                return session, ProviderChoice(model or path.stem, real, actual, tuple(skipped))
        skipped.append((tier, why))
    raise AssertionError("unreachable: the cpu tier either returns or raises")


def _record(choice: ProviderChoice) -> None:
    """Keep the choice, and log its fallbacks once per process (the same reasons for several
    models: once)."""
    with _lock:
        _choices[choice.model] = choice
        if not choice.skipped:
            return
        line = f"vision model sessions on {choice.summary()}"
        if line in _logged:
            return
        _logged.add(line)
    log.warning("%s", line)


def choices() -> dict[str, ProviderChoice]:
    """The provider choice of each model whose session this process opened, by model."""
    with _lock:
        return dict(_choices)


def plan_lines(settings: PerceptionSettings, models: ModelSettings) -> list[str]:
    """``gazecam models list``'s lines: the tier each vision model in use would run on (a model
    not fetched or converted yet: said so, nothing fetched or converted here)."""
    from gazecam.models import is_conversion, model_path
    from gazecam.perception.classifier import CONVERTED_NAME, FORMAT_VERSION, MODEL_NAME
    from gazecam.trt.build import in_use

    lines = []
    for name in in_use(settings):
        if name == MODEL_NAME:
            folders = [f / CONVERTED_NAME for f in (*models.model_path, models.models_dir)]
            found = [f / "model.onnx" for f in folders if is_conversion(f, FORMAT_VERSION)]
            path = found[0] if found else None
        else:
            try:
                path = model_path(name, models)
            except ModelError:
                path = None
        where = "not fetched" if path is None else plan(path, name, settings, models).summary()
        lines.append(f"providers: {name} -> {where}")
    return lines
