"""``gazecam bench --engine remote --clients N,...``: simulated wearers against one server.

The recording is replayed once through capture and perception (the box's own work, which
this bench does not measure); each simulated wearer then has its own Assistant and
RemoteModel (its own session: context, regions, crops) and walks the keyframes from its own
starting point, one fixation onset after another, asking at evenly spaced onsets and waiting
for each answer, as a wearer would. All wearers of a run ask at once, in threads, against the
one server. Per client count the report gives answers/s, TTFT p50/p99 and lost answers (asks
that got no remote answer: there is no fallback here, and the first-token budget is the
request timeout, so that a busy server shows up as latency, not as fallbacks).

The remote engine's overhead: with one wearer, each ask's request is sent again straight to
the server (the same body, one streaming HTTP request, the first content chunk timed), each
timed request after the same predecessor (see ``overhead``).
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gazecam.assist.assistant import Answer, Assistant, load_engines, load_task
from gazecam.bench.report import percentiles, write_json
from gazecam.capture.pipeline import CaptureResult, capture
from gazecam.errors import ConfigError, GazecamError
from gazecam.llm.remote import RemoteModel
from gazecam.llm.settings import LLMSettings
from gazecam.models import ModelSettings
from gazecam.perception.classifier import ImageClassifier
from gazecam.records import Crop, Percept
from gazecam.settings import CaptureSettings, SourceSettings
from gazecam.sources import open_source

QUESTIONS = ("What step am I on?", "What should I do now?", "What's next?", "What am I looking at?")


class RecordedPerception:
    """Perception of the recording's keyframes, found once, looked up by frame."""

    def __init__(self, percepts: dict[int, Percept], classifier: ImageClassifier | None) -> None:
        self.percepts = percepts
        self.classifier = classifier  # embeds the task card's photos for each wearer's tracker

    def perceive(self, crop: Crop) -> Percept:
        """What perception found in this keyframe's crop during the replay."""
        return self.percepts[crop.matched.frame.timestamp_ns]


