"""``gazecam bench``: the assistant's latency per stage over a replayed recording, per mode.

The recording is replayed once through one ``Capture`` core. At every keyframe (fixation onset)
the frame is decoded once, and each mode cuts its crop from it, perceives it and prefills the
regions found into its own visual memory; at the asks (N spread over the replay, or a schedule
of seconds) every mode answers the same question. The modes interleave keyframe by keyframe,
in rotating order, so a change in a shared machine's load hits them alike and their ratios
hold. They share one perception and one language model (loaded once); each has its own
assistant (step tracker, memory) and its own KV cache, swapped into the model while it runs.

- ``full``: the whole frame, dense attention (every region in memory at every step);
- ``center``: the 448 px centre crop, dense (a system without eye tracking);
- ``gaze``: the 448 px gaze crop, dense;
- ``gaze-sparse``: the gaze crop, attending the language model's top-k regions per step.

The first keyframe warms the models up (each mode perceives it and answers once, untimed).
A recording's ``step.set:N`` events are the ground truth of the step accuracy, so they are
withheld from the assistants (which would otherwise just repeat them); other events are passed
on, as ``gazecam ask`` does. The synthetic demo's truth is its script (``DemoScene.step_at``).
"""

from __future__ import annotations

import asyncio
import copy
import resource
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import CliPositionalArg
from tqdm import tqdm

from gazecam.capture.crop import make_crop
from gazecam.capture.pipeline import Capture, FrameResult
from gazecam.errors import ConfigError
from gazecam.llm.settings import (
    ENGINE_HELP,
    REMOTE_MODEL_HELP,
    REMOTE_URL_HELP,
    VLM_HELP,
    EngineName,
    LLMSettings,
    engine_settings,
)
from gazecam.models import ModelSettings
from gazecam.records import CropMode, MatchedFrame, SourceEvent
from gazecam.settings import CaptureSettings, Pace, SourceSettings
from gazecam.sources import Source, open_source

if TYPE_CHECKING:
    from gazecam.assist.assistant import Assistant
    from gazecam.assist.tasks import TaskCard
    from gazecam.llm.decoder import LanguageModel
    from gazecam.llm.kv import KVCache

Mode = Literal["full", "center", "gaze", "gaze-sparse"]
MODES: tuple[Mode, ...] = get_args(Mode)
# The crop each mode perceives, and whether it attends every region (dense).
MODE_SPECS: dict[Mode, tuple[CropMode, bool]] = {
    "full": ("full", True),
    "center": ("center", True),
    "gaze": ("gaze", True),
    "gaze-sparse": ("gaze", False),
}
# Asked in turn. Each routes to facts (gazecam.assist.answers), whose sentence is the answer's first
# piece (facts_ms: looked up, not generated); the model then continues it, which times the
# decoder (ttft_ms, tpot_ms) as before.
QUESTIONS = ("What step am I on?", "What should I do now?", "What's next?", "What am I looking at?")


