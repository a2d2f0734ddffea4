"""The llama-architecture decoder graph for ONNX Runtime (SmolLM2, and SmolVLM's text model).

One builder for both converters: ``engines.smollm2_onnx`` (a GGUF's Q4_1 blocks as they are)
and ``engines.smolvlm_onnx`` (a Hugging Face checkpoint, quantised with gguf's own numpy
quantiser). ``save(...)`` writes ``model.onnx`` (+ ``model.onnx.data``), ``embed_tokens.npz``
(the token embedding, looked up by the runtime), ``tokenizer.json`` and ``config.json``; the
runtime is ``gazecam.llm``.

Graph interface (B = 1; T new tokens; P cached entries chosen by the runtime, any subset, any
order, P may be 0; Hk KV heads of 64):

- inputs: ``inputs_embeds`` float32 [1, T, hidden] (token embeddings, or a vision encoder's
  visual tokens: the same input, so both enter the KV cache alike), ``position_ids`` int64
  [1, T], ``past_length`` int64 [1]: P, and per layer i ``past_key_i`` / ``past_value_i``
  float32 [1, Hk, C, 64], C ≥ P: KV buffers whose first P entries are attended (keys already
  RoPE'd).
- outputs: ``logits`` float32 [1, 1, V] for the LAST new token only (prefill never needs the
  others, and the head is the biggest matmul); ``present_key_i`` / ``present_value_i``: the
  buffers with the new tokens' entries (RoPE'd keys) at P..P+T−1; ``probe_query``
  [1, H, T, 64]: the RoPE'd queries of layer ``probe_layer`` (the middle one), used to score
  cached regions.
- attention: every new token sees the P past entries, and the new tokens causally.

The runtime binds each present buffer to its past buffer (ONNX Runtime I/O binding; C ≥ P + T):
GroupQueryAttention then writes the new entries in place, and nothing else is copied. Fed
plain arrays of exactly P entries instead, present is [1, Hk, P + T, 64]: the past, then the
new entries.

Linear layers are Q4_1 or Q8_0 blocks (``weight_bits`` 4 or 8, one kind per model), used
exactly as given. A Q4_1 block is w = d·q + m (q in 0..15). ONNX Runtime's ``MatMulNBits``
(4 bits, blocks of 32, no zero-point input, so zero point 8) computes d·(q − 8); float zero
points would be exact too but take a slow CPU path (onnxruntime 1.32, accuracy_level 4: 23 ms
instead of 0.1-0.2 ms for one token through a 576 × 3072 matrix), so the rest,
(m + 8d)·Σ_block x, is added by a tiny fp32 MatMul on the block sums of x ("offsets"): exact,
at 4 more nodes per linear (480 of SmolLM2's 883).

Folding m into integer zero points means re-quantising, measured on SmolLM2 (branch h-fold,
commit 6519525): 4-bit zero points (z = round(−m/d) keeping q, least-squares scales, per-block
scale searches) move the weights by 7-8% of their RMS, another quantisation's worth: 0-1 of the
8 parity prompts (``tests/llm/parity.py``) keep their greedy answers and perplexity on prose
rises up to 30%, for about 20% faster decoding. 8-bit blocks with zero points move them by
0.2%, but the m term then sees accuracy_level 4's int8 activations instead of fp32 block sums,
which flips the same near-ties (top-2 margins down to 0.006) as switching to accuracy_level 0
does: 4 of 8 keep their answers, prefill is 12% faster, decoding no faster. So the offsets
stay: greedy answers unchanged outweighs either.
A Q8_0 matrix is an 8-bit ``MatMulNBits`` (q + 128 with the default zero point 128; exact, no
offsets). The output head is Q8_0: the embedding itself (tied, SmolLM2) or its own matrix
(SmolVLM's ``lm_head``); the Q8_0 embedding, saved as it is, is the runtime's lookup table (q·d,
as ``GatherBlockQuantized`` would compute).
``accuracy_level`` 4 lets the CPU kernels quantise the activations to int8 per block, as
llama.cpp does (Q8_1 activations); 0 keeps fp32.
RoPE pairs ADJACENT dims (2i, 2i+1): llama.cpp's converter permutes HF's q/k rows for it, and
``engines.smolvlm_onnx`` does the same.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from gazecam.models import folder_written_atomically

# 2: inputs_embeds instead of input_ids, embed_tokens.npz; 3: past_length and shared KV buffers
FORMAT_VERSION = 3
# The Q8_0 token embedding: q int8 [V, hidden/32, 32], scales float32 [V, hidden/32].
EMBEDDINGS = "embed_tokens.npz"
BLOCK = 32  # elements per quantisation block (Q4_1, Q8_0 and MatMulNBits alike)
F32 = NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Q41:
    """A [N, K] matrix in GGUF Q4_1 form: w[n, 32b + j] = d[n, b]·q[n, b, j] + m[n, b]."""

    d: F32  # [N, K/32]
    m: F32  # [N, K/32]
    q: NDArray[np.uint8]  # [N, K/32, 32], 0..15


@dataclass(frozen=True, slots=True)
class Q80:
    """A [N, K] matrix in GGUF Q8_0 form: w[n, 32b + j] = d[n, b]·q[n, b, j]."""

    d: F32  # [N, K/32]
    q: NDArray[np.int8]  # [N, K/32, 32]


Linear = Q41 | Q80  # one kind for all linear layers of a model (its weight_bits)


@dataclass(frozen=True, slots=True)
class Layer:
    """One transformer block's weights; linear layers are [out, in]."""

    attn_norm: F32
    ffn_norm: F32
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    gate: Linear
    up: Linear
    down: Linear


