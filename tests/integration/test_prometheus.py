"""/metrics scraped by a real Prometheus server (Debian's `prometheus`) on loopback.

After traffic through our client, the test asks Prometheus's HTTP API for our series and
finds the values the service exported. Counters live in the process-wide registry (other
tests' servers share it), so expected values are read from the registry right after the
traffic, and Prometheus must agree with them.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from support import ServerThread, metric, png, score_config

from align2.client import CurationClient, Sample, Turn
from align2.server.testing import ChildProcess, free_port, http_ok

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None and not os.environ.get("ALIGN2_REQUIRE_PROMETHEUS"),
    reason="needs Debian's prometheus package (.ci/run installs it)",
)


@pytest.fixture(scope="module")
def server(tiny_llava: pathlib.Path) -> Iterator[ServerThread]:
    config = score_config(tiny_llava)
    server = ServerThread(config).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def prometheus(server: ServerThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    assert PROMETHEUS is not None, "prometheus binary not found"
    folder = tmp_path_factory.mktemp("prometheus")
    (folder / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: align2\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.app.metrics_port}']\n"
    )
    port = free_port()
    command = [
        PROMETHEUS,
        f"--config.file={folder / 'prometheus.yml'}",
        f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    prometheus = ChildProcess(command, folder / "log").start()
    try:
        ready = f"http://127.0.0.1:{port}/-/ready"
        prometheus.wait_until(lambda: http_ok(ready), timeout=60, what="prometheus")
        yield f"http://127.0.0.1:{port}"
    finally:
        prometheus.stop(grace=30)


def query(base: str, expr: str) -> float | None:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            data = json.load(reply)["data"]["result"]
    except OSError:
        return None
    return float(data[0]["value"][1]) if data else None


def wait_for(base: str, expr: str, expected: float, timeout: float = 60) -> float | None:
    """Poll until Prometheus has scraped a value equal to ``expected`` (or time runs out)."""
    deadline, value = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        value = query(base, expr)
        if value is not None and abs(value - expected) < 1e-9:
            break
        time.sleep(0.5)
    return value


def test_prometheus_scrapes_our_series_with_the_exported_values(
    server: ServerThread, prometheus: str
) -> None:
    good = Sample(id="ok", image=png(), turns=[Turn("What is it?", "A red box.")])
    bad = Sample(id="bad", image=b"not an image", turns=[Turn("Q?", "A.")])
    with CurationClient(server.target, timeout=30, retry=False) as client:
        for _ in range(3):
            client.score([good, bad])
        held = server.call(_reserve(server.app._runtimes["question"].batcher))
        try:
            with pytest.raises(grpc.RpcError):
                client.score([good])
        finally:
            server.call(_release(held))

    model = server.app._runtimes["question"].batcher.name  # both heads share one runtime
    expectations = {
        'align2_requests_total{rpc="Score",code="OK"}': metric(
            "align2_requests_total", rpc="Score", code="OK"
        ),
        'align2_requests_total{rpc="Score",code="RESOURCE_EXHAUSTED"}': metric(
            "align2_requests_total", rpc="Score", code="RESOURCE_EXHAUSTED"
        ),
        'align2_items_rejected_total{reason="invalid"}': metric(
            "align2_items_rejected_total", reason="invalid"
        ),
        'align2_items_rejected_total{reason="overloaded"}': metric(
            "align2_items_rejected_total", reason="overloaded"
        ),
        f'align2_batch_size_sum{{model="{model}"}}': metric("align2_batch_size_sum", model=model),
        f'align2_queue_depth{{model="{model}"}}': 0.0,
        'align2_model_info{model="question",backend="transformers"}': 1.0,
    }
    assert expectations['align2_requests_total{rpc="Score",code="OK"}'] >= 3
    assert expectations['align2_items_rejected_total{reason="invalid"}'] >= 3
    for expr, expected in expectations.items():
        assert wait_for(prometheus, expr, expected) == pytest.approx(expected), expr
    histogram = query(prometheus, 'align2_request_duration_seconds_count{rpc="Score",code="OK"}')
    assert histogram is not None and histogram >= 3
    refused = 'align2_request_duration_seconds_count{rpc="Score",code="RESOURCE_EXHAUSTED"}'
    assert (query(prometheus, refused) or 0) >= 1  # apart from the served calls' latency
    memory = query(prometheus, "process_resident_memory_bytes")
    assert memory is not None and memory > 10e6


async def _reserve(batcher):  # type: ignore[no-untyped-def]
    return batcher.reserve(batcher.max_queue)


async def _release(reservation):  # type: ignore[no-untyped-def]
    reservation.release()
