"""When a Curate stream that failed is opened again, and for how long.

A stream that fails with one of :attr:`ResumePolicy.codes` (UNAVAILABLE: a server that
drains or warms up says so; grpcio's blocking client reports a connection that breaks
mid-stream, a killed server, as UNAVAILABLE too) starts an *outage*. Each try waits a
backoff, then until the server reports SERVING (grpc.health.v1 Checks, each waiting for the
connection with gRPC's own reconnection and backoff), then opens a new stream. The outage
ends with the first decision on a new stream, and fails after ``max_attempts`` tries or
``max_wait_seconds``, whichever comes first; the call's own deadline bounds it too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class ResumePolicy:
    """How ``curate`` resumes a stream that failed with one of ``codes`` (see the module doc).

    Backoff before try n (from 1) is min(initial * multiplier**(n-1), max) seconds, jittered
    by +-20% so that many producers do not return at the same instant."""

    max_attempts: int = 30
    """New streams opened in one outage, at most."""
    max_wait_seconds: float = 300.0
    """Time from the failure that started an outage until giving up."""
    initial_backoff_seconds: float = 0.5
    max_backoff_seconds: float = 10.0
    backoff_multiplier: float = 2.0
    codes: tuple[str, ...] = ("UNAVAILABLE",)
    """Status code names that start or continue an outage; any other fails the call."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts: {self.max_attempts} is not positive")
        if self.max_wait_seconds <= 0:
            raise ValueError(f"max_wait_seconds: {self.max_wait_seconds} is not positive")
        if min(self.initial_backoff_seconds, self.max_backoff_seconds) < 0:
            raise ValueError("backoff seconds must not be negative")
        if self.backoff_multiplier < 1:
            raise ValueError(f"backoff_multiplier: {self.backoff_multiplier} is below 1")
        unknown = set(self.codes) - set(grpc.StatusCode.__members__)
        if unknown:
            raise ValueError(f"codes: unknown status codes {sorted(unknown)}")

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before try ``attempt`` (from 1) of an outage."""
        base = self.initial_backoff_seconds * self.backoff_multiplier ** (attempt - 1)
        return min(base, self.max_backoff_seconds) * random.uniform(0.8, 1.2)


@dataclass
class Outage:
    """The tries of one outage. ``started``: a monotonic time."""

    policy: ResumePolicy
    started: float
    attempts: int = 0

    def next_try(self, now: float) -> tuple[float, float] | None:
        """(backoff, then the longest wait for a connection) before the next try, or None
        when the outage has used its tries or its time."""
        left = self.started + self.policy.max_wait_seconds - now
        if self.attempts >= self.policy.max_attempts or left <= 0:
            return None
        self.attempts += 1
        backoff = min(self.policy.backoff(self.attempts), left)
        return backoff, left - backoff


def status_of(error: grpc.RpcError) -> tuple[str, str]:
    """The code name and details of a failed call ("UNKNOWN" when it has none)."""
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else None
    return (code.name if code is not None else "UNKNOWN"), details or ""


def resume_policy(resume: bool | ResumePolicy) -> ResumePolicy | None:
    """True: the defaults; False: None (a failed stream fails the call)."""
    if isinstance(resume, ResumePolicy):
        return resume
    return ResumePolicy() if resume else None
