"""Log records: grpc-core's noise about clients that left is not an ERROR."""

from __future__ import annotations

import logging

from grpc._cython import cygrpc

from align2.server import logs


def record(exc: Exception) -> logging.LogRecord:
    return logging.LogRecord(
        logs.GRPC_CORE_LOGGER,
        logging.ERROR,
        __file__,
        1,
        "ExecuteBatchError raised in core by servicer method [%s]",
        ("/align2.v1.CurationService/Score",),
        (type(exc), exc, None),
    )


def test_a_response_to_a_gone_client_is_said_at_info_without_a_traceback() -> None:
    core = logging.getLogger(logs.GRPC_CORE_LOGGER)
    before = core.level
    core.setLevel(logging.INFO)
    try:
        gone = record(cygrpc.ExecuteBatchError('Failed "execute_batch"'))
        assert logs._ClientGoneFilter().filter(gone)
    finally:
        core.setLevel(before)
    assert (gone.levelno, gone.levelname, gone.exc_info) == (logging.INFO, "INFO", None)
    assert gone.getMessage() == (
        "a response could not be sent, the call had ended (client gone): "
        "ExecuteBatchError raised in core by servicer method [/align2.v1.CurationService/Score]"
    )
    core.setLevel(logging.WARNING)  # a server run at --log-level warning: not said at all
    try:
        assert not logs._ClientGoneFilter().filter(record(cygrpc.ExecuteBatchError("x")))
    finally:
        core.setLevel(before)
    fault = record(RuntimeError("boom"))  # anything else stays an ERROR with its traceback
    assert logs._ClientGoneFilter().filter(fault)
    assert fault.levelno == logging.ERROR and fault.exc_info is not None


def test_a_callers_request_id_is_kept_only_when_made_of_id_characters() -> None:
    """Fails on: an id with quotes or spaces kept (it could pose as another log field)."""
    for given in ("job-7", "0a1b2c3d-4e5f-6789-abcd-ef0123456789", "run/12:shard=3", "x" * 128):
        assert logs.new_request_id(given) == given
    for given in ('x code=OK" "rpc":"Evil', "a b", "x" * 129, "", "é", "a\tb", None):
        made = logs.new_request_id(given)
        assert made != given and len(made) == 32 and logs.REQUEST_ID.fullmatch(made)
