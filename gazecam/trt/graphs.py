"""The ONNX graphs TensorRT builds from, prepared on the CPU: FP16 (weights and activations,
inputs and outputs kept fp32) and INT8 Q/DQ (explicit quantization, calibrated on the model's own
inputs from crops of a recording), and which precision each model's graph gets.

TensorRT 11.x takes precision from the graph only (strongly typed); 10.x gets the fp32 graph and
the FP16 flag, and the same Q/DQ graph with the INT8 flag (``build.builder_flags``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from gazecam.trt import EngineError, Precision

QDQ_MIN_OPSET = 13
GraphPrecision = Literal["fp32", "fp16", "int8"]
# Measured on the demo's crops on the CPU (tests/trt/test_precision.py): PP-OCR's detector
# converted to FP16 gives a probability map off by up to 1.0 (11% of the pixels above the
# text threshold instead of 1.6%), so it stays fp32; its Q/DQ graph read the same text on
# every crop, YOLOX's kept the detections on 5 of 12 crops, the recogniser's read nothing.
FP16_BREAKS = frozenset({"ppocr-det"})
INT8_KEEPS = frozenset({"ppocr-det"})
Feeds = list[dict[str, Any]]  # a model's calibration inputs: one {input name: array} per run


def graph_precision(model: str, precision: Precision, calibrated: bool) -> GraphPrecision:
    """The precision a model's graph is built at for a requested precision: 'int8' quantizes
    every model, 'best' only those whose Q/DQ graph keeps its results (with calibration
    inputs), and FP16 is skipped where it breaks the model (``FP16_BREAKS``)."""
    if precision == "int8" or (precision == "best" and calibrated and model in INT8_KEEPS):
        return "int8"
    if precision == "fp32" or model in FP16_BREAKS:
        return "fp32"
    return "fp16"


def to_fp16(onnx_path: Path, out: Path) -> Path:
    """The model with fp16 weights and activations, its inputs and outputs still fp32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True), str(out))
    return out


def to_qdq(onnx_path: Path, feeds: Feeds, out: Path) -> Path:
    """The model quantized to INT8 Q/DQ form on calibration inputs, as TensorRT takes it:
    symmetric int8 activations and per-channel weights (TensorRT has no zero points)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):  # type: ignore[misc]  # untyped base class
        def __init__(self) -> None:
            self.feeds = iter(feeds)

        def get_next(self) -> dict[str, Any] | None:
            return next(self.feeds, None)

    if not feeds:
        raise EngineError(f"{onnx_path.name}: no calibration inputs (the source gave no crops)")
    import onnx
    from onnx.version_converter import convert_version

    model = onnx.load(str(onnx_path))
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < QDQ_MIN_OPSET:  # per-channel DequantizeLinear (its axis) came with opset 13
        onnx_path = out.with_name(f"opset{QDQ_MIN_OPSET}.onnx")
        onnx.save(convert_version(model, QDQ_MIN_OPSET), str(onnx_path))
    quantize_static(
        str(onnx_path),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
        # Q/DQ at the inputs of convolutions and matrix products only, as TensorRT places
        # them: quantizing YOLOX's concatenated output (box sizes and probabilities on one
        # scale) lost every detection on the demo's crops.
        op_types_to_quantize=["Conv", "MatMul", "Gemm"],
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    return out


def network_onnx(
    onnx_path: Path, graph: GraphPrecision, typed: bool, feeds: Feeds | None, tmp: Path
) -> Path:
    """The ONNX graph TensorRT parses: Q/DQ for int8, FP16 for a strongly typed fp16 build,
    else the model itself."""
    if graph == "int8":
        return to_qdq(onnx_path, feeds or [], tmp / "qdq.onnx")
    if typed and graph == "fp16":
        return to_fp16(onnx_path, tmp / "fp16.onnx")
    return onnx_path
