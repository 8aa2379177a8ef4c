"""Wall time and peak resident memory of each pipeline stage, for the report and the summary.

Peak RSS per stage: Linux lets a process reset its high-water mark (VmHWM) by writing 5 to
/proc/self/clear_refs, so each stage reads its own peak; where that is refused the process-lifetime
peak (getrusage) is reported instead and marked so.
"""

from __future__ import annotations

import resource
import time


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_mb() -> float:
    kib = _status_kib("VmRSS")
    return (kib or 0) / 1024


def peak_rss_mb() -> float:
    """The process-lifetime peak RSS (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StageClock:
    """`begin(name)` ends the running stage (if any) and starts the next; `end()` ends it. Plain
    calls rather than a context manager keep the pipeline's stage code unindented."""

    def __init__(self, counter=None):
        self.stages: list[dict] = []
        self._running: tuple[str, float, bool, int] | None = None
        # A callable giving the ORT work so far (Runtime.sample_forwards); None: not reported.
        self.counter = counter

    def begin(self, name: str) -> None:
        self.end()
        self._running = (name, time.perf_counter(), _reset_peak(), self._count())

    def _count(self) -> int:
        return int(self.counter()) if self.counter is not None else 0

    def end(self) -> None:
        if self._running is None:
            return
        name, start, per_stage, count = self._running
        self._running = None
        peak = _status_kib("VmHWM") if per_stage else None
        self.stages.append(
            {
                "stage": name,
                "wall_s": round(time.perf_counter() - start, 3),
                "peak_rss_mb": round(peak / 1024 if peak is not None else peak_rss_mb(), 1),
                "peak_is_stage": peak is not None,
                "sample_forwards": self._count() - count,
            }
        )
