"""Settings of the language model runtime, read from ``GAZECAM_LLM_*`` variables."""

from __future__ import annotations

from ipaddress import ip_address
from pathlib import Path
from typing import Any, Literal

from pydantic import AnyHttpUrl, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gazecam.models import ModelSettings
from gazecam.settings import comma_names
from gazecam.trt import CPU_EP, CUDA_EP, TRT_EP

# What llm_providers "auto" picks from, fastest first: TensorRT, then CUDA, then the CPU.
AUTO_PROVIDERS = (TRT_EP, CUDA_EP, CPU_EP)
EngineName = Literal["text", "vlm", "remote"]
# The help of the --engine, --vlm and --remote-* flags of ask, serve and bench.
ENGINE_HELP = (
    "Answer engine: text, vlm or remote [GAZECAM_ENGINE; unset: vlm when a SmolVLM checkpoint "
    "is installed, else text]."
)
VLM_HELP = "A SmolVLM checkpoint folder for the vlm engine [GAZECAM_VLM]."
REMOTE_URL_HELP = (
    "The remote engine's OpenAI-compatible server, e.g. http://gpu-box:8000/v1 "
    "[GAZECAM_REMOTE_URL]; its API key comes from GAZECAM_REMOTE_API_KEY only."
)
REMOTE_MODEL_HELP = (
    "The model the remote server serves [GAZECAM_REMOTE_MODEL; unset: the first it lists]."
)


class LLMSettings(BaseSettings):
    """How the language model is loaded, run and sampled, and how regions are chosen."""

    model_config = SettingsConfigDict(env_prefix="GAZECAM_", extra="ignore")

    engine: EngineName | None = Field(
        None,
        description="The answer engine: 'text' (perception's regions as text, SmolLM2-135M), "
        "'vlm' (a SmolVLM checkpoint's visual tokens as gaze regions) or 'remote' (an "
        "OpenAI-compatible server, GAZECAM_REMOTE_URL, with the text engine as fallback); "
        "unset: vlm when a SmolVLM checkpoint is installed (gazecam models fetch/import, or "
        "GAZECAM_VLM), else text.",
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
        description="Let ONNX Runtime's idle threads spin between operators while a run is under "
        "way (they sleep when it returns). Alone on a 2-core CPU decoding is ~25% faster, "
        "beside a busy perception ~30% slower; in the service answers came no sooner.",
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
    remote_url: AnyHttpUrl | None = Field(
        None,
        description="The remote engine's OpenAI-compatible server (vLLM, llama.cpp's server, "
        "Ollama, SGLang, NIM), up to and including /v1, e.g. http://gpu-box:8000/v1.",
    )
    remote_model: str | None = Field(
        None, description="The model the remote server serves; unset: the first it lists."
    )
    remote_api_key: SecretStr | None = Field(
        None,
        description="The remote server's API key (sent as a bearer token; from the environment "
        "only, never logged); refused over plain http to a host other than loopback.",
    )
    remote_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Connecting to the remote server, and each wait for its next token after "
        "the first, may take at most this long.",
    )
    remote_retries: int = Field(
        2,
        ge=0,
        le=10,
        description="Retries of a remote request refused with 408/409/429/5xx or a lost "
        "connection, with exponential backoff from 0.5 s (or the server's Retry-After), all "
        "within the first-token budget.",
    )
    remote_budget_ms: float = Field(
        3000.0,
        gt=0,
        description="The remote engine's first token must come within this many ms of the "
        "ask (retries included); otherwise the local text engine answers.",
    )
    remote_breaker_failures: int = Field(
        3,
        ge=1,
        description="After this many failed remote answers in a row the circuit opens: the "
        "local text engine answers at once, without waiting for the server.",
    )
    remote_breaker_reset_s: float = Field(
        30.0,
        gt=0,
        description="An open circuit lets one trial request through after this many seconds "
        "(half-open): success closes it, failure opens it again.",
    )
    remote_images: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Send the gaze crop and the whole-frame thumbnail as images (for a "
        "multimodal model): on, off, or auto (sent until the server refuses a request with "
        "them, then text only for this session).",
    )
    remote_fallback: bool = Field(
        True,
        description="When the remote engine fails (down, slow, refused, a broken reply), the "
        "local text engine answers and the answer says why (engine.fallback); off: the ask "
        "fails (the CLI exits 2, the service sends an error frame).",
    )

    def providers(self) -> list[str]:
        """The execution providers ``llm_providers`` names, checked against this onnxruntime
        build; ConfigError naming the setting where one is not there."""
        import onnxruntime as ort

        spec = self.llm_providers
        available: list[str] = ort.get_available_providers()
        if spec.strip() == "auto":
            listed = [p for p in AUTO_PROVIDERS if p in available]
            if listed == [CPU_EP]:
                return listed
            # onnxruntime-gpu lists its GPU providers whether or not this machine can run them
            # (no GPU, no TensorRT libraries): the vision models' tiers are checked alike.
            from gazecam.trt.providers import TIER_OF_NAME, this_platform, unavailable

            platform = this_platform()
            return [p for p in listed if unavailable(TIER_OF_NAME[p], platform) is None]
        has = f"not available (this onnxruntime has: {', '.join(available)})"
        return comma_names(spec, "llm_providers", available, has)

    @model_validator(mode="after")
    def _check_remote(self) -> LLMSettings:
        url = self.remote_url
        if self.engine == "remote" and url is None:
            raise ValueError("the remote engine needs GAZECAM_REMOTE_URL (--remote-url)")
        key, host = self.remote_api_key, url.host or "" if url else ""
        if url is not None and key is not None and url.scheme == "http" and not _is_loopback(host):
            raise ValueError(
                f"GAZECAM_REMOTE_API_KEY would cross the network in clear to {host}: "
                "use an https:// GAZECAM_REMOTE_URL"
            )
        return self


def _is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine."""
    if host == "localhost":
        return True
    try:
        return ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def engine_settings(
    engine: EngineName | None,
    vlm: Path | None,
    remote_url: str | None = None,
    remote_model: str | None = None,
) -> tuple[LLMSettings, ModelSettings]:
    """The settings that ``--engine``, ``--vlm``, ``--remote-url`` and ``--remote-model`` set;
    a flag left out (None) keeps the environment's ``GAZECAM_*`` setting."""
    flags: dict[str, Any] = {
        "engine": engine,
        "remote_url": remote_url,
        "remote_model": remote_model,
    }
    llm = LLMSettings(**{key: value for key, value in flags.items() if value is not None})
    models = ModelSettings(vlm=vlm) if vlm is not None else ModelSettings()
    return llm, models
