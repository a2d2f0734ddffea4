"""Settings of the language model runtime, read from ``GAZECAM_LLM_*`` variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from gazecam.models import ModelSettings

EngineName = Literal["text", "vlm"]
# The help of the --engine and --vlm flags of ask, serve and bench.
ENGINE_HELP = (
    "Answer engine: text or vlm [GAZECAM_ENGINE; unset: vlm when a SmolVLM checkpoint is "
    "installed, else text]."
)
VLM_HELP = "A SmolVLM checkpoint folder for the vlm engine [GAZECAM_VLM]."


class LLMSettings(BaseSettings):
    """How the language model is loaded, run and sampled, and how regions are chosen."""

    model_config = SettingsConfigDict(env_prefix="GAZECAM_", extra="ignore")

    engine: EngineName | None = Field(
        None,
        description="The answer engine: 'text' (perception's regions as text, SmolLM2-135M) "
        "or 'vlm' (a SmolVLM checkpoint's visual tokens as gaze regions); unset: vlm when a "
        "SmolVLM checkpoint is installed (gazecam models fetch/import, or GAZECAM_VLM), else "
        "text.",
    )
    llm_model_dir: Path | None = Field(
        None,
        description="A converted model folder (model.onnx, tokenizer.json, config.json); "
        "unset: the SmolLM2-135M GGUF converted once into the models cache.",
    )
    llm_providers: str = Field(
        "auto",
        description="ONNX Runtime execution providers, comma-separated in order of preference; "
        "'auto': TensorRT, then CUDA, then CPU, whichever this onnxruntime build has.",
    )
    llm_threads: int = Field(
        0,
        ge=0,
        description="ONNX Runtime intra-op threads; 0: ONNX Runtime's default (one per "
        "physical core).",
    )
    llm_thread_spinning: bool = Field(
        False,
        description="Let idle ONNX Runtime threads spin between operators: on an otherwise idle "
        "2-core CPU decoding is ~15% faster, but 30-40% slower while perception or anything "
        "else needs the cores.",
    )
    llm_max_tokens: int = Field(
        128, ge=1, description="At most this many tokens are generated per answer."
    )
    llm_temperature: float = Field(
        0.0, ge=0, description="Sampling temperature; 0: greedy (deterministic)."
    )
    llm_top_p: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Nucleus sampling: sample among the most likely tokens whose probabilities "
        "add up to this (when the temperature is above 0).",
    )
    llm_top_k_regions: int = Field(
        4,
        ge=0,
        description="Visual regions attended per step, chosen by relevance and gaze; 0: all "
        "regions (dense attention).",
    )
    llm_gaze_prior_weight: float = Field(
        1.0,
        ge=0,
        description="Weight of a region's gaze prior (0..1) against its z-normalised relevance "
        "to the query when regions are chosen.",
    )


def engine_settings(
    engine: EngineName | None, vlm: Path | None
) -> tuple[LLMSettings, ModelSettings]:
    """The settings that ``--engine`` and ``--vlm`` set; a flag left out (None) keeps the
    environment's ``GAZECAM_ENGINE`` / ``GAZECAM_VLM``."""
    llm = LLMSettings(engine=engine) if engine is not None else LLMSettings()
    models = ModelSettings(vlm=vlm) if vlm is not None else ModelSettings()
    return llm, models
