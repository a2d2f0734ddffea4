"""The remote answer engine against llama.cpp's OpenAI-compatible server on loopback (SmolLM2
GGUF), with a fault-injecting proxy in front for the ways servers fail."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from gazecam.assist.assistant import Answer, Assistant, Engines, load_engines, load_task
from gazecam.bench.remote import RecordedPerception, keyframes
from gazecam.cli import main
from gazecam.llm.remote import THUMBNAIL_PX, RemoteError, RemoteModel
from gazecam.llm.settings import LLMSettings
from gazecam.models import ModelSettings
from gazecam.records import Crop
from tests.llm.remote_server import SERVED_MODEL, FaultProxy, free_port

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def text_engines() -> Engines:
    """Perception and the text engine (the remote engine's fallback)."""
    return load_engines(LLMSettings(engine="text"))


@pytest.fixture(scope="module")
def demo(text_engines: Engines) -> tuple[Any, RecordedPerception, list[Crop]]:
    """The text engine and the synthetic demo's keyframes up to 25 s, perceived once."""
    engines = text_engines
    every = asyncio.run(keyframes("synthetic:demo", THUMBNAIL_PX))
    start_ns = every[0].matched.frame.timestamp_ns
    crops = [c for c in every if c.matched.frame.timestamp_ns - start_ns < 25e9]
    perception = RecordedPerception(
        {c.matched.frame.timestamp_ns: engines.perception.perceive(c) for c in crops},
        engines.perception.classifier,
    )
    return engines.model, perception, crops


def assistant(
    demo: tuple[Any, RecordedPerception, list[Crop]],
    url: str,
    crops: slice = slice(-6, None),
    fallback: bool = True,
    **settings: Any,
) -> Assistant:
    """A session answered by the remote engine at ``url``, having seen these keyframes."""
    local, perception, all_crops = demo
    llm = LLMSettings(engine="remote", remote_url=url, remote_model=SERVED_MODEL, **settings)
    model = RemoteModel(local, llm, fallback=fallback)
    model.clear_memory()
    a = Assistant(load_task("demo"), perception, model)
    for crop in all_crops[crops]:
        a.observe_keyframe(crop)
    return a


def ask(a: Assistant, question: str = "What step am I on?") -> tuple[list[str], Answer]:
    items = list(a.ask(question))
    answer = items[-1]
    assert isinstance(answer, Answer)
    return [i for i in items if isinstance(i, str)], answer


def test_answers_stream_from_the_server_with_the_grounded_prompt(demo: Any, proxy: FaultProxy):
    a = assistant(demo, proxy.url, remote_budget_ms=30000)
    pieces, answer = ask(a)
    assert answer.engine.engine == "remote" and answer.engine.model == SERVED_MODEL
    assert answer.engine.fallback is None
    lead = f"You are on step {answer.step.index} of {answer.step.total}: {answer.step.title}."
    # The fact sentence, then the server's continuation where the checker keeps it (SmolLM2
    # mostly repeats the sentence, which is dropped): the server's first token came either way.
    assert pieces[0] == lead and answer.text.startswith(lead) and len(pieces) <= 2
    assert answer.timings.ttft_ms > 0 and answer.timings.completion_tokens > 0
    # auto images: llama.cpp's text-only chat template cannot take image parts (an empty
    # stream), so the ask went again as text, and later asks go as text at once.
    first, second = (r["body"] for r in proxy.requests)
    parts = first["messages"][1]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "image_url"]
    assert all(p["image_url"]["url"].startswith("data:image/jpeg;base64,") for p in parts[1:])
    system, user = (m["content"] for m in second["messages"])
    assert "Task: " in system and "Steps:\n1. " in system
    regions = list(a.model._regions.values())  # type: ignore[attr-defined]
    assert regions and all(line in system for line in regions)
    assert user.startswith(f"What step am I on?\n(The person is on step {answer.step.index}: ")
    assert lead in user
    assert (
        second["stream"] is True and second["stop"] == ["\n"] and second["max_tokens"] == 40
    )  # answer_max_tokens
    ask(a, "What is next?")
    assert isinstance(proxy.requests[-1]["body"]["messages"][1]["content"], str)
    assert len(proxy.requests) == 3


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("down", "cannot connect"),
        ("slow", "no first token within 300 ms"),
        ("429", "HTTP 429: injected 429"),
        ("500", "HTTP 500: injected 500"),
        ("garbage", "malformed stream"),
        ("cut", "stopped mid-answer"),
        ("html", "not a chat-completions stream"),
        ("strict-model", "HTTP 404: The model `nope` does not exist."),
    ],
)
def test_a_failing_server_gets_a_marked_local_answer(
    demo: Any, proxy: FaultProxy, fault: str, reason: str
):
    proxy.fault, proxy.delay_s = fault, 3.0
    url = f"http://127.0.0.1:{free_port()}/v1" if fault == "down" else proxy.url
    model = {"remote_model": "nope"} if fault == "strict-model" else {}
    budget_ms = 300 if fault == "slow" else 30000  # the others fail with the server's help
    a = assistant(demo, url, remote_images="off", remote_retries=0, remote_budget_ms=budget_ms)
    if model:
        a.model.model_name = "nope"  # type: ignore[attr-defined]
    pieces, answer = ask(a)
    assert answer.engine.engine == "text" and answer.engine.fallback is not None
    assert (
        answer.engine.fallback.startswith(f"remote: {url}: ") and reason in answer.engine.fallback
    )
    # The local engine answered: it prefilled the question (its continuation may be empty).
    assert answer.text.startswith(pieces[0]) and answer.timings.prompt_tokens > 10
    assert pieces[0].startswith(f"You are on step {answer.step.index} of 6")


