"""The CPU thread budget: threads for torch and for the preparation pool, sized from the CPUs
this process may use, so that the default configuration does not oversubscribe them.

Measured on a 2-core machine (docs/benchmarks.md, "The thread budget"): with torch's own
defaults the OpenMP threads of a finished forward keep spinning for their next task (about
300,000 spins) and take the CPU that image decoding and the event loop need. Sleeping at
once (a passive wait policy) hands it back but wakes every thread at each of a forward's
parallel regions: +12-18 ms on a ~240 ms call of the ~38M bench model. A short spin
(SPIN_COUNT) keeps the threads awake between the regions of one forward and lets them
sleep between forwards: median +1.8 ms (-1.1 to +7.1) over three runs, throughput level
with both.
"""

from __future__ import annotations

import logging
import math
import os
import pathlib
from dataclasses import dataclass

log = logging.getLogger(__name__)

WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
"""Read by the OpenMP runtime once, when torch is first imported."""
SPIN_COUNT_ENV = "GOMP_SPINCOUNT"
"""GNU OpenMP's (torch's on Linux) spin count before an idle thread sleeps; wins over the
wait policy."""
SPIN_COUNT = "30000"
"""What ``align2 serve`` sets: a tenth of the runtime's default spin (a fraction of a
millisecond, by libgomp's own estimate of about 100,000 spins per ms), then sleep."""

_CGROUP_V2 = pathlib.Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1 = pathlib.Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")


@dataclass(frozen=True)
class ThreadBudget:
    cpus: int
    """CPUs this process may use: its affinity, capped by a cgroup CPU quota (a Kubernetes
    CPU limit)."""
    torch_threads: int
    """torch intra-op threads (server.torch_threads, or ``cpus`` when that is 0)."""
    preprocess_workers: int
    """Preparation threads (batching.preprocess_workers, or half of ``cpus``, 2 to 8, when
    that is 0: on 2 CPUs, 1 thread served the tiny bench model at 0.71x of 2 threads)."""

    def describe(self) -> str:
        policy = os.environ.get(WAIT_POLICY_ENV, "unset")
        spins = os.environ.get(SPIN_COUNT_ENV, "unset")
        return (
            f"{self.cpus} CPUs: torch {self.torch_threads} threads, {self.preprocess_workers} "
            f"preparation threads, OpenMP {WAIT_POLICY_ENV} {policy}, {SPIN_COUNT_ENV} {spins}"
        )


def plan(torch_threads: int, preprocess_workers: int, cpus: int | None = None) -> ThreadBudget:
    """The budget for configured values; 0 means sized from the machine."""
    cpus = cpus or usable_cpus()
    return ThreadBudget(
        cpus=cpus,
        torch_threads=torch_threads or cpus,
        preprocess_workers=preprocess_workers or max(2, min(8, cpus // 2)),
    )


def usable_cpus() -> int:
    """The CPUs this process may run on, capped by its cgroup CPU quota (rounded up)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = _cgroup_quota()
    return max(1, min(cpus or 1, quota if quota is not None else cpus or 1))


def _cgroup_quota() -> int | None:
    try:
        if _CGROUP_V2.exists():
            limit, period = _CGROUP_V2.read_text().split()[:2]
            return None if limit == "max" else math.ceil(int(limit) / int(period))
        if _CGROUP_V1.exists():
            quota_us = int(_CGROUP_V1.read_text())
            period_us = int((_CGROUP_V1.parent / "cpu.cfs_period_us").read_text())
            return None if quota_us <= 0 else math.ceil(quota_us / period_us)
    except (OSError, ValueError):
        return None
    return None


def bound_spinning() -> None:
    """Idle OpenMP threads spin SPIN_COUNT times, then sleep, unless the environment already
    says how they wait (OMP_WAIT_POLICY, or GOMP_SPINCOUNT). Must run before torch is
    imported: the runtime reads these once, when it loads."""
    if WAIT_POLICY_ENV not in os.environ and SPIN_COUNT_ENV not in os.environ:
        os.environ[SPIN_COUNT_ENV] = SPIN_COUNT


def apply(budget: ThreadBudget) -> None:
    """Give torch its share (imports torch)."""
    import torch

    torch.set_num_threads(budget.torch_threads)
    log.info("thread budget: %s", budget.describe())