class BenchCommand(BaseModel):
    """Measure latency per stage over a replayed recording, per mode; write a JSON report + PNG."""

    source: CliPositionalArg[str] = Field(
        description="A recording or export folder, or synthetic:NAME (e.g. synthetic:demo)."
    )
    out: Path = Field(description="The JSON report; the PNG is written beside it (.png).")
    task: str = Field("demo", description="Task card: a YAML file, or 'demo' (bundled).")
    modes: list[Mode] = Field(
        list(MODES), description="Modes to compare, comma-separated (e.g. full,gaze-sparse)."
    )
    asks: int = Field(12, ge=1, description="Questions per mode, spread evenly over the replay.")
    at: list[float] = Field(
        [], description="Ask at the first keyframe from each of these seconds instead (e.g. 5,20)."
    )
    pace: Pace = Field("fast", description="Replay pacing: fast, or realtime.")
    engine: EngineName | None = Field(
        None, description=f"{ENGINE_HELP} vlm's stages include the vision encoder."
    )
    vlm: Path | None = Field(None, description=VLM_HELP)
    remote_url: str | None = Field(None, description=REMOTE_URL_HELP)
    remote_model: str | None = Field(None, description=REMOTE_MODEL_HELP)
    clients: list[int] = Field(
        [1, 2, 4, 8, 16],
        description="The remote engine: simulated wearers asking at once, one run per count "
        "(comma-separated).",
    )
    providers: str | None = Field(
        None,
        description="Also time the vision models on these provider tiers over the same crops, "
        "comma-separated (engine, tensorrt, cuda, cpu), or auto: each in turn; a tier this "
        "machine lacks is reported as not run, with the reason.",
    )
    check: Path | None = Field(
        None, description="Fail (exit 1) where a ratio between modes regressed from this baseline."
    )
    save_baseline: Path | None = Field(
        None, description="Write this run's ratios as a baseline for --check."
    )

    @field_validator("modes", mode="before")
    @classmethod
    def _known_modes(cls, value: Any) -> Any:
        names = value.split(",") if isinstance(value, str) else value
        unknown = [n for n in names if n not in MODES]
        if unknown or not names:
            raise ValueError(f"{unknown or 'none'} not among {', '.join(MODES)}")
        return list(dict.fromkeys(names))  # in order, once each

    def cli_cmd(self) -> None:
        """Run the command."""
        from gazecam.bench import report as bench_report

        baseline = None
        if self.check is not None:  # a bad baseline fails now, not after minutes of measuring
            baseline = bench_report.load_baseline(self.check)
            bench_report.require_modes(baseline, self.modes, self.check)
        if self.providers is not None:  # a bad tier fails now, not after minutes of measuring
            from gazecam.trt.providers import parse_tiers

            parse_tiers(self.providers)
        schedule = self.at or self.asks
        llm, models = engine_settings(self.engine, self.vlm, self.remote_url, self.remote_model)
        if llm.engine == "remote":
            from gazecam.bench import remote as bench_remote

            bench_remote.run(self.source, self.task, self.clients, self.asks, self.out, llm, models)
            return
        run = asyncio.run(
            run_bench(self.source, self.task, self.modes, schedule, self.pace, llm, models)
        )
        if self.providers is not None:
            from gazecam.bench.providers import bench_providers, format_providers

            run.report["providers"] = bench_providers(self.source, self.providers)
            print(format_providers(run.report["providers"]))
        png = self.out.with_suffix(".png")
        bench_report.draw_png(run.samples, png)
        bench_report.write_json(self.out, run.report)
        print(bench_report.format_table(run.report))
        print(f"wrote {self.out} and {png}")
        if self.save_baseline is not None:
            bench_report.write_json(self.save_baseline, bench_report.baseline_of(run.report))
            print(f"wrote the baseline {self.save_baseline}")
        if baseline is not None:
            table, regressed = bench_report.check(run.report, baseline)
            print(table)
            if regressed:
                raise SystemExit(1)


@dataclass
class ModeRun:
    """One mode's assistant, its KV cache, and what was measured."""

    mode: Mode
    crop_mode: CropMode
    dense: bool
    assistant: Assistant
    cache: KVCache
    samples: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    keyframe_steps: list[tuple[int, int]] = field(default_factory=list)  # (truth, tracker)
    ask_steps: list[tuple[int, int]] = field(default_factory=list)  # (truth, answer)
    answers: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class BenchRun:
    """The report (JSON-ready), and every mode's raw samples for the plots."""

    report: dict[str, Any]
    samples: dict[str, dict[str, list[float]]]


class GroundTruth:
    """The step the wearer is really on: the synthetic scene's script, or ``step.set:N``."""

    def __init__(self, source: Source, start_ns: int) -> None:
        from gazecam.sources.synthetic import SyntheticSource

        self._scene = source.scene if isinstance(source, SyntheticSource) else None
        self._start_ns = start_ns
        self._set: int | None = None

    def take(self, event: SourceEvent) -> bool:
        """Whether the event is ground truth (then it is withheld from the assistants)."""
        action, _, number = event.name.partition(":")
        if action == "step.set" and number.isdecimal():
            self._set = int(number)
            return True
        return False

    def step_at(self, t_ns: int) -> int | None:
        """The true step at a time, where known."""
        if self._scene is not None:
            return self._scene.step_at((t_ns - self._start_ns) / 1e9)
        return self._set


