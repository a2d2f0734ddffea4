"""The service's own settings: what it serves, where it listens, who may use it, and its limits.

Capture, source, assistant and model settings are the ones every command reads
(``gazecam.settings``, ``gazecam.assist.assistant``, ...); this model holds only what is the
service's. Unsafe combinations are refused, not warned about: listening beyond this machine
without a token, or with a token short enough to guess.
"""

from __future__ import annotations

import ipaddress
import socket

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gazecam.assist.tasks import MAX_CARD_BYTES
from gazecam.sources import check_address

MIN_TOKEN_CHARS = 16


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine only: ``localhost`` (any case), or a numeric address in
    127.0.0.0/8 or ::1 in any form the resolver takes (``127.1``, ``::ffff:127.0.0.1``)."""
    # Names are case-insensitive, and a trailing dot only says the name is fully qualified.
    if host.lower().removesuffix(".") == "localhost":
        return True
    try:
        # Numeric only: no name is looked up (another name may resolve anywhere), and the
        # address is read as the server reads the one it listens on.
        found = socket.getaddrinfo(host, None, flags=socket.AI_NUMERICHOST)
    except (OSError, UnicodeError, ValueError):
        return False
    return all(_loopback_address(str(info[4][0])) for info in found)


def _loopback_address(text: str) -> bool:
    address = ipaddress.ip_address(text.partition("%")[0])  # without an IPv6 zone
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class ServerSettings(BaseSettings):
    """The stop-and-ask service: address, access and limits."""

    model_config = SettingsConfigDict(env_prefix="GAZECAM_", extra="ignore")

    source: str = Field(
        "synthetic:demo",
        description="Source address to serve; recordings and synthetic scenes replay in a loop "
        "in real time, live glasses stream as they are.",
    )
    task: str = Field(
        "demo", description="Task card at start: a YAML file, or 'demo' (the bundled one)."
    )
    token: SecretStr | None = Field(
        None,
        description=f"Bearer token every route but /healthz and the web client needs "
        f"(at least {MIN_TOKEN_CHARS} characters); unset: no token, loopback only.",
    )
    host: str = Field(
        "127.0.0.1",
        description="Address to listen on; anything but loopback needs GAZECAM_TOKEN set.",
    )
    port: int = Field(8000, ge=1, le=65535, description="TCP port to listen on.")
    max_message_bytes: int = Field(
        4096,
        ge=256,
        le=1 << 20,
        description="A websocket message longer than this is refused with a bad_request error.",
    )
    max_task_bytes: int = Field(
        MAX_CARD_BYTES,
        ge=1024,
        le=1 << 22,
        description="A longer task card body is refused (413).",
    )
    max_chat_bytes: int = Field(
        1 << 21,
        ge=1024,
        le=1 << 24,
        description="A longer POST /v1/chat/completions body is refused (413); chat clients "
        "send the whole conversation, and live-VLM clients a camera image, with each question.",
    )
    body_timeout_s: float = Field(
        10.0,
        gt=0,
        le=300,
        description="A request body not fully received this long after the request began is "
        "refused (408) and its connection closed.",
    )
    max_task_upload_bytes: int = Field(
        32 << 20,
        ge=1024,
        le=1 << 30,
        description="A longer task card upload with its photos (multipart/form-data) is "
        "refused (413): a card's photos are decoded and embedded as it loads.",
    )
    max_clients: int = Field(
        32, ge=1, description="Websocket connections at once; more are closed with code 1013."
    )
    asks_per_minute: int = Field(
        30,
        ge=1,
        description="Asks taken per client in any 60 s (per connection from loopback, per address "
        "otherwise); more get a rate_limited error.",
    )
    live_rate_hz: float = Field(
        10.0, gt=0, le=10, description="At most this many state messages per second on /v1/live."
    )
    restart_backoff_s: float = Field(
        0.5, gt=0, description="Wait before restarting a failed or ended source; doubles each time."
    )
    restart_backoff_max_s: float = Field(
        10.0, gt=0, description="The wait before restarting a source grows up to this."
    )
    ask_queue_wait_s: float = Field(
        10.0,
        gt=0,
        le=600,
        description="An ask that would wait longer than this for the generation thread (the "
        "asks ahead times the recent answer time), or has waited this long, gets a busy error "
        "with its queue position instead of waiting on.",
    )
    ask_queue_max: int = Field(
        16,
        ge=1,
        description="At most this many asks wait for the generation thread besides the answer "
        "under way; one more gets a busy error with its queue position at once.",
    )
    perception_yield_s: float = Field(
        2.0,
        ge=0,
        le=60,
        description="While a local engine (text, vlm) generates an answer, the newest keyframe "
        "waits up to this long for it to end before perception takes it (the answer gets the "
        "cores; 0: no wait).",
    )
    source_stale_s: float = Field(
        10.0,
        gt=0,
        description="With no scene frame for this long (or the source not running), an ask is "
        "told that the glasses are not connected instead of answered from what was seen before.",
    )

    @field_validator("source")
    @classmethod
    def _source_well_formed(cls, source: str) -> str:
        # Raises ConfigError/SourceError (not ValueError): the command line shows it as it is.
        check_address(source)
        return source

    @field_validator("token")
    @classmethod
    def _token_long_enough(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None and len(token.get_secret_value()) < MIN_TOKEN_CHARS:
            # The command names it as GAZECAM_TOKEN: only the environment sets it (a flag
            # would show it in the process list).
            raise ValueError(f"the token needs at least {MIN_TOKEN_CHARS} characters")
        return token

    @field_validator("host")
    @classmethod
    def _no_open_host_without_token(cls, host: str, info: ValidationInfo) -> str:
        # ``token`` is declared before ``host``, so it has been validated by now.
        if not is_loopback(host) and info.data.get("token") is None:
            raise ValueError(
                f"{host} is reachable from other machines: set GAZECAM_TOKEN (at least "
                f"{MIN_TOKEN_CHARS} characters) to listen there"
            )
        return host
