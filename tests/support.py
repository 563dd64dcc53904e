"""Test helpers: a real align2 server in a background thread, and test images."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image

from align2.server.app import App
from align2.server.config import Config


def png(width: int = 40, height: int = 30, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(width: int = 40, height: int = 30, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    image = Image.effect_noise((width, height), 40 + seed).convert("RGB")
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


class ServerThread:
    """A real App on 127.0.0.1:0, with its own event loop in a thread.

    Sync and async clients in the test process both reach it over loopback gRPC.
    """

    def __init__(self, config: Config) -> None:
        config.server.host = "127.0.0.1"
        config.server.port = 0
        config.server.metrics_port = 0  # a free port: several servers may run at once
        self.app = App(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="align2-test-server", daemon=True)
        self._started = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.app.start())
        except BaseException as exc:
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.app.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        self._started.wait(timeout=600)
        if self._error is not None:
            raise self._error
        return self

    def call(self, coro: object, timeout: float = 60) -> object:
        """Run a coroutine on the server's loop (e.g. to inspect or stop it)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)  # type: ignore[arg-type]

    def stop(self, grace: float = 1.0) -> None:
        if self._error is None and self._thread.is_alive():
            self.call(self.app.stop(grace))
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=60)


@contextmanager
def running(config: Config) -> Iterator[ServerThread]:
    server = ServerThread(config).start()
    try:
        yield server
    finally:
        server.stop()
