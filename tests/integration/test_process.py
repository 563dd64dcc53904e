"""`align2 serve` as a real process: config file + flags, port 0, SIGTERM exits 0."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
from support import ServerProcess, png

from align2.client import CurationClient, Sample, Turn


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
