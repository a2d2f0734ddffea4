"""``gazecam engines build``: a TensorRT engine per vision model, built on this device through
the ``tensorrt`` Python API, at the shapes gazecam feeds the model, into the engine cache.

TensorRT 10.x (JetPack 6 has 10.3) builds weakly typed networks: the fp32 ONNX with the FP16
and INT8 builder flags. 11.x (PyPI) builds strongly typed networks only, the precision coming
from the graph: an FP16 ONNX (converted here, inputs and outputs kept fp32) or a Q/DQ ONNX.
INT8 is always explicit quantization (a Q/DQ ONNX from ``onnxruntime.quantization`` on
calibration inputs from a recording): TensorRT 10 deprecated the implicit calibrators and 11
removed them. 'best' quantizes the models whose Q/DQ graph keeps their results and builds the
others FP16 (``graph_precision``); a model that FP16 breaks stays fp32.

A timing cache per TensorRT version and GPU persists in the engine cache, so a rebuild (a new
crop size, another precision) reuses the kernel timings of earlier builds.
"""

from __future__ import annotations

import errno
import importlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from gazecam.errors import ConfigError, MissingDependencyError
from gazecam.models import ModelSettings, cache_temporary, model_path, progress
from gazecam.trt import (
    EngineError,
    Platform,
    Precision,
    probe_platform,
    tensorrt_too_old,
)
from gazecam.trt.cache import (
    ENGINE_DIR,
    VLM_ENCODER,
    EngineKey,
    InputProfile,
    check_engine,
    engine_key,
    engine_paths,
    input_profiles,
    write_engine,
)
from gazecam.trt.graphs import Feeds, GraphPrecision, graph_precision, network_onnx

if TYPE_CHECKING:
    from gazecam.perception import PerceptionSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BuildResult:
    """One model's engine after ``build_engines``: built now, or found up to date."""

    model: str
    precision: Precision
    engine: Path
    size_bytes: int
    build_s: float | None  # None: up to date, not rebuilt
    graph: GraphPrecision | None = None  # the precision its graph was built at, where built now

    def line(self) -> str:
        """The line ``gazecam engines build`` prints for it."""
        size = f"{self.size_bytes / 1e6:.1f} MB"
        if self.build_s is None:
            return f"{self.model}: {self.precision} engine up to date ({size}) {self.engine}"
        took = f"built in {self.build_s:.1f} s"
        if self.graph != self.precision:
            took = f"(its graph {self.graph}) {took}"
        return f"{self.model}: {self.precision} engine {took} ({size}) {self.engine}"


