"""Load as tests, against a real server in this process: a burst past the queue, a storm of
short deadlines under load, more concurrent calls than one connection's stream limit. The
short forms run in `make test`; `make load` repeats them (ALIGN2_LOAD_ROUNDS) and prints
their figures (docs/operating.md has the latest). Process faults (SIGKILL, SIGTERM):
test_process_faults.py.

The device is held or slowed with a forward pre-hook (tests/load.py), so that "the queue is
full" and "the deadline passed while queued" are states the test sets up, not races."""

from __future__ import annotations

import collections
import pathlib
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from load import (
    SERVING,
    DeviceGate,
    ForwardLog,
    env_int,
    health,
    outcome,
    outcomes,
    runtimes,
    score_request,
    stub,
    wait_until,
)
from support import ServerThread

from align2.server.config import Config, ModelConfig

ROUNDS = env_int("ALIGN2_LOAD_ROUNDS", 1)
QUEUE = 16
BATCH = 4
BURST = 200
CONNECTIONS = 4  # BURST / CONNECTIONS calls per connection: within limits.max_streams (100)
WAVE = 10  # storm calls at once while the device is held: within the queue
# An item expires when its timer runs on the server's event loop; until then (the loop's
# lag, microseconds when idle) a batch being formed can still take it. Measured: 1 item of
# 67 started 3 us after its deadline.
LOOP_LAG = 0.02
# An item computed in time whose answer then takes longer than its deadline's rest to
# reach the client ends DEADLINE_EXCEEDED there: seen 8 ms before the deadline, with the
# client's and server's loops busy on 2 cores. Time allowed for that way back:
DELIVERY = 0.1


@pytest.fixture(scope="module")
def server(tiny_llava: pathlib.Path) -> Iterator[ServerThread]:
    config = Config()
    config.models = {n: ModelConfig(path=str(tiny_llava)) for n in ("question", "answer")}
    config.align.enabled = False
    config.batching.max_queue_items = QUEUE
    config.batching.max_batch_size = BATCH
    server = ServerThread(config).start()
    yield server
    server.stop()


@pytest.fixture
def channels(server: ServerThread) -> Iterator[list[grpc.Channel]]:
    """CONNECTIONS channels with a connection each (channels of equal arguments share one
    from gRPC's global subchannel pool)."""
    own = [("grpc.use_local_subchannel_pool", 1)]
    opened = [grpc.insecure_channel(server.target, options=own) for _ in range(CONNECTIONS)]
    yield opened
    for channel in opened:
        channel.close()


def queue_load(server: ServerThread) -> int:
    return sum(rt.batcher.load for rt in runtimes(server))


def test_a_burst_past_the_queue_is_answered_ok_or_resource_exhausted(
    server: ServerThread, channels: list[grpc.Channel]
) -> None:
    """200 one-sample Score calls at once against a 16-item queue. With the device held,
    admission is exact: 16 calls admitted, 184 refused at once; then the same burst on a
    free device: every call answered, OK or RESOURCE_EXHAUSTED. One forward pass per call
    answered OK, none for a refused one."""
    gate, log = DeviceGate(server), ForwardLog()
    restore = log.install(server)
    try:
        for _ in range(ROUNDS):
            held = burst(channels, gate)
            assert held == {"OK": QUEUE, "RESOURCE_EXHAUSTED": BURST - QUEUE}
            assert log.items == QUEUE
            log.batches.clear()
            started = time.monotonic()
            free = burst(channels)
            seconds = time.monotonic() - started
            assert set(free) <= {"OK", "RESOURCE_EXHAUSTED"}, free
            assert free["OK"] >= QUEUE
            assert log.items == free["OK"]
            log.batches.clear()
            print(f"\nburst of {BURST} on a free device: {dict(free)} in {seconds:.2f} s")
    finally:
        restore()
        gate.remove()
    assert queue_load(server) == 0
    assert health(channels[0]) == SERVING


def burst(channels: list[grpc.Channel], gate: DeviceGate | None = None) -> collections.Counter:
    """BURST calls at once, spread over the connections; with ``gate``, the device is held
    until all but QUEUE of them were refused (the rest are admitted and wait)."""
    if gate is not None:
        gate.hold()
    calls = [
        stub(channels[i % len(channels)]).Score.future(score_request(i), timeout=60)
        for i in range(BURST)
    ]
    if gate is not None:
        wait_until(lambda: sum(f.done() for f in calls) == BURST - QUEUE, 30, "refusals")
        gate.release()
    return outcomes(calls)


