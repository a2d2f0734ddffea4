"""Parity prompts for the real SmolLM2-135M, and their greedy answers recorded as goldens.

Changes to the decoder runtime or to the converted graph (I/O binding, KV layout, weight
format) must keep the greedy answers to these prompts identical, token for token:
``tests/llm/test_parity.py`` checks them against ``data/parity_golden.json``, which this module
writes when run as a script:

    PYTHONPATH=$PWD .venv/bin/python -m tests.llm.parity [--out tests/llm/data/parity_golden.json]

It converts the GGUF from the models cache afresh (as ``tests/conftest.py``'s ``real_dir``
does) and records the commit it was made with. Rewrite the goldens only on purpose (a change
that is meant to change the answers), and say why in the commit.

The cases: a context, region lines with gaze priors (none, a few, and 40 lines of about 20
tokens as ``benchmarks/bench_llm.py`` builds them), a question, and k regions attended per
step (4, or None: dense), greedy, at most 40 tokens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gazecam.llm import GenerationStats, LanguageModel, LLMSettings
from gazecam.llm.converted import converted_model_dir
from gazecam.models import ModelSettings, model_path

GOLDEN = Path(__file__).parent / "data" / "parity_golden.json"
MAX_TOKENS = 40
Region = tuple[str, str, float]  # id, line, gaze prior (0..1)

HELPFUL = "You are a helpful assistant."
PUMP = (
    "You are the assistant in a technician's smart glasses. Answer in one short sentence. "
    "Task: service the pump. The wearer is on step 3 of 6: tighten the flange bolts."
)
FUSE = "The wearer is replacing a fuse. What the wearer sees:"
MANUAL = (
    "You are the assistant in a technician's smart glasses. The task card: 1. Switch off the "
    "main breaker and lock it. 2. Open the cover of panel B with the 8 mm key. 3. Check the "
    "fuse F3 (15 A) and replace it if it is blown. 4. Tighten the terminal screws to 2.5 Nm. "
    "5. Close the cover and remove the lock. 6. Switch the breaker on and check that the "
    "green lamp lights. The wearer is on step 4. Answer in one or two short sentences, and "
    "name the label you read when the question is about what the wearer sees."
)
WORDS = [
    *("CHECK", "FUSE", "TORQUE", "BOLT", "VALVE", "PUMP", "OUTLET", "INLET", "PRESSURE"),
    *("WARNING", "CAUTION", "HOT", "MAX", "MIN", "FLANGE", "SEAL", "FILTER", "DRAIN", "VENT"),
    *("RESET", "POWER", "MOTOR", "COVER", "PANEL"),
]
FUSE_REGIONS: tuple[Region, ...] = (
    ("exit", "- text 'EXIT', 300 px from the gaze point", 0.1),
    ("cup", "- a cup, 250 px from the gaze point", 0.2),
    ("fuse", "- text 'FUSE F3 15A', 200 px from the gaze point", 0.4),
    ("laptop", "- a laptop, 350 px from the gaze point", 0.0),
    ("door", "- text 'DOOR 12B', 320 px from the gaze point", 0.1),
    ("chair", "- a chair, 500 px from the gaze point", 0.0),
)


def label_regions(count: int, seed: int) -> tuple[Region, ...]:
    """Region lines as the memory writes them (about 20 tokens each, as bench_llm.py's), with a
    gaze prior that falls with the distance from the gaze point."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        label = " ".join(rng.choice(WORDS, 2)) + f" {rng.integers(1, 99)}"
        distance_px = int(rng.integers(0, 500))
        line = f"- text '{label}', {distance_px} px from the gaze point"
        out.append((f"r{i}", line, round(max(0.0, 1 - distance_px / 250), 2)))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Case:
    """One parity prompt."""

    name: str
    context: str
    regions: tuple[Region, ...]
    question: str
    k: int | None  # regions attended per step; None: all (dense)


TORQUE = "Which label says how tight the bolt has to be?"
BENCH_REGIONS = label_regions(40, seed=0)
MANUAL_REGIONS = label_regions(12, seed=1)
CASES = (
    Case("france", HELPFUL, (), "What is the capital of France?", None),
    Case("cats", HELPFUL, (), "Write two sentences about cats.", 4),
    Case("fuse_top4", FUSE, FUSE_REGIONS, "Which fuse rating is written?", 4),
    Case("fuse_dense", FUSE, FUSE_REGIONS, "Which fuse rating is written?", None),
    Case("bench40_top4", PUMP, BENCH_REGIONS, TORQUE, 4),
    Case("bench40_dense", PUMP, BENCH_REGIONS, TORQUE, None),
    Case("bench40_list_top4", PUMP, BENCH_REGIONS, "List every label you see, one per line.", 4),
    Case("manual12_top4", MANUAL, MANUAL_REGIONS, "What do I do now, and which label matters?", 4),
)  # fmt: skip


def greedy(lm: LanguageModel, case: Case) -> dict[str, Any]:
    """The greedy answer to a case from a cleared memory (cleared again after): its text and
    token ids."""
    lm.clear_memory()
    lm.set_context(case.context)
    for region_id, line, prior in case.regions:
        lm.add_region(region_id, line, prior)
    try:
        items = list(
            lm.generate(
                case.question,
                top_k_regions=case.k,
                max_tokens=MAX_TOKENS,
                temperature=0,
            )
        )
    finally:
        lm.clear_memory()  # the model may be shared with other tests
    stats = items.pop()
    assert isinstance(stats, GenerationStats)
    text = "".join(str(p) for p in items)
    return {"text": text, "ids": stats.token_ids, "stop_reason": stats.stop_reason}


def record(out: Path) -> None:
    """Write the goldens of the runtime as it is checked out (its commit recorded) to out."""
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "gazecam", "engines"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        gguf = model_path("smollm2-135m-gguf")
        models = ModelSettings(models_dir=Path(tmp), model_path=[gguf.parent])
        model_dir = converted_model_dir(LLMSettings(), models)
        lm = LanguageModel(LLMSettings(llm_model_dir=model_dir))
        answers = {case.name: greedy(lm, case) for case in CASES}
        config = lm.config
    import onnxruntime as ort

    golden = {
        "commit": commit + ("-dirty" if dirty else ""),
        "onnxruntime": ort.__version__,
        "model": gguf.name,
        "weight_format": config.get("weight_format", "q4_1"),  # before it was recorded: Q4_1
        "max_tokens": MAX_TOKENS,
        "answers": answers,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(golden, indent=1) + "\n")
    for name, a in answers.items():
        print(f"{name}: {len(a['ids'])} tokens ({a['stop_reason']}): {a['text']!r}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Record the parity goldens of today's runtime.")
    ap.add_argument("--out", type=Path, default=GOLDEN)
    record(ap.parse_args().out)
