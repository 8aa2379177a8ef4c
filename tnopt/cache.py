"""On-disk memory of measurements: one JSON file per (model, data, metric, factor mode).

A rerun, or a run with another budget, reads every sensitivity, method screen and latency it
already paid for. A corrupt or read-only cache only loses the speed-up, never the run."""

from __future__ import annotations

import json
from pathlib import Path


class SensitivityCache:
    def __init__(self, directory: str | None, key: str):
        self.path = Path(directory) / f"{key}.json" if directory else None
        self.entries: dict = {}
        self.hits = self.misses = 0
        if self.path and self.path.exists():
            try:
                self.entries = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.entries = {}

    def get(self, key: str):
        value = self.entries.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: str, value) -> None:
        self.entries[key] = value

    def save(self) -> None:
        if not self.path:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.entries))
            tmp.replace(self.path)
        except OSError:
            pass