@dataclass
class Wearer:
    """One simulated wearer: its session, its keyframes in order, and what its asks got."""

    assistant: Assistant
    keyframes: list[Crop]
    asks: int
    ttft_ms: list[float] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)

    def run(self) -> None:
        """Walk the keyframes; ask at ``asks`` evenly spaced ones and wait for each answer."""
        stride = max(1, len(self.keyframes) // self.asks)
        for i, crop in enumerate(self.keyframes):
            self.assistant.observe_keyframe(crop)
            if i % stride or len(self.ttft_ms) + len(self.lost) == self.asks:
                continue
            try:
                answer = [a for a in self.assistant.ask(QUESTIONS[i % 4]) if isinstance(a, Answer)]
                self.ttft_ms.append(answer[0].timings.ttft_ms)
            except GazecamError as exc:
                self.lost.append(str(exc))


async def keyframes(address: str, thumbnail_px: int) -> list[Crop]:
    """The recording's keyframe crops (with the thumbnail the remote engine sends)."""
    source = open_source(address, SourceSettings(pace="fast"))
    info = await source.open()
    try:
        settings = CaptureSettings().with_thumbnail(thumbnail_px)
        return [
            r.crop
            async for r in capture(source, info, settings)
            if isinstance(r, CaptureResult) and r.crop is not None
        ]
    finally:
        await source.close()


def direct_ttft_ms(model: RemoteModel, body: dict[str, Any]) -> float:
    """One streaming request with ``body`` straight to the server: ms to the first content."""
    import httpx

    started = time.perf_counter()
    with httpx.stream(
        "POST", f"{model.url}/chat/completions", json=body, timeout=model.settings.remote_timeout_s
    ) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if '"content":' in line and '"content": ""' not in line and '"content":""' not in line:
                return (time.perf_counter() - started) * 1e3
    raise ConfigError(f"bench: {model.url} sent no content to a direct request")


def overhead(wearer: Wearer, asks: int) -> dict[str, Any]:
    """The remote engine's TTFT against a direct request with the same body, per ask.

    A server may reuse the previous request's prompt prefix (llama-cpp-python's server keeps
    one), so each timed request, remote or direct, follows the previous ask's body: after
    each ask the previous body is sent again (untimed), then the ask's own body (timed).
    """
    model = wearer.assistant.model
    assert isinstance(model, RemoteModel)
    for crop in wearer.keyframes[: len(wearer.keyframes) // 2]:
        wearer.assistant.observe_keyframe(crop)
    remote: list[float] = []
    direct: list[float] = []
    previous: dict[str, Any] | None = None
    for i in range(asks + 1):  # the first ask only sets ``previous``
        answer = [a for a in wearer.assistant.ask(QUESTIONS[i % 4]) if isinstance(a, Answer)]
        body = model.last_body
        assert body is not None
        if previous is not None:
            remote.append(answer[0].timings.ttft_ms)
            direct_ttft_ms(model, previous)
            direct.append(direct_ttft_ms(model, body))
        previous = body
    remote_ms, direct_ms = statistics.median(remote), statistics.median(direct)
    return {
        "remote_ttft_ms": percentiles(remote),
        "direct_ttft_ms": percentiles(direct),
        "overhead_pct": round((remote_ms - direct_ms) / direct_ms * 100, 1),
    }


def run(
    address: str,
    task: str,
    clients: list[int],
    asks: int,
    out: Path,
    llm: LLMSettings,
    models: ModelSettings,
) -> dict[str, Any]:
    """Run the bench for each client count; write and print the report."""
    # Every answer is waited for: a slow one counts as latency, a failed one as lost.
    llm = llm.model_copy(
        update={"remote_budget_ms": llm.remote_timeout_s * 1e3, "remote_fallback": False}
    )
    engines = load_engines(llm, models)
    assert isinstance(engines.model, RemoteModel)
    local, card = engines.model.local, load_task(task)
    crops = asyncio.run(keyframes(address, engines.model.thumbnail_px))
    if not crops:
        raise ConfigError(f"bench: {address} has no keyframes")
    perception = RecordedPerception(
        {c.matched.frame.timestamp_ns: engines.perception.perceive(c) for c in crops},
        engines.perception.classifier,
    )

    def wearer(i: int, n: int) -> Wearer:
        start = i * len(crops) // n  # each wearer somewhere else in the procedure
        model = RemoteModel(local, llm, fallback=False)
        return Wearer(Assistant(card, perception, model), crops[start:] + crops[:start], asks)

    runs: dict[str, Any] = {}
    for n in clients:
        wearers = [wearer(i, n) for i in range(n)]
        threads = [
            threading.Thread(target=w.run, name=f"wearer-{i}") for i, w in enumerate(wearers)
        ]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall_s = time.perf_counter() - started
        ttft = [t for w in wearers for t in w.ttft_ms]
        lost = [e for w in wearers for e in w.lost]
        runs[str(n)] = {
            "answers": len(ttft),
            "lost": len(lost),
            "lost_reasons": sorted(set(lost))[:5],
            "wall_s": round(wall_s, 2),
            "answers_per_s": round(len(ttft) / wall_s, 3),
            "ttft_ms": percentiles(ttft),
        }
        print(
            f"{n:3} wearers: {len(ttft):4} answers, {len(lost)} lost, "
            f"{runs[str(n)]['answers_per_s']:.2f} answers/s, TTFT p50/p99 "
            + ("-" if not ttft else f"{runs[str(n)]['ttft_ms']['p50']:.0f}/"
               f"{runs[str(n)]['ttft_ms']['p99']:.0f} ms")
        )  # fmt: skip
        for reason in runs[str(n)]["lost_reasons"]:
            print(f"    lost: {reason}")
    base = runs[str(clients[0])]["answers_per_s"]
    report = {
        "server": engines.model.url,
        "model": engines.model.served_model(),
        "images": engines.model.settings.remote_images,
        "asks_per_wearer": asks,
        "keyframes": len(crops),
        "clients": runs,
        "speedup_vs_first": {n: round(r["answers_per_s"] / base, 2) for n, r in runs.items()},
        "overhead": overhead(wearer(0, 1), asks),
    }
    print(f"remote engine overhead over a direct request: {report['overhead']}")
    write_json(out, report)
    print(f"wrote {out}")
    return report