def test_retries_then_the_circuit_opens(demo: Any, proxy: FaultProxy):
    proxy.fault = "500"
    a = assistant(demo, proxy.url, remote_images="off", remote_retries=1,
                  remote_breaker_failures=2)  # fmt: skip
    for _ in range(3):
        _, answer = ask(a)
    assert len(proxy.requests) == 4  # two asks, each tried twice; the third not sent
    assert answer.engine.fallback is not None and "circuit open" in answer.engine.fallback
    proxy.fault = None
    a.model.breaker.opened_at -= 60  # type: ignore[attr-defined]  # the reset time passed
    _, answer = ask(a)
    assert answer.engine.engine == "remote" and len(proxy.requests) == 5


def test_without_fallback_the_ask_fails_with_one_line(demo: Any):
    url = f"http://127.0.0.1:{free_port()}/v1"
    a = assistant(demo, url, fallback=False, remote_retries=0)
    with pytest.raises(RemoteError, match=rf"^the remote engine at {url}: cannot connect"):
        ask(a)


def test_two_sessions_never_share_a_request(demo: Any, proxy: FaultProxy):
    early = assistant(demo, proxy.url, slice(0, 4), remote_images="off", answer_max_tokens=4)
    late = assistant(demo, proxy.url, slice(-4, None), remote_images="off", answer_max_tokens=4)
    ask(early)
    ask(late)
    ask(early, "What am I looking at?")
    own = [set(s.model._regions.values()) for s in (early, late)]  # type: ignore[attr-defined]
    only = [own[0] - own[1], own[1] - own[0]]
    assert only[0] and only[1]
    for request, session in zip(proxy.requests, (0, 1, 0), strict=True):
        system = request["body"]["messages"][0]["content"]
        assert all(line in system for line in own[session])
        assert not any(line in system for line in only[1 - session])


def test_the_multimodal_body_has_vllms_request_shape(demo: Any, proxy: FaultProxy):
    from openai.types.chat import ChatCompletionMessageParam

    recorded = json.loads((DATA / "vllm_multimodal_request.json").read_text())
    a = assistant(demo, proxy.url, remote_images="on")
    body = {**recorded, "model": SERVED_MODEL}
    body["messages"] = a.model.messages("What is this?", "You are looking at", images=True)  # type: ignore[attr-defined]
    del body["_origin"], recorded["_origin"]
    # vLLM's ChatCompletionRequest takes its messages as OpenAI's message params.
    adapter = TypeAdapter(list[ChatCompletionMessageParam])
    for request in (recorded, body):
        adapter.validate_python(request["messages"], strict=True)
    assert body.keys() == recorded.keys()

    def shape(message: dict[str, Any]) -> Any:
        content = message["content"]
        return message["role"], [
            (p["type"], sorted(p.get("image_url", {}))) for p in content
        ] if isinstance(content, list) else "text"  # fmt: skip

    assert [shape(m) for m in body["messages"]] == [shape(m) for m in recorded["messages"]]


def test_the_api_key_reaches_the_server_and_no_log(
    demo: Any,
    proxy: FaultProxy,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
):
    key = "sk-gazecam-test-0123456789"
    caplog.set_level(logging.DEBUG)
    a = assistant(demo, proxy.url, remote_api_key=key, remote_images="off")
    ask(a)
    proxy.fault = "500"
    ask(a)
    assert proxy.requests[0]["headers"]["authorization"] == f"Bearer {key}"
    captured = capsys.readouterr()
    assert key not in caplog.text + captured.out + captured.err + repr(a.model.settings)  # type: ignore[attr-defined]
    with pytest.raises(ValidationError, match=r"would cross the network in clear to 10\.0\.0\.7"):
        LLMSettings(remote_url="http://10.0.0.7:8000/v1", remote_api_key=key)


