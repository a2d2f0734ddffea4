"""The one place where exceptions become what a client sees: an error code and a message.

HTTP routes answer with the status and ``{"type": "error", "id": null, "code", "message"}``;
websockets send the same object with the ask's id. An error gazecam raises on purpose carries
its one-line message to the client; anything else is logged with its traceback and reaches
the client only as ``internal``.
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

from gazecam.assistant import QuestionError
from gazecam.errors import ConfigError, GazecamError
from gazecam.tasks import CardTooLargeError

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


class ClientError(Exception):
    """A request the service refuses, with the code and one-line message the client gets."""

    def __init__(
        self, code: ErrorCode, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
        self.headers = dict(headers or {})  # HTTP only: e.g. Allow with a 405
        if code == "unauthorized":
            self.headers["WWW-Authenticate"] = "Bearer"

    @property
    def status(self) -> int:
        """The HTTP status of this error."""
        return _STATUS[self.code]

    def frame(self, request_id: str | None = None) -> dict[str, Any]:
        """The error object, as a websocket frame or an HTTP body."""
        return {"type": "error", "id": request_id, "code": self.code, "message": self.message}


class ErrorFrame(BaseModel):
    """The error object (documents the error responses in the OpenAPI schema)."""

    type: Literal["error"]
    id: str | None = Field(description="The ask's id on a websocket; null over HTTP.")
    code: ErrorCode
    message: str = Field(description="One line, for people.")


def error_responses(*codes: ErrorCode) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of a route that may answer with these errors."""
    return {
        _STATUS[code]: {"model": ErrorFrame, "description": f"{code} (the error object)"}
        for code in codes
    }


def _validation_message(exc: ValidationError | RequestValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"] if part != "body") or "body"
    return f"{where}: {first['msg']}"


def client_error(exc: BaseException) -> ClientError:
    """What the client is told about ``exc`` (logged here when it is not the client's doing)."""
    if isinstance(exc, ClientError):
        return exc
    if isinstance(exc, CardTooLargeError):
        return ClientError("too_large", str(exc))
    if isinstance(exc, QuestionError | ConfigError):
        return ClientError("bad_request", str(exc))
    if isinstance(exc, ValidationError | RequestValidationError):
        return ClientError("bad_request", _validation_message(exc))
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
    return JSONResponse(error.frame(), status_code=error.status, headers=error.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every HTTP error with the service's error object."""
    # Exception too: Starlette still re-raises it afterwards, so the server logs it as well.
    handled = (ClientError, GazecamError, ValidationError, RequestValidationError)
    for kind in (*handled, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, _respond)
