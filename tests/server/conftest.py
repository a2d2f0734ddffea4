"""The service under test: real models, the real synthetic demo looping in real time.

The models are loaded once per session and shared by the apps the modules start, one after
the other: each app's fixture is module-scoped, so an app has stopped (and taken its regions
out of the shared language model) before the next module's app starts.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from gazecam.assist.assistant import AssistantSettings, Engines
from gazecam.assist.tasks import load_task_card
from gazecam.llm import LanguageModel, LLMSettings
from gazecam.perception import create_perception
from gazecam.server.app import WS_TRANSPORT_MAX_BYTES, create_app
from gazecam.server.settings import ServerSettings
from gazecam.settings import SourceSettings
from tests.conftest import REPO
from tests.perception import require_models

DEMO_S = 20.0  # the looped synthetic demo: six steps of 3.3 s
DEMO_CARD = REPO / "gazecam" / "data" / "demo_task.yaml"
TOKEN = "t0ken-for-the-tests-0123456789"
# Without a token only loopback host names are served (TestClient's own is "testserver").
LOCAL = "http://127.0.0.1"
WS = "ws://127.0.0.1"


@pytest.fixture(scope="session")
def engines(real_dir: Path) -> Engines:
    """Perception and SmolLM2, loaded once for every app of the session."""
    models = require_models("ppocr-det", "ppocr-rec", "yolox-nano", "efficientnet-lite0")
    return Engines(
        create_perception(models=models), LanguageModel(LLMSettings(llm_model_dir=real_dir))
    )


@pytest.fixture(scope="session")
def make_app(engines: Engines) -> Callable[..., FastAPI]:
    """An app on the looped demo; keyword arguments set ServerSettings fields."""

    def make(**server: Any) -> FastAPI:
        return create_app(
            ServerSettings(**server),
            source=SourceSettings(synthetic_duration_s=DEMO_S),
            # Short answers keep the suite fast; their streaming is the same.
            assistant=AssistantSettings(answer_max_tokens=12),
            engines=engines,
        )

    return make


def card_upload(card: Path) -> dict[str, tuple[str, bytes]]:
    """A card file and the photos it names as POST /v1/task's multipart parts (httpx files=)."""
    parts = {"card": (card.name, card.read_bytes())}
    for step in load_task_card(card).steps:
        parts |= {name: (name, (card.parent / name).read_bytes()) for name in step.cues.images}
    return parts


def wait_for(condition: Callable[[], Any], timeout_s: float = 15.0, what: str = "it") -> Any:
    """Poll ``condition`` until it is truthy (returning it), or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"waited {timeout_s} s for {what}")


def first_crop(client: TestClient, **kwargs: Any) -> None:
    """Wait until the service has cut its first keyframe crop and perception has read it (an
    answer carries the crop of the latest perceived keyframe)."""
    wait_for(
        lambda: client.get("/v1/status", **kwargs).json()["frames"]["keyframes_perceived"] > 0,
        what="the first perceived keyframe",
    )


def first_keyframe(address: str, token: str | None = None) -> None:
    """Wait until the service at ``address`` (HOST:PORT) has perceived its first keyframe: until
    then an ask is refused as not_ready. ``token``: the service's, where it has one."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def perceived() -> int:
        status = urllib.request.Request(f"http://{address}/v1/status", headers=headers)
        with urllib.request.urlopen(status) as response:
            return int(json.loads(response.read())["frames"]["keyframes_perceived"])

    wait_for(perceived, what="the first perceived keyframe")


@contextmanager
def uvicorn_server(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 (a free port) in a thread; yields its base URL, and stops
    it on the way out."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", ws_max_size=WS_TRANSPORT_MAX_BYTES
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), 60, "uvicorn to start")
        assert server.started, "uvicorn did not start (see the log above)"
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "uvicorn did not stop"
