"""Structured logging: one JSON object per line, each with the request id of its RPC.

The request id comes from the caller's ``x-request-id`` metadata or is made up per call,
and is sent back in the trailing metadata. Sample text and images are never logged unless
``server.log_payloads`` is on (and then only at DEBUG).
"""

from __future__ import annotations

import contextvars
import logging
import re
import uuid

from pythonjsonlogger.json import JsonFormatter

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


REQUEST_ID = re.compile(r"[A-Za-z0-9._:/@+=-]{1,128}")
"""A caller's x-request-id that is used as given: what ids are made of (UUIDs, ULIDs, trace
ids, job names). Spaces, quotes and brackets are not: in the text log format a given id
could otherwise pose as another field or event (``x code=OK" "rpc":"Evil``)."""


def new_request_id(given: str | None = None) -> str:
    """Use the caller's id when it matches REQUEST_ID, else a fresh one; set it."""
    rid = given if given and REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
    request_id.set(rid)
    return rid


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class _ClientGoneFilter(logging.Filter):
    """grpc's asyncio server logs an ERROR with a traceback when it cannot send a response
    because the call already ended (``ExecuteBatchError``, grpc/grpc#32551): a client that
    cancelled or timed out, routine under load. Said once, at INFO, without the traceback,
    so that an ERROR in the log still means a fault of the server."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if type(error).__name__ == "ExecuteBatchError":
            said = record.getMessage()
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = "a response could not be sent, the call had ended (client gone): %s"
            record.args = (said,)
            record.exc_info = record.exc_text = None
            return logging.getLogger(record.name).isEnabledFor(logging.INFO)
        return True


GRPC_CORE_LOGGER = "grpc._cython.cygrpc"


def setup(level: str, fmt: str) -> None:
    """Configure the root logger once, in main()."""
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    core = logging.getLogger(GRPC_CORE_LOGGER)
    if not any(isinstance(f, _ClientGoneFilter) for f in core.filters):
        core.addFilter(_ClientGoneFilter())
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
