"""Structured logging: one JSON object per line, each with the request id of its RPC.

The request id comes from the caller's ``x-request-id`` metadata or is made up per call,
and is sent back in the trailing metadata. Sample text and images are never logged unless
``server.log_payloads`` is on (and then only at DEBUG).
"""

from __future__ import annotations

import contextvars
import logging
import uuid

from pythonjsonlogger.json import JsonFormatter

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


def new_request_id(given: str | None = None) -> str:
    """Use the caller's id when it is short and printable, else a fresh one; set it."""
    rid = given if given and len(given) <= 128 and given.isprintable() else uuid.uuid4().hex
    request_id.set(rid)
    return rid


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


def setup(level: str, fmt: str) -> None:
    """Configure the root logger once, in main()."""
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
                rename_fields={"levelname": "level", "asctime": "time", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
