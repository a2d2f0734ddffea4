"""A plain numpy llama forward over the weights of a converted model, for checking the graph.

It reads the ONNX initializers back and dequantises them independently of the converter's
packing code, and takes an explicit attention mask, so it can compute "dense" references with
any block structure (e.g. regions that see only the context).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import numpy_helper

F32 = NDArray[np.float32]


@dataclass
class Output:
    """What a reference forward computes."""

    logits: F32  # [S, V]
    keys: list[F32]  # per layer, RoPE'd: [kv_heads, S, 64]
    probe: F32  # the probe layer's RoPE'd queries: [heads, S, 64]


@dataclass
class Reference:
    """Dequantised fp32 weights and the architecture numbers of a converted model."""

    config: dict[str, float]
    tensors: dict[str, NDArray[np.generic]]

    @classmethod
    def load(cls, model_dir: Path) -> Reference:
        """Load model.onnx's initializers (external data included) and config.json."""
        model = onnx.load(str(model_dir / "model.onnx"))
        tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        return cls(json.loads((model_dir / "config.json").read_text()), tensors)

    def linear(self, name: str) -> F32:
        """The [N, K] fp32 matrix of a MatMulNBits 4-bit linear + its block offsets."""
        packed = self.tensors[f"{name}.q4"]  # [N, K/32, 16]
        q = np.empty((*packed.shape[:2], 32), np.float32)
        q[..., 0::2], q[..., 1::2] = packed & 15, packed >> 4
        scales = self.tensors[f"{name}.scales"].reshape(packed.shape[:2])
        offsets = self.tensors[f"{name}.offsets"].T  # [N, K/32]
        w = scales[..., None] * (q - 8) + offsets[..., None]
        return w.reshape(packed.shape[0], -1).astype(np.float32)

    def embedding(self) -> F32:
        """The [V, hidden] fp32 table (also the tied head)."""
        table = self.tensors["embed.q8"].astype(np.float32) - 128  # [V, hidden/32, 32]
        scales = self.tensors["embed.scales"].reshape(table.shape[:2])
        return (table * scales[..., None]).reshape(table.shape[0], -1)

    def forward(
        self,
        ids: list[int] | F32,
        positions: list[int],
        mask: NDArray[np.bool_],
        rope_pairs: Literal["adjacent", "halves"] = "adjacent",
    ) -> Output:
        """Run the model on ids (or their embeddings [S, hidden]) at positions; mask[i, j]:
        token i sees token j.

        ``rope_pairs``: RoPE rotates dims (2i, 2i + 1) as llama.cpp's GGUF layout needs, or
        (i, i + 32) as HF's layout does (a wrong choice for GGUF weights).
        """
        c = self.config
        heads, kv_heads, hd = int(c["heads"]), int(c["kv_heads"]), int(c["head_dim"])
        eps = c["rms_eps"]
        x = self.embedding()[np.asarray(ids)] if isinstance(ids, list) else ids
        pos = np.asarray(positions, np.float64)[:, None]
        angles = pos * c["rope_base"] ** (-np.arange(0, hd, 2) / hd)  # [S, 32]
        cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)

        def rms(v: F32, w: NDArray[np.generic]) -> F32:
            return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * w

        pairs = (slice(0, hd, 2), slice(1, hd, 2))
        if rope_pairs == "halves":
            pairs = (slice(0, hd // 2), slice(hd // 2, hd))

        def rope(v: F32) -> F32:  # [S, heads, 64]
            out = np.empty_like(v)
            first, second = v[..., pairs[0]], v[..., pairs[1]]
            out[..., pairs[0]] = first * cos[:, None] - second * sin[:, None]
            out[..., pairs[1]] = first * sin[:, None] + second * cos[:, None]
            return out

        keys, probe = [], np.zeros(0, np.float32)
        s = len(ids)
        for i in range(int(c["layers"])):
            p = f"blk.{i}"
            h = rms(x, self.tensors[f"{p}.attn_norm"])
            qkv = h @ self.linear(f"{p}.qkv").T
            q = rope(qkv[:, : heads * hd].reshape(s, heads, hd))
            k = rope(qkv[:, heads * hd : (heads + kv_heads) * hd].reshape(s, kv_heads, hd))
            v = qkv[:, (heads + kv_heads) * hd :].reshape(s, kv_heads, hd)
            keys.append(k.transpose(1, 0, 2))
            if i == int(c["probe_layer"]):
                probe = q.transpose(1, 0, 2)
            group = heads // kv_heads
            out = np.empty((s, heads, hd), np.float32)
            for head in range(heads):
                scores = q[:, head] @ k[:, head // group].T / np.sqrt(hd)
                scores = np.where(mask, scores, -np.inf)
                weights = np.exp(scores - scores.max(-1, keepdims=True))
                out[:, head] = (weights / weights.sum(-1, keepdims=True)) @ v[:, head // group]
            x = x + out.reshape(s, -1) @ self.linear(f"{p}.o").T
            h = rms(x, self.tensors[f"{p}.ffn_norm"])
            gate, up = np.split(h @ self.linear(f"{p}.gate_up").T, 2, axis=-1)
            x = x + (gate / (1 + np.exp(-gate)) * up) @ self.linear(f"{p}.down").T
        head = self.embedding()  # tied
        return Output(rms(x, self.tensors["output_norm"]) @ head.T, keys, probe)
