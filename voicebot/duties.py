"""Call-centre duties outside the dialog engine: application import, message recording.

The engine decides (pure); this module does the I/O its actions ask for: reading the
case system's CSV export into the store, and writing a caller's message to a WAV file
that is complete and named only once it is finished (written as ``.part``, then
renamed), so a crash or a hang-up never leaves a half-written file under a real name.
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
import os
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import wavfile
from .errors import VoicebotError
from .menus import APPLICATION_STATES
from .store import Store

MAX_NUMBER_LEN = 20
log = logging.getLogger("voicebot.duties")

DATE_FORMATS = ("%Y-%m-%d", "%d.%m.%Y")  # ISO, and the day.month.year of local exports


@dataclass(frozen=True)
class RowError:
    line: int
    field: str
    problem: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.field}: {self.problem}"


@dataclass
class ImportReport:
    file: Path
    imported: int = 0
    errors: list[RowError] = field(default_factory=list)


def _parse_date(text: str) -> dt.date | None:
    for fmt in DATE_FORMATS:
        try:
            return dt.datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    return None


def read_applications(path: Path) -> tuple[list[tuple[str, str, str]], list[RowError]]:
    """Rows (number, status, ISO date) of a CSV with a header ``number,status,date``, and
    the rows rejected, each with its line number, field and problem."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise VoicebotError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise VoicebotError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                            "export the CSV as UTF-8") from None
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if header is None:
        raise VoicebotError(f"{path}: empty file; expected a header: number,status,date")
    cols = [h.strip().lower() for h in header]
    if "status_date" in cols and "date" not in cols:
        cols[cols.index("status_date")] = "date"
    missing = [c for c in ("number", "status", "date") if c not in cols]
    if missing:
        raise VoicebotError(f"{path}: line 1: header lacks column(s) {', '.join(missing)}; "
                            f"expected number,status,date (got {','.join(header)})")
    ix = {c: cols.index(c) for c in ("number", "status", "date")}
    rows: list[tuple[str, str, str]] = []
    errors: list[RowError] = []
    seen: dict[str, int] = {}
    for line, rec in enumerate(reader, start=2):
        if not rec or all(not c.strip() for c in rec):
            continue  # blank lines are not rows
        if len(rec) < len(cols):
            errors.append(RowError(line, "row", f"has {len(rec)} fields, the header "
                                                f"{len(cols)}"))
            continue
        number = rec[ix["number"]].strip().replace(" ", "")
        status = rec[ix["status"]].strip().lower().replace(" ", "_")
        date_text = rec[ix["date"]].strip()
        if not number.isdigit() or len(number) > MAX_NUMBER_LEN:
            errors.append(RowError(line, "number", f"{number!r} is not an application number "
                                                   f"(1-{MAX_NUMBER_LEN} digits)"))
            continue
        if status not in APPLICATION_STATES:
            errors.append(RowError(line, "status", f"{rec[ix['status']]!r} is not one of "
                                                   f"{', '.join(APPLICATION_STATES)}"))
            continue
        date = _parse_date(date_text)
        if date is None:
            errors.append(RowError(line, "date", f"{date_text!r} is not a date (YYYY-MM-DD "
                                                 "or DD.MM.YYYY)"))
            continue
        if number in seen:
            errors.append(RowError(line, "number", f"{number} is already on line "
                                                   f"{seen[number]}"))
            continue
        seen[number] = line
        rows.append((number, status, date.isoformat()))
    return rows, errors


def import_applications(store: Store, path: Path) -> ImportReport:
    """Import the good rows of ``path``; bad rows are reported, never half-imported."""
    rows, errors = read_applications(path)
    report = ImportReport(path, store.upsert_applications(rows), errors)
    return report


class MessageRecorder:
    """A caller's message, streamed to ``path.part`` and renamed to ``path`` when done.

    The first write that fails (a full disk, ENOSPC, or any other OSError) stops the
    recording: what was written is kept, :attr:`failed` says why, and :meth:`finish`
    still gives a playable WAV of it, so the caller's message ends normally."""

    HEADER_EVERY = 50  # frames between header updates: a killed process leaves most of it

    def __init__(self, path: Path, sample_rate: int) -> None:
        self.path = path
        self.part = path.with_name(path.name + ".part")
        self.rate = sample_rate
        self.samples = 0
        self.speech_samples = 0
        self.failed: str | None = None
        self._header_ok = False
        self._writes = 0
        self._fd: int | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Unbuffered, so a failing write tells exactly how much of the audio is on disk.
            # 0600: a caller's message is personal data (also when used in-process, without
            # the umask voicebot.cli sets).
            self._fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            self._write_all(wavfile.header(sample_rate, 0))
            self._header_ok = True
        except OSError as exc:
            self._fail(exc)

    @property
    def duration_ms(self) -> float:
        return self.samples * 1000.0 / self.rate

    @property
    def speech_ms(self) -> float:
        return self.speech_samples * 1000.0 / self.rate

    def _write_all(self, data: bytes) -> int:
        """Write all of ``data``; on OSError, raise it with ``written`` set on it."""
        assert self._fd is not None
        view, done = memoryview(data), 0
        while done < len(data):
            try:
                done += os.write(self._fd, view[done:])
            except OSError as exc:
                exc.written = done  # type: ignore[attr-defined]
                raise
        return done

    def _fail(self, exc: OSError) -> None:
        self.failed = f"{exc.strerror or exc} ({self.part})"
        log.error("message %s: %s: recording stopped, %.1f s kept", self.path.name,
                  exc.strerror or exc, self.duration_ms / 1000)

    def write(self, samples: np.ndarray, speech: bool) -> None:
        if self._fd is None or self.failed is not None:
            return
        data = samples.astype("<i2", copy=False).tobytes()
        try:
            n = self._write_all(data)
        except OSError as exc:
            self._account(getattr(exc, "written", 0) // 2, speech)  # what did reach the disk
            self._fail(exc)
            return
        self._account(n // 2, speech)
        self._writes += 1
        if self._writes % self.HEADER_EVERY == 0:
            self._patch_header()

    def _account(self, count: int, speech: bool) -> None:
        self.samples += count
        if speech:
            self.speech_samples += count

    def _patch_header(self) -> None:
        """Rewrite the sizes in place (no new disk blocks, so it works on a full disk too)."""
        assert self._fd is not None
        kept = self.samples * 2
        with suppress(OSError):
            os.pwrite(self._fd, wavfile.header(self.rate, kept), 0)

    def finish(self) -> Path | None:
        """Close the WAV (header sizes set to what is on disk), flush it to disk, give it its
        real name; None when not even the header could be written (nothing to keep)."""
        if self._fd is None:
            with suppress(OSError):
                self.part.unlink()
            return None if not self.path.exists() else self.path
        fd, self._fd = self._fd, None
        try:
            if not self._header_ok:
                with suppress(OSError):
                    self.part.unlink()
                return None
            kept = self.samples * 2
            os.ftruncate(fd, wavfile.HEADER_BYTES + kept)  # a torn half sample goes
            os.pwrite(fd, wavfile.header(self.rate, kept), 0)
            with suppress(OSError):  # a full disk may refuse the flush; the data is written
                os.fsync(fd)
        finally:
            with suppress(OSError):
                os.close(fd)
        os.replace(self.part, self.path)
        return self.path
