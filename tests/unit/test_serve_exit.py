"""`align2 serve`'s exit status (server/cli.py ``serve``), with the App replaced by a fake
that plays a lifecycle: the process-level behaviour is in tests/integration/test_process.py."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
from types import SimpleNamespace
from typing import Any

import pytest

from align2.server import app as app_module
from align2.server import cli, threads


class FailingApp:
    """Starts, hits an unrecoverable device error, and is sent SIGTERM while it drains
    (a liveness probe's kill, `docker stop`)."""

    threads = None

    def __init__(self, config: Any) -> None:
        del config
        self.lifecycle = SimpleNamespace(wait_failed=lambda: asyncio.sleep(0.05))

    async def start(self) -> None:
        pass

    async def stop(self, grace: float | None = None) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.2)  # the signal is handled while it drains


def test_a_sigterm_while_draining_after_a_device_error_keeps_exit_status_1(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(app_module, "App", FailingApp)
    monkeypatch.setattr(threads, "apply", lambda _plan: None)
    config = SimpleNamespace(server=SimpleNamespace(grace_seconds=1.0))
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert asyncio.run(cli.serve(config)) == 1  # type: ignore[arg-type]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_build_folder_is_removed_when_it_ends_and_by_remove_unfinished(
    tmp_path: pathlib.Path,
) -> None:
    from align2.server.models import scratch

    with scratch.folder("m", tmp_path) as done:
        (done / "w.bin").write_bytes(b"1")
    assert not done.exists() and scratch.remove_unfinished() == 0
    with scratch.folder("m", tmp_path) as running:
        (running / "w.bin").write_bytes(b"1")
        assert running.name.startswith(".m.") and scratch.remove_unfinished() == 1
        assert not running.exists()