def import_tensorrt() -> ModuleType:
    """The ``tensorrt`` module; MissingDependencyError saying what to install."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:
        raise MissingDependencyError("tensorrt", "trt", "Building TensorRT engines") from exc


def strongly_typed(tensorrt: ModuleType) -> bool:
    """Whether this TensorRT builds strongly typed networks only (11.x); EngineError below 10."""
    version = str(tensorrt.__version__)
    if tensorrt_too_old(version):
        raise EngineError(f"TensorRT {version} is too old: gazecam builds with 10.0 or newer")
    return int(re.findall(r"\d+", version)[0]) >= 11


def builder_flags(tensorrt: ModuleType, graph: GraphPrecision) -> list[Any]:
    """The precision flags of a weakly typed (10.x) build; none for a strongly typed one."""
    if strongly_typed(tensorrt):
        return []
    flag = tensorrt.BuilderFlag
    return {"fp32": [], "fp16": [flag.FP16], "int8": [flag.INT8]}[graph]


def _monitor(tensorrt: ModuleType, bar: Any) -> Any:
    """A TensorRT progress monitor that moves ``bar`` one step per build step."""

    class Monitor(tensorrt.IProgressMonitor):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            tensorrt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            bar.total = (bar.total or 0) + num_steps
            bar.refresh()

        def step_complete(self, phase_name: str, step: int) -> bool:
            bar.update(1)
            return True  # go on building

        def phase_finish(self, phase_name: str) -> None:
            pass

    return Monitor()


def build_serialized(
    tensorrt: ModuleType,
    onnx_path: Path,
    profiles: Sequence[InputProfile],
    graph: GraphPrecision,
    timing_cache: bytes,
    bar: Any,
) -> tuple[bytes, bytes]:
    """The serialized engine of an ONNX graph, and the timing cache after the build."""
    logger = tensorrt.Logger(tensorrt.Logger.WARNING)
    builder = tensorrt.Builder(logger)
    # 10.x: explicit batch is the default; 11.x: strongly typed is the only kind.
    network = builder.create_network(0)
    parser = tensorrt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{onnx_path}: TensorRT cannot parse it ({errors or 'no reason given'})")
    config = builder.create_builder_config()
    for flag in builder_flags(tensorrt, graph):
        config.set_flag(flag)
    config.set_timing_cache(config.create_timing_cache(timing_cache), False)
    dynamic = [p for p in profiles if not p.fixed]
    if dynamic:
        profile = builder.create_optimization_profile()
        for p in dynamic:
            profile.set_shape(p.name, p.min_shape, p.opt_shape, p.max_shape)
        config.add_optimization_profile(profile)
    if hasattr(tensorrt, "IProgressMonitor"):
        config.progress_monitor = _monitor(tensorrt, bar)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"{onnx_path}: TensorRT could not build an engine (see its log above)")
    return bytes(plan), bytes(config.get_timing_cache().serialize())


def epcontext_model(onnx_path: Path, engine_name: str, compute_capability: str) -> bytes:
    """An ONNX model with one EPContext node that runs the engine file ``engine_name`` (beside
    it) on ONNX Runtime's TensorRT EP, with the model's own inputs and outputs."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    node = helper.make_node(
        "EPContext",
        [i.name for i in inputs],
        [o.name for o in graph.output],
        name="EPContext",
        domain="com.microsoft",
        embed_mode=0,  # the engine is a file beside the model, not embedded in it
        ep_cache_context=engine_name,
        hardware_architecture=compute_capability.replace(".", ""),
    )
    wrapper = helper.make_graph([node], f"{onnx_path.stem}-tensorrt", inputs, list(graph.output))
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    # The oldest IR version for the opsets (see engines.efficientnet_onnx): JetPack's
    # onnxruntime reads no newer.
    ir_version = helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    model = helper.make_model(wrapper, ir_version=ir_version, opset_imports=opsets)
    return bytes(model.SerializeToString())


def timing_cache_path(models_dir: Path, platform: Platform) -> Path:
    """The timing cache of this TensorRT version on this GPU."""
    return (
        models_dir
        / ENGINE_DIR
        / f"timing-trt{platform.tensorrt_version}-sm{platform.compute_capability}.cache"
    )


