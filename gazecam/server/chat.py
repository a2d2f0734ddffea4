"""gazecam as an OpenAI-compatible model: ``POST /v1/chat/completions`` and ``GET /v1/models``.

Chat clients and live-VLM web UIs that speak OpenAI's chat-completions API can use a pair of
glasses as a model. The last message, a user's, is the question; it is answered from the live
gaze context of this service's device through the same ``Runtime.ask`` as ``/v1/ask``, in the
same bounded answer queue and under the same rate limit. Everything else a chat request may
carry is either ignored where it cannot change what an answer is (sampling knobs: the answer
engine decodes greedily, at most its own number of tokens) or refused with a 400 naming the
parameter where an OpenAI client would get something other than it asked for (``n`` > 1,
tools, a JSON response format, logprobs, audio). Earlier messages and system prompts are not
read: the prompt is gazecam's own (task card, step, what perception saw). Images a client
sends are not read either: the answer rests on what the wearer looks at, not on the client's
camera. gazecam's own fields of an answer (intent, sources, step, crop, engine, timings) come
in the extension field ``gazecam``, which OpenAI clients keep as an extra. See docs/protocol.md.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gazecam.assist.assistant import Answer
from gazecam.server.deps import MetricsDep, RateLimiterDep, RuntimeDep, SettingsDep, TokenChecked
from gazecam.server.errors import (
    ClientError,
    OpenAIError,
    openai_error_responses,
)
from gazecam.server.protocol import RateLimiter
from gazecam.server.routes import read_body
from gazecam.server.runtime import Runtime

MODEL_ID = "gazecam"

router = APIRouter(
    dependencies=[TokenChecked],
    responses=openai_error_responses("unauthorized", "forbidden", "internal"),
)


class TextPart(BaseModel):
    """A text part of a message's content."""

    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    """An image a client sends (a URL or a data: URL)."""

    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    """An image part of a message's content: accepted, and not read (see the module doc)."""

    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(BaseModel):
    """One message; only the last one's role and text are read."""

    model_config = ConfigDict(extra="ignore", frozen=True)  # name, tool_call_id, refusal…

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _known_parts(cls, content: Any) -> Any:
        # Said here, in one line: a union's own error would name each type it tried.
        for part in content if isinstance(content, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("text", "image_url"):
                raise ValueError(f"a content part of type {kind!r}: text and image_url are taken")
        return content

    def text(self) -> str:
        """The message's text: its content, or its text parts one per line."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content or () if isinstance(part, TextPart))


class StreamOptions(BaseModel):
    """``stream_options``: with ``include_usage``, a last chunk carries the usage."""

    include_usage: bool = False


class ResponseFormat(BaseModel):
    """``response_format``: answers are text."""

    type: Literal["text"]


class ChatRequest(BaseModel):
    """The body of ``POST /v1/chat/completions`` (OpenAI's request, as far as it applies)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description=f"The model: {MODEL_ID!r}, the one GET /v1/models lists.")
    messages: list[ChatMessage] = Field(
        min_length=1, description="The last is the user's question."
    )
    stream: bool | None = Field(False, description="Server-sent chat.completion.chunk events.")
    stream_options: StreamOptions | None = None
    n: Literal[1] | None = Field(1, description="One answer per ask.")
    response_format: ResponseFormat | None = None
    logprobs: Literal[False] | None = None
    tool_choice: Literal["none"] | None = None
    modalities: list[Literal["text"]] | None = None
    # Refused unless empty: gazecam calls no tools, and answers in text only.
    tools: list[dict[str, Any]] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    top_logprobs: int | None = None
    audio: dict[str, Any] | None = None
    # Taken and ignored: they cannot change what the answer is (see the module docstring).
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None

    @field_validator("tools", "functions", "function_call", "top_logprobs", "audio")
    @classmethod
    def _unsupported(cls, value: Any) -> Any:
        if value:
            raise ValueError("not supported: gazecam calls no tools and answers in text only")
        return value

    def question(self) -> str:
        """The question: the last message's text, which must be a user's."""
        last = self.messages[-1]
        if last.role != "user":
            raise ClientError(
                "bad_request",
                f"messages: the last message is the question, a user's (not {last.role!r})",
                param="messages",
            )
        return last.text()


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with its ``$defs`` put in place of their references: a request body in the
    OpenAPI schema cannot refer to definitions of its own. Discriminators go too (their
    mappings name definitions; the ``oneOf`` they annotate says the same)."""
    definitions = schema.get("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].rsplit("/", 1)[1]])
            return {
                key: inline(value)
                for key, value in node.items()
                if key not in ("$defs", "discriminator")
            }
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    result: dict[str, Any] = inline(schema)
    return result


class ChatUsage(BaseModel):
    """Tokens: prefilled at ask time, and generated (the tracker's lead sentence aside)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    """The answer as a message."""

    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    """The one answer."""

    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    """A whole answer (``stream`` false), with gazecam's extras in ``gazecam``."""

    id: str
    object: Literal["chat.completion"]
    created: int = Field(description="Unix time, seconds.")
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage
    gazecam: dict[str, Any] = Field(
        description="gazecam's extension: intent, sources, engine, step, timings and crop, as in "
        "/v1/ask's answer."
    )


class ModelCard(BaseModel):
    """A model this service serves."""

    id: str
    object: Literal["model"]
    created: int = Field(description="Unix time the service started, seconds.")
    owned_by: str


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"]
    data: list[ModelCard]


def _model_card(runtime: Runtime) -> ModelCard:
    started_s = time.time() - (time.monotonic() - runtime.started)
    return ModelCard(id=MODEL_ID, object="model", created=int(started_s), owned_by="gazecam")


def _not_found(model: str) -> ClientError:
    return ClientError(
        "not_found",
        f"the model {model!r} does not exist: this service serves {MODEL_ID!r} (GET /v1/models)",
        param="model",
    )


@router.get("/v1/models")
async def list_models(runtime: RuntimeDep) -> ModelList:
    """The one model: this service's glasses."""
    return ModelList(object="list", data=[_model_card(runtime)])


@router.get("/v1/models/{model}", responses=openai_error_responses("not_found"))
async def retrieve_model(model: str, runtime: RuntimeDep) -> ModelCard:
    """The model ``model`` (404 for any other than this service's)."""
    if model != MODEL_ID:
        raise _not_found(model)
    return _model_card(runtime)


async def _then(
    first: str | Answer, rest: AsyncIterator[str | Answer]
) -> AsyncGenerator[str | Answer, None]:
    """``first``, then the pieces of ``rest``."""
    yield first
    async for piece in rest:
        yield piece


def _extension(answer: Answer) -> dict[str, Any]:
    """gazecam's fields of an answer: all of /v1/ask's but the text."""
    extension = answer.to_json()
    del extension["text"]
    return extension


def _finish_reason(runtime: Runtime, answer: Answer) -> Literal["stop", "length"]:
    limit = runtime.assistant.settings.answer_max_tokens
    return "length" if answer.timings.completion_tokens >= limit else "stop"


def _usage(answer: Answer) -> ChatUsage:
    prompt, completion = answer.timings.prompt_tokens, answer.timings.completion_tokens
    return ChatUsage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _event(data: dict[str, Any] | str) -> bytes:
    return format_sse_event(data_str=data if isinstance(data, str) else json.dumps(data))


async def _events(
    runtime: Runtime,
    chat: ChatRequest,
    first: str | Answer,
    pieces: AsyncGenerator[str | Answer, None],
    head: dict[str, Any],
) -> AsyncIterator[bytes]:
    """The answer, ``first`` and the rest of ``pieces``, as ``chat.completion.chunk`` events,
    then ``[DONE]``; an error after the first piece is an event with OpenAI's error object
    (the status is sent by then). Closed early (the client left), it closes ``pieces``, which
    stops the answer."""
    with_usage = chat.stream_options is not None and chat.stream_options.include_usage
    more = {"usage": None} if with_usage else {}
    head = {**head, "object": "chat.completion.chunk"}

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return _event({**head, "choices": [choice], **more, **extra})

    try:
        async with contextlib.aclosing(pieces):
            yield chunk({"role": "assistant", "content": ""})
            async for piece in _then(first, pieces):
                if isinstance(piece, str):
                    yield chunk({"content": piece})
                    continue
                yield chunk({}, _finish_reason(runtime, piece), gazecam=_extension(piece))
                if with_usage:
                    yield _event({**head, "choices": [], "usage": _usage(piece).model_dump()})
    except ClientError as error:
        yield _event(error.openai())
    yield _event("[DONE]")


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses={
        200: {
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": "A chat.completion, or with stream true chat.completion.chunk events.",
        },
        **openai_error_responses(
            "bad_request", "not_found", "timeout", "too_large", "rate_limited"
        ),
        503: {"model": OpenAIError, "description": "busy (queue full) or not_ready (source down)"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": _inline_refs(ChatRequest.model_json_schema())}
            },
        }
    },
)
async def chat_completions(
    request: Request,
    runtime: RuntimeDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    limiter: RateLimiterDep,
) -> ChatCompletion | EventSourceResponse:
    """Answer the last user message from the live gaze context (OpenAI's chat completions)."""
    body = await read_body(request, settings.max_chat_bytes)
    chat = ChatRequest.model_validate_json(body)
    if chat.model != MODEL_ID:
        raise _not_found(chat.model)
    question = chat.question()
    limiter.take(RateLimiter.client_key(request.client))
    pieces = metrics.metered(runtime.ask(question, metrics.ask_queue_wait.observe))
    # Waits for the answer's turn: a refusal is an error status, before any of the answer.
    first = await anext(pieces)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": MODEL_ID}
    if chat.stream:
        chunks = _events(runtime, chat, first, pieces, head)
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}  # nginx: unbuffered
        return EventSourceResponse(chunks, headers=headers)
    answer = first
    async with contextlib.aclosing(pieces):
        async for piece in pieces:
            answer = piece
    assert isinstance(answer, Answer)  # the last piece is the Answer
    message = AssistantMessage(role="assistant", content=answer.text)
    choice = ChatChoice(index=0, message=message, finish_reason=_finish_reason(runtime, answer))
    return ChatCompletion(
        **head,
        object="chat.completion",
        choices=[choice],
        usage=_usage(answer),
        gazecam=_extension(answer),
    )
