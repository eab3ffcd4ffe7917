"""Call records: one row per call, one row per turn, in SQLite (WAL) or PostgreSQL.

SQLite in WAL mode is the embedded default: every worker process of a host
writes to the same file. A PostgreSQL DSN in the config (``[store] dsn``) serves
several hosts. Each turn is committed as it happens, so a crash or a hang-up at
any moment loses nothing already said.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .dialog import Turn
from .errors import VoicebotError

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS calls (
        id TEXT PRIMARY KEY,
        sip_call_id TEXT,
        worker INTEGER,
        caller TEXT,
        dialled TEXT,
        started_at TEXT,
        answered_at TEXT,
        ended_at TEXT,
        language TEXT,
        path TEXT,
        result TEXT,
        recording TEXT,
        ended_by TEXT,
        reason TEXT
    )""",
    """CREATE TABLE IF NOT EXISTS turns (
        call_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        t_ms REAL,
        node TEXT,
        language TEXT,
        input TEXT,
        heard TEXT,
        confidence REAL,
        option TEXT,
        result TEXT,
        prompt TEXT,
        prompt_text TEXT,
        barge_in INTEGER,
        latency_ms REAL,
        created_at TEXT,
        PRIMARY KEY (call_id, seq)
    )""",
    "CREATE INDEX IF NOT EXISTS calls_started ON calls (started_at)",
    "CREATE INDEX IF NOT EXISTS calls_sip ON calls (sip_call_id)",
    # Call-centre duties. Applications are imported from the case system's CSV export.
    """CREATE TABLE IF NOT EXISTS applications (
        number TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        status_date TEXT NOT NULL,
        imported_at TEXT
    )""",
    """CREATE TABLE IF NOT EXISTS tickets (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ticket TEXT,
        call_id TEXT,
        caller TEXT,
        language TEXT,
        kind TEXT,
        state TEXT,
        recording TEXT,
        duration_ms REAL,
        speech_ms REAL,
        ended_by TEXT,
        created_at TEXT
    )""",
    """CREATE TABLE IF NOT EXISTS callbacks (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        call_id TEXT,
        caller TEXT,
        language TEXT,
        reason TEXT,
        created_at TEXT,
        done_at TEXT
    )""",
]

TICKET_BASE = 100000  # tickets are said digit by digit: six digits from the first one


def now() -> str:
    """The current time, ISO 8601 with offset, to the millisecond."""
    return dt.datetime.now(dt.UTC).astimezone().isoformat(timespec="milliseconds")


