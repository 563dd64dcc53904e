"""`align2 serve` as a real process: config file + flags, port 0, SIGTERM exits 0."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
from support import ServerProcess, png

from align2.client import CurationClient, Sample, Turn
from align2.server.testing import ChildProcess


@pytest.mark.parametrize("entry", [["-m", "align2.server"], ["-m", "align2.client", "serve"]])
def test_serve_process_flags_override_file_and_sigterm_exits_zero(
    entry: list[str], tiny_llava: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    config = tmp_path / "align2.toml"
    config.write_text(
        f"""
[server]
port = 1  # overridden by --port 0
[limits]
max_samples_per_call = 5
[models.question]
path = "{tiny_llava}"
[models.answer]
path = "{tiny_llava}"
"""
    )
    server = ServerProcess(
        ["--config", str(config), "--port", "0", "--metrics-port", "-1"], tmp_path / "log"
    )
    server.command[1:3] = entry  # python -m align2.server | python -m align2.client serve
    server.start()
    try:
        with CurationClient(server.target, timeout=30) as client:
            assert client.server_info().limits.max_samples_per_call == 5
            [result] = client.score([Sample(id="a", image=png(), turns=[Turn("Q?", "A.")])])
            assert result.error is None
    finally:
        assert server.stop() == 0  # SIGTERM


def test_bad_config_fails_fast_naming_the_key(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        '[models.question]\npath = "x"\nbackend = "tensorrt"\n[models.answer]\npath = "y"\n'
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "align2.server",
            "--config",
            str(config),
            "--port",
            "0",
            "--metrics-port",
            "-1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "models.question.backend: unknown backend 'tensorrt'; valid: transformers, vllm" in (
        done.stderr
    )


SLOW_LOAD = """
import os, sys, time
from align2.server import backends, cli
load = backends.load_scoring
def slow(*args):
    if os.environ.get("ALIGN2_TEST_ENGINE"):  # stands for a vLLM engine's processes
        import subprocess
        engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(f"test: engine pid {engine.pid}", flush=True)
    print("test: the model load starts", flush=True)
    time.sleep(float(os.environ.get("ALIGN2_TEST_HOLD", "120")))
    return load(*args)
backends.load_scoring = slow
sys.exit(cli.main(["serve", *sys.argv[1:]]))
"""


def test_sigterm_while_a_model_loads_exits_at_once(
    tiny_llava: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """A model load runs in a thread nothing can interrupt (here: 120 s). SIGTERM before
    SERVING, when nothing has been accepted, exits 0 at once instead of after the load,
    and takes the processes the load started with it (a vLLM engine starting)."""
    config = tmp_path / "align2.toml"
    config.write_text(
        f'[models.question]\npath = "{tiny_llava}"\n[models.answer]\npath = "{tiny_llava}"\n'
    )
    args = ["--config", str(config), "--port", "0", "--metrics-port", "-1"]
    env = {**os.environ, "ALIGN2_TEST_ENGINE": "1"}
    server = ChildProcess([sys.executable, "-c", SLOW_LOAD, *args], tmp_path / "log", env)
    server.start()
    engine: int | None = None
    try:
        server.wait_until(lambda: "the model load starts" in server.tail(), 120, "server")
        engine = int(re.search(r"engine pid (\d+)", server.tail()).group(1))  # type: ignore[union-attr]
        signalled = time.monotonic()
        assert server.proc is not None
        server.proc.terminate()  # not server.stop(): that also clears the process group
        code = server.proc.wait(timeout=60)
        waited = time.monotonic() - signalled
        assert code == 0, server.tail()
        assert waited < 30, f"exited {waited:.1f} s after SIGTERM"
        assert "stopping without waiting for the model load" in server.tail()
        gone = time.monotonic() + 10
        while alive(engine) and time.monotonic() < gone:
            time.sleep(0.1)
        assert not alive(engine), "the engine's process outlived the server"
    finally:
        server.stop(grace=10)
        if engine is not None and alive(engine):
            os.kill(engine, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Running (a killed orphan that nobody reaped yet is a zombie: not running)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


BREAKABLE = """
import os, sys
from align2.server import backends, cli
load = backends.load_scoring
def loaded(*args):
    backend = load(*args)
    base, forward = backend._base, backend._base.forward
    def forward_or_fail(*a, **k):
        if os.path.exists(os.environ["ALIGN2_TEST_BREAK"]):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return forward(*a, **k)
    base.forward = forward_or_fail
    return backend
