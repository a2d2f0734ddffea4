"""gazecam's decoder against llama.cpp and onnxruntime-genai on the same weights and token ids.

    .venv/bin/python benchmarks/bench_peers.py [--rounds 18] [--out report.json]

The SmolLM2-135M-Instruct Q4_1 GGUF that gazecam converts is also what llama.cpp runs, and
what onnxruntime-genai's builder re-quantizes to int4 (block 32) after a dequantization to F32
(``peers_worker.py prepare``). The peers live in their own virtual environment, made on the
first run under ``~/.cache/gazecam/bench-peers`` (``--peers-dir``): llama-cpp-python built with
``GGML_NATIVE=OFF`` (the native build crashes on these CPUs) and onnxruntime-genai with what its
builder needs. Each peer runs in a long-lived worker process (``peers_worker.py serve``), so
that the rounds interleave without reloading. Every engine runs on 2 threads.

Workloads, on the token ids gazecam's tokenizer and templates make:

1. Ask with memory: a 158-token context and 40 regions (866 entries) in memory, a 27-token
   question, 40 tokens decoded. gazecam keeps the regions as its KV groups (top-4 and dense);
   the peers keep the same ids as one causal prefix in their KV cache, evaluated once, and roll
   back to it before each question. TTFT, and decoding in tokens/s.
2. 1,051 tokens prefilled cold: gazecam's ``set_context`` of a text new to it; the peers from
   an empty cache.
3. A 16-token prompt, 128 tokens decoded.

Every engine decodes exactly the tokens asked for, end-of-sequence ignored (gazecam: its stop
ids cleared while the benchmark runs). One warm-up round, then ``--rounds`` rounds; each runs
every engine once per workload, in a new random order each round (seeded), 0.1 s apart.
Medians, with the 10th and 90th percentiles.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import IO, Any

import numpy as np
import onnxruntime as ort
from bench_llm import QUESTION, region_lines  # benchmarks/bench_llm.py: the same memory
from common import machine_info, pct, write_report  # benchmarks/common.py

from gazecam.llm import GenerationStats, LanguageModel, LLMSettings
from gazecam.llm.tokenizer import region_prompt
from gazecam.models import ModelSettings, model_path

HERE = Path(__file__).resolve().parent
THREADS = 2
SETTLE_S = 0.1  # a pause before each run
PEERS = {"llama": "llama.cpp", "genai": "onnxruntime-genai"}
PEER_PACKAGES = [
    ["llama-cpp-python==0.3.36"],  # built from source: CMAKE_ARGS below
    ["onnxruntime-genai==0.18.0", "onnx", "onnx-ir", "torch==2.13.0", "transformers", "gguf"],
]
CONTEXT = (
    "You are the assistant in a technician's smart glasses. Answer in one short sentence and "
    "name the label you mean. Task: service the coolant pump P-3 in hall B. Steps: 1. Switch "
    "the pump off at panel 4 and lock the isolator. 2. Close the inlet and outlet valves. "
    "3. Tighten the flange bolts crosswise to the torque on the label. 4. Check the seal for "
    "leaks. 5. Open the valves slowly. 6. Switch the pump on and check that the gauge reads "
    "between 2 and 4 bar. The wearer is on step 3 of 6. Safety: the housing can be hot, wear "
    "gloves. Say so when a warning label is in view."
)
LOG_LINE = "Pump P-{i} checked: flange bolts at {nm} Nm, seal dry, pressure {bar} bar, no alarm."
SHORT_QUESTION = "Describe Rome"  # with the shortest context: a 16-token prompt
ASK_TOKENS, SHORT_TOKENS = 40, 128


def ensure_peers(peers_dir: Path) -> tuple[Path, Path]:
    """The peers' Python and onnxruntime-genai's model dir, made once (minutes)."""
    python = peers_dir / "venv" / "bin" / "python"
    marker = peers_dir / "venv" / "bench-peers.json"
    if not marker.exists() or json.loads(marker.read_text()) != PEER_PACKAGES:
        print(f"installing the peers into {python.parent.parent} (once; the build takes long)")
        subprocess.run([sys.executable, "-m", "venv", str(peers_dir / "venv")], check=True)
        # Shared cores: the llama.cpp build runs at the lowest priority.
        env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=OFF"}
        for packages in PEER_PACKAGES:
            pip = ["nice", "-n", "19", str(python), "-m", "pip", "install", *packages]
            subprocess.run(pip, check=True, env=env)
        marker.write_text(json.dumps(PEER_PACKAGES))
    genai_dir = peers_dir / "genai-int4"
    if not (genai_dir / "genai_config.json").exists():
        gguf = model_path("smollm2-135m-gguf")
        tokenizer = converted_dir() / "tokenizer.json"
        log = peers_dir / "prepare.log"
        print(f"building onnxruntime-genai's int4 model into {genai_dir} (log: {log})")
        with log.open("w") as f:
            cmd = [str(python), str(HERE / "peers_worker.py"), "prepare", str(gguf), str(tokenizer)]
            subprocess.run([*cmd, str(genai_dir)], check=True, stdout=f, stderr=f)
    return python, genai_dir


def converted_dir() -> Path:
    """gazecam's converted model (its tokenizer.json is the GGUF's tokenizer)."""
    from gazecam.llm.converted import converted_model_dir

    return converted_model_dir(LLMSettings(), ModelSettings())


class Peer:
    """A peer engine in its worker process: one JSON request, one JSON reply."""

    def __init__(self, python: Path, kind: str, model: Path, log: IO[str]) -> None:
        cmd = [str(python), str(HERE / "peers_worker.py"), "serve", kind, str(model)]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True
        )
        self._reply()  # {"ready": true} once its model is loaded

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"peer worker {self.proc.args!r} ended (rc {self.proc.wait()})")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class Gazecam:
    """Two LanguageModels: one keeps the ask workload's memory, one serves the others."""

    def __init__(self) -> None:
        settings = LLMSettings(llm_threads=THREADS)
        self.memory, self.plain = LanguageModel(settings), LanguageModel(settings)
        for lm in (self.memory, self.plain):
            lm.tokenizer.stop_ids = frozenset()  # decode every token asked for
        self.memory.set_context(CONTEXT)
        for region_id, text, prior in region_lines(40):
            self.memory.add_region(region_id, text, prior)

    def close(self) -> None:
        for lm in (self.memory, self.plain):
            tok = lm.tokenizer
            tok.stop_ids = frozenset(tok.special_id(t) for t in lm.chat.stop)

    def ids(self, prompt: Any) -> list[int]:
        return self.memory.tokenizer.encode_prompt(prompt)

    def ask(self, lm: LanguageModel, question: str, k: int | None, tokens: int) -> dict[str, Any]:
        items = list(lm.generate(question, top_k_regions=k, max_tokens=tokens, temperature=0))
        stats = items[-1]
        assert isinstance(stats, GenerationStats) and stats.generated_tokens == tokens
        text = "".join(x for x in items[:-1] if isinstance(x, str))
        return {"ttft_ms": stats.ttft_ms, "decode_tokens_s": 1e3 / stats.tpot_ms, "text": text}