@dataclass(frozen=True, slots=True)
class Arch:
    """The architecture numbers the graph and the runtime need (written as config.json)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    rope_base: float
    rms_eps: float
    max_positions: int
    head_dim: int = 64
    probe_layer: int = 0
    accuracy_level: int = 4


@dataclass(frozen=True, slots=True)
class Weights:
    """All weights of a llama-architecture model."""

    arch: Arch
    embedding: Q80  # [V, hidden]
    layers: list[Layer]
    output_norm: F32
    head: Q80 | None = None  # [V, hidden]; None: tied, the embedding is the head

    @property
    def weight_bits(self) -> int:
        """4 (Q4_1 linear layers) or 8 (Q8_0)."""
        return 4 if isinstance(self.layers[0].q, Q41) else 8


def q41_from_gguf(raw: NDArray[np.uint8]) -> Q41:
    """Parse GGUF Q4_1 rows [N, K/32·20]: per block f16 d, f16 m, 16 bytes (lo nibble = j < 16)."""
    blocks = raw.reshape(raw.shape[0], -1, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4:20]
    return Q41(d, m, np.concatenate([qs & 15, qs >> 4], axis=-1))


def q80_from_gguf(raw: NDArray[np.uint8]) -> Q80:
    """Parse GGUF Q8_0 rows [N, K/32·34]: per block f16 d, then 32 int8."""
    blocks = raw.reshape(raw.shape[0], -1, 34)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    return Q80(d, blocks[..., 2:].copy().view(np.int8))


def pack_q41(mats: list[Q41]) -> tuple[NDArray[np.uint8], F32, F32]:
    """Stack Q4_1 matrices along N into MatMulNBits form: (B [N, K/32, 16], scales [N·K/32],
    offsets [K/32, N]) with w = scale·(q − 8) + offset[block] (exact but for the fp32 rounding
    of m + 8d: ≤ 1e-6 on SmolLM2).

    B packs element 2i in the low nibble and 2i + 1 in the high nibble of byte i of a block.
    """
    q = np.concatenate([mat.q for mat in mats])
    d = np.concatenate([mat.d for mat in mats])
    m = np.concatenate([mat.m for mat in mats])
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return packed, d.reshape(-1), np.ascontiguousarray((m + 8 * d).T)


class _Graph:
    """A small onnx.helper wrapper: fresh value names, initializers, nodes."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []

    def const(self, name: str, value: NDArray[Any]) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def ints(self, name: str, *values: int) -> str:
        return self.const(name, np.array(values, np.int64))

    def op(
        self, op: str, inputs: list[str], outputs: int | list[str] = 1, **attrs: Any
    ) -> list[str]:
        names = (
            outputs
            if isinstance(outputs, list)
            else [f"{op}_{len(self.nodes)}_{i}" for i in range(outputs)]
        )
        domain = "com.microsoft" if op in _CONTRIB else ""
        self.nodes.append(helper.make_node(op, inputs, names, domain=domain, **attrs))
        return names

    def norm(self, x: str, residual: str | None, weight: str, eps: float) -> tuple[str, str]:
        """RMS norm of x + residual (fused; the first layer has no residual yet) and the sum."""
        if residual is None:
            return self.op("SimplifiedLayerNormalization", [x, weight], epsilon=eps, axis=-1)[0], x
        out, _, _, total = self.op(
            "SkipSimplifiedLayerNormalization", [x, residual, weight], 4, epsilon=eps
        )
        return out, total

    def linear(
        self,
        x: str,
        name: str,
        mats: list[Linear],
        accuracy_level: int,
        output: list[str] | None = None,
    ) -> str:
        """x [1, T, K] → [1, T, N], the matrices stacked along N (all Q4_1 or all Q8_0).

        Q8_0: one 8-bit MatMulNBits (q + 128, zero point 128). Q4_1: MatMulNBits (d·(q − 8)) +
        the block sums of x @ offsets.
        """
        q8 = [m for m in mats if isinstance(m, Q80)]
        q4 = [m for m in mats if isinstance(m, Q41)]
        if q8 and q4:
            raise ValueError(f"{name}: Q4_1 and Q8_0 matrices mixed")
        if q8:
            q = np.concatenate([m.q for m in q8])
            packed = (q.astype(np.int16) + 128).astype(np.uint8)  # [N, K/32, 32]
            scales = np.concatenate([m.d for m in q8]).reshape(-1)
            weights = [self.const(f"{name}.q8", packed), self.const(f"{name}.scales", scales)]
        else:
            packed, scales, offsets = pack_q41(q4)
            weights = [self.const(f"{name}.q4", packed), self.const(f"{name}.scales", scales)]
        n, blocks = packed.shape[0], packed.shape[1]
        (y,) = self.op(
            "MatMulNBits",
            [x, *weights],
            1 if q4 or output is None else output,
            K=blocks * BLOCK,
            N=n,
            bits=8 if q8 else 4,
            block_size=BLOCK,
            accuracy_level=accuracy_level,
        )
        if q8:
            return y
        (xb,) = self.op("Reshape", [x, self.ints(f"{name}.blocks", 0, 0, blocks, BLOCK)])
        (sums,) = self.op(
            "ReduceSum", [xb, self.ints(f"{name}.axis", -1)], keepdims=0
        )  # [1, T, K/32]
        (offset,) = self.op("MatMul", [sums, self.const(f"{name}.offsets", offsets)])  # [1, T, N]
        return self.op("Add", [y, offset], 1 if output is None else output)[0]


