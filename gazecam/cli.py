"""The ``gazecam`` command line. Flags map onto the settings models (``gazecam.settings``).

Errors gazecam raises on purpose, and invalid flag values, end the command with one line on
stderr and exit code 2; never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import BaseModel, Field, ValidationError
from pydantic_settings import BaseSettings, CliApp, CliPositionalArg, CliSubCommand, SettingsError
from tqdm import tqdm

from gazecam import __version__
from gazecam.bench.replay import BenchCommand
from gazecam.capture.export import CropWriter
from gazecam.capture.pipeline import Capture, CaptureResult, capture
from gazecam.errors import ConfigError, GazecamError
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
from gazecam.records import CropMode, SourceEvent
from gazecam.server.command import ServeCommand
from gazecam.settings import CaptureSettings, Pace, SourceSettings, settings_problem
from gazecam.simulate.command import SimulateNeonCommand
from gazecam.sources import check_address, open_source
from gazecam.trt.command import EnginesCommand

if TYPE_CHECKING:
    from gazecam.assist.assistant import Assistant
    from gazecam.sources.recorder import RecordSummary

SOURCE_HELP = (
    "A Neon recording or Pupil Cloud export folder, neon://auto, neon://HOST[:PORT], "
    "or synthetic:NAME (e.g. synthetic:demo)."
)


# Settings fields that a flag of another name sets, for naming both in an error.
_FLAG_FOR_SETTING = {
    "crop_size_px": "size",
    "keyframes_per_s": "fps",
    "crop_mode": "mode",
    "thumbnail_px": "thumbnail",
    "fixation_detector": "fixations",
    "sim_host": "host",
    "sim_port": "port",
    "sim_rate": "rate",
    "sim_loop": "loop",
    "sim_mdns": "mdns",
    "sim_faults": "fault",
}


def _command_flags(command: str) -> dict[str, str]:
    """The flags of the command named ``command`` (none for another word), by the setting each
    sets."""
    field = Gazecam.model_fields.get(command.replace("-", "_"))  # simulate-neon
    commands = [t for t in get_args(field.annotation) if t is not type(None)] if field else []
    names = [name for cls in commands for name in cls.model_fields]
    return {setting: flag for setting, flag in _FLAG_FOR_SETTING.items() if flag in names} | {
        name: name for name in names
    }


def _show_warnings() -> None:
    """Warnings from the readers (a cut-short recording, a doubtful start time) as one line each
    on stderr, like the errors."""
    logging.basicConfig(level=logging.WARNING, format="gazecam: warning: %(message)s")
    # Not FFmpeg's own log lines (its errors too come through as such): the error a broken
    # video raises quotes the last one, so they would say it twice.
    logging.getLogger("libav").setLevel(logging.CRITICAL)


def _overrides(**flags: Any) -> dict[str, Any]:
    """The flags the user gave (None means: keep the setting from the environment/default)."""
    return {key: value for key, value in flags.items() if value is not None}


class CropsCommand(BaseModel):
    """Cut foveal crops at fixation keyframes: OUT/crops/, crops.jsonl, contact_sheet.jpg."""

    source: CliPositionalArg[str] = Field(description=SOURCE_HELP)
    out: Path = Field(description="Output folder (created if missing).")
    size: int | None = Field(None, description="Crop side in pixels [GAZECAM_CROP_SIZE_PX, 448].")
    fps: float | None = Field(
        None, description="At most this many keyframes per second [GAZECAM_KEYFRAMES_PER_S, 1]."
    )
    mode: CropMode | None = Field(
        None, description="gaze, or the baselines center and full [GAZECAM_CROP_MODE, gaze]."
    )
    thumbnail: int | None = Field(
        None,
        description="Also write a whole-frame thumbnail this wide [GAZECAM_THUMBNAIL_PX, 0=off].",
    )
    fixations: Literal["auto", "source", "ivt"] | None = Field(
        None, description="Fixation detector [GAZECAM_FIXATION_DETECTOR, auto]."
    )
    pace: Pace | None = Field(None, description="Replay pacing [GAZECAM_PACE, fast].")
    force: bool = Field(False, description="Replace the crops of an earlier run in the folder.")

    def cli_cmd(self) -> None:
        """Run the command."""
        check_address(self.source)
        _show_warnings()
        capture_settings = CaptureSettings(
            **_overrides(
                crop_size_px=self.size,
                keyframes_per_s=self.fps,
                crop_mode=self.mode,
                thumbnail_px=self.thumbnail,
                fixation_detector=self.fixations,
            )
        )
        source_settings = SourceSettings(**_overrides(pace=self.pace))
        summary = asyncio.run(
            write_crops(self.source, self.out, capture_settings, source_settings, self.force)
        )
        print(
            f"{summary['crops']} crops from {summary['frames']} frames "
            f"({summary['no_gaze']} without gaze, {summary['not_worn']} not worn, "
            f"{summary['off_frame']} with gaze off the frame) -> {self.out}"
        )


# What ends a recording as Ctrl-C does: systemd's stop, and a closed terminal.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class RecordCommand(BaseModel):
    """Record a source (live glasses) to a folder that replays as a source; Ctrl-C stops."""

    source: CliPositionalArg[str] = Field(description=SOURCE_HELP)
    out: Path = Field(description="New (or empty) folder to record into.")
    pace: Pace | None = Field(
        None, description="Pacing of a recorded or synthetic source [GAZECAM_PACE, fast]."
    )

    def cli_cmd(self) -> None:
        """Run the command.

        SIGINT (Ctrl-C), SIGTERM and SIGHUP stop the recording: its files are finished and
        the command ends with exit code 0. Stopped before the source opened, it has recorded
        nothing and leaves no folder; the exit code is then 128 + the signal's number.
        """
        from gazecam.sources.recorder import check_out_dir

        check_address(self.source)
        check_out_dir(self.out)
        _show_warnings()
        progress: list[RecordSummary] = []  # the latest summary
        with tqdm(unit="frame", desc="recording", disable=None) as bar:

            def on_progress(summary: RecordSummary) -> None:
                progress[:] = [summary]
                bar.update(summary.frames - bar.n)

            stopped_by = asyncio.run(self._record(on_progress))
        if not progress:  # stopped before the source opened: no folder was made
            assert stopped_by is not None
            print(
                f"gazecam: {stopped_by.name} before the recording began; nothing was written",
                file=sys.stderr,
            )
            raise SystemExit(128 + stopped_by.value)
        summary = progress[0]
        how = f" (stopped by {stopped_by.name})" if stopped_by is not None else ""
        print(
            f"recorded {summary.frames} frames and {summary.gaze_samples} gaze samples "
            f"-> {self.out}{how}"
        )

    async def _record(self, on_progress: Callable[[RecordSummary], None]) -> signal.Signals | None:
        """Record until the source ends or a stop signal comes; the signal, if one came."""
        from gazecam.sources.recorder import record

        async def run() -> None:
            settings = SourceSettings(**_overrides(pace=self.pace))
            # Creating a source can take a while (a synthetic scene is rendered): in a thread,
            # so that a stop signal is taken at once.
            source = await asyncio.to_thread(open_source, self.source, settings)
            await record(source, self.out, on_progress)

        loop = asyncio.get_running_loop()
        recording = asyncio.create_task(run())
        stopped_by: list[signal.Signals] = []

        def stop(signum: signal.Signals) -> None:
            if not stopped_by:
                stopped_by.append(signum)
                recording.cancel()  # record() finishes the files before it ends

        for signum in _STOP_SIGNALS:
            loop.add_signal_handler(signum, stop, signum)
        try:
            await recording
        except asyncio.CancelledError:
            if not stopped_by:
                raise
        finally:
            for signum in _STOP_SIGNALS:
                loop.remove_signal_handler(signum)
        return stopped_by[0] if stopped_by else None


class AskCommand(BaseModel):
    """Replay a source up to a moment and answer questions about what the wearer was doing."""

    source: CliPositionalArg[str] = Field(description=SOURCE_HELP)
    questions: CliPositionalArg[list[str]] = Field(
        description='The question, e.g. "what step am I on?"; several are asked in order as one '
        'conversation (a follow-up such as "and after that?" refers to the answer before it).'
    )
    task: str = Field("demo", description="Task card: a YAML file, or 'demo' (bundled).")
    at: float = Field(ge=0, description="Answer at this many seconds into the source.")
    as_json: bool = Field(
        False,
        alias="json",
        description="Follow each answer with one JSON line: text, intent, sources, engine, "
        "step, timings, crop.",
    )
    engine: EngineName | None = Field(None, description=ENGINE_HELP)
    vlm: Path | None = Field(None, description=VLM_HELP)
    remote_url: str | None = Field(None, description=REMOTE_URL_HELP)
    remote_model: str | None = Field(None, description=REMOTE_MODEL_HELP)

    def cli_cmd(self) -> None:
        """Run the command."""
        from gazecam.assist.answers import Conversation
        from gazecam.assist.assistant import Answer

        check_address(self.source)  # before the models load
        _show_warnings()
        engines = engine_settings(self.engine, self.vlm, self.remote_url, self.remote_model)
        assistant = asyncio.run(prepare_assistant(self.source, self.task, self.at, *engines))
        conversation = Conversation()
        for question in self.questions:
            for item in assistant.ask(question, conversation=conversation):
                if not isinstance(item, Answer):
                    print(item, end="", flush=True)
                elif self.as_json:
                    print()
                    print(json.dumps(item.to_json()), end="")
            print()


class ModelsCommand(BaseModel):
    """List the models gazecam uses, fetch them into the cache, or import a SmolVLM checkpoint."""

    action: CliPositionalArg[Literal["list", "fetch", "import"]] = Field(
        description="list, fetch [NAME ...], or import smolvlm-256m|smolvlm-500m DIR."
    )
    names: CliPositionalArg[list[str]] = Field(
        default_factory=list,
        description="fetch: the models to fetch (default: all but the SmolVLM checkpoints, "
        "which come from the Hugging Face Hub); import: the checkpoint's name and folder.",
    )

    def cli_cmd(self) -> None:
        """Run the command."""
        from gazecam.models import (
            CHECKPOINT_LICENCE,
            CHECKPOINTS,
            MODELS,
            describe,
            fetch,
        )
        from gazecam.perception.classifier import MODEL_NAME as CLASSIFIER_MODEL
        from gazecam.perception.classifier import converted_model
        from gazecam.vlm.install import describe_checkpoint, fetch_checkpoint, import_checkpoint

        settings = ModelSettings()
        if self.action == "list":
            for name, spec in MODELS.items():
                print(f"{name:20} {spec.licence:40} {describe(name, settings)}")
            for name in CHECKPOINTS:
                print(f"{name:20} {CHECKPOINT_LICENCE:40} {describe_checkpoint(name, settings)}")
            from gazecam.perception import PerceptionSettings
            from gazecam.trt.providers import plan_lines

            print("\n".join(plan_lines(PerceptionSettings(), settings)))
            return
        if self.action == "import":
            if len(self.names) != 2:
                raise ConfigError(
                    "models import: give a name (smolvlm-256m or smolvlm-500m) and a folder"
                )
            checkpoint = import_checkpoint(self.names[0], Path(self.names[1]), settings)
            print(f"{self.names[0]}: {checkpoint.path} ({checkpoint.summary()})")
            return
        for name in self.names or list(MODELS):
            if name in CHECKPOINTS:
                checkpoint = fetch_checkpoint(name, settings)
                print(f"{name}: {checkpoint.path} ({checkpoint.summary()})")
            elif name == CLASSIFIER_MODEL:  # fetched, then converted to ONNX once
                print(f"{name}: {fetch(name, settings)} -> {converted_model(settings)}")
            else:
                print(f"{name}: {fetch(name, settings)}")


class Gazecam(
    BaseSettings,
    cli_prog_name="gazecam",
    cli_kebab_case=True,
    cli_implicit_flags=True,
    cli_hide_none_type=True,
):
    """gazecam: a real-time assistant for Pupil Labs Neon eye-tracking glasses."""

    crops: CliSubCommand[CropsCommand]
    record: CliSubCommand[RecordCommand]
    ask: CliSubCommand[AskCommand]
    serve: CliSubCommand[ServeCommand]
    models: CliSubCommand[ModelsCommand]
    bench: CliSubCommand[BenchCommand]
    simulate_neon: CliSubCommand[SimulateNeonCommand]
    engines: CliSubCommand[EnginesCommand]

    def cli_cmd(self) -> None:
        """Run the chosen subcommand."""
        CliApp.run_subcommand(self)


async def write_crops(
    address: str,
    out_dir: Path,
    capture_settings: CaptureSettings,
    source_settings: SourceSettings,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Replay a source through the capture pipeline and write its keyframe crops to ``out_dir``.

    Returns the run's summary (also written as ``summary.json``, even when the run fails
    midway: the crops written until then stay).
    """
    source = open_source(address, source_settings)
    info = await source.open()
    try:
        writer = CropWriter(out_dir, info.start_ns, overwrite)
        core = Capture(info, capture_settings)
        error: str | None = None
        try:
            with tqdm(total=info.frame_count, unit="frame", desc="crops", disable=None) as bar:
                async for result in capture(source, info, capture_settings, core):
                    if isinstance(result, CaptureResult):
                        bar.update(1)
                        if result.crop is not None:
                            writer.write(result.crop)
        except BaseException as exc:
            error = str(exc) or type(exc).__name__
            raise
        finally:
            summary: dict[str, Any] = {
                "source": address,
                "source_kind": info.kind,
                "crops": writer.count,
                **vars(core.counts),
                "frames_dropped": source.stats.frames_dropped,
                "settings": capture_settings.model_dump(),
                "gazecam_version": __version__,
                "error": error,
            }
            writer.close(summary)
    finally:
        await source.close()
    return summary


