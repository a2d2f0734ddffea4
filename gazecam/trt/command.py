"""``gazecam engines build``: the command line of ``gazecam.trt.build``."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import CliPositionalArg

from gazecam.errors import ConfigError, GazecamError
from gazecam.models import ModelSettings
from gazecam.trt import Precision
from gazecam.trt.build import build_engines, build_tools, in_use, runtime_profiles, vlm_encoders
from gazecam.trt.cache import INPUT_NAMES, VLM_ENCODER
from gazecam.trt.graphs import Feeds


class EnginesCommand(BaseModel):
    """Build TensorRT engines for the vision models on this device (GPU and tensorrt needed)."""

    action: CliPositionalArg[Literal["build"]] = Field(
        description="build: build the engines that are missing or stale."
    )
    precision: Precision | None = Field(
        None,
        description="fp32, fp16, int8 (every model; needs --calibrate) or best (int8 where "
        "it keeps the results and --calibrate is given, else fp16) [GAZECAM_TRT_PRECISION, fp16].",
    )
    models: list[str] | None = Field(
        None,
        description=f"The models to build, comma-separated (default: those perception runs, and "
        f"the SmolVLM encoders where installed; known: {', '.join(INPUT_NAMES)}, "
        f"{VLM_ENCODER}SIZE).",
    )
    calibrate: str | None = Field(
        None,
        description="INT8 calibration: a source whose keyframe crops are fed to each model, "
        "e.g. synthetic:demo or a recording folder.",
    )

    def cli_cmd(self) -> None:
        """Run the command: one line per engine."""
        from gazecam.perception import PerceptionSettings
        from gazecam.settings import CaptureSettings
        from gazecam.sources import check_address

        perception = PerceptionSettings()
        precision = self.precision or perception.trt_precision
        models = ModelSettings()
        unknown = [
            n for n in self.models or [] if n not in INPUT_NAMES and not n.startswith(VLM_ENCODER)
        ]
        if unknown:
            raise ConfigError(
                f"--models: {', '.join(unknown)} unknown (known: {', '.join(INPUT_NAMES)}, "
                f"and {VLM_ENCODER}SIZE for the installed SmolVLM's encoders)"
            )
        if self.calibrate is not None:
            check_address(self.calibrate)
        # No GPU, no or an old TensorRT: said before anything is converted or calibrated.
        platform, tensorrt = build_tools()
        names = self.models or in_use(perception)
        if not self.models:
            try:
                names += list(vlm_encoders(models))
            except GazecamError as exc:  # the vision models' engines are built all the same
                print(
                    f"gazecam: warning: no engines for the SmolVLM encoders: {exc}", file=sys.stderr
                )
        crop_px = CaptureSettings().crop_size_px
        feeds_of = None
        if self.calibrate is not None:
            from gazecam.trt.calibrate import calibration_feeds

            address = self.calibrate

            def feeds_of(wanted: Sequence[str]) -> dict[str, Feeds]:
                return calibration_feeds(address, wanted, perception, models)

        results = build_engines(
            names,
            precision,
            lambda name: runtime_profiles(name, crop_px, perception),
            models,
            feeds_of,
            platform,
            tensorrt,
        )
        for result in results:
            print(result.line())
