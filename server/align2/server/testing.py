"""Running a real align2 server for tests and benchmarks.

ServerThread: an App on its own event loop in a background thread of this process.
ChildProcess: any command as a child process in its own session, stopped with all it started.
ServerProcess: ``python -m align2.server`` as a ChildProcess, its ports read from its log.
free_port, http_ok: a free loopback port for a child that needs one named; whether an
HTTP endpoint (a child's health check) answers 200.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from contextlib import suppress
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


def free_port() -> int:
    """A loopback port free now (for a child that cannot be given port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_ok(url: str) -> bool:
    """Whether ``url`` answers HTTP 200 now (a child's health or readiness endpoint)."""
    with suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
        return bool(response.status == 200)
    return False


class ChildProcess:
    """``command`` as a child process, stdout and stderr in ``log``, in its own session.

    Its own session (and so its own process group): a terminal's Ctrl-C reaches only this
    process, which then stops the child in order (``wait_until`` does on a failed start;
    after it, the caller's ``finally``), and ``stop()`` also reaches whatever the child
    started and left in its group (an inference engine's worker processes), even those
    whose parent died.
    """

    def __init__(
        self, command: Sequence[str], log: pathlib.Path, env: dict[str, str] | None = None
    ) -> None:
        self.command = list(command)
        self.log = log
        self.env = dict(os.environ if env is None else env)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ChildProcess:
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                self.command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        return self

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``ready()`` until it holds; RuntimeError naming ``what``, with the log's
        tail, when the child exits first or ``timeout`` seconds pass. However the wait
        fails (Ctrl-C included: it reaches only this process), the child and what it
        started are stopped first."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if ready():
                    return
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{what} exited {self.proc.returncode}:\n{self.tail()}")
                time.sleep(0.1)
            raise RuntimeError(f"{what} was not ready in {timeout} s:\n{self.tail()}")
        except BaseException:
            self.stop(grace=10)
            raise

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace: float = 120) -> int | None:
        """SIGTERM the child and wait up to ``grace`` seconds (it stops what it started
        itself); then SIGTERM, and after 10 s SIGKILL, whatever is left of its process
        group. Returns the child's exit status (None: it never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            code = self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not self._group_alive():
                break
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            deadline = time.monotonic() + 10
            while self._group_alive() and time.monotonic() < deadline:
                time.sleep(0.1)
        return code

    def _group_alive(self) -> bool:
        """Whether a process of the child's group still runs (zombies left out: where
        nothing reaps orphans, one would otherwise hold every stop for 20 s)."""
        assert self.proc is not None
        group = self.proc.pid
        proc = pathlib.Path("/proc")
        if not proc.is_dir():  # not Linux: ask the kernel, zombies counted
            try:
                os.killpg(group, 0)
            except (ProcessLookupError, PermissionError):
                return False
            return True
        for stat in proc.glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # gone meanwhile
            if fields[2] == str(group) and fields[0] != "Z":  # pgrp, state
                return True
        return False


class ServerProcess(ChildProcess):
    """``python -m align2.server ARGS`` with stdout and stderr in ``log``.

    ``start()`` waits for the "align2 serving" line and reads the gRPC and metrics ports.
    """

    def __init__(self, args: Sequence[str], log: pathlib.Path, env: dict[str, str] | None = None):
        super().__init__([sys.executable, "-m", "align2.server", *args], log, env)
        self.port = 0
        self.metrics_port: int | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 300) -> ServerProcess:
        super().start()
        self.wait_until(self._ready, timeout, "server")
        return self

    def _ready(self) -> bool:
        match = _READY.search(self.log.read_text(errors="replace"))
        if match:
            self.port = int(match.group(1))
            self.metrics_port = int(match.group(2)) if match.group(2).isdigit() else None
        return match is not None