backends.load_scoring = loaded
sys.exit(cli.main(["serve", *sys.argv[1:]]))
"""


def test_an_unrecoverable_device_error_ends_the_process_with_status_1(
    tiny_llava: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """A device in that state does not recover within the process: `align2 serve` drains
    and exits 1, so that Kubernetes, Docker's restart policy or systemd starts a fresh one."""
    config = tmp_path / "align2.toml"
    config.write_text(
        f'[models.question]\npath = "{tiny_llava}"\n[models.answer]\npath = "{tiny_llava}"\n'
    )
    trigger = tmp_path / "break"
    env = {**os.environ, "ALIGN2_TEST_BREAK": str(trigger)}
    args = ["--config", str(config), "--port", "0", "--metrics-port", "-1"]
    server = ServerProcess(args, tmp_path / "log", env)
    server.command[1:3] = ["-c", BREAKABLE]
    server.start()
    try:
        sample = Sample(id="a", image=png(), turns=[Turn("Q?", "A.")])
        with CurationClient(server.target, timeout=30, retry=False) as client:
            assert client.score([sample])[0].error is None
            trigger.touch()
            [broken] = client.score([sample])
        assert broken.error is not None and "illegal memory access" in broken.error.message
        assert server.proc is not None
        code = server.proc.wait(timeout=60)
    finally:
        server.stop(grace=10)
    assert code == 1, server.tail()
    assert "unrecoverable device error: draining" in server.tail()


def test_a_cli_run_with_wait_ready_waits_for_a_server_still_loading(
    tiny_llava: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """A sidecar started with its server: without a wait its first call is refused while
    the models load (here held 5 s); with --wait-ready it waits, then scores every record."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "align2.toml"
    config.write_text(
        f'[models.question]\npath = "{tiny_llava}"\n[models.answer]\npath = "{tiny_llava}"\n'
    )
    args = ["--config", str(config), "--port", str(port), "--metrics-port", "-1"]
    env = {**os.environ, "ALIGN2_TEST_HOLD": "5"}
    server = ChildProcess([sys.executable, "-c", SLOW_LOAD, *args], tmp_path / "log", env)
    examples = pathlib.Path(__file__).parents[2] / "examples"
    out = tmp_path / "scores.jsonl"
    score = [sys.executable, "-m", "align2.client", "score", str(examples / "conversations.json")]
    score += ["--image-folder", str(examples), "--target", f"127.0.0.1:{port}"]
    score += ["--out", str(out), "--no-progress"]
    server.start()
    try:
        server.wait_until(lambda: "the model load starts" in server.tail(), 120, "server")
        refused = subprocess.run([*score, "--no-retry"], capture_output=True, text=True)
        waited = subprocess.run([*score, "--wait-ready", "120"], capture_output=True, text=True)
    finally:
        server.stop(grace=10)
    assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr
    assert waited.returncode == 0, waited.stderr
    records = json.loads((examples / "conversations.json").read_text())
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in results] == [r["id"] for r in records]
    assert all(r["error"] is None for r in results)


HELD_BUILD = """
import sys, time
from align2.server import cli
from align2.server.models import embedded
def held(folder, cache_dir):
    (folder / "half-written.bin").write_bytes(b"0" * 1024)
    print("test: a model build starts", flush=True)
    time.sleep(120)
for name in list(embedded._BUILDERS):
    embedded._BUILDERS[name] = held
sys.exit(cli.main(["serve", *sys.argv[1:]]))
"""


def test_sigterm_during_a_model_build_leaves_no_half_written_folder(
    tmp_path: pathlib.Path,
) -> None:
    """The exit that does not wait for the build (above) removes the build's scratch
    folder, which the build's own clean-up would have: none stays in the cache."""
    cache = tmp_path / "cache"
    args = ["--port", "0", "--metrics-port", "-1", "--cache-dir", str(cache)]
    server = ChildProcess([sys.executable, "-c", HELD_BUILD, *args], tmp_path / "log").start()
    try:
        server.wait_until(lambda: "a model build starts" in server.tail(), 120, "server")
        assert list(cache.rglob("half-written.bin"))  # the build is under way
        code = server.stop(grace=60)
    finally:
        server.stop(grace=10)
    assert code == 0, server.tail()
    assert not list(cache.rglob("half-written.bin")), server.tail()
    assert "removed 1 unfinished model build folder" in server.tail()
