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
]


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

    def close(self) -> None:
        with self._lock:
            self._conn.close()
