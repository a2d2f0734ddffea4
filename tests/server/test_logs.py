"""No log line carries the token: the service on uvicorn with a token, HTTP and websocket
requests that carry it in the query and as a Bearer header, and every log record captured."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest
import websockets
from fastapi import FastAPI

from gazecam.server.logs import redact, redact_secrets_in_logs
from tests.server.conftest import TOKEN, uvicorn_server

WRONG = "wrong-token-0123456789"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(make_app: Callable[..., FastAPI]) -> Iterator[str]:
    with uvicorn_server(make_app(token=TOKEN)) as address:
        yield address


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every record at INFO and above, uvicorn's too (its loggers do not reach the root's)."""
    caplog.set_level(logging.INFO)
    ours = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.error", "uvicorn.access")]
    for logger in ours:
        caplog.set_level(logging.INFO, logger=logger.name)
        logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        for logger in ours:
            logger.removeHandler(caplog.handler)


def status_of(url: str, headers: dict[str, str]) -> int:
    """The HTTP status of a GET."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers)) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


async def test_no_log_line_carries_the_token(server: str, logged: pytest.LogCaptureFixture) -> None:
    http = f"http://{server}"
    for path, headers, status in (
        (f"/v1/status?token={TOKEN}", BEARER, 200),
        (f"/v1/status?token={TOKEN}", {}, 401),  # the query does not do for HTTP
        (f"/v1/status?x=1&token={WRONG}", {}, 401),
        (f"/v1/nothing?token={TOKEN}&y=2", BEARER, 404),
    ):
        assert await asyncio.to_thread(status_of, http + path, headers) == status
    ws = f"ws://{server}"
    async with websockets.connect(f"{ws}/v1/ask?token={TOKEN}") as socket:
        await socket.send(json.dumps({"type": "ask", "id": "q", "question": "What step?"}))
        while json.loads(await asyncio.wait_for(socket.recv(), 60))["type"] == "token":
            pass
    for url, headers in (
        (f"{ws}/v1/live?%74oken={TOKEN}", {}),  # the server decodes %74 to t: it is the token
        (f"{ws}/v1/live", BEARER),
    ):
        async with websockets.connect(url, additional_headers=headers) as socket:
            assert json.loads(await asyncio.wait_for(socket.recv(), 10))["type"] == "state"
    async with websockets.connect(f"{ws}/v1/live?token={WRONG}") as socket:
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(socket.recv(), 10)
    await asyncio.sleep(0.2)  # the access lines of the last requests

    text = logged.text
    # The lines are there, with the secret's place marked ...
    assert '"GET /v1/status?token=*** HTTP/1.1" 200' in text
    assert '"GET /v1/nothing?token=***&y=2 HTTP/1.1" 404' in text
    assert '"WebSocket /v1/ask?token=***" [accepted]' in text
    assert '"WebSocket /v1/live?%74oken=***" [accepted]' in text
    # ... and the secret, or a wrong guess at it, is in none of them.
    assert TOKEN not in text and WRONG not in text
    for record in logged.records:
        assert TOKEN not in record.getMessage() and TOKEN not in str(record.args)


def test_tracebacks_are_redacted_too(caplog: pytest.LogCaptureFixture) -> None:
    redact_secrets_in_logs()  # as create_app does
    logger = logging.getLogger("gazecam.server")
    try:
        raise ValueError(f"could not open ws://box/v1/ask?token={TOKEN}")
    except ValueError:
        logger.exception("failed with %s", f"Authorization: Bearer {TOKEN}")
    assert caplog.records and TOKEN not in caplog.text
    assert "Authorization: Bearer ***" in caplog.text and "/v1/ask?token=***" in caplog.text


@pytest.mark.parametrize(
    ("line", "redacted"),
    [
        ("GET /v1/x?token=abc HTTP/1.1", "GET /v1/x?token=*** HTTP/1.1"),
        ("/v1/x?a=1&TOKEN=abc&b=2", "/v1/x?a=1&TOKEN=***&b=2"),
        ("/v1/x?%74oken=abc", "/v1/x?%74oken=***"),
        ("authorization: bearer abc.def", "authorization: bearer ***"),
        ("/v1/x?tokens=abc&my_token=def", "/v1/x?tokens=abc&my_token=def"),  # other names
        ("no token=here", "no token=here"),  # not a query parameter
    ],
)
def test_what_is_redacted(line: str, redacted: str) -> None:
    assert redact(line) == redacted
