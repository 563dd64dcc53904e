"""The thread budget: sized from the CPUs the process may use, and set before torch loads."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from align2.server import config as config_module
from align2.server import threads
from align2.server.errors import ConfigError


def test_zero_means_sized_from_the_machine() -> None:
    assert threads.plan(0, 0, cpus=2) == threads.ThreadBudget(2, 2, 2)
    assert threads.plan(0, 0, cpus=16) == threads.ThreadBudget(16, 16, 8)
    assert threads.plan(0, 0, cpus=64).preprocess_workers == 8
    assert threads.plan(0, 0, cpus=1) == threads.ThreadBudget(1, 1, 2)


def test_configured_values_win() -> None:
    assert threads.plan(3, 5, cpus=16) == threads.ThreadBudget(16, 3, 5)


def test_a_cgroup_quota_caps_the_cpus(tmp_path: pathlib.Path, monkeypatch) -> None:
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(threads, "_CGROUP_V2", cpu_max)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    cpu_max.write_text("150000 100000\n")  # a Kubernetes limit of 1.5 CPUs
    assert threads.usable_cpus() == 2
    cpu_max.write_text("max 100000\n")
    assert threads.usable_cpus() == 32
    cpu_max.write_text("garbage")
    assert threads.usable_cpus() == 32


def test_the_affinity_caps_the_cpus(monkeypatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setattr(threads, "_CGROUP_V2", tmp_path / "absent")
    monkeypatch.setattr(threads, "_CGROUP_V1", tmp_path / "absent-too")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5})
    assert threads.usable_cpus() == 3


@pytest.mark.parametrize("key", ["batching.preprocess_workers", "server.torch_threads"])
def test_a_negative_count_is_refused_by_name(key: str) -> None:
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=rf"{key}: must be >= 0"):
        config_module.load(None, {key: -1})
    assert getattr(getattr(config_module.load(None, {key: 0}), section), name) == 0


def test_serve_bounds_the_spinning_before_torch_loads() -> None:
    """The OpenMP runtime reads GOMP_SPINCOUNT and OMP_WAIT_POLICY once, when torch is
    imported: the command must set the spin count before anything imports torch, and keep
    what the operator set."""
    probe = (
        "import os, sys\n"
        "from align2.server import cli, threads\n"
        "seen = []\n"
        "real = threads.bound_spinning\n"
        "def spy():\n"
        "    seen.append('torch' in sys.modules)\n"
        "    real()\n"
        "threads.bound_spinning = spy\n"
        "cli._no_progress_bars = lambda: None\n"
        "cli.serve = lambda config: None\n"
        "cli.asyncio.run = lambda coro: 0\n"
        "cli.main(['serve', '--port', '0'])\n"
        "print(seen, os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["[False]", "None", "30000"]
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["[False]", "ACTIVE", "None"]
    del env["OMP_WAIT_POLICY"]
    env["GOMP_SPINCOUNT"] = "1000"  # a spin count of the operator's: kept, no policy added
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["[False]", "None", "1000"]
