"""ServerSettings refuse unsafe set-ups; ``gazecam serve``'s flags map onto them; client
messages are checked before anything acts on them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from pydantic_settings import CliApp

from gazecam.cli import main
from gazecam.errors import ConfigError
from gazecam.llm.settings import LLMSettings
from gazecam.models import ModelSettings
from gazecam.server import app as server_app
from gazecam.server.command import ServeCommand
from gazecam.server.errors import ClientError
from gazecam.server.protocol import RateLimiter, decode_message, parse_ask
from gazecam.server.settings import ServerSettings, is_loopback
from tests.server.conftest import TOKEN


def test_defaults_are_the_looped_demo_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GAZECAM_TOKEN", raising=False)
    settings = ServerSettings()
    assert (settings.source, settings.task, settings.host, settings.port) == (
        "synthetic:demo",
        "demo",
        "127.0.0.1",
        8000,
    )
    assert settings.token is None
    assert all(field.description for field in ServerSettings.model_fields.values())


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.0.0.2",
        "127.255.255.254",
        "127.1",  # the resolver's short form, as uvicorn would bind it
        "::1",
        "0:0:0:0:0:0:0:1",
        "::ffff:127.0.0.1",
        "localhost",
        "LOCALHOST",
        "LocalHost",
        "localhost.",
    ],
)
def test_loopback_hosts_need_no_token(host: str) -> None:
    assert is_loopback(host)
    assert ServerSettings(host=host, token=None).host == host


@pytest.mark.parametrize(
    "host",
    [
        "0.0.0.0",
        "::",
        "192.168.1.20",
        "128.0.0.1",
        "::ffff:10.0.0.1",
        "gazecam.local",
        "localhost.evil.example",
        "127.0.0.1.evil.example",
    ],
)
def test_other_hosts_are_refused_without_a_token(host: str) -> None:
    with pytest.raises(ValidationError, match="set GAZECAM_TOKEN"):
        ServerSettings(host=host, token=None)
    assert ServerSettings(host=host, token=TOKEN).host == host


def test_a_short_token_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GAZECAM_TOKEN", "secret")
    with pytest.raises(ValidationError, match="at least 16 characters"):
        ServerSettings()


def test_a_short_token_is_named_as_the_variable_that_sets_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # serve has no --token flag (it would show the token in the process list).
    monkeypatch.setenv("GAZECAM_TOKEN", "secret")
    monkeypatch.setattr(server_app, "serve", lambda *settings: pytest.fail("must not serve"))
    assert main(["serve"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("gazecam: error: GAZECAM_TOKEN: ") and "--token" not in error
    assert "the token needs at least 16 characters" in error and "secret" not in error


def test_the_token_is_not_shown() -> None:
    assert TOKEN not in repr(ServerSettings(token=TOKEN))


def test_serve_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    served: list[tuple[ServerSettings, LLMSettings, ModelSettings]] = []
    monkeypatch.setattr(server_app, "serve", lambda *settings: served.append(settings))
    monkeypatch.setenv("GAZECAM_PORT", "9000")
    monkeypatch.setenv("GAZECAM_TASK", "my-card.yaml")
    monkeypatch.setenv("GAZECAM_ENGINE", "text")
    CliApp.run(ServeCommand, cli_args=["--source", "neon://auto", "--port", "8123"])
    CliApp.run(ServeCommand, cli_args=["--engine", "vlm", "--vlm", "/data/SmolVLM"])
    (settings, llm, models), (_, vlm_llm, vlm_models) = served
    assert (settings.source, settings.port, settings.task) == ("neon://auto", 8123, "my-card.yaml")
    assert settings.host == "127.0.0.1"
    assert (llm.engine, models.vlm) == ("text", None)
    assert (vlm_llm.engine, vlm_models.vlm) == ("vlm", Path("/data/SmolVLM"))


def test_serve_refuses_an_open_host_without_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GAZECAM_TOKEN", raising=False)
    monkeypatch.setattr(server_app, "serve", lambda *settings: pytest.fail("must not serve"))
    with pytest.raises(
        ConfigError, match=r"^--host / GAZECAM_HOST: .*0\.0\.0\.0 is reachable from other machines"
    ):
        CliApp.run(ServeCommand, cli_args=["--host", "0.0.0.0"])


LONE_SURROGATE = r"not JSON: .*escape.* \(\\uD800-\\uDFFF escapes come in pairs\)"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "send JSON text messages"),
        ("{nope", "not JSON"),
        ("[1, 2]", "a message is a JSON object"),
        ("x" * 5000, "message of 5000 bytes: at most 4096"),
        # json.loads recursed into a RecursionError here, which dropped the socket.
        ("[" * 4000, "not JSON: recursion limit exceeded"),
        ('{"a":' * 600 + "1" + "}" * 600, "not JSON: recursion limit exceeded"),
        # Escaped lone surrogates are not text: no reply can carry them.
        ('{"type": "ask", "id": "\\ud800", "question": "hi"}', LONE_SURROGATE),
        ('{"type": "ask", "id": "q", "question": "\\udc00?"}', LONE_SURROGATE),
        ("\ud800", "not JSON"),  # one in the text itself (no websocket delivers it)
    ],
)
def test_undecodable_messages_are_bad_requests(text: str | None, message: str) -> None:
    with pytest.raises(ClientError, match=message) as caught:
        decode_message(text, b"" if text is None else None, 4096)
    assert caught.value.code == "bad_request"


def test_asks_are_parsed_strictly_where_it_matters() -> None:
    ask: dict[str, Any] = {"type": "ask", "id": "q1", "question": "hi", "extra": 1}
    assert parse_ask(ask).question == "hi"
    with pytest.raises(ClientError, match="unknown message type 'cancel'"):
        parse_ask({"type": "cancel", "id": "q1"})
    with pytest.raises(ValidationError, match="question"):
        parse_ask({"type": "ask", "id": "q1"})
    with pytest.raises(ValidationError, match="id"):
        parse_ask({"type": "ask", "id": "", "question": "hi"})


def test_the_rate_limit_counts_asks_per_client() -> None:
    limiter = RateLimiter(per_minute=2)
    limiter.take("a")
    limiter.take("a")
    limiter.take("b")
    with pytest.raises(ClientError, match="at most 2 asks a minute") as caught:
        limiter.take("a")
    assert caught.value.code == "rate_limited" and caught.value.status == 429
