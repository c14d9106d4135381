"""The CPU thread policy: behave on a busy machine (shared login nodes, laptops, CI runners).

Two measures, both overridable:

* **Passive waiting.** OpenMP threads that spin while they wait for work burn the cores other processes need,
  and are descheduled in the middle of a parallel region when those processes run: a 2-thread run beside two
  busy processes on 2 cores was measured 10-20x slower instead of ~3x. ``OMP_WAIT_POLICY=PASSIVE`` (threads
  sleep at once) removes that. It must be in the environment before the OpenMP runtime starts (the first
  ``import torch``), so :mod:`lat_lightning` sets it as a default on import; an explicit ``OMP_WAIT_POLICY`` in
  the environment wins, and a script that imports torch before lat_lightning must set it itself.
* **Threads from the cores actually free.** :func:`apply_thread_policy` (called when a run starts) sets
  torch's intra-op threads to the number of cores that are idle right now (a 0.2 s sample of ``/proc/stat``,
  bounded by the CPU affinity and a cgroup CPU quota), at least 1. Overrides, in order:
  ``LAT_LIGHTNING_THREADS=<n>`` (or ``auto``), then ``OMP_NUM_THREADS`` when it is set.
* **One thread for narrow models.** Below a hidden size of :data:`SMALL_MODEL_WIDTH` the matrix products are too
  small to split: on this project's 2-core machine, quiet, two threads made a width-128 Llama's batched greedy
  decoding 1.6x slower than one thread (width 256: 1.16x slower; 384: 0.89x, 576: 0.68x, i.e. faster), and the
  organism's scan (ASA random + ASAgrad, 32 prompts, 6 layers, 2 seeds) 1.18x and its batch-8 training steps 1.34x
  slower (``docs/performance.md``). The pipeline passes the model's width for the stages after the organism build
  (the build's batch-32 steps are 14% faster on two threads, and keep the free-core count).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

ENV_OVERRIDE = "LAT_LIGHTNING_THREADS"
SMALL_MODEL_WIDTH = 256  # hidden size at or below which one thread is faster than two (measured, module docstring)


def set_wait_policy(environ=os.environ) -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless the environment says otherwise (effective before torch is imported)."""
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, bounded by a cgroup v2 CPU quota when one is set."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def _cpu_times() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]), idle


def free_cores(sample_s: float = 0.2) -> float:
    """Idle cores right now: the machine's idle fraction over ``sample_s`` times its CPU count, bounded by
    :func:`usable_cores`. Falls back to the 1-minute load average where ``/proc/stat`` is missing."""
    usable = usable_cores()
    total_cpus = os.cpu_count() or usable
    first = _cpu_times()
    if first is None:
        try:
            return max(0.0, min(float(usable), total_cpus - os.getloadavg()[0]))
        except OSError:  # pragma: no cover
            return float(usable)
    time.sleep(sample_s)
    second = _cpu_times()
    if second is None:  # pragma: no cover - /proc/stat vanished between the two reads
        return float(usable)
    d_total, d_idle = second[0] - first[0], second[1] - first[1]
    if d_total <= 0:
        return float(usable)
    return max(0.0, min(float(usable), total_cpus * d_idle / d_total))


def choose_threads(environ=os.environ, model_width: int | None = None) -> tuple[int, str]:
    """``(threads, why)`` by the policy of the module docstring.

    Args:
        environ: the environment (overrides).
        model_width: the hidden size of the model the next stage runs, if known: at most
            :data:`SMALL_MODEL_WIDTH` means one thread (unless overridden).

    Raises:
        ConfigError: a ``LAT_LIGHTNING_THREADS`` that is neither a positive integer nor ``auto``.
    """
    from lat_lightning.errors import ConfigError

    override = environ.get(ENV_OVERRIDE, "").strip()
    if override and override != "auto":
        if not override.isdigit() or int(override) < 1:
            raise ConfigError(f"{ENV_OVERRIDE}={override!r}: give a positive number of threads or 'auto'")
        return int(override), f"{ENV_OVERRIDE}={override}"
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if not override and omp.isdigit() and int(omp) >= 1:
        return int(omp), f"OMP_NUM_THREADS={omp}"
    free = free_cores()
    n = max(1, int(free + 0.5))
    if model_width is not None and 0 < int(model_width) <= SMALL_MODEL_WIDTH and n > 1:
        return (
            1,
            f"the model is {int(model_width)} wide (<= {SMALL_MODEL_WIDTH}: one thread is faster); "
            f"{free:.1f} of {usable_cores()} cores free",
        )
    return n, f"{free:.1f} of {usable_cores()} cores free"


def apply_thread_policy(verbose: bool = True, model_width: int | None = None) -> int:
    """Set torch's intra-op threads by :func:`choose_threads`; print one line saying why when it changes them.

    Args:
        verbose: print the line.
        model_width: the hidden size of the model about to run (see :func:`choose_threads`).

    Returns:
        The number of threads.
    """
    import torch

    n, why = choose_threads(model_width=model_width)
    changed = n != torch.get_num_threads()
    torch.set_num_threads(n)
    if verbose and changed:
        print(
            f"[threads] {n} torch thread(s): {why}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')} "
            f"(override: {ENV_OVERRIDE}=<n>)",
            flush=True,
        )
    return n


@contextmanager
def fixed_torch_threads(n: int) -> Iterator[None]:
    """Run the block on ``n`` torch intra-op threads, then give the caller's count back (a build whose result
    depends on the thread count, e.g. the organisms' weights, pins it whatever the machine has)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


__all__ = [
    "fixed_torch_threads",
    "ENV_OVERRIDE",
    "SMALL_MODEL_WIDTH",
    "apply_thread_policy",
    "choose_threads",
    "free_cores",
    "set_wait_policy",
    "usable_cores",
]
