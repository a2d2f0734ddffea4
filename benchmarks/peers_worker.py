"""The peer engines of ``bench_peers.py``; runs inside the peers' own virtual environment.

    venv/bin/python peers_worker.py prepare GGUF TOKENIZER_JSON OUT_DIR   # int4 model for genai
    venv/bin/python peers_worker.py serve llama|genai MODEL                # JSON lines on stdio

``prepare`` builds onnxruntime-genai's model from the same Q4_1 GGUF as the others: its builder
reads only float GGUFs, so the GGUF is dequantized to F32 first (metadata and tokenizer kept),
a Hugging Face config is written from its metadata (the builder reads config and tokenizer from
``-m``) and the builder re-quantizes to int4, block 32, for the CPU.

``serve`` loads one engine once and answers one JSON request per line on stdin with one JSON
line on stdout, so that the benchmark interleaves engines without reloading them. Token ids
come in and go out; greedy; end-of-sequence is ignored (llama.cpp: our own argmax loop;
genai: ``min_length`` = ``max_length``), so every engine decodes exactly the tokens asked for.
Two KV caches per engine: ``memory`` keeps the ask workload's prefix between rounds (each
ask rolls back to it), ``scratch`` serves the cold prefill and the short decode.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

THREADS = 2
MAX_LENGTH = 2048  # positions per KV cache: the longest workload is ~1,100


class Engine(Protocol):
    def reset(self, slot: str, keep: int) -> None: ...
    def prefill(self, slot: str, ids: list[int]) -> None: ...
    def next_token(self, slot: str) -> int: ...


class LlamaEngine:
    """llama-cpp-python's ``eval``; the KV cache is truncated to ``n_tokens`` at the next one."""

    def __init__(self, model: str) -> None:
        import llama_cpp

        kw: dict[str, Any] = dict(n_ctx=MAX_LENGTH, n_threads=THREADS, n_threads_batch=THREADS)
        # The GGUF is memory-mapped, so the two contexts share one copy of the weights.
        self.slots = {s: llama_cpp.Llama(model, verbose=False, **kw) for s in ("memory", "scratch")}
        self.get_logits = llama_cpp.llama_get_logits_ith
        self.vocab = self.slots["memory"].n_vocab()
        self.chosen: dict[str, int] = {}  # per slot: the token chosen last, not yet evaluated
        self.info = {"n_batch": self.slots["memory"].n_batch, "threads": THREADS}

    def reset(self, slot: str, keep: int) -> None:
        # eval() removes the cache entries past n_tokens before it appends.
        self.slots[slot].n_tokens = keep
        self.chosen.pop(slot, None)

    def prefill(self, slot: str, ids: list[int]) -> None:
        self.slots[slot].eval(ids)

    def next_token(self, slot: str) -> int:
        # As genai's generate_next_token: first the model on the token chosen last (none after
        # a prefill), then the choice; so the first token costs no decoding step.
        llm = self.slots[slot]
        if slot in self.chosen:
            llm.eval([self.chosen[slot]])
        # The last evaluated token's logits, read in place (Llama.scores holds them only with
        # logits_all, which would compute every prompt position's).
        logits = np.ctypeslib.as_array(self.get_logits(llm.ctx, -1), shape=(self.vocab,))
        self.chosen[slot] = int(np.argmax(logits))
        return self.chosen[slot]


