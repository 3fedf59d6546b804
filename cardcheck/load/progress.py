"""The live line on stderr while a run goes on: on a terminal one line rewritten in place every
second, otherwise (a log, CI) a line every few seconds."""

from __future__ import annotations

import sys
from typing import TextIO

from cardcheck.load.recording import Recorder


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.0f} ms"


def line(recorder: Recorder, now: float, duration: float, in_flight: int, window_s: float = 5.0) -> str:
    elapsed = now - recorder.start
    recent = [
        w.completed for i, w in recorder.windows.items()
        if elapsed - window_s <= (i + 1) * recorder.window_s and i * recorder.window_s <= elapsed
    ]
    span = min(window_s, max(elapsed, recorder.window_s))
    errors = recorder.errors()
    shown = ", ".join(f"{reason} {count}" for reason, count in list(errors.items())[:3])
    if len(errors) > 3:
        shown += ", …"
    return (
        f"{min(elapsed, duration):5.1f}/{duration:g} s  {sum(recent) / span:5.1f} journeys/s  "
        f"in flight {in_flight}  done {recorder.completed}  errors {sum(errors.values())}"
        f"{f' ({shown})' if shown else ''}  journey p50 {fmt_ms(recorder.percentile_ms('journey', 50))} "
        f"p99 {fmt_ms(recorder.percentile_ms('journey', 99))}"
    )


class Progress:
    def __init__(self, stream: TextIO = sys.stderr, quiet: bool = False) -> None:
        self.stream = stream
        self.quiet = quiet
        self.live = not quiet and stream.isatty()
        self.every = 1.0 if self.live else 5.0
        self._last = float("-inf")
        self._width = 0

    def update(self, text: str, now: float, force: bool = False) -> None:
        if self.quiet or (not force and now - self._last < self.every):
            return
        self._last = now
        if self.live:
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def say(self, text: str) -> None:
        """A line of its own (a phase begins or ends), also when quiet."""
        if self.live and self._width:
            self.stream.write("\n")
            self._width = 0
        self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.live and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
