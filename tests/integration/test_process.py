"""`align2 serve` as a real process: config file + flags, port 0, SIGTERM exits 0."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest
from support import png

from align2.client import CurationClient, Sample, Turn

ROOT = pathlib.Path(__file__).resolve().parents[2]


def start(args: list[str], tmp_path: pathlib.Path) -> tuple[subprocess.Popen[str], int]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(ROOT / p) for p in ("client", "server")))
    log = (tmp_path / "server.log").open("w+")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = (tmp_path / "server.log").read_text()
        match = re.search(r"align2 serving: grpc port (\d+)", text)
        if match:
            return proc, int(match.group(1))
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}:\n{text}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("server did not start:\n" + (tmp_path / "server.log").read_text())


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
    proc, port = start(
        [sys.executable, *entry, "--config", str(config), "--port", "0", "--metrics-port", "-1"],
        tmp_path,
    )
    try:
        with CurationClient(f"127.0.0.1:{port}", timeout=30) as client:
            assert client.server_info().limits.max_samples_per_call == 5
            [result] = client.score([Sample(id="a", image=png(), turns=[Turn("Q?", "A.")])])
            assert result.error is None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_bad_config_fails_fast_naming_the_key(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        '[models.question]\npath = "x"\nbackend = "tensorrt"\n[models.answer]\npath = "y"\n'
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(ROOT / p) for p in ("client", "server")))
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
        env=env,
        timeout=120,
    )
    assert done.returncode != 0
    assert "models.question.backend: unknown backend 'tensorrt'; valid: transformers, vllm" in (
        done.stderr
    )
