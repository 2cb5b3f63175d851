"""Structured JSON logs, one line per record, with the per-session fields (never a key or audio).

No raw key reaches a log line, whatever the client sends: `redact` strips query strings (uvicorn logs
`"WebSocket /v1/realtime?<query>" 401` for every WebSocket, whatever `access_log` says, and a client may
put `?api_key=sk-...` there) and anything key-shaped (`sk-...` keys, `ek_...` client secrets, Bearer
tokens, the browser subprotocol `openai-insecure-api-key.<key>`, `api-key:` / `authorization:` header
lines as websockets logs them at DEBUG, URL passwords). `configure_logging` puts `RedactFilter` on the one
handler every logger propagates to, `JsonFormatter` redacts what it writes and gives a logged exception by
its type only, and an uncaught exception goes through logging (its traceback redacted) rather than straight
to stderr.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import traceback
from types import TracebackType
from typing import Final, TextIO

import orjson

# Fields a record may carry through `extra=` that belong in the JSON line.
CONTEXT_FIELDS: Final = ("session_id", "key_hash", "model", "deployment_id", "close_reason", "reason")
REDACTED: Final = "[redacted]"
UVICORN_LOGGERS: Final = ("uvicorn", "uvicorn.error", "uvicorn.access")

# Each pattern keeps its group 1 (what names the secret) and replaces the rest with REDACTED.
_PATTERNS: Final = tuple(
    (re.compile(pattern), rf"\1{REDACTED}")
    for pattern in (
        # A query string after a path or URL: `/v1/realtime?model=x&api_key=sk-...`.
        r"((?:[\w/%.~-])\?)[^\s\"'<>]+",
        # The browser form of a key, in a Sec-WebSocket-Protocol header or a subprotocol list.
        r"(?i)(openai-insecure-api-key\.)[^\s,\"'\]]+",
        # A token after an HTTP auth scheme.
        r"(?i)(\b(?:bearer|basic)\s+)[^\s,\"']+",
        # A header or field whose value is a secret: `api-key: ...`, `"api_key": "..."`, `secret=...`.
        r"(?i)(\b(?:x-)?(?:api[-_]?key|authorization|ocp-apim-subscription-key|client_secret|secret|password"
        r"|access_token|master_key)[\"']?\s*[:=]\s*[\"']?)(?!\[redacted\]|(?i:bearer|basic)\s)[^\s,\"'&]+",
        # Key-shaped tokens anywhere: LiteLLM/OpenAI keys (sk-..., sk-proj-...) and client secrets (ek_...).
        r"(\b)(?:sk-|ek_)[\w.~+/=-]{2,}",
        # The password of a URL: scheme://user:password@host.
        r"(\b[a-z][\w+.-]*://[^\s:/@]*:)[^\s@/]+(?=@)",
    )
)


def redact(text: str) -> str:
    """`text` with query strings and anything key-shaped replaced by REDACTED."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactFilter(logging.Filter):
    """Rewrites every record it sees so that no handler or formatter after it can write a secret: the
    message (formatted with its args), string `extra` fields and the exception text."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        for name in CONTEXT_FIELDS:
            value = record.__dict__.get(name)
            if isinstance(value, str):
                record.__dict__[name] = redact(value)
        if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object (redacted; an exception by its type only, never its text)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for name in CONTEXT_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = redact(value) if isinstance(value, str) else value
        if record.exc_info and record.exc_info[0] is not None:
            line["exc_type"] = record.exc_info[0].__name__
        return orjson.dumps(line, default=str).decode()


def configure_logging(level: int = logging.INFO, *, stream: TextIO | None = None) -> None:
    """JSON lines on stderr (or `stream`) for the sidecar's and uvicorn's loggers, every record redacted;
    uncaught exceptions (main thread and others) are logged the same way instead of printed."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.addFilter(RedactFilter())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in UVICORN_LOGGERS:  # uvicorn's own logging config gives these handlers that bypass ours
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_thread_uncaught


_uncaught = logging.getLogger("sidecar.uncaught")


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    text = "".join(traceback.format_exception(kind, exc, tb))
    _uncaught.critical("uncaught exception: %s", text, exc_info=(kind, exc, tb))


def _log_thread_uncaught(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None:
        return
    _log_uncaught(args.exc_type, args.exc_value, args.exc_traceback)
