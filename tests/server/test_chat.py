"""gazecam as an OpenAI-compatible model, driven by the openai SDK against the service on
uvicorn (127.0.0.1, with a token): /v1/models, chat completions streamed and not, answered from
the live gaze context through the answer queue, and refusals in OpenAI's error shape."""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Callable, Iterator
from typing import Any

import cv2
import httpx
import numpy as np
import openai
import pytest
from fastapi import FastAPI

from tests.server.conftest import TOKEN, first_keyframe, uvicorn_server, wait_for

QUESTION = "What step am I on?"
MAX_TOKENS = 12  # the apps' answer_max_tokens (tests/server/conftest.py)
ASKS_PER_MINUTE = 2
BEARER = {"Authorization": f"Bearer {TOKEN}"}
ASK = {"model": "gazecam", "messages": [{"role": "user", "content": QUESTION}]}


@pytest.fixture(scope="module")
def base_url(make_app: Callable[..., FastAPI]) -> Iterator[str]:
    # One ask waits at most besides the answer under way: a burst of asks finds the queue full.
    # Two asks a minute per connection (each test asks on connections of its own).
    app = make_app(token=TOKEN, ask_queue_max=1, asks_per_minute=ASKS_PER_MINUTE)
    with uvicorn_server(app) as address:
        first_keyframe(address, TOKEN)
        yield f"http://{address}/v1"


@pytest.fixture
def client(base_url: str) -> Iterator[openai.OpenAI]:
    # No retries: a refusal is what the tests look at (the SDK would retry 429s and 503s).
    with openai.OpenAI(base_url=base_url, api_key=TOKEN, max_retries=0) as client:
        yield client


def check_answer(text: str, extension: dict[str, Any]) -> None:
    """An answer to QUESTION opens with the tracker's step, the one gazecam's extension has."""
    step = extension["step"]
    assert step["total"] == 6 and 1 <= step["index"] <= 6
    assert text.startswith(f"You are on step {step['index']} of 6: {step['title']}.")
    assert set(extension) == {"intent", "sources", "engine", "step", "timings", "crop"}
    assert extension["intent"] == "current_step"
    assert extension["engine"]["engine"] == "text"
    x0, y0, x1, y1 = extension["crop"]["box"]
    assert (x1 - x0, y1 - y0) == (448, 448)


def test_the_models_list_the_glasses(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [model.id for model in models.data] == ["gazecam"]
    assert models.data[0].owned_by == "gazecam" and models.data[0].created > 1.7e9
    assert client.models.retrieve("gazecam").id == "gazecam"
    with pytest.raises(openai.NotFoundError) as refused:
        client.models.retrieve("gpt-4o")
    assert refused.value.code == "not_found" and refused.value.param == "model"


def test_a_completion_answers_from_the_gaze_context(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="gazecam",
        messages=[
            {"role": "system", "content": "You are a pirate."},  # not read: gazecam's prompt
            {"role": "user", "content": QUESTION},
        ],
        temperature=0.7,  # taken and ignored
        max_tokens=100,
    )
    assert completion.object == "chat.completion" and completion.model == "gazecam"
    assert completion.id.startswith("chatcmpl-") and len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content is not None
    extension = completion.model_extra["gazecam"]
    check_answer(choice.message.content, extension)
    usage = completion.usage
    assert usage is not None and 1 <= usage.completion_tokens <= MAX_TOKENS
    assert usage.prompt_tokens == extension["timings"]["prompt_tokens"] > 5
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.completion_tokens == extension["timings"]["completion_tokens"]
    full = usage.completion_tokens == MAX_TOKENS
    assert choice.finish_reason == ("length" if full else "stop")


def test_a_streamed_completion_ends_with_usage_and_done(base_url: str) -> None:
    with openai.OpenAI(base_url=base_url, api_key=TOKEN, max_retries=0) as client:
        stream = client.chat.completions.create(
            **ASK, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)  # the SDK stops at data: [DONE], and fails on an error event
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk.id for chunk in chunks}) == 1
    first, *middle, last_choice, usage_chunk = chunks
    assert first.choices[0].delta.role == "assistant"
    # The fact sentence, then the model's continuation where the checker kept it, a chunk each.
    texts = [chunk.choices[0].delta.content for chunk in middle]
    assert 1 <= len(texts) <= 2 and all(texts)
    assert last_choice.choices[0].finish_reason in ("stop", "length")
    extension = last_choice.model_extra["gazecam"]
    check_answer("".join(t or "" for t in texts).strip(), extension)
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == extension["timings"]["completion_tokens"]
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_the_raw_stream_is_server_sent_events(base_url: str) -> None:
    with httpx.stream(
        "POST", f"{base_url}/chat/completions", json={**ASK, "stream": True}, headers=BEARER
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"


def test_text_parts_are_the_question_and_images_are_not_read(client: openai.OpenAI) -> None:
    # A live-VLM web UI sends its camera's frame with each question.
    ok, png = cv2.imencode(".png", np.full((48, 64, 3), 200, np.uint8))
    assert ok
    pixel = f"data:image/png;base64,{base64.b64encode(png.tobytes()).decode()}"
    completion = client.chat.completions.create(
        model="gazecam",
        messages=[
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What step"},
                    {"type": "image_url", "image_url": {"url": pixel}},
                    {"type": "text", "text": "am I on?"},
                ],
            },
        ],
    )
    check_answer(completion.choices[0].message.content or "", completion.model_extra["gazecam"])


