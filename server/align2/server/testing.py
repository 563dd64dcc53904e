"""Running a real align2 server for tests and benchmarks.

ServerThread: an App on its own event loop in a background thread of this process.
ServerProcess: ``python -m align2.server`` as a child process, its ports read from its log.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import re
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Sequence
from typing import Any

from align2.server import backends
from align2.server.app import App
from align2.server.config import Config

_READY = re.compile(r"align2 serving: grpc port (\d+), metrics port (\d+|None)")


class ServerThread:
    """A real App on 127.0.0.1:0 (metrics on a free port), with its own event loop.

    Sync and async clients in this process both reach it over loopback gRPC.
    """

    def __init__(self, config: Config, registry: backends.Registry | None = None) -> None:
        config.server.host = "127.0.0.1"
        config.server.port = 0
        config.server.metrics_port = 0  # a free port: several servers may run at once
        self.app = App(config, registry)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="align2-server", daemon=True)
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

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        """Run a coroutine on the server's loop (to inspect or change it) and return its value."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self, grace: float = 1.0) -> None:
        if self._error is None and self._thread.is_alive():
            self.call(self.app.stop(grace))
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=60)


class ServerProcess:
    """``python -m align2.server ARGS`` with stdout and stderr in ``log``.

    ``start()`` waits for the "align2 serving" line and reads the gRPC and metrics ports.
    """

    def __init__(self, args: Sequence[str], log: pathlib.Path, env: dict[str, str] | None = None):
        self.args = [sys.executable, "-m", "align2.server", *args]
        self.log = log
        self.env = dict(os.environ if env is None else env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.metrics_port: int | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 300) -> ServerProcess:
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                self.args, stdout=out, stderr=subprocess.STDOUT, env=self.env
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _READY.search(self.log.read_text())
            if match:
                self.port = int(match.group(1))
                self.metrics_port = int(match.group(2)) if match.group(2).isdigit() else None
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log.read_text()}")
            time.sleep(0.1)
        self.proc.kill()
        raise RuntimeError(f"server did not start in {timeout} s:\n{self.log.read_text()}")

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM, then wait; returns the exit status (killed after ``timeout``)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
