"""The server's phases: construct -> load -> warm up -> SERVING -> drain -> stopped.

RPCs are served only in SERVING; in any other phase they fail with UNAVAILABLE, so that a
client retries elsewhere (the health service reports the same phase to probes).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable

from align2.server.errors import Unavailable


class Phase(enum.Enum):
    STARTING = "starting"  # loading models and warming up
    SERVING = "serving"
    DRAINING = "draining"  # SIGTERM: finishing in-flight calls, refusing new ones
    STOPPED = "stopped"
    FAILED = "failed"  # an unrecoverable device error: the orchestrator should restart us


_WHY = {
    Phase.STARTING: "server is warming up; retry shortly",
    Phase.DRAINING: "server is shutting down; retry on another replica",
    Phase.STOPPED: "server is stopped",
    Phase.FAILED: "server hit an unrecoverable device error and awaits restart",
}


class Lifecycle:
    def __init__(self) -> None:
        self._phase = Phase.STARTING
        self._on_leaving: set[Callable[[], object]] = set()
        self._failed = asyncio.Event()

    @property
    def phase(self) -> Phase:
        return self._phase

    @phase.setter
    def phase(self, value: Phase) -> None:
        leaving = self._phase is Phase.SERVING and value is not Phase.SERVING
        self._phase = value
        if value is Phase.FAILED:
            self._failed.set()
        if leaving:
            for callback in list(self._on_leaving):
                callback()

    def on_leaving_serving(self, callback: Callable[[], object]) -> Callable[[], None]:
        """Call ``callback`` (on the thread that changes the phase: the event loop's) when
        the server stops serving (drain, failure). Returns the function that unregisters
        it. Long-lived calls (Curate streams) use it to stop taking work at once."""
        self._on_leaving.add(callback)
        return lambda: self._on_leaving.discard(callback)

    async def wait_failed(self) -> None:
        """Return once the phase is FAILED (``align2 serve`` then stops, exit status 1)."""
        await self._failed.wait()

    @property
    def serving(self) -> bool:
        return self.phase is Phase.SERVING

    def check_serving(self) -> None:
        if self.phase is not Phase.SERVING:
            raise Unavailable(_WHY[self.phase])
