"""What clients send, checked before anything acts on it: message size, JSON, type, fields,
and how often a client may ask (see docs/protocol.md)."""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import from_json
from starlette.datastructures import Address

from gazecam.server.errors import ClientError
from gazecam.server.settings import is_loopback

_MINUTE_S = 60.0
_MAX_TRACKED_CLIENTS = 1024  # beyond this, clients idle for a minute are forgotten


class AskMessage(BaseModel):
    """``{"type": "ask", "id": "...", "question": "..."}``; other fields are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: Literal["ask"] = Field(description="The message type.")
    id: str = Field(
        min_length=1, max_length=100, description="Chosen by the client; echoed in every reply."
    )
    question: str = Field(description="The question (its length is the assistant's to judge).")


class EventMessage(BaseModel):
    """The body of ``POST /v1/events``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        min_length=1, max_length=100, description="step.next, step.back or step.set:N."
    )


def decode_message(text: str | None, data: bytes | None, max_bytes: int) -> dict[str, Any]:
    """A websocket message as a JSON object, or a bad_request ClientError.

    pydantic's JSON parser, not the json module's: it refuses nesting deeper than 200 levels
    (json.loads recurses until RecursionError) and escaped lone surrogates (``"\\ud800"``),
    which are not text: no reply could carry them, and the model could not read them.
    """
    if text is None:
        raise ClientError("bad_request", "send JSON text messages, not binary ones")
    # surrogatepass: a lone surrogate in the text itself fails below, in the parser.
    encoded = text.encode(errors="surrogatepass")
    if len(encoded) > max_bytes:
        raise ClientError(
            "bad_request", f"message of {len(encoded)} bytes: at most {max_bytes} are taken"
        )
    try:
        message = from_json(encoded)
    except ValueError as exc:
        # The parser's words for "\\ud800" are about the escape; say what it must be.
        hint = " (\\uD800-\\uDFFF escapes come in pairs)" if "escape" in str(exc) else ""
        raise ClientError("bad_request", f"not JSON: {exc}{hint}") from exc
    if not isinstance(message, dict):
        raise ClientError("bad_request", "a message is a JSON object")
    return message


def request_id(message: dict[str, Any]) -> str | None:
    """The message's id, where it has a usable one (to answer an error with it)."""
    value = message.get("id")
    return value if isinstance(value, str) and 0 < len(value) <= 100 else None


def parse_ask(message: dict[str, Any]) -> AskMessage:
    """The ask in a decoded message (pydantic's ValidationError for bad fields)."""
    kind = message.get("type")
    if kind != "ask":
        raise ClientError("bad_request", f"unknown message type {kind!r}: expected 'ask'")
    return AskMessage.model_validate(message)


class RateLimiter:
    """At most ``per_minute`` asks per client in any 60 s window (a sliding log).

    A client is its connection when it comes from loopback, else its address (see
    ``client_key``).
    """

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._asks: dict[str, deque[float]] = {}

    @staticmethod
    def client_key(client: Address | None) -> str:
        """The bucket a connection's asks count against.

        Loopback connections are apps on this machine (or a local proxy that did not say whom
        it forwards: uvicorn takes the address from X-Forwarded-For when it does), which share
        one address: each connection is a client of its own, so one local app cannot use up
        another's asks. From any other address, all its connections share one bucket, so a
        remote client gains nothing by opening more sockets.
        """
        if client is None:
            return "unknown"
        return f"{client.host}:{client.port}" if is_loopback(client.host) else client.host

    def take(self, client: str) -> None:
        """Count an ask by ``client``, or raise a rate_limited ClientError."""
        now = time.monotonic()
        if len(self._asks) > _MAX_TRACKED_CLIENTS:
            self._asks = {k: v for k, v in self._asks.items() if now - v[-1] < _MINUTE_S}
        asks = self._asks.setdefault(client, deque())
        while asks and now - asks[0] >= _MINUTE_S:
            asks.popleft()
        if len(asks) >= self.per_minute:
            wait_s = _MINUTE_S - (now - asks[0])
            raise ClientError(
                "rate_limited",
                f"at most {self.per_minute} asks a minute: try again in {wait_s:.0f} s",
            )
        asks.append(now)
