"""The one place where exceptions become what a client sees: an error code and a message.

HTTP routes answer with the status and ``{"type": "error", "id": null, "code", "message"}``;
websockets send the same object with the ask's id. The OpenAI-compatible routes (``/v1/chat/…``,
``/v1/models``) answer in OpenAI's shape instead, ``{"error": {"message", "type", "param",
"code"}}``, so that OpenAI clients read them. An error gazecam raises on purpose carries its
one-line message to the client; anything else is logged with its traceback and reaches the
client only as ``internal``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gazecam.assist.assistant import QuestionError
from gazecam.assist.tasks import CardTooLargeError
from gazecam.errors import ConfigError, GazecamError

logger = logging.getLogger("gazecam.server")

ErrorCode = Literal[
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "method_not_allowed",
    "timeout",
    "too_large",
    "not_ready",
    "busy",
    "rate_limited",
    "internal",
]
_STATUS: dict[ErrorCode, int] = {
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "timeout": 408,
    "too_large": 413,
    "not_ready": 503,
    "busy": 409,
    "rate_limited": 429,
    "internal": 500,
}
_CODE_OF_STATUS = {status: code for code, status in _STATUS.items()}
# OpenAI clients read 409 as a conflict; a full answer queue is an overload, which they retry
# after a pause when it is a 503 (the openai SDK does).
_OPENAI_STATUS: dict[ErrorCode, int] = {**_STATUS, "busy": 503}
# OpenAI's error types; any other code is the client's request (or, 5xx, the server's fault).
_OPENAI_TYPE: dict[ErrorCode, str] = {
    "unauthorized": "authentication_error",
    "forbidden": "permission_error",
    "rate_limited": "rate_limit_error",
}
# Paths whose errors take OpenAI's shape: the OpenAI-compatible routes and what lies under them.
OPENAI_PATHS = ("/v1/chat/", "/v1/models")


class ClientError(Exception):
    """A request the service refuses, with the code and one-line message the client gets."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        headers: Mapping[str, str] | None = None,
        *,
        param: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
        self.headers = dict(headers or {})  # HTTP only: e.g. Allow with a 405
        if code == "unauthorized":
            self.headers["WWW-Authenticate"] = "Bearer"
        self.param = param  # the request field at fault (OpenAI's error object names it)
        self.extra = dict(extra or {})  # more fields of the error object, e.g. queue_position

    @property
    def status(self) -> int:
        """The HTTP status of this error."""
        return _STATUS[self.code]

    @property
    def openai_status(self) -> int:
        """The HTTP status of this error on an OpenAI-compatible route."""
        return _OPENAI_STATUS[self.code]

    def frame(self, request_id: str | None = None) -> dict[str, Any]:
        """The error object, as a websocket frame or an HTTP body."""
        frame = {"type": "error", "id": request_id, "code": self.code, "message": self.message}
        return {**frame, **self.extra}

    def openai(self) -> dict[str, Any]:
        """The error in OpenAI's shape: an HTTP body, or a streamed event's data."""
        kind = _OPENAI_TYPE.get(
            self.code, "server_error" if self.openai_status >= 500 else "invalid_request_error"
        )
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return {"error": {**error, **self.extra}}


class ErrorFrame(BaseModel):
    """The error object (documents the error responses in the OpenAPI schema)."""

    type: Literal["error"]
    id: str | None = Field(description="The ask's id on a websocket; null over HTTP.")
    code: ErrorCode
    message: str = Field(description="One line, for people.")


class OpenAIErrorDetail(BaseModel):
    """What went wrong, in OpenAI's words."""

    message: str = Field(description="One line, for people.")
    type: str = Field(description="invalid_request_error, authentication_error, server_error, …")
    param: str | None = Field(description="The request field at fault, if one is.")
    code: ErrorCode = Field(description="gazecam's error code.")


class OpenAIError(BaseModel):
    """The error object of the OpenAI-compatible routes."""

    error: OpenAIErrorDetail


def error_responses(*codes: ErrorCode) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of a route that may answer with these errors."""
    return {
        _STATUS[code]: {"model": ErrorFrame, "description": f"{code} (the error object)"}
        for code in codes
    }


def openai_error_responses(*codes: ErrorCode) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of an OpenAI-compatible route that may answer with these."""
    return {
        _OPENAI_STATUS[code]: {"model": OpenAIError, "description": f"{code} (OpenAI's shape)"}
        for code in codes
    }


def _validation_error(exc: ValidationError | RequestValidationError) -> ClientError:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"] if part != "body") or None
    return ClientError("bad_request", f"{where or 'body'}: {first['msg']}", param=where)


def client_error(exc: BaseException) -> ClientError:
    """What the client is told about ``exc`` (logged here when it is not the client's doing)."""
    if isinstance(exc, ClientError):
        return exc
    if isinstance(exc, CardTooLargeError):
        return ClientError("too_large", str(exc))
    if isinstance(exc, QuestionError | ConfigError):
        return ClientError("bad_request", str(exc))
    if isinstance(exc, ValidationError | RequestValidationError):
        return _validation_error(exc)
    if isinstance(exc, StarletteHTTPException):
        # Starlette's own refusals: an unknown route (404), a wrong method (405, with Allow).
        code = _CODE_OF_STATUS.get(exc.status_code, "bad_request")
        return ClientError(code, str(exc.detail), exc.headers)
    if isinstance(exc, GazecamError):
        logger.error("request failed: %s", exc)
        return ClientError("internal", str(exc))
    logger.error("request failed", exc_info=exc)
    return ClientError("internal", "internal error (logged by the server)")


async def _respond(request: Request, exc: Exception) -> JSONResponse:
    error = client_error(exc)
    if request.url.path.startswith(OPENAI_PATHS):
        return JSONResponse(error.openai(), status_code=error.openai_status, headers=error.headers)
    return JSONResponse(error.frame(), status_code=error.status, headers=error.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every HTTP error with the service's error object."""
    # Exception too: Starlette still re-raises it afterwards, so the server logs it as well.
    handled = (ClientError, GazecamError, ValidationError, RequestValidationError)
    for kind in (*handled, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, _respond)
