"""The client stays light: no GPU stack, no server code; types and llava need no grpc."""

from __future__ import annotations

import os
import subprocess
import sys

HEAVY = ("torch", "transformers", "PIL", "vllm", "align2.server")


def loaded_after(code: str) -> set[str]:
    """Top modules (and align2.server.*) imported by ``code`` in a fresh interpreter."""
    script = f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    completed = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    return set(completed.stdout.split())


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


def test_client_imports_no_heavy_or_server_modules() -> None:
    modules = loaded_after(
        "import align2.client\n"
        "from align2.client import CurationClient, AsyncCurationClient, ScoreResult\n"
        "import align2.client.cli, align2.client.convert\n"
        "import align2.client.offline_cli, align2.client.offline_report"
    )
    assert "grpc" in modules  # the check is meaningful: the client really was imported
    assert heavy(modules) == []


def test_types_and_llava_do_not_import_grpc() -> None:
    modules = loaded_after(
        "import align2.client.types, align2.client.llava, align2.client\n"
        "import align2.client.selection, align2.client.scorestore, align2.client.records"
    )
    assert not {m for m in modules if m == "grpc" or m.startswith("grpc.")}