class Harness:
    """Drives the modes through one replay: keyframes, asks, and their timings."""

    def __init__(
        self, card: TaskCard, runs: list[ModeRun], lm: LanguageModel, truth: GroundTruth
    ) -> None:
        self.card, self.runs, self.lm, self.truth = card, runs, lm, truth
        self.settings = CaptureSettings().with_thumbnail(lm.thumbnail_px)
        self.keyframes = 0
        self.asked = 0
        self.start_ns: int | None = None
        self.ask_at_ns: list[int] = []  # from the start, in order; taken as they come

    def feed(self, results: list[FrameResult | SourceEvent], push_ms: float) -> int:
        """Handle what one ``Capture.push`` returned (it took ``push_ms``); frames handled."""
        frames = 0
        for result in results:
            if isinstance(result, SourceEvent):
                if not self.truth.take(result):
                    for run in self.runs:
                        run.assistant.observe_event(result)
                continue
            frames += 1
            t_ns = result.matched.frame.timestamp_ns
            self.start_ns = t_ns if self.start_ns is None else self.start_ns
            if result.keyframe:
                self.keyframe(result.matched, push_ms, self.truth.step_at(t_ns))
                due = [at for at in self.ask_at_ns if t_ns - self.start_ns >= at]
                if due and self.keyframes > 1:
                    # Times that passed without a keyframe of their own merge into this ask.
                    del self.ask_at_ns[: len(due)]
                    self.ask((t_ns - self.start_ns) / 1e9, self.truth.step_at(t_ns))
        return frames

    def rotation(self) -> list[ModeRun]:
        """The modes, starting one later at each keyframe: none always runs first (cold)."""
        k = self.keyframes % len(self.runs)
        return self.runs[k:] + self.runs[:k]

    def keyframe(self, matched: MatchedFrame, push_ms: float, truth: int | None) -> None:
        """Decode once, then per mode: crop, perceive, prefill the regions found."""
        warm = self.keyframes > 0  # the first one warms the models up
        t0 = time.perf_counter()
        image = matched.frame.bgr()
        decode_ms = (time.perf_counter() - t0) * 1e3
        size, thumb = self.settings.crop_size_px, self.settings.thumbnail_px
        for run in self.rotation():
            self.lm.cache = run.cache
            t0 = time.perf_counter()
            crop = make_crop(matched, image, run.crop_mode, size, thumb)
            t1 = time.perf_counter()
            regions = run.assistant.observe_keyframe(crop)
            t2 = time.perf_counter()
            if not warm:
                list(run.assistant.ask(QUESTIONS[0], dense=run.dense))
                continue
            perception_ms, encode_ms = run.assistant.perception_ms, self.lm.last_encode_ms
            s = run.samples
            s["decode_ms"].append(decode_ms)
            s["sync_crop_ms"].append(push_ms + (t1 - t0) * 1e3)
            s["perception_ms"].append(perception_ms)
            if self.lm.info.engine == "vlm":
                s["vision_encode_ms"].append(encode_ms)
            # observe_keyframe's rest: tracker and memory (microseconds), and the prefill.
            s["region_prefill_ms"].append((t2 - t1) * 1e3 - perception_ms - encode_ms)
            s["regions_found"].append(len(regions))
            if truth is not None:
                run.keyframe_steps.append((truth, run.assistant.tracker.current().index))
        self.keyframes += 1

    def ask(self, t_s: float, truth: int | None) -> None:
        """Every mode answers the same question; time its prompt, tokens and whole answer."""
        from gazecam.assist.assistant import Answer

        question = QUESTIONS[self.asked % len(QUESTIONS)]
        self.asked += 1
        for run in self.rotation():
            self.lm.cache = run.cache
            a = run.assistant
            started = time.perf_counter()
            pieces: list[float] = []
            answer: Answer | None = None
            for item in a.ask(question, dense=run.dense):
                if isinstance(item, Answer):
                    answer = item
                else:
                    pieces.append(time.perf_counter())
            assert answer is not None  # ask always ends with its answer
            t, s = answer.timings, run.samples
            # The fact sentence is yielded as soon as it is looked up.
            s["facts_ms"].append((pieces.pop(0) - started) * 1e3)
            s["e2e_ms"].append(t.e2e_ms)
            s["regions"].append(len(a.memory))
            run.answers.append(
                {
                    "t_s": round(t_s, 3),
                    "question": question,
                    "text": answer.text,
                    "intent": answer.intent,
                    "step": answer.step.index,
                    "true_step": truth,
                }
            )
            if truth is not None:
                run.ask_steps.append((truth, answer.step.index))
            if not t.prompt_tokens:  # nothing could answer: the model was not asked
                continue
            for metric in ("ttft_ms", "prompt_tokens", "visual_kv"):
                s[metric].append(getattr(t, metric))
            # Had the ask come as the keyframe did, it would have waited for all of it.
            stages = (
                "decode_ms",
                "sync_crop_ms",
                "perception_ms",
                "vision_encode_ms",
                "region_prefill_ms",
            )
            waited = sum(s[stage][-1] for stage in stages if s[stage])
            s["keyframe_ttft_ms"].append(waited + t.ttft_ms)
            if t.tpot_ms > 0:  # at least one decoding step (else both stand for the prefill)
                s["tpot_ms"].append(t.tpot_ms)
                s["attended_kv"].append(t.attended_kv)


