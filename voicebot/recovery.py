"""Start-up recovery: what a crashed or killed process left behind is closed and saved.

Run once by each process that serves calls, before it takes the first one:

1. journals of dead processes (``var/spool``) are replayed into the store;
2. calls left open (``ended_at`` NULL) by this host's dead processes (one worker's, or all
   of the host's when ``worker`` is None) are closed with result ``interrupted``;
3. partial recordings are repaired into playable WAVs (sizes in the header set from the
   data's length) and given their real names: call recordings
   ``<recordings>/<day>/.<call id>.part.wav`` -> ``<call id>.wav``, linked to the call
   (``calls.recording``), messages ``<recordings>/messages/<day>/<ticket>-<kind>.wav.part``
   -> ``.wav``, linked to the ticket (``tickets.recording``);
4. tickets left ``recording`` by a call that has ended are marked ``interrupted``: what
   was recorded is kept.

A partial file of a call that is still open in another live worker is left alone.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import wavfile
from .store import Store, StoreUnavailable, now

log = logging.getLogger("voicebot.recovery")

CALL_PART = ".part.wav"  # telephony: .<call id>.part.wav
MESSAGE_PART = ".wav.part"  # MessageRecorder: <ticket>-<kind>.wav.part
ORPHAN_AGE_S = 60.0  # a partial file without a call record is another process's if newer


@dataclass
class RecoveryReport:
    """What recovery did; ``lines`` are the log lines, for the operator."""

    replayed: int = 0
    calls_interrupted: list[str] = field(default_factory=list)
    recordings: list[Path] = field(default_factory=list)
    messages: list[Path] = field(default_factory=list)
    tickets_interrupted: list[str] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)  # partial files with no audio in them
    skipped: list[Path] = field(default_factory=list)  # partial files of live calls
    error: str | None = None
    lines: list[str] = field(default_factory=list)

    def say(self, level: int, msg: str) -> None:
        log.log(level, "%s", msg)
        self.lines.append(msg)

    @property
    def counts(self) -> dict[str, int]:
        return {"replayed": self.replayed, "calls_interrupted": len(self.calls_interrupted),
                "recordings": len(self.recordings), "messages": len(self.messages),
                "tickets_interrupted": len(self.tickets_interrupted),
                "removed": len(self.removed), "skipped": len(self.skipped)}


def recordings_folder(cfg: Any) -> Path:
    rec = Path(cfg.recording.folder)
    return rec if rec.is_absolute() else cfg.base / rec


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save(part: Path, final: Path, rep: RecoveryReport) -> wavfile.WavInfo | None:
    """Repair ``part`` and rename it ``final``; None (and the file removed) when it holds
    no audio at all."""
    info = wavfile.repair(part)
    if info is None:
        part.unlink(missing_ok=True)
        rep.removed.append(part)
        rep.say(logging.WARNING, f"recovery: {part}: no audio in it (header incomplete), "
                                 "removed")
        return None
    os.replace(part, final)
    _fsync_dir(final.parent)
    return info


def _call_state(store: Store, call_id: str) -> tuple[bool, bool] | None:
    """(exists, ended) of a call's record."""
    rows = store.execute("SELECT ended_at FROM calls WHERE id = ?", (call_id,))
    return (True, rows[0][0] is not None) if rows else None


def _dead(store: Store, call_id: str | None, part: Path, everything: bool) -> bool:
    """Does ``part`` belong to a call that no live process is recording?"""
    state = _call_state(store, call_id) if call_id else None
    if state is not None:
        return state[1]
    # No record: its start may still be on its way from a live process. When the whole
    # host restarts there is none; otherwise only an old file is an orphan.
    try:
        age = time.time() - part.stat().st_mtime
    except OSError:
        return False
    return everything or age > ORPHAN_AGE_S