def test_calls_past_max_streams_on_one_connection_wait_rather_than_fail(
    server: ServerThread,
) -> None:
    """limits.max_streams (100) bounds the concurrent calls of one connection; "more wait in
    gRPC until one ends, none is refused" (Limits.max_streams in the proto). 200 at once on
    one channel, five times: each call answered OK or RESOURCE_EXHAUSTED (the queue), none
    UNAVAILABLE."""
    with grpc.insecure_channel(server.target) as channel:
        assert outcome(stub(channel).Score.future(score_request(0), timeout=30)) == "OK"
        found: collections.Counter[str] = collections.Counter()
        for _ in range(5):
            found.update(
                outcomes(
                    [stub(channel).Score.future(score_request(i), timeout=60) for i in range(BURST)]
                )
            )
        assert set(found) <= {"OK", "RESOURCE_EXHAUSTED"}, found


def test_expired_work_is_never_computed(server: ServerThread, channels: list[grpc.Channel]) -> None:
    """Calls with 50 ms deadlines. Held device: 100 of them (in waves of 10) expire in the
    queue behind a call on the device; once it is free it computes that call's batch and
    nothing else. Under load (4 callers without deadline, each pass 20 ms): no item starts
    on the device later than LOOP_LAG after its deadline, and the passes are at most the
    calls answered OK plus the items whose deadline passed while they were on the device
    (their batch in flight) or their answer on its way back (DELIVERY), plus one batch."""
    channel = channels[0]
    gate, log = DeviceGate(server), ForwardLog()
    restore = log.install(server)
    try:
        gate.hold()
        blocker = stub(channel).Score.future(score_request(0), timeout=60)
        assert gate.on_device.wait(30)
        storm: collections.Counter[str] = collections.Counter()
        for wave in range(100 // WAVE):
            calls = [
                stub(channel).Score.future(score_request(wave * WAVE + i), timeout=0.05)
                for i in range(WAVE)
            ]
            storm.update(outcomes(calls))
            wait_until(lambda: queue_load(server) == 1, 10, "the expired items left the queue")
        gate.release()
        assert outcome(blocker) == "OK"
        # Expired calls end DEADLINE_EXCEEDED, or OK with the item's DEADLINE_EXCEEDED when the
        # server answered first (its deadline is the call's, read on arrival).
        assert set(storm) <= {"DEADLINE_EXCEEDED", "OK, items DEADLINE_EXCEEDED"}, storm
        assert log.items == 1  # the blocker's batch alone: none of the 100 was computed

        for _ in range(ROUNDS):
            log.batches.clear()
            gate.delay = 0.02
            answered = storm_under_load(channels, seconds=2.0)
            check_storm(log, answered)
    finally:
        restore()
        gate.remove()
    assert health(channel) == SERVING


def check_storm(log: ForwardLog, answered: collections.Counter[tuple[str, str]]) -> None:
    late = [
        batch.started - deadline
        for batch in log.batches
        for deadline in batch.deadlines
        if deadline is not None and deadline < batch.started
    ]
    worst = max(late, default=0.0)
    on_device = sum(  # expired while computed, or while its answer was on its way back
        1
        for batch in log.batches
        for deadline in batch.deadlines
        if deadline is not None and batch.started <= deadline < batch.finished + DELIVERY
    )
    ok = answered["load", "OK"] + answered["storm", "OK"]
    print(
        f"\ndeadline storm under load: {dict(answered)}; {log.items} forward passes in "
        f"{len(log.batches)} batches, {on_device} items expired on the device or on the way "
        f"back, {len(late)} started after their deadline (at most {worst * 1e3:.3f} ms after)"
    )
    assert worst < LOOP_LAG, f"items started on the device this long after their deadline: {late}"
    assert answered["storm", "DEADLINE_EXCEEDED"] + answered["storm", "OK, items DEADLINE_EXCEEDED"]
    # One batch of slack: an item computed just in time whose answer reached the client
    # after its deadline.
    assert log.items <= ok + on_device + BATCH


def storm_under_load(
    channels: list[grpc.Channel], seconds: float
) -> collections.Counter[tuple[str, str]]:
    """4 closed-loop callers without deadline, and every 20 ms a call with a 50 ms one."""
    answered: collections.Counter[tuple[str, str]] = collections.Counter()
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def caller(n: int) -> None:
        while time.monotonic() < stop:
            call = stub(channels[n % len(channels)]).Score.future(score_request(n), timeout=60)
            result = outcome(call)
            with lock:
                answered["load", result] += 1

    callers = [threading.Thread(target=caller, args=(n,)) for n in range(4)]
    for thread in callers:
        thread.start()
    storm = []
    while time.monotonic() < stop:
        call = stub(channels[-1]).Score.future(score_request(len(storm)), timeout=0.05)
        storm.append(call)
        time.sleep(0.02)  # pacing the storm, not synchronising
    for thread in callers:
        thread.join(timeout=60)
    for result, n in outcomes(storm).items():
        answered["storm", result] += n
    assert {result for _, result in answered} <= {
        "OK",
        "DEADLINE_EXCEEDED",
        "OK, items DEADLINE_EXCEEDED",
    }, answered
    return answered