def ask_offsets_ns(schedule: list[float] | int, duration_ns: int | None) -> list[int]:
    """When to ask, in ns from the start: the schedule, or N times spread evenly."""
    if isinstance(schedule, list):
        return sorted(round(t * 1e9) for t in schedule)
    if duration_ns is None:
        raise ConfigError("bench: the source has no known duration; give the asks' times (--at)")
    return [round(duration_ns * (i + 0.5) / schedule) for i in range(schedule)]


async def run_bench(
    address: str,
    task: str,
    modes: list[Mode],
    schedule: list[float] | int,
    pace: Pace,
    llm: LLMSettings | None = None,
    models: ModelSettings | None = None,
) -> BenchRun:
    """Replay ``address`` once through every mode and measure; see the module docstring.

    ``llm``/``models``: the answer engine (``llm.engine``, the vlm engine's checkpoint); a vlm
    engine asked for by name that cannot load is an error, not a fallback.
    """
    from gazecam.assist.assistant import Assistant, load_engines, load_task
    from gazecam.bench import report as bench_report
    from gazecam.llm.remote import RemoteModel

    started = time.perf_counter()
    card = load_task(task)
    engines = load_engines(llm, models)
    perception, lm = engines.perception, engines.model
    if isinstance(lm, RemoteModel):
        raise ConfigError("bench: the remote engine has its own bench (gazecam.bench.remote)")
    runs = []
    for mode in modes:
        crop_mode, dense = MODE_SPECS[mode]
        assistant = Assistant(card, perception, lm)  # the context is prefilled once, here
        runs.append(ModeRun(mode, crop_mode, dense, assistant, copy.deepcopy(lm.cache)))
    source = open_source(address, SourceSettings(pace=pace))
    info = await source.open()
    try:
        harness = Harness(card, runs, lm, GroundTruth(source, info.start_ns or 0))
        harness.ask_at_ns = ask_offsets_ns(schedule, info.duration_ns)
        core = Capture(info, harness.settings)
        with tqdm(total=info.frame_count, unit="frame", desc="bench", disable=None) as bar:
            async for item in source.stream():
                t0 = time.perf_counter()
                results = core.push(item)
                if frames := harness.feed(results, (time.perf_counter() - t0) * 1e3):
                    bar.update(frames)
                    bar.set_postfix(asks=harness.asked, refresh=False)
            t0 = time.perf_counter()
            results = core.flush()
            bar.update(harness.feed(results, (time.perf_counter() - t0) * 1e3))
    finally:
        await source.close()
    samples: dict[str, dict[str, list[float]]] = {run.mode: dict(run.samples) for run in runs}
    report = bench_report.summarise(
        lm.info.engine,
        samples,
        {run.mode: {"keyframes": run.keyframe_steps, "asks": run.ask_steps} for run in runs},
        {run.mode: {"crop_mode": run.crop_mode, "dense": run.dense} for run in runs},
    )
    for run in runs:  # what each mode said, last: for reading, not for the numbers
        report["modes"][run.mode]["answers"] = run.answers
    report["run"] = {
        "source": address,
        "task": task,
        "pace": pace,
        "questions": list(QUESTIONS),
        "frames": core.counts.frames,
        "keyframes": core.counts.keyframes,
        "asks": harness.asked,
        "frames_dropped": source.stats.frames_dropped,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "top_k_regions": lm.settings.llm_top_k_regions,
        "engine": lm.info.to_json(),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    report["machine"] = bench_report.machine_info(lm)
    return BenchRun(report, samples)