def _write_timing_cache(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        full = " (disk full)" if exc.errno == errno.ENOSPC else ""
        raise EngineError(
            f"{path}: cannot write the timing cache{full}; partial file removed"
        ) from exc


def model_onnx(name: str, models: ModelSettings) -> Path:
    """The ONNX file a vision model runs from (EfficientNet-Lite0 and the vision-language
    engine's encoders: their conversions)."""
    if name == "efficientnet-lite0":
        from gazecam.perception.classifier import converted_model

        return converted_model(models)
    if name.startswith(VLM_ENCODER):
        encoders = vlm_encoders(models)
        if name not in encoders:
            raise ConfigError(
                f"--models: {name} unknown (the installed checkpoint's encoders: "
                f"{', '.join(encoders) or 'none'})"
            )
        return encoders[name]
    return model_path(name, models)


def vlm_encoders(models: ModelSettings) -> dict[str, Path]:
    """The vision-language engine's fp32 encoders by name (one per tile size), where a SmolVLM
    checkpoint is installed (converted to ONNX first where needed); none otherwise."""
    from gazecam.vlm.engine import converted_vlm_dir
    from gazecam.vlm.install import vlm_checkpoint

    checkpoint = vlm_checkpoint(models)
    if checkpoint is None:
        return {}
    folder = converted_vlm_dir(checkpoint, models)
    try:
        tiles = json.loads((folder / "vision.json").read_text())["tiles"]
    except (OSError, ValueError, KeyError) as exc:
        raise EngineError(f"{folder / 'vision.json'}: not readable ({exc})") from exc
    return {f"{VLM_ENCODER}{size}": folder / f"vision_{size}.onnx" for size in tiles}


def build_tools(
    platform: Platform | None = None, tensorrt: ModuleType | None = None
) -> tuple[Platform, ModuleType]:
    """This machine's platform (with the tensorrt package's version) and tensorrt, both checked;
    EngineError without a GPU or with a TensorRT below 10, MissingDependencyError without it."""
    platform = platform or probe_platform()
    if platform.compute_capability is None:
        raise EngineError("no NVIDIA GPU found (nvidia-smi lists none, and this is no Jetson)")
    tensorrt = tensorrt or import_tensorrt()
    strongly_typed(tensorrt)  # too old: refused
    # The installed package's version, whatever the probe found (a fake passes its own).
    version = str(tensorrt.__version__)
    return replace(platform, tensorrt_version=version), tensorrt


def build_engines(
    names: Sequence[str],
    precision: Precision,
    profiles_of: Callable[[str], tuple[InputProfile, ...]],
    models: ModelSettings,
    feeds_of: Callable[[Sequence[str]], dict[str, Feeds]] | None = None,
    platform: Platform | None = None,
    tensorrt: ModuleType | None = None,
) -> list[BuildResult]:
    """Build (or find up to date) the engine of each named model; the results in order.

    ``feeds_of`` gives calibration inputs (int8, best); ``platform`` and ``tensorrt`` are this
    machine's unless given (a test's fake). A stale, foreign or corrupt engine is rebuilt.
    """
    if precision == "int8" and feeds_of is None:
        raise ConfigError("--precision int8 needs calibration crops: give --calibrate SOURCE")
    platform, tensorrt = build_tools(platform, tensorrt)
    typed = strongly_typed(tensorrt)
    results, keys = [], {}
    for name in names:
        onnx_path = model_onnx(name, models)
        keys[name] = (
            onnx_path,
            engine_key(name, onnx_path, platform, precision, profiles_of(name)),
        )
    stale = []
    for name, (_, key) in keys.items():
        try:
            check_engine(models.models_dir, key)
        except EngineError as exc:
            log.info("%s", exc)
            stale.append(name)
        else:
            engine = engine_paths(models.models_dir, name, precision)[0]
            results.append(BuildResult(name, precision, engine, engine.stat().st_size, None))
    feeds = feeds_of(stale) if feeds_of is not None and stale else {}
    cache_file = timing_cache_path(models.models_dir, platform)
    for name in stale:
        onnx_path, key = keys[name]
        results.append(
            _build_one(
                tensorrt, typed, onnx_path, key, feeds.get(name), models.models_dir, cache_file
            )
        )
    order = {name: i for i, name in enumerate(names)}
    return sorted(results, key=lambda r: order[r.model])


def _build_one(
    tensorrt: ModuleType,
    typed: bool,
    onnx_path: Path,
    key: EngineKey,
    feeds: Feeds | None,
    models_dir: Path,
    cache_file: Path,
) -> BuildResult:
    start = time.perf_counter()
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    timing = cache_file.read_bytes() if cache_file.is_file() else b""
    engine = engine_paths(models_dir, key.model, key.precision)[0]
    graph = graph_precision(key.model, key.precision, feeds is not None)
    try:
        with (
            cache_temporary(cache_file.parent, f"{key.model}-onnx") as tmp,  # removed at the end
            progress(f"{key.model}: building {key.precision} engine", unit="step") as bar,
        ):
            parsed = network_onnx(onnx_path, graph, typed, feeds, tmp)
            plan, timing = build_serialized(tensorrt, parsed, key.profiles, graph, timing, bar)
    except OSError as exc:  # writing the FP16 or Q/DQ graph
        what = "disk full" if exc.errno == errno.ENOSPC else f"cannot write ({exc.strerror})"
        raise EngineError(
            f"{cache_file.parent}: {what} while preparing the {key.model} {graph} graph; "
            "partial files removed"
        ) from exc
    _write_timing_cache(cache_file, timing)
    build_s = time.perf_counter() - start
    wrapper = epcontext_model(onnx_path, engine.name, key.compute_capability)
    write_engine(models_dir, key, plan, wrapper, build_s)
    return BuildResult(key.model, key.precision, engine, len(plan), build_s, graph)


def in_use(settings: PerceptionSettings) -> list[str]:
    """The vision models a PerceptionSettings turns on."""
    names = ["ppocr-det", "ppocr-rec"] if settings.ocr_enabled else []
    names += ["yolox-nano"] if settings.detector_enabled else []
    return names + (["efficientnet-lite0"] if settings.classifier_enabled else [])


def runtime_profiles(
    name: str, crop_px: int, settings: PerceptionSettings
) -> tuple[InputProfile, ...]:
    """The input profiles of a model as PerceptionSettings and the crop size feed it."""
    from gazecam.perception.ocr import REC_BATCH

    return input_profiles(name, crop_px, 1 + settings.classifier_detections, REC_BATCH)
