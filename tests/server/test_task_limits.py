"""What a task card may cost the running service: a long card is cut to the context budget and
asks are answered; a card over a size limit, nested too deep or using aliases is refused in one
line, and the service keeps the card it had."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from gazecam.assist.assistant import AssistantSettings
from gazecam.assist.tasks import MAX_STEPS
from gazecam.server.runtime import Runtime
from tests.assist.test_tasks import long_card_yaml
from tests.server.conftest import DEMO_CARD, LOCAL, WS, card_upload, first_crop


@pytest.fixture(scope="module")
def client(make_app: Callable[..., FastAPI]) -> Iterator[TestClient]:
    with TestClient(make_app(), base_url=LOCAL) as client:
        first_crop(client)
        yield client


@pytest.fixture
def runtime(client: TestClient) -> Iterator[Runtime]:
    """The app's runtime; the demo card is loaded again afterwards."""
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    assert isinstance(runtime, Runtime)
    yield runtime
    assert client.post("/v1/task", files=card_upload(DEMO_CARD)).status_code == 200


def ask(client: TestClient, question: str) -> dict[str, object]:
    """The last frame of one ask: the answer, or an error."""
    with client.websocket_connect(f"{WS}/v1/ask") as socket:
        socket.send_json({"type": "ask", "id": "a", "question": question})
        frame: dict[str, object] = socket.receive_json()
        while frame["type"] == "token":
            frame = socket.receive_json()
    return frame


def test_a_30_kb_card_is_cut_to_the_context_budget_and_asks_are_answered(
    client: TestClient, runtime: Runtime
) -> None:
    card = long_card_yaml()  # 6 steps of 5,000 characters: about 7,400 tokens verbatim
    assert 29_000 < len(card.encode()) < 65_536
    response = client.post("/v1/task", content=card)
    assert response.status_code == 200, response.json()
    assert response.json()["name"] == "A long procedure" and response.json()["steps"] == 6
    # The load prefilled at most the budget: its time and its attention buffers are bounded.
    budget = AssistantSettings().context_max_tokens
    assert runtime.assistant.context_tokens == runtime.engines.model.cache.entries("context")
    assert runtime.assistant.context_tokens <= budget
    for question in ("What step am I on?", "What do I do now?"):
        frame = ask(client, question)
        assert frame["type"] == "answer", frame
        assert str(frame["text"]).strip()
    assert str(ask(client, "What step am I on?")["text"]).startswith("You are on step ")


@pytest.mark.parametrize(
    ("card", "message"),
    [
        (
            "name: Many steps\nsteps:\n"
            + "  - {title: Step, instruction: Do it.}\n" * (MAX_STEPS + 1),
            f"task card: steps: Tuple should have at most {MAX_STEPS} items after validation",
        ),
        (
            f"name: x\nsteps:\n  - {{title: {'t' * 81}, instruction: b}}\n",
            "task card: steps.1.title: String should have at most 80 characters",
        ),
    ],
)
def test_a_card_over_a_size_limit_is_refused_and_the_card_kept(
    client: TestClient, card: str, message: str
) -> None:
    before = client.get("/v1/status").json()["task"]
    response = client.post("/v1/task", content=card)
    assert response.status_code == 413
    error = response.json()
    assert error["code"] == "too_large" and error["message"].startswith(message)
    assert "\n" not in error["message"]
    assert client.get("/v1/status").json()["task"] == before
    assert ask(client, "What step am I on?")["type"] == "answer"


@pytest.mark.parametrize(
    ("card", "message"),
    [
        ("[" * 10_000 + "]" * 10_000, "nested deeper than 16 levels (a task card needs 6)"),
        (
            "name: x\nsteps:\n  - " + "{a: " * 5000 + "1" + "}" * 5000,
            "nested deeper than 16 levels",
        ),
        (
            "a: &a [l, l, l, l, l, l, l, l, l]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
            "name: x\nsteps: *b\n",
            "task card: YAML at line 2, column 8: aliases (*name) are not allowed in a task card",
        ),
    ],
)
def test_deep_yaml_and_aliases_are_refused_and_the_card_kept(
    client: TestClient, card: str, message: str
) -> None:
    before = client.get("/v1/status").json()["task"]
    response = client.post("/v1/task", content=card)
    assert response.status_code == 400
    error = response.json()
    assert error["code"] == "bad_request" and message in error["message"]
    assert error["message"].startswith("task card: YAML at line ")
    assert client.get("/v1/status").json()["task"] == before