class GenaiEngine:
    """onnxruntime-genai: one model, one ``Generator`` (and its KV cache) per slot."""

    def __init__(self, model: str) -> None:
        import onnxruntime_genai as og

        config = og.Config(model)
        options = {"intra_op_num_threads": THREADS, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.og, self.model = og, og.Model(config)
        self.slots = {s: self._generator() for s in ("memory", "scratch")}
        self.info = {"threads": THREADS, "version": og.__version__}

    def _generator(self) -> Any:
        params = self.og.GeneratorParams(self.model)
        # min_length = max_length: end-of-sequence is never chosen, as in the other loops.
        params.set_search_options(do_sample=False, max_length=MAX_LENGTH, min_length=MAX_LENGTH)
        return self.og.Generator(self.model, params)

    def reset(self, slot: str, keep: int) -> None:
        if keep == 0:  # a fresh cache, as a user's new request gets
            self.slots[slot] = self._generator()
        else:
            self.slots[slot].rewind_to(keep)

    def prefill(self, slot: str, ids: list[int]) -> None:
        self.slots[slot].append_tokens(ids)  # runs the model: the logits of the last token

    def next_token(self, slot: str) -> int:
        # generate_next_token first runs the model on the token chosen last (none after a
        # prefill), then chooses.
        gen = self.slots[slot]
        gen.generate_next_token()
        return int(gen.get_next_tokens()[0])


def handle(engine: Engine, req: dict[str, Any]) -> dict[str, Any]:
    """One request: ``set_prefix`` (memory slot), ``ask`` (memory slot, rolled back to the
    prefix), ``generate`` and ``prefill`` (scratch slot, from an empty cache)."""
    op = req["op"]
    if op == "set_prefix":
        engine.reset("memory", 0)
        t0 = time.perf_counter()
        engine.prefill("memory", req["ids"])
        return {"ms": (time.perf_counter() - t0) * 1e3}
    if op == "prefill":
        engine.reset("scratch", 0)
        t0 = time.perf_counter()
        engine.prefill("scratch", req["ids"])
        return {"ms": (time.perf_counter() - t0) * 1e3}
    if op in ("ask", "generate"):
        slot = "memory" if op == "ask" else "scratch"
        engine.reset(slot, req["keep"] if op == "ask" else 0)
        t0 = time.perf_counter()
        engine.prefill(slot, req["ids"])
        tokens = [engine.next_token(slot)]
        t_first = time.perf_counter()
        while len(tokens) < req["max_tokens"]:
            tokens.append(engine.next_token(slot))
        t_last = time.perf_counter()
        return {
            "ttft_ms": (t_first - t0) * 1e3,
            "decode_tokens_s": (len(tokens) - 1) / (t_last - t_first),
            "tokens": tokens,
        }
    if op == "info":
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {**getattr(engine, "info", {}), "peak_rss_mb": peak_mb}
    raise ValueError(f"unknown op {op!r}")


def serve(kind: str, model: str) -> None:
    engine: Engine = LlamaEngine(model) if kind == "llama" else GenaiEngine(model)
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but replies on the protocol's stream
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        out.write(json.dumps(handle(engine, json.loads(line))) + "\n")
        out.flush()


def hf_config(reader: Any) -> dict[str, Any]:
    """The Hugging Face config of a llama-architecture GGUF, from its metadata."""

    def value(key: str) -> Any:
        return reader.fields[key].contents()

    arch = value("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r}: only llama is mapped")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": value("llama.embedding_length"),
        "intermediate_size": value("llama.feed_forward_length"),
        "num_hidden_layers": value("llama.block_count"),
        "num_attention_heads": value("llama.attention.head_count"),
        "num_key_value_heads": value("llama.attention.head_count_kv"),
        "head_dim": value("llama.rope.dimension_count"),
        "rms_norm_eps": value("llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": value("llama.rope.freq_base"),
        "max_position_embeddings": value("llama.context_length"),
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data),
        "bos_token_id": value("tokenizer.ggml.bos_token_id"),
        "eos_token_id": value("tokenizer.ggml.eos_token_id"),
        "pad_token_id": value("tokenizer.ggml.padding_token_id"),
        "hidden_act": "silu",
        "tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors),
        "torch_dtype": "float32",
    }


def dequantize_gguf(src: Path, dst: Path) -> dict[str, Any]:
    """Write ``src`` with every tensor in F32 (metadata kept); its Hugging Face config."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, str(reader.fields["general.architecture"].contents()))
    for field in reader.fields.values():
        # GGUF.* are the header's own fields and the writer writes the architecture.
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        kind = field.types[0]
        value = gguf.LlamaFileType.ALL_F32 if field.name == "general.file_type" else None
        writer.add_key_value(
            field.name,
            field.contents() if value is None else int(value),
            kind,
            sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None,
        )
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, data.reshape([int(d) for d in reversed(t.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf_config(reader)


def prepare(gguf_path: Path, tokenizer_json: Path, out_dir: Path) -> None:
    """Build onnxruntime-genai's int4 model of ``gguf_path`` into ``out_dir``."""
    work = out_dir.parent / (out_dir.name + ".work")
    hf_dir = work / "hf"
    hf_dir.mkdir(parents=True, exist_ok=True)
    f32 = work / "model.f32.gguf"
    config = dequantize_gguf(gguf_path, f32)
    (hf_dir / "config.json").write_text(json.dumps(config, indent=2))
    (hf_dir / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    tokens = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens}
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    cmd = [
        sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(hf_dir),
        "-i", str(f32), "-o", str(out_dir), "-p", "int4", "-e", "cpu",
        "-c", str(work / "cache"), "--extra_options", "block_size=32",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "prepare":
        prepare(*(Path(a) for a in sys.argv[2:]))
    elif len(sys.argv) == 4 and sys.argv[1] == "serve" and sys.argv[2] in ("llama", "genai"):
        serve(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__.split("\n\n")[1])


if __name__ == "__main__":
    main()
