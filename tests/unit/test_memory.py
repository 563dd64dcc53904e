"""The heap trimmer: malloc_trim once a burst of request bytes has drained, and only then."""

from __future__ import annotations

from align2.server.memory import MIN_RELEASED_BYTES, HeapTrimmer, rss_bytes


class FakeTrim:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, pad: int) -> int:
        self.calls += 1
        return 1


def trimmer(idle: bool = True) -> tuple[HeapTrimmer, FakeTrim]:
    made = HeapTrimmer(0.0, is_idle=lambda: idle)
    fake = FakeTrim()
    made._trim = fake
    return made, fake


async def test_a_large_burst_is_trimmed_once_when_idle() -> None:
    made, fake = trimmer()
    made.drained(MIN_RELEASED_BYTES // 2)
    assert made._timer is None  # too little passed through to be worth a trim
    made.drained(MIN_RELEASED_BYTES // 2)
    assert made._timer is not None
    made._timer.cancel()
    made._fire()
    assert made._running is not None
    await made._running
    assert fake.calls == 1
    made.drained(1)  # the count starts again after a trim
    assert made._timer is None


async def test_no_trim_while_calls_run() -> None:
    made, fake = trimmer(idle=False)
    made.drained(MIN_RELEASED_BYTES)
    assert made._timer is not None
    made._timer.cancel()
    made._fire()
    assert made._running is None and fake.calls == 0
    made.close()


def test_off_with_a_negative_delay() -> None:
    made = HeapTrimmer(-1, is_idle=lambda: True)
    made.drained(MIN_RELEASED_BYTES)  # no loop needed: nothing is scheduled
    assert made._timer is None


def test_rss_is_read_on_linux() -> None:
    rss = rss_bytes()
    assert rss is None or rss > 0
