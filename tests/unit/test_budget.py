"""The request-bytes budget: claims, refusals that name the limit, release, the config check."""

from __future__ import annotations

import pytest

from align2.server.config import Config
from align2.server.core.budget import ByteBudget
from align2.server.errors import ConfigError, Overloaded


def test_claims_up_to_the_limit_and_releases_once() -> None:
    budget = ByteBudget(100)
    first = budget.claim(60)
    refusal = r"41 bytes do not fit: 60 bytes .* limits\.max_inflight_bytes 100"
    with pytest.raises(Overloaded, match=refusal):
        budget.claim(41)
    assert budget.in_flight == 60  # a refusal claims nothing
    with budget.claim(40):
        assert budget.in_flight == 100 and not budget.fits(1)
    first.release()
    first.release()
    assert budget.in_flight == 0 and budget.fits(100)


def test_a_refusal_asks_for_a_retry() -> None:
    assert ByteBudget(1).refusal(2).retry_after is not None


def test_zero_is_unbounded_but_still_counted() -> None:
    budget = ByteBudget(0)
    with budget.claim(1 << 40):
        assert budget.in_flight == 1 << 40 and budget.fits(1 << 40)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, r"limits\.max_inflight_bytes: must be >= 0"),
        (1000, r"limits\.max_inflight_bytes: 1000 is less than limits\.max_message_bytes"),
    ],
)
def test_config_refuses_a_budget_a_lone_call_cannot_fit(value: int, message: str) -> None:
    config = Config()
    config.limits.max_inflight_bytes = value
    with pytest.raises(ConfigError, match=message):
        config.validate()
    config.limits.max_inflight_bytes = 0
    config.validate()


def test_reports_each_drain_with_the_bytes_since_the_last() -> None:
    drains: list[int] = []
    budget = ByteBudget(100, on_drained=drains.append)
    first, second = budget.claim(30), budget.claim(20)
    first.release()
    assert drains == []  # 20 bytes still in flight
    second.release()
    budget.claim(5).release()
    assert drains == [50, 5]
