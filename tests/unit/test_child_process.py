"""The child-process harness of tests and benchmarks (align2.server.testing.ChildProcess)."""

from __future__ import annotations

import os
import pathlib
import socket
import sys

import pytest

from align2.server.testing import ChildProcess, free_port, http_ok

# A parent that starts a grandchild, prints its pid and waits; SIGTERM ends the parent
# alone, the grandchild lives on (as an engine's worker whose front end died).
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
print(child.pid, flush=True)
time.sleep(300)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except (ProcessLookupError, FileNotFoundError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_stop_ends_the_child_and_what_it_started(tmp_path: pathlib.Path) -> None:
    child = ChildProcess([sys.executable, "-c", PARENT], tmp_path / "log").start()
    child.wait_until(lambda: child.tail().strip().isdigit(), timeout=30, what="parent")
    grandchild = int(child.tail())
    assert alive(grandchild)
    assert child.proc is not None
    assert os.getpgid(child.proc.pid) == child.proc.pid != os.getpgid(0)  # its own group
    code = child.stop(grace=10)
    assert code == -15  # the parent ended by SIGTERM
    assert not alive(grandchild)  # reached through the child's process group


def test_wait_until_names_a_child_that_exits_before_it_is_ready(tmp_path: pathlib.Path) -> None:
    script = "print('no luck'); raise SystemExit(3)"
    child = ChildProcess([sys.executable, "-c", script], tmp_path / "log").start()
    with pytest.raises(RuntimeError, match=r"(?s)engine exited 3:.*no luck"):
        child.wait_until(lambda: False, timeout=30, what="engine")


def test_wait_until_stops_a_child_that_is_not_ready_in_time(tmp_path: pathlib.Path) -> None:
    child = ChildProcess([sys.executable, "-c", "import time; time.sleep(300)"], tmp_path / "l")
    child.start()
    with pytest.raises(RuntimeError, match=r"engine was not ready in 0\.5 s"):
        child.wait_until(lambda: False, timeout=0.5, what="engine")
    assert child.proc is not None and child.proc.poll() is not None


def test_a_failed_start_stops_what_the_child_started(tmp_path: pathlib.Path) -> None:
    child = ChildProcess([sys.executable, "-c", PARENT], tmp_path / "log").start()
    child.wait_until(lambda: child.tail().strip().isdigit(), timeout=30, what="parent")
    grandchild = int(child.tail())

    def interrupted() -> bool:
        raise KeyboardInterrupt  # Ctrl-C while waiting: it reaches this process only

    with pytest.raises(KeyboardInterrupt):
        child.wait_until(interrupted, timeout=30, what="parent")
    assert child.proc is not None and child.proc.poll() is not None
    assert not alive(grandchild)


def test_stop_before_start_is_a_no_op(tmp_path: pathlib.Path) -> None:
    assert ChildProcess(["true"], tmp_path / "log").stop() is None


def test_a_free_port_answers_nothing_yet() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # free: it can be bound
    assert not http_ok(f"http://127.0.0.1:{port}/health")