async def prepare_assistant(
    address: str,
    task: str,
    at_s: float,
    llm: LLMSettings | None = None,
    models: ModelSettings | None = None,
) -> Assistant:
    """Load the assistant and replay ``address`` into it up to ``at_s`` seconds in.

    Each keyframe is perceived as the replay reaches it, as the service does at fixation
    onsets, so the ask that follows finds everything in memory.
    """
    from gazecam.assist.assistant import Assistant, load_engines, load_task

    engines = load_engines(llm, models)
    assistant = Assistant(load_task(task), engines.perception, engines.model)
    settings = CaptureSettings().with_thumbnail(engines.model.thumbnail_px)
    source = open_source(address, SourceSettings(pace="fast"))
    info = await source.open()
    try:
        start_ns = info.start_ns
        async for result in capture(source, info, settings):
            if isinstance(result, SourceEvent):
                assistant.observe_event(result)
                continue
            t_ns = result.matched.frame.timestamp_ns
            start_ns = t_ns if start_ns is None else start_ns
            if t_ns - start_ns > at_s * 1e9:
                break
            if result.crop is not None:
                await asyncio.to_thread(assistant.observe_keyframe, result.crop)
    finally:
        await source.close()
    return assistant


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gazecam`` console script; returns the exit code."""
    args = sys.argv[1:] if argv is None else argv
    try:
        CliApp.run(Gazecam, cli_args=args)
    except GazecamError as exc:
        print(f"gazecam: error: {exc}", file=sys.stderr)
        return 2
    except SettingsError as exc:  # an environment variable that does not parse, e.g. not JSON
        print(f"gazecam: error: {exc} ({exc.__cause__})", file=sys.stderr)
        return 2
    except ValidationError as exc:
        if exc.title == Gazecam.__name__:  # a flag's own value (loc: command, flag)
            problem = "; ".join(
                f"--{str(err['loc'][-1]).replace('_', '-')}: {err['msg']}" for err in exc.errors()
            )
        else:  # a setting, from a flag or the environment
            problem = settings_problem(exc, _command_flags(args[0] if args else ""))
        print(f"gazecam: error: {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # No claim about files: 'crops' keeps the crops it wrote, 'record' takes Ctrl-C itself
        # once it runs, and before that nothing was written.
        print("gazecam: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
