"""Stage times summed over attempts: a stage that is killed and resumed reports the seconds of every attempt.

``<dir>/attempts.json`` holds, per stage, the seconds of each attempt and whether the stage finished; the running
attempt is written atomically at its start, every few seconds while it trains (`heartbeat`, called by a training
callback) and at its end, so a killed attempt counts up to its last write.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .atomic import write_json

FILE = "attempts.json"
BEAT_S = 2.0


class StageClock:
    """``with StageClock(dir, stage) as clock: ...``; then ``clock.total`` is the stage's seconds over all attempts
    since it last finished (a finished stage that runs again starts a new count)."""

    active: list[StageClock] = []

    def __init__(self, directory: Path, stage: str):
        self.path, self.stage = Path(directory) / FILE, stage
        self.seconds: list[float] = []
        self.t0 = self.written = 0.0

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write(self, done: bool = False) -> None:
        data = self._read()
        data[self.stage] = {"seconds": self.seconds, "done": done}
        write_json(self.path, data)
        self.written = time.monotonic()

    def __enter__(self) -> StageClock:
        record = self._read().get(self.stage) or {}
        self.seconds = [] if record.get("done") else [float(s) for s in record.get("seconds", [])]
        self.seconds.append(0.0)
        self.t0 = time.monotonic()
        self._write()
        StageClock.active.append(self)
        return self

    def beat(self, force: bool = False) -> None:
        """Record the running attempt's seconds (at most every BEAT_S seconds unless ``force``)."""
        now = time.monotonic()
        self.seconds[-1] = now - self.t0
        if force or now - self.written >= BEAT_S:
            self._write()

    def __exit__(self, kind, exc, tb) -> None:
        self.seconds[-1] = time.monotonic() - self.t0
        StageClock.active.remove(self)
        self._write(done=kind is None)

    @property
    def total(self) -> float:
        """Seconds of every attempt so far, the running one included."""
        return float(sum(self.seconds))


def heartbeat() -> None:
    """Let every running stage clock record its time (a cheap no-op between writes)."""
    for clock in StageClock.active:
        clock.beat()
