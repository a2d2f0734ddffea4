"""No secret in a log line: the token is taken out of every log record as it is made.

uvicorn logs each request line with its query string (``WebSocket /v1/ask?token=…``), and a
traceback may quote a URL. Handlers and formatters belong to whoever runs the service (uvicorn's
log config, a systemd journal, a test's capture), so the redaction sits where every record of
the process is made, the log record factory, instead of in one handler's filter that another
set-up would not have.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import unquote_plus

REDACTED = "***"

# A query parameter (after ? or &) and its value, up to the next parameter or the end of a URL.
_PARAMETER = re.compile(r"(?<=[?&])([^=&\s\"'#]+)=([^&\s\"'#]*)")
_BEARER = re.compile(r"\b(bearer\s+)[^\s\"',;]+", re.IGNORECASE)


def _parameter(match: re.Match[str]) -> str:
    # Decoded as the server decodes it: %74oken=… and TOKEN=… are taken out too.
    if unquote_plus(match.group(1)).strip().lower() == "token":
        return f"{match.group(1)}={REDACTED}"
    return match.group(0)


def redact(text: str) -> str:
    """``text`` without the values of ``token=`` query parameters and Bearer credentials."""
    return _BEARER.sub(rf"\1{REDACTED}", _PARAMETER.sub(_parameter, text))


def _redact_value(value: Any) -> Any:
    # Only text is changed: formatters rely on the other arguments' types (uvicorn's %d status).
    return redact(value) if isinstance(value, str) else value


class _RedactingRecordFactory:
    """Wraps the record factory in place: makes the record, then takes the secrets out."""

    def __init__(self, make: Any) -> None:
        self._make = make

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record: logging.LogRecord = self._make(*args, **kwargs)
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact_value(arg) for arg in record.args)
        elif isinstance(record.args, dict):
            record.args = {key: _redact_value(arg) for key, arg in record.args.items()}
        if record.exc_info and record.exc_info[0] is not None:
            # Formatters use the traceback's text where it is set, so it is set here, redacted.
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return record


def redact_secrets_in_logs() -> None:
    """Make every log record of this process without tokens (once; later calls do nothing)."""
    factory = logging.getLogRecordFactory()
    if not isinstance(factory, _RedactingRecordFactory):
        logging.setLogRecordFactory(_RedactingRecordFactory(factory))