def recover(cfg: Any, store: Store, worker: int | None = None,
            host: str | None = None) -> RecoveryReport:
    """Close and save what dead processes of ``host`` (default: this one) left; ``worker``:
    only that worker's calls (a restarted worker), None: all of the host's (a start)."""
    rep = RecoveryReport()
    host = host or store.host
    try:
        rep.replayed = store.replay_dead_spools()
        if rep.replayed:
            rep.say(logging.WARNING, f"recovery: {rep.replayed} record(s) replayed from the "
                                     "journals of dead processes")
        _close_calls(store, worker, host, rep)
        folder = recordings_folder(cfg)
        _call_recordings(store, folder, worker is None, rep)
        _messages(store, folder, worker is None, rep)
        _tickets(store, rep)
    except StoreUnavailable as exc:
        rep.error = str(exc)
        rep.say(logging.ERROR, f"recovery: not finished, the store does not answer ({exc}); "
                               "the next start finishes it")
    if not rep.error:
        c = rep.counts
        rep.say(logging.INFO if not any(c.values()) else logging.WARNING,
                "recovery: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in c.items()))
    return rep


def _close_calls(store: Store, worker: int | None, host: str, rep: RecoveryReport) -> None:
    # Rows written before calls had a host column belong to whoever restarts first.
    sql = "SELECT id FROM calls WHERE ended_at IS NULL AND (host = ? OR host IS NULL)"
    args: list[Any] = [host]
    if worker is not None:
        sql += " AND worker = ?"
        args.append(worker)
    ids = [r[0] for r in store.execute(sql, args)]
    stamp = now()
    for cid in ids:
        store.execute("UPDATE calls SET ended_at = ?, result = 'interrupted', "
                      "ended_by = 'restart', reason = ? WHERE id = ? AND ended_at IS NULL",
                      (stamp, "the process serving the call died (crash or kill)", cid))
        rep.calls_interrupted.append(cid)
    if ids:
        rep.say(logging.WARNING, f"recovery: {len(ids)} call(s) left open by a dead process "
                                 f"closed as interrupted: {', '.join(ids[:20])}"
                                 + (" ..." if len(ids) > 20 else ""))


def _call_recordings(store: Store, folder: Path, everything: bool,
                     rep: RecoveryReport) -> None:
    if not folder.is_dir():
        return
    for part in sorted(folder.glob(f"*/.*{CALL_PART}")):
        call_id = part.name[1:-len(CALL_PART)]
        if not _dead(store, call_id, part, everything):
            rep.skipped.append(part)
            continue
        final = part.with_name(f"{call_id}.wav")
        info = _save(part, final, rep)
        if info is None:
            continue
        rep.recordings.append(final)
        store.execute("UPDATE calls SET recording = COALESCE(recording, ?) WHERE id = ?",
                      (str(final), call_id))
        rep.say(logging.WARNING, f"recovery: call recording {final} repaired "
                                 f"({info.duration_ms / 1000:.1f} s) and linked to call "
                                 f"{call_id}")


def _messages(store: Store, folder: Path, everything: bool, rep: RecoveryReport) -> None:
    base = folder / "messages"
    if not base.is_dir():
        return
    for part in sorted(base.glob(f"*/*{MESSAGE_PART}")):
        name = part.name[:-len(".part")]
        ticket = name.split("-", 1)[0]
        rows = store.execute("SELECT state, call_id FROM tickets WHERE ticket = ?", (ticket,))
        closed = bool(rows) and rows[0][0] != "recording"
        if not closed and not _dead(store, rows[0][1] if rows else None, part, everything):
            rep.skipped.append(part)
            continue
        final = part.with_name(name)
        info = _save(part, final, rep)
        if info is None:
            continue
        rep.messages.append(final)
        store.execute("UPDATE tickets SET recording = COALESCE(recording, ?), "
                      "duration_ms = COALESCE(duration_ms, ?), state = CASE WHEN "
                      "state = 'recording' THEN 'interrupted' ELSE state END, "
                      "ended_by = COALESCE(ended_by, 'restart') WHERE ticket = ?",
                      (str(final), info.duration_ms, ticket))
        if rows and rows[0][0] == "recording":
            rep.tickets_interrupted.append(ticket)
        rep.say(logging.WARNING, f"recovery: message {final} repaired "
                                 f"({info.duration_ms / 1000:.1f} s) and linked to ticket "
                                 f"{ticket}" + ("" if rows else " (no such ticket in the store)"))


def _tickets(store: Store, rep: RecoveryReport) -> None:
    """Tickets still ``recording`` although their call has ended, with no partial file
    left (their message had no audio, or was saved but not recorded as saved)."""
    rows = store.execute("SELECT t.ticket FROM tickets t JOIN calls c ON c.id = t.call_id "
                         "WHERE t.state = 'recording' AND c.ended_at IS NOT NULL")
    for (ticket,) in rows:
        store.execute("UPDATE tickets SET state = 'interrupted', "
                      "ended_by = COALESCE(ended_by, 'restart') WHERE ticket = ? AND "
                      "state = 'recording'", (ticket,))
        if ticket not in rep.tickets_interrupted:
            rep.tickets_interrupted.append(ticket)
    if rows:
        rep.say(logging.WARNING, f"recovery: {len(rows)} ticket(s) left recording marked "
                                 "interrupted")
