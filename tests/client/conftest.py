"""The ``fake`` fixture: a real gRPC server on 127.0.0.1:0 serving :class:`FakeCuration`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from client_fakes import FakeCuration, serving


@pytest.fixture
def fake() -> Iterator[FakeCuration]:
    with serving() as servicer:
        yield servicer
