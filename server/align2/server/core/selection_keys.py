"""Selection keys: Curate streams that name the same key on one server share one selector
state (the windows of both stages, per task type), so that a pipeline's workers select as
one.

Lifetime: a key's state is created when a stream first names it, kept while any stream uses
it, and for ``curate.selection_key_idle_seconds`` after the last one ends (a worker that
reconnects finds its windows again); then it is dropped. At most
``curate.max_selection_keys`` keys are live (in use or idle within the TTL): a stream naming
a new key beyond that is refused with RESOURCE_EXHAUSTED, and its RetryInfo says when the
longest-idle key expires (none idle: the idle TTL, the soonest any key can expire). With
max_selection_keys 0 a key is INVALID_ARGUMENT: nothing to wait for. State is per process:
replicas do not share it (see the Curate docs: calibrated thresholds keep replicas
consistent).

Everything runs on the server's event loop (expiry is a ``loop.call_later``): no locks.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from align2.server import metrics
from align2.server.core.selector import SelectorState, StoredScores
from align2.server.errors import InvalidArgument, TooManySelectionKeys

MAX_NAME_LENGTH = 256
"""Longest selection key or task type, in characters (Limits.max_name_length)."""


@dataclass
class _Entry:
    state: SelectorState
    users: int = 0
    expiry: asyncio.TimerHandle | None = None  # set while idle (no user)


class SelectionKeys:
    """The live selection keys of one server: ``acquire`` when a stream starts,
    ``release`` (exactly once per acquire) when it ends."""

    def __init__(
        self,
        max_keys: int,
        idle_seconds: float,
        window: int,
        max_tasks: int,
        stored: StoredScores,
    ) -> None:
        self._max_keys = max_keys
        self._idle_seconds = idle_seconds
        self._window = window
        self._max_tasks = max_tasks
        self._stored = stored
        self._live: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: str) -> bool:
        return key in self._live

    def acquire(self, key: str) -> SelectorState:
        """The state of ``key``, created when new; TooManySelectionKeys when a new key does
        not fit."""
        entry = self._live.get(key)
        if entry is None:
            if self._max_keys == 0:  # not a load to wait out: no key is ever taken here
                raise InvalidArgument(
                    "options.selection_key: this server keeps no selection keys "
                    "(limits.max_selection_keys 0); send streams without one"
                )
            if len(self._live) >= self._max_keys:
                raise TooManySelectionKeys(
                    f"options.selection_key: {len(self._live)} selection keys are live on "
                    f"this server, limits.max_selection_keys {self._max_keys} (a key stays "
                    f"live while a stream uses it and {self._idle_seconds:g} s after)",
                    retry_after=self._next_expiry(),
                )
            state = SelectorState.fresh(self._window, self._max_tasks, self._stored)
            entry = self._live[key] = _Entry(state)
            metrics.CURATE_SELECTION_KEYS.inc()
        if entry.expiry is not None:
            entry.expiry.cancel()
        entry.users += 1
        entry.expiry = None
        return entry.state

    def release(self, key: str) -> None:
        entry = self._live[key]
        entry.users -= 1
        if entry.users == 0:
            loop = asyncio.get_running_loop()
            entry.expiry = loop.call_later(self._idle_seconds, self._expire, key, entry)

    def _expire(self, key: str, entry: _Entry) -> None:
        if self._live.get(key) is entry and entry.users == 0:
            del self._live[key]
            entry.state.close()
            metrics.CURATE_SELECTION_KEYS.dec()

    def _next_expiry(self) -> float:
        """Seconds until a key can expire: the longest-idle one's expiry; with every key in
        use, the idle TTL (a stream ending now frees its key that much later)."""
        expiries = [e.expiry.when() for e in self._live.values() if e.expiry is not None]
        if not expiries:
            return self._idle_seconds
        return max(0.0, min(expiries) - asyncio.get_running_loop().time())