_CONTRIB = {
    "MatMulNBits", "SkipSimplifiedLayerNormalization",
    "RotaryEmbedding", "GroupQueryAttention",
}  # fmt: skip


def build_graph(w: Weights) -> onnx.ModelProto:
    """The decoder graph (see the module docstring for its interface)."""
    a, g = w.arch, _Graph()
    acc, hd = a.accuracy_level, a.head_dim
    # Shared: P + T as GroupQueryAttention wants it: an int32 scalar, and [P + T - 1].
    (new_len,) = g.op("Shape", ["inputs_embeds"], start=1, end=2)
    (total_1d,) = g.op("Cast", g.op("Add", ["past_length", new_len]), to=TensorProto.INT32)
    (total,) = g.op("Squeeze", [total_1d])
    (seqlens_k,) = g.op("Sub", [total_1d, g.const("one_i32", np.array([1], np.int32))])
    inv_freq = a.rope_base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    angles = np.arange(a.max_positions, dtype=np.float64)[:, None] * inv_freq  # [max_pos, 32]
    cos = g.const("rope_cos", np.cos(angles).astype(np.float32))
    sin = g.const("rope_sin", np.sin(angles).astype(np.float32))
    to_end = g.ints("to_end", 1 << 62)

    # The embedding lookup happens outside (``embed_tokens.npz``), so that visual tokens enter
    # the same input as text tokens do; the graph holds the table only as the tied head.
    x = "inputs_embeds"
    residual: str | None = None
    for i, layer in enumerate(w.layers):
        p = f"blk.{i}"
        xn, residual = g.norm(x, residual, g.const(f"{p}.attn_norm", layer.attn_norm), a.rms_eps)
        # Packed q|k|v [1, T, (H + 2Hk)·64]; attention applies RoPE to q and k at position_ids.
        qkv = g.linear(xn, f"{p}.qkv", [layer.q, layer.k, layer.v], acc)
        gqa_inputs = [
            qkv,
            "",
            "",
            f"past_key_{i}",
            f"past_value_{i}",
            seqlens_k,
            total,
            cos,
            sin,
            "position_ids",
        ]
        attn = f"{p}.attention"
        g.op(
            "GroupQueryAttention",
            gqa_inputs,
            [attn, f"present_key_{i}", f"present_value_{i}"],
            num_heads=a.heads,
            kv_num_heads=a.kv_heads,
            do_rotary=1,
            rotary_interleaved=1,
        )  # present: the past entries, then the new ones (in place where bound to the past)
        if i == a.probe_layer:  # its queries, RoPE'd as the attention did: [1, H, T, 64]
            (q,) = g.op(
                "Slice",
                [qkv, g.ints("zero", 0), g.ints("q_width", a.heads * hd), g.ints("last_axis", -1)],
            )
            (q,) = g.op(
                "RotaryEmbedding", [q, "position_ids", cos, sin], interleaved=1, num_heads=a.heads
            )
            (q,) = g.op("Reshape", [q, g.ints("heads_shape", 0, 0, a.heads, hd)])
            g.op("Transpose", [q], ["probe_query"], perm=[0, 2, 1, 3])
        x = g.linear(attn, f"{p}.o", [layer.o], acc)
        xn, residual = g.norm(x, residual, g.const(f"{p}.ffn_norm", layer.ffn_norm), a.rms_eps)
        gate_up = g.linear(xn, f"{p}.gate_up", [layer.gate, layer.up], acc)
        gate, up = g.op("Split", [gate_up], 2, axis=-1, num_outputs=2)
        (silu,) = g.op("Mul", [gate, g.op("Sigmoid", [gate])[0]])  # ORT fuses it
        x = g.linear(g.op("Mul", [silu, up])[0], f"{p}.down", [layer.down], acc)
    xn, _ = g.norm(x, residual, g.const("output_norm", w.output_norm), a.rms_eps)
    (last,) = g.op(
        "Slice", [xn, g.ints("minus_one", -1), to_end, g.ints("axis_1", 1)]
    )  # [1, 1, hidden]
    if w.head is None:  # tied: the table [V, hidden/32, 32] is "embed.q8"
        g.linear(last, "embed", [w.embedding], acc, ["logits"])
    else:
        g.linear(last, "head", [w.head], acc, ["logits"])
    return _model(g, a)