class Workloads:
    """The three workloads' token ids, and one run of each on each engine."""

    def __init__(self, gz: Gazecam, peers: dict[str, Peer]) -> None:
        self.gz, self.peers = gz, peers
        chat = gz.memory.chat
        regions = [gz.ids(region_prompt(text)) for _, text, _ in region_lines(40)]
        self.prefix = gz.ids(chat.context(CONTEXT)) + [i for r in regions for i in r]
        self.question = gz.ids(chat.question(QUESTION))
        self.short = gz.ids(chat.context("")) + gz.ids(chat.question(SHORT_QUESTION))
        self.sizes = {
            "context_tokens": len(gz.ids(chat.context(CONTEXT))),
            "regions": len(regions),
            "region_entries": sum(len(r) for r in regions),
            "question_tokens": len(self.question),
            "prefill_tokens": len(self.document_ids(0)),
            "short_prompt_tokens": len(self.short),
        }
        for peer in peers.values():
            peer.call({"op": "set_prefix", "ids": self.prefix})

    @staticmethod
    def document(round_: int) -> str:
        """A log of 1,051 tokens with the template, new to gazecam's context cache each round."""
        lines = [f"Maintenance log of the coolant pumps in hall B, copy {round_ + 1:04d} of 9."]
        rng = np.random.default_rng(0)
        for i in range(37):
            nm, bar = rng.integers(10, 99), rng.integers(1, 9)
            lines.append(LOG_LINE.format(i=i, nm=nm, bar=bar))
        return " ".join(lines)

    def document_ids(self, round_: int) -> list[int]:
        return self.gz.ids(self.gz.memory.chat.context(self.document(round_)))

    def run(self, workload: str, engine: str, round_: int) -> dict[str, Any]:
        gz, peer = self.gz, self.peers.get(engine)
        if workload == "ask":
            if peer is not None:
                request = {"op": "ask", "keep": len(self.prefix), "ids": self.question}
                return peer.call({**request, "max_tokens": ASK_TOKENS})
            k = 4 if engine == "gazecam_sparse" else None
            return gz.ask(gz.memory, QUESTION, k, ASK_TOKENS)
        if workload == "prefill":
            ids = self.document_ids(round_)
            if peer is not None:
                ms = peer.call({"op": "prefill", "ids": ids})["ms"]
            else:
                t0 = time.perf_counter()
                gz.plain.set_context(self.document(round_))
                ms = (time.perf_counter() - t0) * 1e3
            return {"tokens_s": len(ids) / ms * 1e3}
        if peer is not None:
            return peer.call({"op": "generate", "ids": self.short, "max_tokens": SHORT_TOKENS})
        gz.plain.set_context("")
        return gz.ask(gz.plain, SHORT_QUESTION, None, SHORT_TOKENS)


