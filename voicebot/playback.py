"""The bot's outgoing audio: queued prompt plays, pulled frame by frame by the media clock.

``pull`` runs on the media clock thread (PJSIP's, or the simulator's loop) and must
never block: it only slices arrays under a lock the worker holds for microseconds.
Start and end of each play are reported through callbacks that only enqueue.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Play:
    play_id: int
    audio: np.ndarray
    marks: list[tuple[int, object]] = field(default_factory=list)  # (sample offset, tag)
    pos: int = 0
    started_ms: float | None = None


class Player:
    """A queue of plays for one call.

    on_start(play_id, t_ms): the first sample of a play went out (t_ms on the tx clock).
    on_finish(play_id, t_ms): a play's last sample went out.
    on_mark(tag, t_ms): a mark inside a play was reached (prompt boundaries, for transcripts).
    """

    def __init__(self, sample_rate: int,
                 on_start: Callable[[int, float], None] | None = None,
                 on_finish: Callable[[int, float], None] | None = None,
                 on_mark: Callable[[object, float], None] | None = None) -> None:
        self.sample_rate = sample_rate
        self._queue: deque[_Play] = deque()
        self._lock = threading.Lock()
        self._tx_samples = 0
        self._on_start = on_start
        self._on_finish = on_finish
        self._on_mark = on_mark
        self.stopped_at_ms: float | None = None

    @property
    def busy(self) -> bool:
        return bool(self._queue)

    @property
    def tx_ms(self) -> float:
        """Media time of the next outgoing sample (ms since the call started)."""
        return 1000.0 * self._tx_samples / self.sample_rate

    def current(self) -> tuple[int, float | None] | None:
        """(play id, tx ms its first sample went out) of the play sounding now, or None."""
        with self._lock:
            if not self._queue:
                return None
            return self._queue[0].play_id, self._queue[0].started_ms

    def enqueue(self, play_id: int, audio: np.ndarray,
                marks: list[tuple[int, object]] | None = None) -> None:
        """Queue int16 audio at ``sample_rate`` after whatever is queued."""
        with self._lock:
            self._queue.append(_Play(play_id, audio, marks or []))

    def stop(self) -> list[int]:
        """Drop the current and queued plays; returns their ids."""
        with self._lock:
            ids = [p.play_id for p in self._queue]
            self._queue.clear()
        if ids:
            self.stopped_at_ms = self.tx_ms
        return ids

    def pull(self, n: int) -> np.ndarray:
        """The next ``n`` samples of bot audio (silence when idle). Never blocks for long."""
        out = np.zeros(n, dtype=np.int16)
        filled = 0
        events: list[tuple[str, object, float]] = []
        with self._lock:
            while filled < n and self._queue:
                play = self._queue[0]
                t_ms = 1000.0 * (self._tx_samples + filled) / self.sample_rate
                if play.started_ms is None:
                    play.started_ms = t_ms
                    events.append(("start", play.play_id, t_ms))
                while play.marks and play.marks[0][0] <= play.pos:
                    _, tag = play.marks.pop(0)
                    events.append(("mark", tag, t_ms))
                take = min(n - filled, len(play.audio) - play.pos,
                           (play.marks[0][0] - play.pos) if play.marks else n)
                take = max(take, 0)
                out[filled:filled + take] = play.audio[play.pos:play.pos + take]
                play.pos += take
                filled += take
                if play.pos >= len(play.audio):
                    self._queue.popleft()
                    end_ms = 1000.0 * (self._tx_samples + filled) / self.sample_rate
                    events.append(("finish", play.play_id, end_ms))
            self._tx_samples += n
        for kind, what, t_ms in events:
            if kind == "start" and self._on_start:
                self._on_start(what, t_ms)  # type: ignore[arg-type]
            elif kind == "finish" and self._on_finish:
                self._on_finish(what, t_ms)  # type: ignore[arg-type]
            elif kind == "mark" and self._on_mark:
                self._on_mark(what, t_ms)
        return out
