"""BLAS threads for tnopt's own numpy work (factor fits, the statistics' sums, local errors).

numpy's OpenBLAS on every core beside other busy processes is slow: on 2 cores under a load of ~4
from other jobs, a CP-ALS fit of a 512x512x3x3 kernel took 39 s on 2 threads against 20 s on one,
and a refit's 145x145 solve ran 10-50x slower beside onnxruntime's spinning workers. Alone on the
machine, one thread leaves a core idle through the numpy-bound stretches of a run (ResNet-50 at
224²: ~550 of 834 s). So the math runs on every core only while the other processes leave the
cores idle: over the interval since the last look (/proc/stat for the machine, /proc/self/stat for
this process, onnxruntime's threads included), the CPU time the rest of the machine used is below
OTHERS_MAX_CORES cores; else (or where /proc cannot be read) on one thread, as before.
Work sessions do not spin (tnopt/runtime.py), so onnxruntime's idle workers take no core from it.

`TNOPT_MATH_THREADS=N` fixes the count (e.g. 1: the old behaviour, for side-by-side timings).
Thread counts change only the speed; BLAS may round differently with another split of the work.
"""

from __future__ import annotations

import os
import time

from threadpoolctl import threadpool_limits

# The rest of the machine may use up to this many cores, on average since the last look, for the
# math to take every core.
OTHERS_MAX_CORES = 0.5
# Only math on matrices of at least this many entries takes more than one thread: small products
# and solves gain little from a second thread and pay its synchronisation. ResNet-50 at 224²: its 18
# convs from 256x256x3x3 (590k weights, 2304² patch moments) up; the reference models' layers
# (VGG ≤ 295k, ResNet-style ≤ 147k weights, cnn4 ≤ 37k) stay on one thread.
MIN_PARALLEL_SIZE = 500_000
# A look older than this is taken again (/proc reads cost ~50 µs); newer ones reuse the decision.
LOOK_EVERY_S = 0.5

_state = {"at": None, "machine": None, "own": None, "threads": 1}
# How many math sections ran on how many threads (the report's record of what the run got).
counts: dict[int, int] = {}


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _machine_ticks() -> tuple[int, int] | None:
    """(busy, total) CPU ticks of the whole machine since boot, or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def _own_ticks() -> int | None:
    """User + system CPU ticks of this process (all its threads) since it started, or None."""
    try:
        with open("/proc/self/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(rest[11]) + int(rest[12])  # utime, stime: fields 14 and 15


def others_busy_cores(machine_before, own_before, machine_now, own_now, cpus: int) -> float:
    """Cores the rest of the machine kept busy between two looks: machine ticks are summed over its
    `cpus` CPUs, this process's over its threads, both in clock ticks."""
    elapsed = (machine_now[1] - machine_before[1]) / max(cpus, 1)  # wall ticks
    if elapsed <= 0:
        return float(cpus)
    busy = machine_now[0] - machine_before[0]
    return max(0.0, (busy - (own_now - own_before)) / elapsed)


def choose_threads() -> int:
    """1, or every core when the rest of the machine left them idle since the last look."""
    fixed = os.environ.get("TNOPT_MATH_THREADS", "").strip()
    if fixed.isdigit() and int(fixed) > 0:
        return int(fixed)
    cores = _cores()
    if cores <= 1:
        return 1
    now = time.monotonic()
    if _state["at"] is not None and now - _state["at"] < LOOK_EVERY_S:
        return _state["threads"]
    machine, own = _machine_ticks(), _own_ticks()
    if machine is None or own is None:
        return 1
    threads = 1
    if _state["machine"] is not None:
        # /proc/stat sums every online CPU, not only this process's affinity.
        others = others_busy_cores(_state["machine"], _state["own"], machine, own, os.cpu_count() or cores)
        threads = cores if others < OTHERS_MAX_CORES else 1
    _state.update(at=now, machine=machine, own=own, threads=threads)
    return threads


def math_threads(size: int = 0):
    """A context in which BLAS runs on `choose_threads()` threads where the work's largest matrix
    has at least MIN_PARALLEL_SIZE entries (`size`), on one thread otherwise."""
    threads = choose_threads() if size >= MIN_PARALLEL_SIZE else 1
    counts[threads] = counts.get(threads, 0) + 1
    return threadpool_limits(threads)