ROWS = [  # (label, workload, metric, unit, higher is better)
    ("ask with memory: TTFT", "ask", "ttft_ms", "ms", False),
    ("ask with memory: decode 40 tokens", "ask", "decode_tokens_s", "tok/s", True),
    ("1,051 tokens prefilled cold", "prefill", "tokens_s", "tok/s", True),
    ("16-token prompt, 128 tokens decoded", "short", "decode_tokens_s", "tok/s", True),
]
COLUMNS = {"gazecam_sparse": "gazecam sparse (k=4)", "gazecam_dense": "gazecam dense"}
COLUMNS |= {"llama": "llama.cpp (2 threads)", "genai": "onnxruntime-genai int4 (2 threads)"}


def engines_of(workload: str) -> list[str]:
    """Engines per workload: without regions gazecam has one mode, shown as sparse."""
    gazecam = ["gazecam_sparse", "gazecam_dense"] if workload == "ask" else ["gazecam_sparse"]
    return [*gazecam, *PEERS]


def measure(w: Workloads, rounds: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A warm-up round, then ``rounds`` interleaved rounds: the samples, and the warm-up's
    texts (peers' tokens decoded with gazecam's tokenizer) to compare the engines' answers."""
    samples: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    texts: dict[str, dict[str, str]] = defaultdict(dict)
    order = np.random.default_rng(0)
    for round_ in range(-1, rounds):
        for workload in ("ask", "prefill", "short"):
            # A new order each round, not a rotation: a rotation keeps each engine's
            # predecessor, and a peer's threads spin on for a while after its run, which
            # slowed whichever engine always came next (gazecam sparse's TTFT by ~20 ms).
            for engine in order.permutation(engines_of(workload)).tolist():
                time.sleep(SETTLE_S)  # the last run's spinning threads go to sleep
                result = w.run(workload, engine, round_)
                if round_ < 0:
                    if "tokens" in result:  # a peer's answer, in gazecam's words
                        result["text"] = w.gz.memory.tokenizer.decode(result["tokens"])
                    if "text" in result:
                        texts[workload][engine] = result["text"]
                    continue
                for metric, value in result.items():
                    if isinstance(value, float):
                        samples[f"{workload}.{metric}"][engine].append(value)
        if round_ >= 0:
            print(f"  round {round_ + 1}/{rounds} done")
    return samples, texts


def summarize(samples: dict[str, Any]) -> dict[str, Any]:
    """Per row: each engine's p10/p50/p90, and gazecam's ratios to each peer (on the p50)."""
    table: dict[str, Any] = {}
    for label, workload, metric, unit, higher in ROWS:
        values = {
            e: pct(samples[f"{workload}.{metric}"][e], 10, 50, 90) for e in engines_of(workload)
        }
        ratios = {
            f"{gz}/{peer}": values[gz]["p50"] / values[peer]["p50"]
            for gz in values
            if gz.startswith("gazecam")
            for peer in PEERS
        }
        table[label] = {"unit": unit, "higher_is_better": higher, "engines": values}
        table[label]["ratios"] = ratios
    return table


def print_table(table: dict[str, Any]) -> None:
    """The issue's table (medians, p10–p90 in brackets), then gazecam / peer per row."""
    pairs = [(g, p) for g in ("gazecam_sparse", "gazecam_dense") for p in PEERS]
    print("\n| workload | " + " | ".join(COLUMNS.values()) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for label, row in table.items():
        unit, engines = row["unit"], row["engines"]
        cells = [
            f"{p['p50']:.0f} {unit} ({p['p10']:.0f}–{p['p90']:.0f})" if (p := engines.get(e))
            else "—"
            for e in COLUMNS
        ]  # fmt: skip
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("\nratios gazecam / peer on the medians (TTFT: lower is better; tok/s: higher)")
    print("| workload | " + " | ".join(f"{COLUMNS[g]} / {PEERS[p]}" for g, p in pairs) + " |")
    print("|---" * (len(pairs) + 1) + "|")
    for label, row in table.items():
        ratios = [row["ratios"].get(f"{g}/{p}") for g, p in pairs]
        cells = ["—" if r is None else f"{r:.2f}×" for r in ratios]
        print(f"| {label} | " + " | ".join(cells) + " |")


def targets(table: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The issue's targets on this run's ratios (gazecam sparse / peer, on the medians)."""
    ttft, ask, prefill, short = (table[row[0]]["ratios"] for row in ROWS)
    checks = {  # name: (ratio, bound, whether the ratio must be at least the bound)
        "ask decode vs onnxruntime-genai": (ask["gazecam_sparse/genai"], 1.2, True),
        "ask decode vs llama.cpp": (ask["gazecam_sparse/llama"], 1.5, True),
        "ask TTFT vs onnxruntime-genai": (ttft["gazecam_sparse/genai"], 1.0, False),
        "short decode vs onnxruntime-genai": (short["gazecam_sparse/genai"], 1.0, True),
        "cold prefill vs onnxruntime-genai": (prefill["gazecam_sparse/genai"], 1.0, True),
        "cold prefill vs llama.cpp": (prefill["gazecam_sparse/llama"], 1.0, True),
    }
    return {
        name: {"ratio": r, "bound": b, "at_least": up, "met": r >= b if up else r <= b}
        for name, (r, b, up) in checks.items()
    }


def common_chars(a: str, b: str) -> int:
    """Length of the longest common prefix of two texts."""
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=18, help="timed rounds (after one warm-up)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/gazecam-bench/peers.json"))
    ap.add_argument(
        "--peers-dir", type=Path, default=Path.home() / ".cache" / "gazecam" / "bench-peers"
    )
    args = ap.parse_args()
    started = time.perf_counter()
    python, genai_dir = ensure_peers(args.peers_dir)
    gz = Gazecam()
    peers: dict[str, Peer] = {}
    log_path = args.peers_dir / "workers.log"
    try:
        with log_path.open("w") as log:
            peers["llama"] = Peer(python, "llama", model_path("smollm2-135m-gguf"), log)
            peers["genai"] = Peer(python, "genai", genai_dir, log)
            w = Workloads(gz, peers)
            print(f"workloads: {w.sizes}; {args.rounds} rounds after a warm-up")
            samples, texts = measure(w, args.rounds)
            info = {name: peer.call({"op": "info"}) for name, peer in peers.items()}
    finally:
        for peer in peers.values():
            peer.close()
        gz.close()
    table = summarize(samples)
    gazecam_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report: dict[str, Any] = {
        "machine": machine_info(
            threads=THREADS,
            onnxruntime=ort.__version__,
            gazecam_spinning=gz.memory.settings.llm_thread_spinning,
            peers=info,
        ),
        "rounds": args.rounds,
        "workloads": w.sizes,
        "table": table,
        "peak_rss_mb": {"gazecam (both instances)": gazecam_rss_mb}
        | {name: i["peak_rss_mb"] for name, i in info.items()},
        "warmup_texts": texts,
        "samples": samples,
    }
    m = report["machine"]
    print(f"\n{m['cpu']}, {m['usable_cores']} usable cores, {THREADS} threads per engine")
    print_table(table)
    report["targets"] = targets(table)
    for name, t in report["targets"].items():
        bound = f"{'≥' if t['at_least'] else '≤'} {t['bound']}"
        print(f"  target {name}: {t['ratio']:.2f}× ({bound}) {'met' if t['met'] else 'missed'}")
    print("peak RSS MB: " + ", ".join(f"{k} {v:.0f}" for k, v in report["peak_rss_mb"].items()))
    print("greedy answers of the warm-up round: characters in common with gazecam's")
    for workload, by_engine in texts.items():
        # Dense attends to everything, as the peers do (sparse attends to less).
        reference = by_engine.get("gazecam_dense", by_engine["gazecam_sparse"])
        common = {e: common_chars(text, reference) for e, text in by_engine.items()}
        print(f"  {workload} ({len(reference)} characters): {common}")
    write_report(report, args.out, started)


if __name__ == "__main__":
    main()
