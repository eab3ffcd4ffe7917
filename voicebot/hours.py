"""Operator working hours: pure functions of a timestamp, so tests can set the clock."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def parse_hhmm(text: str) -> dt.time:
    """'09:00' -> time(9, 0); raises ValueError with the offending text."""
    try:
        hh, mm = text.split(":")
        return dt.time(int(hh), int(mm))
    except (ValueError, TypeError):
        raise ValueError(f"time {text!r} is not HH:MM") from None


@dataclass(frozen=True)
class WorkingHours:
    """Operators work ``open``..``close`` local time on ``days``, except ``holidays``."""

    tz: dt.tzinfo
    open: dt.time
    close: dt.time
    days: frozenset[int]  # 0 = Monday
    holidays: frozenset[dt.date]

    @classmethod
    def from_config(cls, cfg: object) -> WorkingHours:
        """Build from a :class:`voicebot.config.HoursConfig`; ValueError names the bad field."""
        try:
            tz = ZoneInfo(cfg.timezone)  # type: ignore[attr-defined]
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone {cfg.timezone!r} is unknown (e.g. Asia/Baku)") from None  # type: ignore[attr-defined]
        opening = parse_hhmm(cfg.open)  # type: ignore[attr-defined]
        closing = parse_hhmm(cfg.close)  # type: ignore[attr-defined]
        if closing <= opening:
            raise ValueError(f"close {cfg.close} must be after open {cfg.open}")  # type: ignore[attr-defined]
        days = set()
        for d in cfg.days:  # type: ignore[attr-defined]
            if d.lower()[:3] not in DAY_NAMES:
                raise ValueError(f"day {d!r} is not one of {', '.join(DAY_NAMES)}")
            days.add(DAY_NAMES.index(d.lower()[:3]))
        holidays = set()
        for h in cfg.holidays:  # type: ignore[attr-defined]
            try:
                holidays.add(dt.date.fromisoformat(h))
            except ValueError:
                raise ValueError(f"holiday {h!r} is not YYYY-MM-DD") from None
        return cls(tz, opening, closing, frozenset(days), frozenset(holidays))

    def local(self, when: dt.datetime) -> dt.datetime:
        """``when`` in the call centre's timezone (naive times are taken as local)."""
        if when.tzinfo is None:
            return when.replace(tzinfo=self.tz)
        return when.astimezone(self.tz)

    def is_open(self, when: dt.datetime) -> bool:
        """True when an operator can take a call at ``when``."""
        t = self.local(when)
        if t.date() in self.holidays or t.weekday() not in self.days:
            return False
        return self.open <= t.time() < self.close

    def working_days(self) -> list[int]:
        """Weekday numbers (0 = Monday) in order."""
        return sorted(self.days)


def parse_at(text: str, tz: dt.tzinfo) -> dt.datetime:
    """Parse an ``--at`` value: ISO date-time, local to the call centre unless it has an offset."""
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--at {text!r}: use ISO form like 2026-11-23T10:30") from None
    return t.replace(tzinfo=tz) if t.tzinfo is None else t