def test_cli_ask_with_the_remote_engine(
    llama: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("GAZECAM_REMOTE_IMAGES", "off")
    monkeypatch.setenv("GAZECAM_REMOTE_BUDGET_MS", "30000")
    args = ["ask", "synthetic:demo", "--at", "25", "--json", "--engine", "remote"]
    assert main([*args, "--remote-url", llama, "What step am I on?"]) == 0
    blob = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert blob["engine"] == {"engine": "remote", "model": SERVED_MODEL, "random_weights": False}
    assert blob["text"].startswith("You are on step 3 of 6: Connect cable.")
    down = f"http://127.0.0.1:{free_port()}/v1"
    monkeypatch.setenv("GAZECAM_REMOTE_FALLBACK", "false")
    assert main([*args, "--remote-url", down, "What step am I on?"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"gazecam: error: the remote engine at {down}: cannot connect " + err[0].split(
        "cannot connect ", 1)[1]]  # fmt: skip
    assert main(["ask", "synthetic:demo", "--at", "1", "--engine", "remote", "hi"]) == 2
    assert "GAZECAM_REMOTE_URL (--remote-url)" in capsys.readouterr().err


def test_the_service_streams_remote_answers_and_marks_fallbacks(
    text_engines: Engines, proxy: FaultProxy
):
    from fastapi.testclient import TestClient

    from gazecam.assist.assistant import AssistantSettings
    from gazecam.server.app import create_app
    from gazecam.server.settings import ServerSettings
    from gazecam.settings import SourceSettings
    from tests.server.conftest import DEMO_S, LOCAL, WS, first_crop
    from tests.server.test_ask import answer, ask

    settings = LLMSettings(
        engine="remote", remote_url=proxy.url, remote_model=SERVED_MODEL, remote_images="off",
        remote_budget_ms=30000, remote_retries=0,
    )  # fmt: skip
    model = RemoteModel(text_engines.model, settings)  # type: ignore[arg-type]
    engines = Engines(text_engines.perception, model)
    app = create_app(
        ServerSettings(),
        source=SourceSettings(synthetic_duration_s=DEMO_S),
        assistant=AssistantSettings(answer_max_tokens=8),
        engines=engines,
    )
    with TestClient(app, base_url=LOCAL) as client:
        first_crop(client)
        status = client.get("/v1/status").json()["model"]
        slot = app.state.runtime.pipeline._slot
        with client.websocket_connect(f"{WS}/v1/ask") as socket:
            ask(socket, "q1", "What step am I on?")
            first = socket.receive_json()
            # The server answers: perception need not wait for it (a local answer would hold it).
            assert first["type"] == "token" and not slot.paused
            rest, remote = answer(socket, "q1")
            tokens = [first["text"], *rest]
            proxy.fault = "500"
            ask(socket, "q2", "What step am I on?")
            _, fallen = answer(socket, "q2")
    assert status["engine"] == "remote" and status["model"] == SERVED_MODEL
    assert remote["engine"] == {"engine": "remote", "model": SERVED_MODEL, "random_weights": False}
    # The fact sentence, then the server's continuation where the checker keeps it.
    assert 1 <= len(tokens) <= 2 and "".join(tokens).strip() == remote["text"]
    assert remote["text"].startswith(f"You are on step {remote['step']['index']} of 6")
    assert fallen["engine"]["engine"] == "text"
    assert fallen["engine"]["fallback"] == f"remote: {proxy.url}: HTTP 500: injected 500"


def test_the_multi_wearer_bench_loses_no_answer(llama: str, tmp_path: Path):
    from gazecam.bench.remote import run

    llm = LLMSettings(engine="remote", remote_url=llama, remote_images="off")
    report = run("synthetic:demo", "demo", [1, 2], 1, tmp_path / "r.json", llm, ModelSettings())
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(report))
    assert [(r["answers"], r["lost"]) for r in report["clients"].values()] == [(1, 0), (2, 0)]
    assert all(
        r["answers_per_s"] > 0 and r["ttft_ms"]["p50"] > 0 for r in report["clients"].values()
    )
    assert report["model"] == SERVED_MODEL  # the first (only) model the server lists
    overhead = report["overhead"]
    assert overhead["direct_ttft_ms"]["p50"] > 0 and isinstance(overhead["overhead_pct"], float)
