"""The converter: exact weight repacking, and the ONNX graph against a numpy llama forward."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize
from onnx import TensorProto, helper

from engines.llama_graph import Linear, _Graph, pack_q41, q41_from_gguf, q80_from_gguf
from gazecam.llm.tokenizer import ChatTokenizer
from tests.conftest import gguf_path
from tests.llm.reference import Reference


def run_linear(mat: Linear, x: np.ndarray) -> np.ndarray:
    """x [1, T, K] through the converter's linear (MatMulNBits, + block offsets for Q4_1), fp32."""
    g = _Graph()
    y = g.linear("x", "w", [mat], accuracy_level=0)
    n, k = mat.d.shape[0], mat.d.shape[1] * 32
    graph = helper.make_graph(
        g.nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", k])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, "T", n])],
        g.inits,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, ir_version=10, opset_imports=opsets)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


@pytest.mark.parametrize("source", ["random", "gguf"])
def test_q41_repacking_equals_gguf_dequantize(source: str) -> None:
    if source == "gguf":
        tensor = {t.name: t for t in GGUFReader(gguf_path()).tensors}["blk.0.ffn_down.weight"]
        raw = np.asarray(tensor.data)
    else:  # gguf's own Q4_1 quantisation of random weights, with constant rows (d = 0)
        w = np.random.default_rng(0).normal(0, 0.1, (96, 256)).astype(np.float32)
        w[:3] = 0.25
        raw = quantize(w, GGMLQuantizationType.Q4_1)
    expected = dequantize(raw, GGMLQuantizationType.Q4_1)  # [N, K]
    packed, scales, offsets = pack_q41([q41_from_gguf(raw)])
    # Unpack MatMulNBits' layout by hand: byte i of a block holds elements 2i (low), 2i+1.
    q = np.empty((*packed.shape[:2], 32), np.float32)
    q[..., 0::2], q[..., 1::2] = packed & 15, packed >> 4
    w = scales.reshape(packed.shape[:2])[..., None] * (q - 8) + offsets.T[..., None]
    np.testing.assert_allclose(w.reshape(expected.shape), expected, rtol=0, atol=1e-6)
    # And through ONNX Runtime (fp32 sums of up to 1,536 products: 1e-4).
    x = np.random.default_rng(1).normal(size=(1, 5, expected.shape[1])).astype(np.float32)
    np.testing.assert_allclose(
        run_linear(q41_from_gguf(raw), x)[0], x[0] @ expected.T, rtol=1e-4, atol=1e-4
    )


def test_q80_linear_equals_gguf_dequantize() -> None:
    """An 8-bit linear (SmolVLM's ``--bits 8``): q + 128 at zero point 128, no offsets."""
    w = np.random.default_rng(2).normal(0, 0.1, (96, 256)).astype(np.float32)
    raw = quantize(w, GGMLQuantizationType.Q8_0)
    expected = dequantize(raw, GGMLQuantizationType.Q8_0)
    x = np.random.default_rng(3).normal(size=(1, 5, 256)).astype(np.float32)
    y = run_linear(q80_from_gguf(raw), x)[0]
    np.testing.assert_allclose(y, x[0] @ expected.T, rtol=1e-4, atol=1e-4)


def test_graph_matches_numpy_reference(tiny_dir: Path) -> None:
    ref = Reference.load(tiny_dir)
    session = ort.InferenceSession(str(tiny_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    ids = rng.integers(0, int(ref.config["vocab"]), 12).tolist()
    pos = list(range(100, 112))  # not from 0: positions come from position_ids, not from P
    # Block mask: 0-3 context, 4-7 and 8-9 two regions that see only the context, 10-11 all.
    mask = np.tril(np.ones((12, 12), bool))
    mask[8:10, 4:8] = False
    expected = ref.forward(ids, pos, mask)
    emb = ref.embedding()  # the runtime looks tokens up in the same Q8_0 table
    names = [o.name for o in session.get_outputs()]
    past_names = [f"past_{kind}_{i}" for i in range(2) for kind in ("key", "value")]

    def run(lo: int, hi: int, *attend: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Tokens lo..hi-1, attending to the new entries of earlier runs."""
        embeds = emb[np.asarray(ids[lo:hi])][None]
        feed = {"inputs_embeds": embeds, "position_ids": np.array([pos[lo:hi]])}
        for name in past_names:
            present = [out[name.replace("past", "present")] for out in attend]
            feed[name] = np.concatenate([np.zeros((1, 1, 0, 64), np.float32), *present], axis=2)
        past = feed["past_key_0"].shape[2]
        feed["past_length"] = np.array([past], np.int64)
        out = dict(zip(names, session.run(None, feed), strict=True))
        # Fed exact arrays, present is the past then the new entries: keep the new ones.
        return {k: v[:, :, past:] if k.startswith("present") else v for k, v in out.items()}

    context = run(0, 4)
    a, b = run(4, 8, context), run(8, 10, context)
    question = run(10, 12, context, a, b)
    assert question["logits"].shape == (1, 1, ref.config["vocab"])
    np.testing.assert_allclose(question["logits"][0, 0], expected.logits[-1], atol=1e-5)
    np.testing.assert_allclose(b["present_key_1"][0], expected.keys[1][:, 8:10], atol=1e-5)
    np.testing.assert_allclose(b["probe_query"][0], expected.probe[:, 8:10], atol=1e-5)


def test_rope_rotates_adjacent_pairs_for_gguf_weights(real_dir: Path) -> None:
    """llama.cpp permuted HF's q/k rows: with the weights as stored, pairs are (2i, 2i+1)."""
    ref = Reference.load(real_dir)
    tokenizer = ChatTokenizer.load(real_dir / "tokenizer.json")
    ids = tokenizer.encode("The capital of France is Paris. The capital of Italy is Rome.")
    causal = np.tril(np.ones((len(ids), len(ids)), bool))

    def nll(pairs: Literal["adjacent", "halves"]) -> float:
        logits = ref.forward(ids, list(range(len(ids))), causal, pairs).logits.astype(np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        return float(-np.mean([logp[i, ids[i + 1]] for i in range(len(ids) - 1)]))

    assert nll("adjacent") < nll("halves") - 0.5