@dataclass
class CallRecord:
    """A call as stored. path: the option ids the caller chose, in order."""

    id: str
    sip_call_id: str | None
    worker: int | None
    caller: str | None
    dialled: str | None
    started_at: str | None
    answered_at: str | None
    ended_at: str | None
    language: str | None
    path: list[str]
    result: str | None
    recording: str | None
    ended_by: str | None
    reason: str | None
    turns: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Store:
    """Thread-safe access to the call records of one host (or one PostgreSQL database)."""

    def __init__(self, path: Path | None = None, dsn: str | None = None) -> None:
        self._lock = threading.Lock()
        self.path = path
        self.dsn = dsn
        if dsn:
            try:
                import psycopg  # type: ignore[import-not-found]
            except ImportError:
                raise VoicebotError("[store] dsn is set but psycopg is not installed: "
                                    "pip install 'psycopg[binary]'") from None
            self._conn: Any = psycopg.connect(dsn, autocommit=True)
            self._ph = "%s"
        else:
            assert path is not None
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._conn = sqlite3.connect(str(path), timeout=10.0, check_same_thread=False,
                                             isolation_level=None)
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=NORMAL")
                self._conn.execute("PRAGMA busy_timeout=10000")
            except sqlite3.DatabaseError as exc:
                raise VoicebotError(f"{path}: cannot open the call store ({exc}); move the "
                                    "file away or set [store] path to a new file") from None
            self._ph = "?"
        with self._lock:
            if dsn:
                # Workers start together; PostgreSQL's CREATE ... IF NOT EXISTS is not safe
                # against a concurrent twin (duplicate pg_type rows), so serialise it.
                self._conn.execute("SELECT pg_advisory_lock(919001)")
            try:
                for stmt in SCHEMA:
                    if dsn:  # PostgreSQL spells an auto-numbered key differently
                        stmt = stmt.replace("INTEGER PRIMARY KEY AUTOINCREMENT",
                                            "SERIAL PRIMARY KEY")
                    self._conn.execute(stmt)
            finally:
                if dsn:
                    self._conn.execute("SELECT pg_advisory_unlock(919001)")

    @classmethod
    def from_config(cls, cfg: Any) -> Store:
        if cfg.store.dsn:
            return cls(dsn=cfg.store.dsn)
        p = Path(cfg.store.path)
        return cls(path=p if p.is_absolute() else cfg.base / p)

    def _q(self, sql: str) -> str:
        return sql.replace("?", self._ph) if self._ph != "?" else sql

    @contextmanager
    def _cursor(self) -> Iterator[Any]:
        with self._lock:
            cur = self._conn.cursor()
            try:
                yield cur
            finally:
                cur.close()

    def _exec(self, sql: str, args: Sequence[Any] = ()) -> None:
        with self._cursor() as cur:
            cur.execute(self._q(sql), tuple(args))

    # --- writing ---

    def call_started(self, call_id: str, sip_call_id: str | None, caller: str | None,
                     dialled: str | None, worker: int | None = None,
                     started_at: str | None = None) -> None:
        self._exec("INSERT INTO calls (id, sip_call_id, worker, caller, dialled, started_at, path) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (call_id, sip_call_id, worker, caller, dialled, started_at or now(), "[]"))

    def call_answered(self, call_id: str) -> None:
        self._exec("UPDATE calls SET answered_at = ? WHERE id = ?", (now(), call_id))

    def add_turn(self, call_id: str, turn: Turn) -> None:
        """Store a turn and extend the call's path and language at once."""
        with self._cursor() as cur:
            cur.execute(self._q("SELECT COUNT(*) FROM turns WHERE call_id = ?"), (call_id,))
            seq = int(cur.fetchone()[0]) + 1
            cur.execute(self._q(
                "INSERT INTO turns (call_id, seq, t_ms, node, language, input, heard, confidence,"
                " option, result, prompt, prompt_text, barge_in, latency_ms, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
                (call_id, seq, turn.t_ms, turn.node, turn.language, turn.input, turn.heard,
                 turn.confidence, turn.option, turn.result, turn.prompt, turn.prompt_text,
                 int(turn.barge_in), turn.latency_ms, now()))
            if turn.option:
                cur.execute(self._q("SELECT path FROM calls WHERE id = ?"), (call_id,))
                row = cur.fetchone()
                path = json.loads(row[0]) if row and row[0] else []
                path.append(turn.option)
                cur.execute(self._q("UPDATE calls SET path = ? WHERE id = ?"),
                            (json.dumps(path), call_id))

    def call_ended(self, call_id: str, result: str, language: str | None,
                   recording: str | None, ended_by: str, reason: str = "") -> None:
        self._exec("UPDATE calls SET ended_at = ?, result = ?, language = COALESCE(?, language), "
                   "recording = ?, ended_by = ?, reason = ? WHERE id = ?",
                   (now(), result, language, recording, ended_by, reason, call_id))

    def set_language(self, call_id: str, language: str | None) -> None:
        if language:
            self._exec("UPDATE calls SET language = ? WHERE id = ?", (language, call_id))

    # --- reading ---

    def calls(self, last: int | None = None, sip_call_id: str | None = None,
              call_id: str | None = None) -> list[CallRecord]:
        """Calls, newest first, each with its turns."""
        where, args = [], []
        if sip_call_id:
            where.append("sip_call_id = ?")
            args.append(sip_call_id)
        if call_id:
            where.append("id = ?")
            args.append(call_id)
        sql = ("SELECT id, sip_call_id, worker, caller, dialled, started_at, answered_at, "
               "ended_at, language, path, result, recording, ended_by, reason FROM calls")
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY started_at DESC, id DESC"
        if last:
            sql += f" LIMIT {int(last)}"
        with self._cursor() as cur:
            cur.execute(self._q(sql), tuple(args))
            rows = cur.fetchall()
            out = []
            for r in rows:
                cur.execute(self._q(
                    "SELECT seq, t_ms, node, language, input, heard, confidence, option, result,"
                    " prompt, prompt_text, barge_in, latency_ms FROM turns WHERE call_id = ? "
                    "ORDER BY seq"), (r[0],))
                turns = [dict(zip(("seq", "t_ms", "node", "language", "input", "heard",
                                   "confidence", "option", "result", "prompt", "prompt_text",
                                   "barge_in", "latency_ms"), t, strict=True))
                         for t in cur.fetchall()]
                for t in turns:
                    t["barge_in"] = bool(t["barge_in"])
                out.append(CallRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8],
                                      json.loads(r[9] or "[]"), r[10], r[11], r[12], r[13],
                                      turns))
        return out

    # --- call-centre duties ---

    def _insert_id(self, sql: str, args: Sequence[Any]) -> int:
        """INSERT ... RETURNING id (SQLite 3.35+ and PostgreSQL both have RETURNING)."""
        with self._cursor() as cur:
            cur.execute(self._q(sql + " RETURNING id"), tuple(args))
            return int(cur.fetchone()[0])

    def upsert_applications(self, rows: Sequence[tuple[str, str, str]]) -> int:
        """Insert or replace (number, status, ISO date) rows; returns how many."""
        stamp = now()
        with self._cursor() as cur:
            for number, status, date in rows:
                cur.execute(self._q(
                    "INSERT INTO applications (number, status, status_date, imported_at) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (number) DO UPDATE SET "
                    "status = excluded.status, status_date = excluded.status_date, "
                    "imported_at = excluded.imported_at"), (number, status, date, stamp))
        return len(rows)

    def application(self, number: str) -> tuple[str, dt.date] | None:
        """(status, date) of an application, or None."""
        with self._cursor() as cur:
            cur.execute(self._q("SELECT status, status_date FROM applications WHERE number = ?"),
                        (number,))
            row = cur.fetchone()
        return (row[0], dt.date.fromisoformat(row[1])) if row else None

    def open_ticket(self, call_id: str, caller: str | None, language: str | None,
                    kind: str) -> str:
        """A new ticket for a message being recorded; returns its number (said to the caller)."""
        tid = self._insert_id("INSERT INTO tickets (call_id, caller, language, kind, state, "
                              "created_at) VALUES (?, ?, ?, ?, ?, ?)",
                              (call_id, caller, language, kind, "recording", now()))
        ticket = str(TICKET_BASE + tid)
        self._exec("UPDATE tickets SET ticket = ? WHERE id = ?", (ticket, tid))
        return ticket

    def close_ticket(self, ticket: str, recording: str | None, duration_ms: float,
                     speech_ms: float, ended_by: str) -> None:
        state = "received" if speech_ms > 0 else "empty"
        self._exec("UPDATE tickets SET state = ?, recording = ?, duration_ms = ?, speech_ms = ?,"
                   " ended_by = ? WHERE ticket = ?",
                   (state, recording, duration_ms, speech_ms, ended_by, ticket))

    def tickets(self) -> list[dict[str, Any]]:
        cols = ("ticket", "call_id", "caller", "language", "kind", "state", "recording",
                "duration_ms", "speech_ms", "ended_by", "created_at")
        with self._cursor() as cur:
            cur.execute(f"SELECT {', '.join(cols)} FROM tickets ORDER BY id")
            return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    def add_callback(self, call_id: str, caller: str | None, language: str | None,
                     reason: str) -> int:
        return self._insert_id("INSERT INTO callbacks (call_id, caller, language, reason, "
                               "created_at) VALUES (?, ?, ?, ?, ?)",
                               (call_id, caller, language, reason, now()))

    def callbacks(self, outstanding_only: bool = False) -> list[dict[str, Any]]:
        cols = ("id", "call_id", "caller", "language", "reason", "created_at", "done_at")
        sql = f"SELECT {', '.join(cols)} FROM callbacks"
        if outstanding_only:
            sql += " WHERE done_at IS NULL"
        with self._cursor() as cur:
            cur.execute(sql + " ORDER BY id")
            return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    def callback_done(self, callback_id: int) -> bool:
        """Mark a callback made; False when there is no such outstanding callback."""
        with self._cursor() as cur:
            cur.execute(self._q("UPDATE callbacks SET done_at = ? WHERE id = ? AND "
                                "done_at IS NULL"), (now(), callback_id))
            return bool(cur.rowcount)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
