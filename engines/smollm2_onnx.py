"""SmolLM2 (llama architecture) GGUF → an ONNX decoder for ONNX Runtime, without torch.

``convert(gguf_path, out_dir)`` writes ``model.onnx`` (+ ``model.onnx.data``),
``embed_tokens.npz`` (the token embedding, looked up by the runtime), ``tokenizer.json`` and
``config.json``; ``build_random(...)`` writes the same graph with random weights (tiny models
for architecture tests). The runtime is ``gazecam.llm``.

The graph and its interface: ``engines.llama_graph``. Weights stay exactly as the GGUF has them
(Q4_1 linear layers, the tied Q8_0 embedding as the head).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import quantize
from numpy.typing import NDArray
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tqdm import tqdm

from engines.llama_graph import (
    F32,
    Q41,
    Arch,
    Layer,
    Weights,
    q41_from_gguf,
    q80_from_gguf,
    save,
)
from gazecam.models import ModelError, progress

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_FORMAT = "chatml"  # <|im_start|>role\n…<|im_end|>, as the runtime's prompts are written


def make_tokenizer(tokens: list[str], merges: list[str], special: list[str]) -> Tokenizer:
    """A byte-level BPE tokenizer as HF's for SmolLM2 ("smollm" pre-tokenizer: digits split)."""
    bpe = models.BPE(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=[(left, right) for left, right in (m.split(" ", 1) for m in merges)],
    )
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(special)
    return tokenizer


def read_gguf(path: Path, accuracy_level: int = 4) -> tuple[Weights, Tokenizer]:
    """Weights and tokenizer of a llama-architecture GGUF (Q4_1 blocks, tied Q8_0 embedding)."""
    reader = GGUFReader(path)

    def field(name: str) -> Any:
        if name not in reader.fields:
            raise ModelError(f"{path}: GGUF has no field {name}")
        return reader.fields[name].contents()

    if field("general.architecture") != "llama":
        raise ModelError(f"{path}: architecture {field('general.architecture')!r}, not llama")
    tensors = {t.name: t for t in reader.tensors}

    def raw(name: str, kind: GGMLQuantizationType) -> NDArray[np.uint8]:
        if name not in tensors or tensors[name].tensor_type != kind:
            raise ModelError(f"{path}: tensor {name} is missing or not {kind.name}")
        return np.asarray(tensors[name].data)

    def norm(name: str) -> F32:
        return raw(name, GGMLQuantizationType.F32).astype(np.float32)

    def q41(name: str) -> Q41:
        return q41_from_gguf(raw(name, GGMLQuantizationType.Q4_1))

    hidden, heads = int(field("llama.embedding_length")), int(field("llama.attention.head_count"))
    arch = Arch(
        layers=int(field("llama.block_count")),
        hidden=hidden,
        heads=heads,
        kv_heads=int(field("llama.attention.head_count_kv")),
        ffn=int(field("llama.feed_forward_length")),
        vocab=int(field("llama.vocab_size")),
        rope_base=float(field("llama.rope.freq_base")),
        rms_eps=float(field("llama.attention.layer_norm_rms_epsilon")),
        max_positions=int(field("llama.context_length")),
        head_dim=hidden // heads,
        probe_layer=int(field("llama.block_count")) // 2,
        accuracy_level=accuracy_level,
    )
    if "output.weight" in tensors or arch.head_dim != int(field("llama.rope.dimension_count")):
        raise ModelError(f"{path}: only tied embeddings and full-width RoPE are supported")
    layers = [
        Layer(
            norm(f"blk.{i}.attn_norm.weight"),
            norm(f"blk.{i}.ffn_norm.weight"),
            *(q41(f"blk.{i}.{n}.weight") for n in ("attn_q", "attn_k", "attn_v", "attn_output")),
            *(q41(f"blk.{i}.{n}.weight") for n in ("ffn_gate", "ffn_up", "ffn_down")),
        )
        for i in range(arch.layers)
    ]
    embedding = q80_from_gguf(raw("token_embd.weight", GGMLQuantizationType.Q8_0))
    weights = Weights(arch, embedding, layers, norm("output_norm.weight"))
    tokens = [str(t) for t in field("tokenizer.ggml.tokens")]
    types = list(field("tokenizer.ggml.token_type"))
    control = [t for t, kind in zip(tokens, types, strict=True) if kind == 3]  # 3: CONTROL
    merges = [str(m) for m in field("tokenizer.ggml.merges")]
    return weights, make_tokenizer(tokens, merges, control)


def convert(gguf_path: Path, out_dir: Path, accuracy_level: int = 4) -> Path:
    """Convert a SmolLM2 GGUF into out_dir (model.onnx, tokenizer.json, config.json).

    Its two stages (reading the GGUF, building and writing the graph; a few seconds each) are
    shown as a progress bar on stderr, or one line where stderr is not a terminal.
    """
    size = tqdm.format_sizeof(gguf_path.stat().st_size, "B")
    with progress(f"converting {gguf_path.name} ({size}) to ONNX", total=2, unit="stage") as bar:
        bar.set_postfix_str("reading the GGUF")
        weights, tokenizer = read_gguf(gguf_path, accuracy_level)
        bar.update()
        bar.set_postfix_str("writing the ONNX graph")
        model = save(weights, tokenizer.to_str(), out_dir, config(gguf_path.name))
        bar.update()
        written = sum(f.stat().st_size for f in out_dir.iterdir())
        bar.set_postfix_str(f"wrote {out_dir.name} ({tqdm.format_sizeof(written, 'B')})")
    return model


def build_random(
    out_dir: Path,
    layers: int = 2,
    hidden: int = 128,
    heads: int = 2,
    kv_heads: int = 1,
    ffn: int = 256,
    seed: int = 0,
    max_positions: int = 2048,
) -> Path:
    """A RANDOM-weight model (same graph, byte-level tokenizer, fp32 compute) for fast tests."""
    rng = np.random.default_rng(seed)
    tokens = list(SPECIAL_TOKENS) + sorted(pre_tokenizers.ByteLevel.alphabet())
    arch = Arch(
        layers, hidden, heads, kv_heads, ffn, len(tokens), 10000.0, 1e-5, max_positions,
        head_dim=hidden // heads, probe_layer=layers // 2, accuracy_level=0,
    )  # fmt: skip

    def mat(n: int, k: int) -> Q41:  # quantised by gguf itself, parsed as a GGUF's tensors
        w = rng.normal(0, 0.08, (n, k)).astype(np.float32)
        return q41_from_gguf(quantize(w, GGMLQuantizationType.Q4_1))

    def norm() -> F32:
        return (1 + 0.1 * rng.normal(size=hidden)).astype(np.float32)

    kv = kv_heads * arch.head_dim
    blocks = [
        Layer(norm(), norm(), mat(hidden, hidden), mat(kv, hidden), mat(kv, hidden),
              mat(hidden, hidden), mat(ffn, hidden), mat(ffn, hidden), mat(hidden, ffn))
        for _ in range(layers)
    ]  # fmt: skip
    table = rng.normal(0, 0.1, (len(tokens), hidden)).astype(np.float32)
    embedding = q80_from_gguf(quantize(table, GGMLQuantizationType.Q8_0))
    weights = Weights(arch, embedding, blocks, norm())
    tokenizer = make_tokenizer(tokens, [], list(SPECIAL_TOKENS))
    return save(weights, tokenizer.to_str(), out_dir, config("random"))


def config(source: str) -> dict[str, Any]:
    """config.json's fields beside the architecture's."""
    return {"source": source, "chat_format": CHAT_FORMAT}