def _model(g: _Graph, a: Arch) -> onnx.ModelProto:
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("inputs_embeds", f, [1, "T", a.hidden]),
        helper.make_tensor_value_info("position_ids", i64, [1, "T"]),
        helper.make_tensor_value_info("past_length", i64, [1]),
    ]
    outputs = [helper.make_tensor_value_info("logits", f, [1, 1, a.vocab])]
    for i in range(a.layers):
        for kind in ("key", "value"):
            shape: list[str | int] = [1, a.kv_heads, "C", a.head_dim]
            inputs.append(helper.make_tensor_value_info(f"past_{kind}_{i}", f, shape))
            shape = [1, a.kv_heads, "C_present", a.head_dim]
            outputs.append(helper.make_tensor_value_info(f"present_{kind}_{i}", f, shape))
    outputs.append(helper.make_tensor_value_info("probe_query", f, [1, a.heads, "T", a.head_dim]))
    graph = helper.make_graph(g.nodes, "llama_decoder", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, ir_version=10, opset_imports=opsets, producer_name="gazecam")


def write(weights: Weights, tokenizer_json: str, folder: Path, config: dict[str, Any]) -> None:
    """Write model.onnx (+ .data), embed_tokens.npz, tokenizer.json and config.json into folder.

    config.json holds the Arch fields, ``format_version``, ``weight_bits`` and ``config``.
    """
    onnx.save_model(
        build_graph(weights),
        folder / "model.onnx",
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,
    )
    np.savez(folder / EMBEDDINGS, q=weights.embedding.q, scales=weights.embedding.d)
    (folder / "tokenizer.json").write_text(tokenizer_json)
    fields = {"format_version": FORMAT_VERSION, "weight_bits": weights.weight_bits}
    text = json.dumps({**fields, **config, **asdict(weights.arch)}, indent=2)
    (folder / "config.json").write_text(text + "\n")


def save(weights: Weights, tokenizer_json: str, out_dir: Path, config: dict[str, Any]) -> Path:
    """``write`` into out_dir atomically; returns out_dir / model.onnx.

    The files are written into a hidden temporary folder beside out_dir, which is renamed to
    out_dir last: a failed or interrupted save leaves the earlier out_dir (or none), never a
    partial one.
    """
    with folder_written_atomically(out_dir) as tmp:
        write(weights, tokenizer_json, tmp, config)
    return out_dir / "model.onnx"