def test_a_wrong_or_missing_token_is_refused(base_url: str) -> None:
    with (
        openai.OpenAI(base_url=base_url, api_key="wrong-token-0123456789", max_retries=0) as client,
        pytest.raises(openai.AuthenticationError) as refused,
    ):
        client.chat.completions.create(**ASK)
    assert refused.value.status_code == 401 and refused.value.code == "unauthorized"
    assert refused.value.type == "authentication_error"
    assert refused.value.response.headers["www-authenticate"] == "Bearer"
    # The SDK will not send a request without a key: a bare client.
    for path in ("/chat/completions", "/models"):
        response = httpx.request("POST" if "chat" in path else "GET", base_url + path, json=ASK)
        assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"


def test_an_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as refused:
        client.chat.completions.create(model="gpt-4o", messages=ASK["messages"])
    error = refused.value
    assert error.status_code == 404 and error.param == "model"
    assert error.type == "invalid_request_error"
    assert error.body == {
        "message": "the model 'gpt-4o' does not exist: this service serves 'gazecam' "
        "(GET /v1/models)",
        "type": "invalid_request_error",
        "param": "model",
        "code": "not_found",
    }


USER = {"role": "user", "content": QUESTION}


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"messages": []}, "messages", "List should have at least 1 item"),
        ({"messages": [USER, {"role": "assistant", "content": "Hi."}]}, "messages", "a user's"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", "Input should be"),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "data": "x"}]}]},
            "messages.0.content",
            "a content part of type 'input_audio': text and image_url are taken",
        ),
        ({"messages": [{"role": "user", "content": "   "}]}, None, "question: empty"),
        ({"messages": [USER], "n": 2}, "n", "Input should be 1"),
        ({"messages": [USER], "tools": [{"type": "function"}]}, "tools", "calls no tools"),
        (
            {"messages": [USER], "response_format": {"type": "json_object"}},
            "response_format.type",
            "Input should be 'text'",
        ),
        ({"messages": [USER], "logprobs": True}, "logprobs", "Input should be False"),
        ({"messages": [USER], "best_of": 3}, "best_of", "Extra inputs are not permitted"),
    ],
)
def test_malformed_requests_get_a_400_naming_the_parameter(
    base_url: str, body: dict[str, Any], param: str | None, message: str
) -> None:
    response = httpx.post(
        f"{base_url}/chat/completions", json={"model": "gazecam", **body}, headers=BEARER
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == "bad_request"
    assert error["param"] == param and message in error["message"]


def test_a_body_that_is_not_json_is_a_400(base_url: str) -> None:
    response = httpx.post(f"{base_url}/chat/completions", content=b"{not json", headers=BEARER)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("body: Invalid JSON")


async def test_asks_beyond_the_queue_get_503_busy_and_the_rest_are_answered(
    base_url: str,
) -> None:
    async def ask(client: openai.AsyncOpenAI, stream: bool) -> str:
        try:
            if stream:
                chunks = [c async for c in await client.chat.completions.create(**ASK, stream=True)]
                return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            completion = await client.chat.completions.create(**ASK)
            return completion.choices[0].message.content or ""
        except openai.APIStatusError as refused:
            assert refused.status_code == 503 and refused.code == "busy", refused.body
            assert isinstance(refused.body, dict) and refused.body["queue_position"] >= 1
            assert refused.type == "server_error"
            return "busy"

    async with openai.AsyncOpenAI(base_url=base_url, api_key=TOKEN, max_retries=0) as client:
        replies = await asyncio.gather(*(ask(client, stream=n % 2 == 1) for n in range(8)))
    answered = [reply for reply in replies if reply != "busy"]
    # The answer under way and the one waiting are answered; asks beyond them are refused.
    assert 2 <= len(answered) < len(replies)
    assert all(reply.strip().startswith("You are on step") for reply in answered)


def asks_counted(base_url: str, outcome: str) -> float:
    text = httpx.get(f"{base_url.removesuffix('/v1')}/metrics", headers=BEARER).text
    match = re.search(rf'^gazecam_asks_total{{outcome="{outcome}"}} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_asks_over_the_rate_limit_get_429(base_url: str) -> None:
    with httpx.Client(headers=BEARER) as one_connection:
        replies = [
            one_connection.post(f"{base_url}/chat/completions", json=ASK)
            for _ in range(ASKS_PER_MINUTE + 1)
        ]
    assert [reply.status_code for reply in replies] == [200] * ASKS_PER_MINUTE + [429]
    error = replies[-1].json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limited"
    assert error["message"].startswith(f"at most {ASKS_PER_MINUTE} asks a minute: try again in")


def test_a_client_leaving_mid_stream_stops_its_answer(base_url: str) -> None:
    before = asks_counted(base_url, "disconnected")
    with httpx.stream(
        "POST", f"{base_url}/chat/completions", json={**ASK, "stream": True}, headers=BEARER
    ) as response:
        assert next(response.iter_lines()).startswith("data: ")  # the first chunk, then gone
    wait_for(lambda: asks_counted(base_url, "disconnected") > before, what="the ask to stop")
    # The generation thread is free again: the next ask is answered.
    with openai.OpenAI(base_url=base_url, api_key=TOKEN, max_retries=0) as client:
        completion = client.chat.completions.create(**ASK)
    assert (completion.choices[0].message.content or "").startswith("You are on step")
