"""Call records: one row per call, one row per turn, in SQLite (WAL) or PostgreSQL.

SQLite in WAL mode is the embedded default: every worker process of a host
writes to the same file. A PostgreSQL DSN in the config (``[store] dsn``) serves
several hosts.

Writes never touch the database on the caller's thread: each write is an
operation put on a queue and returned from at once. One writer thread per process
appends the operations to a journal on local disk (``var/spool/<host>-<pid>.jsonl``,
fsync'd per batch) and then applies them to the database in order; when the
database does not answer it retries with backoff, reconnecting, and when the disk
is full the operations wait in memory. A journal left by a dead process (one whose
lock on the file is gone) is replayed by the next process that opens the store.
Every operation is idempotent (primary keys, ``ON CONFLICT DO NOTHING``, updates
that set values rather than add to them), so replaying a journal twice changes
nothing. Reads are synchronous and raise :class:`StoreUnavailable` when the
database does not answer.

Times are stored in one form, UTC ISO 8601 to the millisecond with ``+00:00``
(fixed width, so text order is time order); see :func:`utc`.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import itertools
import json
import logging
import os
import socket
import sqlite3
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .dialog import Turn
from .errors import VoicebotError

log = logging.getLogger("voicebot.store")

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
        reason TEXT,
        host TEXT,
        caller_from TEXT,
        caller_verified INTEGER,
        language_by TEXT
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
    # The ticket number is the key a replayed journal is matched on.
    "CREATE UNIQUE INDEX IF NOT EXISTS tickets_ticket ON tickets (ticket)",
    """CREATE TABLE IF NOT EXISTS callbacks (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        call_id TEXT,
        caller TEXT,
        language TEXT,
        reason TEXT,
        created_at TEXT,
        done_at TEXT,
        verified INTEGER
    )""",
    # A caller's accessibility controls (issue 12), remembered for their number for
    # CALLER_SETTINGS_DAYS; `voicebot callers forget NUMBER` removes them.
    """CREATE TABLE IF NOT EXISTS caller_settings (
        number TEXT PRIMARY KEY,
        rate_step INTEGER,
        gain_db INTEGER,
        more_time INTEGER,
        updated_at TEXT
    )""",
    # What migrations have run (key: name), so a big store is not scanned on every open.
    """CREATE TABLE IF NOT EXISTS meta (
        key TEXT PRIMARY KEY,
        value TEXT
    )""",
    # Blocks of ticket and callback numbers, leased by a process so that it can number
    # them without asking the database each time (see Store._number).
    """CREATE TABLE IF NOT EXISTS number_blocks (
        block INTEGER PRIMARY KEY AUTOINCREMENT,
        host TEXT,
        pid INTEGER,
        leased_at TEXT
    )""",
]

# Columns added after the first release, with their type: added on open when missing.
# caller_verified/verified (issue 11): 1 when the number came from a P-Asserted-Identity of
# a trusted peer; rows from before the column (NULL) count as unverified.
# language_by (issue 12): how the caller's language was chosen (key, name, detected).
ADDED_COLUMNS = {"calls": [("host", "TEXT"), ("caller_from", "TEXT"),
                           ("caller_verified", "INTEGER"), ("language_by", "TEXT")],
                 "callbacks": [("verified", "INTEGER")]}
# Time columns normalised to UTC on open (rows written before times were stored in UTC).
TIME_COLUMNS = {"calls": ("id", ["started_at", "answered_at", "ended_at"]),
                "turns": ("call_id, seq", ["created_at"]),
                "tickets": ("id", ["created_at"]),
                "callbacks": ("id", ["created_at", "done_at"])}

# Block b gives the numbers 1_000_000 + 1000 b ... + 999: above the six-digit tickets of
# the old numbering (100000 + row id).
NUMBER_BASE = 1_000_000
BLOCK_SIZE = 1000
# Numbers made without a leased block: 10**9 + 1000 x + n, x from the start time and pid.
# Ten digits, below 2**31: callbacks.id is a 32-bit integer in PostgreSQL.
OFFLINE_BASE = 1_000_000_000

CALLER_SETTINGS_DAYS = 90  # how long a caller's controls are remembered (retention purges)
RETRY_MIN_S = 0.2
RETRY_MAX_S = 5.0
BATCH = 500  # operations per database transaction
JOURNAL_COMPACT_BYTES = 256 * 1024
READ_WAIT_S = 3.0  # how long a read waits for this process's queued writes
_SERIAL = itertools.count(1)
_OPEN: weakref.WeakSet[Store] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked worker must not keep its parent's journals locked (a journal is replayed
    once nobody holds it) and has none of the parent's store threads."""
    for store in list(_OPEN):
        if store._jfd is not None:
            with suppress(OSError):
                os.close(store._jfd)
            store._jfd = None


os.register_at_fork(after_in_child=_after_fork_in_child)


class StoreUnavailable(VoicebotError):
    """The database does not answer (PostgreSQL down, SQLite file locked or its disk full)."""


def utc(value: str | dt.datetime | None) -> str | None:
    """A time as stored: UTC, ISO 8601 to the millisecond, ``+00:00``.

    Accepts a datetime or ISO text with any offset; a time without one is taken as UTC.
    Text that is not a time is returned unchanged (never lose what was there)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            t = dt.datetime.fromisoformat(value)
        except ValueError:
            return value
    else:
        t = value
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.astimezone(dt.UTC).isoformat(timespec="milliseconds")


def now() -> str:
    """The current time as stored (see :func:`utc`)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def local(value: str | None, tz: dt.tzinfo) -> dt.datetime | None:
    """A stored time in the call centre's zone ``tz`` (None for no or unreadable time)."""
    if not value:
        return None
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.astimezone(tz)


@dataclass
class CallRecord:
    """A call as stored. path: the option ids the caller chose, in order; times in UTC."""

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
    host: str | None = None
    caller_verified: bool = False  # caller is a trusted P-Asserted-Identity (issue 11)
    caller_from: str | None = None  # the From URI as sent (caller is From's user if unverified)
    language_by: str | None = None  # key, name or detected (issue 12); None: preset or none

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Call:
    """What the writer needs to know of a call this process writes: turn number and path."""

    seq: int = 0
    path: list[str] = field(default_factory=list)


def _alive_lock(fd: int) -> bool:
    """Take the exclusive lock on a journal; False when its process still holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The operations of a journal file, in order; a torn last line (a crash or a full
    disk in the middle of a write) is skipped."""
    ops = []
    with path.open("rb") as f:
        for line in f:
            try:
                ops.append(json.loads(line))
            except ValueError:
                continue
    return ops


class Store:
    """Thread-safe access to the call records of one host (or one PostgreSQL database).

    path: the SQLite file; dsn: a PostgreSQL DSN instead; spool: the folder of the write
    journals (default: ``spool`` next to the SQLite file; none, memory only, for a DSN
    without one); host: this host's name, stored with each call (default: hostname);
    tz: the call centre's zone, for showing times.
    """

    def __init__(self, path: Path | None = None, dsn: str | None = None,
                 spool: Path | None = None, host: str | None = None,
                 tz: dt.tzinfo | None = None) -> None:
        self.path = path
        self.dsn = dsn
        self.host = host or socket.gethostname()
        self.tz: dt.tzinfo = tz or dt.UTC
        self._ph = "%s" if dsn else "?"
        self._psycopg: Any = None
        if dsn:
            try:
                import psycopg  # type: ignore[import-not-found]
            except ImportError:
                raise VoicebotError("[store] dsn is set but psycopg is not installed: "
                                    "pip install 'psycopg[binary]'") from None
            self._psycopg = psycopg
        else:
            assert path is not None
            path.parent.mkdir(parents=True, exist_ok=True)
            if spool is None:
                spool = path.parent / "spool"
        self.spool = spool
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        # Reads: one connection under a lock, reopened after a failure.
        self._lock = threading.Lock()
        self._rconn: Any = None
        # Numbering of tickets and callbacks.
        self._num_lock = threading.Lock()
        self._blocks: deque[int] = deque()
        self._block: int | None = None
        self._next = BLOCK_SIZE
        self._offline: int | None = None
        self._numbering = False  # set by the first write that may need numbers
        # Turn numbers and paths of the calls this process writes (bounded: calls end).
        self._calls: OrderedDict[str, _Call] = OrderedDict()
        # The write queue, shared with the writer thread.
        self._cv = threading.Condition()
        self._queue: list[dict[str, Any]] = []
        self._pending: deque[dict[str, Any]] = deque()  # journalled, not in the database
        self._jlock = threading.Lock()  # the journal file
        self._journal_done = False
        self._journalling = 0
        self._stop = False
        self._started = threading.Event()  # dead journals replayed (or tried)
        self._replayed = 0
        self._journal: Path | None = None
        self._jfd: int | None = None
        self._journal_ok = False
        self._journal_bytes = 0
        self._unjournalled: list[dict[str, Any]] = []  # in memory only (the disk was full)
        self._full_logged = -1e9
        self._wconn: Any = None
        try:
            with self._lock:
                self._read_conn()
        except StoreUnavailable as exc:
            # Calls go on without the database: writes wait in the journal.
            log.warning("%s", exc)
        except self._transient() as exc:
            self._drop_read()
            log.warning("store: %s: %s; records wait in the spool", self.name, exc)
        self._open_journal()
        self._jthread = threading.Thread(target=self._jrun, name="store-journal", daemon=True)
        self._writer = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._jthread.start()
        self._writer.start()
        _OPEN.add(self)

    @classmethod
    def from_config(cls, cfg: Any) -> Store:
        from zoneinfo import ZoneInfo

        try:
            tz: dt.tzinfo | None = ZoneInfo(cfg.hours.timezone)
        except Exception:  # the config check names a bad zone; show UTC here
            tz = None
        spool = cfg.var_dir / "spool"
        if cfg.store.dsn:
            return cls(dsn=cfg.store.dsn, spool=spool, tz=tz)
        p = Path(cfg.store.path)
        return cls(path=p if p.is_absolute() else cfg.base / p, spool=spool, tz=tz)

    # --- connections ---

    @property
    def name(self) -> str:
        return self.dsn.split("@")[-1] if self.dsn else str(self.path)

    def _transient(self) -> tuple[type[BaseException], ...]:
        """Errors that mean "the database does not answer now", worth a retry."""
        if self._psycopg is not None:
            return (self._psycopg.OperationalError, self._psycopg.InterfaceError, OSError)
        return (sqlite3.OperationalError, OSError)

    def _connect(self, autocommit: bool) -> Any:
        if self._psycopg is not None:
            try:
                # Keepalives and a TCP user timeout: a server that vanishes without a
                # reset (a network cut) fails a query in seconds instead of hanging it.
                return self._psycopg.connect(self.dsn, autocommit=autocommit, connect_timeout=3,
                                             keepalives=1, keepalives_idle=5,
                                             keepalives_interval=2, keepalives_count=3,
                                             tcp_user_timeout=10000)
            except self._transient() as exc:
                raise StoreUnavailable(f"the call store at {self.name} does not answer "
                                       f"({str(exc).strip()}); start it or check [store] dsn "
                                       "(calls go on: their records wait in the spool)"
                                       ) from None
        assert self.path is not None
        try:
            conn = sqlite3.connect(str(self.path), timeout=5.0, check_same_thread=False,
                                   isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"{self.path}: the call store does not answer ({exc}); "
                                   "records wait in the spool until it is back") from None
        except sqlite3.DatabaseError as exc:
            raise VoicebotError(f"{self.path}: cannot open the call store ({exc}); move the "
                                "file away or set [store] path to a new file") from None
        return conn

    def _read_conn(self) -> Any:
        """The read connection (caller holds ``_lock``), opened and the schema made once."""
        if self._rconn is None:
            self._rconn = self._connect(autocommit=True)
            try:
                self._ensure_schema(self._rconn)
            except self._transient() as exc:
                self._drop_read()
                raise StoreUnavailable(f"the call store at {self.name} does not answer "
                                       f"({exc})") from None
        return self._rconn

    def _drop_read(self) -> None:
        if self._rconn is not None:
            with suppress(Exception):
                self._rconn.close()
            self._rconn = None

    def _q(self, sql: str) -> str:
        return sql.replace("?", self._ph) if self._ph != "?" else sql

    def _ensure_schema(self, conn: Any) -> None:
        with self._schema_lock:
            if self._schema_ready:
                return
            cur = conn.cursor()
            try:
                if self.dsn:
                    # Workers start together; PostgreSQL's CREATE ... IF NOT EXISTS is not
                    # safe against a concurrent twin (duplicate pg_type rows): serialise it.
                    cur.execute("SELECT pg_advisory_lock(919001)")
                try:
                    for stmt in SCHEMA:
                        if self.dsn:  # PostgreSQL spells an auto-numbered key differently
                            stmt = stmt.replace("INTEGER PRIMARY KEY AUTOINCREMENT",
                                                "SERIAL PRIMARY KEY")
                        cur.execute(stmt)
                    self._migrate(cur)
                finally:
                    if self.dsn:
                        cur.execute("SELECT pg_advisory_unlock(919001)")
            finally:
                cur.close()
            self._schema_ready = True

    def _columns(self, cur: Any, table: str) -> set[str]:
        if self.dsn:
            cur.execute("SELECT column_name FROM information_schema.columns "
                        "WHERE table_name = %s", (table,))
            return {r[0] for r in cur.fetchall()}
        cur.execute(f"PRAGMA table_info({table})")
        return {r[1] for r in cur.fetchall()}

    def _migrate(self, cur: Any) -> None:
        """Bring a store written by an older release up to date: new columns, and times
        with an offset other than +00:00 rewritten in UTC so they sort as times."""
        for table, cols in ADDED_COLUMNS.items():
            have = self._columns(cur, table)
            for name, kind in cols:
                if name not in have:
                    cur.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
        cur.execute("SELECT value FROM meta WHERE key = 'times'")
        row = cur.fetchone()
        if row and row[0] == "utc":
            return
        for table, (key, cols) in TIME_COLUMNS.items():
            keys = [k.strip() for k in key.split(",")]
            cond = " OR ".join(f"({c} IS NOT NULL AND {c} NOT LIKE '%+00:00')" for c in cols)
            cur.execute(f"SELECT {key}, {', '.join(cols)} FROM {table} WHERE {cond}")
            rows = cur.fetchall()
            for r in rows:
                ks, vals = r[:len(keys)], r[len(keys):]
                sets = ", ".join(f"{c} = ?" for c in cols)
                where = " AND ".join(f"{k} = ?" for k in keys)
                cur.execute(self._q(f"UPDATE {table} SET {sets} WHERE {where}"),
                            (*(utc(v) for v in vals), *ks))
            if rows:
                log.info("store: %d %s row(s) rewritten with times in UTC", len(rows), table)
        cur.execute("INSERT INTO meta (key, value) VALUES ('times', 'utc') "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value")

    def _read(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(cursor)`` with one retry on a fresh connection."""
        with self._lock:
            for attempt in (0, 1):
                conn = self._read_conn()
                cur = conn.cursor()
                try:
                    return fn(cur)
                except self._transient() as exc:
                    self._drop_read()
                    if attempt:
                        raise StoreUnavailable(f"the call store at {self.name} does not "
                                               f"answer ({str(exc).strip()}); try again when "
                                               "it is back") from None
                finally:
                    with suppress(Exception):
                        cur.close()
        raise AssertionError("unreachable")

    # --- numbering of tickets and callbacks ---

    def _lease_blocks_on(self, conn: Any, want: int) -> None:
        """Lease blocks until ``want`` are in hand (one INSERT each, on ``conn``)."""
        while True:
            with self._num_lock:
                have = len(self._blocks) + (self._block is not None and self._block >= 0
                                            and self._next < BLOCK_SIZE)
            if have >= want:
                return
            cur = conn.cursor()
            try:
                cur.execute(self._q("INSERT INTO number_blocks (host, pid, leased_at) "
                                    "VALUES (?, ?, ?) RETURNING block"),
                            (self.host, os.getpid(), now()))
                block = int(cur.fetchone()[0])
                if self.dsn and not getattr(conn, "autocommit", True):
                    conn.commit()
            finally:
                cur.close()
            with self._num_lock:
                self._blocks.append(block)

    def _number(self) -> int:
        """A ticket or callback number, unique across processes and hosts, without asking
        the database: the next of a block of 1000 leased from ``number_blocks`` (the writer
        keeps a spare block leased). Block b numbers 1000000 + 1000 b ... + 999: seven
        digits for the first 8999 blocks, then eight. Only a process that has not reached
        the database since it started has no block: it numbers from 1000000000 + 1000 x,
        x made of the time (seconds, mod 10000) and its pid (mod 100), ten digits that no
        block reaches; two such processes collide only if they start in the same second
        (mod 2.7 h) with pids equal mod 100 and both never reach the database."""
        with self._num_lock:
            if self._blocks and (self._block is None or self._block == -1
                                 or self._next >= BLOCK_SIZE):
                self._block, self._next = self._blocks.popleft(), 0
            elif self._block is None or self._next >= BLOCK_SIZE:
                x = (int(time.time()) % 10_000) * 100 + os.getpid() % 100
                self._offline = OFFLINE_BASE // BLOCK_SIZE + x
                self._block, self._next = -1, 0
                log.warning("store: no number block leased yet (the database has not "
                            "answered since the first call): numbering from %d000",
                            self._offline)
                self._numbering = True
            n = self._next
            self._next += 1
            if self._block == -1:
                assert self._offline is not None
                return self._offline * 1000 + n
            return NUMBER_BASE + self._block * BLOCK_SIZE + n

    # --- writing: queued, returns at once ---

    def _put(self, op: dict[str, Any]) -> None:
        with self._cv:
            if not self._stop:
                self._queue.append(op)
                # Both threads (and flush) wait on this condition: notify() could wake the
                # writer instead of the journal thread and leave the record queued.
                self._cv.notify_all()
                return
        self._late(op)

    def _late(self, op: dict[str, Any]) -> None:
        """A write after close (a call finishing while the process stops): straight to a
        journal of its own, unlocked, so the next process to start replays it."""
        if self.spool is None:
            log.error("store: closed, record lost: %s", json.dumps(op, ensure_ascii=False))
            return
        path = self.spool / f"{self.host}-{os.getpid()}-late{next(_SERIAL)}.jsonl"
        try:
            with path.open("ab") as f:
                f.write(json.dumps(op, ensure_ascii=False).encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
            log.warning("store: record after close kept in %s for the next start", path)
        except OSError as exc:
            log.error("store: closed and %s not writable (%s), record lost: %s", path, exc,
                      json.dumps(op, ensure_ascii=False))

    def call_started(self, call_id: str, sip_call_id: str | None, caller: str | None,
                     dialled: str | None, worker: int | None = None,
                     started_at: str | dt.datetime | None = None, verified: bool = False,
                     caller_from: str | None = None) -> None:
        """A new call; started_at: any tz-aware time (datetime or ISO text), default now.
        caller: the number callbacks go to; verified: it came from a trusted
        P-Asserted-Identity; caller_from: the From header's URI, as the caller sent it."""
        self._numbering = True  # a call may open a ticket or queue a callback: lease ahead
        with self._num_lock:
            self._calls[call_id] = _Call()
            while len(self._calls) > 2000:
                self._calls.popitem(last=False)
        self._put({"op": "call_started", "id": call_id, "sip_call_id": sip_call_id,
                   "worker": worker, "caller": caller, "dialled": dialled,
                   "started_at": utc(started_at) or now(), "host": self.host,
                   "verified": bool(verified), "caller_from": caller_from})

    def call_answered(self, call_id: str) -> None:
        self._put({"op": "call_answered", "id": call_id, "at": now()})

    def add_turn(self, call_id: str, turn: Turn) -> None:
        """Store a turn and extend the call's path at once."""
        with self._num_lock:
            c = self._calls.get(call_id)
            if c is None:
                c = self._calls[call_id] = _Call()
            c.seq += 1
            if turn.option:
                c.path.append(turn.option)
            path = list(c.path) if turn.option else None
            seq = c.seq
        self._put({"op": "turn", "call_id": call_id, "seq": seq, "t_ms": turn.t_ms,
                   "node": turn.node, "language": turn.language, "input": turn.input,
                   "heard": turn.heard, "confidence": turn.confidence, "option": turn.option,
                   "result": turn.result, "prompt": turn.prompt,
                   "prompt_text": turn.prompt_text, "barge_in": int(turn.barge_in),
                   "latency_ms": turn.latency_ms, "created_at": now(),
                   "path": path})

    def call_ended(self, call_id: str, result: str, language: str | None,
                   recording: str | None, ended_by: str, reason: str = "",
                   language_by: str | None = None) -> None:
        """language_by: how the language was chosen, key, name or detected (issue 12)."""
        self._put({"op": "call_ended", "id": call_id, "at": now(), "result": result,
                   "language": language, "recording": recording, "ended_by": ended_by,
                   "reason": reason, "language_by": language_by or None})

    def set_language(self, call_id: str, language: str | None, by: str | None = None) -> None:
        """by: how it was chosen, key, name or detected (issue 12)."""
        if language:
            self._put({"op": "set_language", "id": call_id, "language": language, "by": by})

    def save_caller_settings(self, number: str, settings: Any,
                             at: dt.datetime | None = None) -> None:
        """Remember a caller's controls (a dialog.CallerSettings) for their number; default
        settings forget the number. Written like every record (journal, then database)."""
        self._put({"op": "caller_settings", "number": number,
                   "rate_step": int(settings.rate_step), "gain_db": int(settings.gain_db),
                   "more_time": int(settings.more_time),
                   "updated_at": utc(at) or now()})

    def caller_settings(self, number: str, at: dt.datetime | None = None) -> Any:
        """The controls remembered for ``number`` (a dialog.CallerSettings), or None when
        nothing is remembered or it is older than CALLER_SETTINGS_DAYS. Never raises: a
        store that does not answer means the call starts with the defaults."""
        from .dialog import CallerSettings

        since = utc((at or dt.datetime.now(dt.UTC)) - dt.timedelta(days=CALLER_SETTINGS_DAYS))

        def run(cur: Any) -> Any:
            cur.execute(self._q("SELECT rate_step, gain_db, more_time FROM caller_settings "
                                "WHERE number = ? AND updated_at >= ?"), (number, since))
            return cur.fetchone()

        try:
            row = self._read(run)
        except Exception as exc:
            log.warning("store: remembered settings of a caller not read: %s", exc)
            return None
        return CallerSettings(int(row[0]), int(row[1]), int(row[2])) if row else None

    def forget_caller(self, number: str) -> int:
        """Remove what is remembered for ``number``; the rows removed (0 or 1)."""
        self.flush(READ_WAIT_S)

        def run(cur: Any) -> int:
            cur.execute(self._q("DELETE FROM caller_settings WHERE number = ?"), (number,))
            return int(cur.rowcount)

        return self._read(run)  # type: ignore[no-any-return]

    def purge_caller_settings(self, before: dt.datetime) -> int:
        """Remove settings not changed since ``before``; the rows removed."""
        self.flush(READ_WAIT_S)

        def run(cur: Any) -> int:
            cur.execute(self._q("DELETE FROM caller_settings WHERE updated_at < ?"),
                        (utc(before),))
            return int(cur.rowcount)

        return self._read(run)  # type: ignore[no-any-return]

    def open_ticket(self, call_id: str, caller: str | None, language: str | None,
                    kind: str) -> str:
        """A new ticket for a message being recorded; returns its number (said to the
        caller), numbered locally (see :meth:`_number`)."""
        ticket = str(self._number())
        self._put({"op": "open_ticket", "ticket": ticket, "call_id": call_id, "caller": caller,
                   "language": language, "kind": kind, "created_at": now()})
        return ticket

    def close_ticket(self, ticket: str, recording: str | None, duration_ms: float,
                     speech_ms: float, ended_by: str) -> None:
        self._put({"op": "close_ticket", "ticket": ticket, "recording": recording,
                   "duration_ms": duration_ms, "speech_ms": speech_ms, "ended_by": ended_by,
                   "state": "received" if speech_ms > 0 else "empty"})

    def add_callback(self, call_id: str, caller: str | None, language: str | None,
                     reason: str, verified: bool = False) -> int:
        """Queue a callback; returns its number (``voicebot callbacks done NUMBER``).
        verified: caller is a trusted P-Asserted-Identity, not just what From said."""
        n = self._number()
        self._put({"op": "add_callback", "id": n, "call_id": call_id, "caller": caller,
                   "language": language, "reason": reason, "created_at": now(),
                   "verified": bool(verified)})
        return n

    # The SQL of each operation; each is idempotent (see the module docstring).
    def _apply(self, cur: Any, op: dict[str, Any]) -> None:
        kind = op["op"]
        q = self._q
        if kind == "call_started":
            # Journals written before issue 11 have no verified/caller_from: unverified.
            cur.execute(q("INSERT INTO calls (id, sip_call_id, worker, caller, dialled, "
                          "started_at, path, host, caller_from, caller_verified) "
                          "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING"),
                        (op["id"], op["sip_call_id"], op["worker"], op["caller"], op["dialled"],
                         op["started_at"], "[]", op.get("host"), op.get("caller_from"),
                         int(bool(op.get("verified")))))
        elif kind == "call_answered":
            cur.execute(q("UPDATE calls SET answered_at = ? WHERE id = ?"), (op["at"], op["id"]))
        elif kind == "turn":
            cur.execute(q(
                "INSERT INTO turns (call_id, seq, t_ms, node, language, input, heard, confidence,"
                " option, result, prompt, prompt_text, barge_in, latency_ms, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (call_id, seq) DO NOTHING"),
                (op["call_id"], op["seq"], op["t_ms"], op["node"], op["language"], op["input"],
                 op["heard"], op["confidence"], op["option"], op["result"], op["prompt"],
                 op["prompt_text"], op["barge_in"], op["latency_ms"], op["created_at"]))
            if op.get("path") is not None:
                cur.execute(q("UPDATE calls SET path = ? WHERE id = ?"),
                            (json.dumps(op["path"]), op["call_id"]))
        elif kind == "call_ended":
            cur.execute(q("UPDATE calls SET ended_at = ?, result = ?, "
                          "language = COALESCE(?, language), recording = ?, ended_by = ?, "
                          "reason = ?, language_by = COALESCE(?, language_by) WHERE id = ?"),
                        (op["at"], op["result"], op["language"], op["recording"],
                         op["ended_by"], op["reason"], op.get("language_by"), op["id"]))
        elif kind == "set_language":
            cur.execute(q("UPDATE calls SET language = ?, language_by = COALESCE(?, "
                          "language_by) WHERE id = ?"),
                        (op["language"], op.get("by") or None, op["id"]))
        elif kind == "caller_settings":
            if (op["rate_step"], op["gain_db"], op["more_time"]) == (0, 0, 0):
                cur.execute(q("DELETE FROM caller_settings WHERE number = ?"), (op["number"],))
            else:
                cur.execute(q("INSERT INTO caller_settings (number, rate_step, gain_db, "
                              "more_time, updated_at) VALUES (?, ?, ?, ?, ?) "
                              "ON CONFLICT (number) DO UPDATE SET rate_step = "
                              "excluded.rate_step, gain_db = excluded.gain_db, more_time = "
                              "excluded.more_time, updated_at = excluded.updated_at"),
                            (op["number"], op["rate_step"], op["gain_db"], op["more_time"],
                             op["updated_at"]))
        elif kind == "open_ticket":
            cur.execute(q("INSERT INTO tickets (ticket, call_id, caller, language, kind, state, "
                          "created_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
                          "ON CONFLICT (ticket) DO NOTHING"),
                        (op["ticket"], op["call_id"], op["caller"], op["language"], op["kind"],
                         "recording", op["created_at"]))
        elif kind == "close_ticket":
            cur.execute(q("UPDATE tickets SET state = ?, recording = ?, duration_ms = ?, "
                          "speech_ms = ?, ended_by = ? WHERE ticket = ?"),
                        (op["state"], op["recording"], op["duration_ms"], op["speech_ms"],
                         op["ended_by"], op["ticket"]))
        elif kind == "add_callback":
            cur.execute(q("INSERT INTO callbacks (id, call_id, caller, language, reason, "
                          "created_at, verified) VALUES (?, ?, ?, ?, ?, ?, ?) "
                          "ON CONFLICT (id) DO NOTHING"),
                        (op["id"], op["call_id"], op["caller"], op["language"], op["reason"],
                         op["created_at"], int(bool(op.get("verified")))))
        else:
            raise ValueError(f"unknown store operation {kind!r}")

    # --- the writer thread ---

    def _open_journal(self) -> None:
        if self.spool is None:
            return
        try:
            self.spool.mkdir(parents=True, exist_ok=True)
            # One journal per Store: a process may open several (the CLI, the web report).
            self._journal = self.spool / f"{self.host}-{os.getpid()}-{next(_SERIAL)}.jsonl"
            self._jfd = os.open(self._journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            # Held while this process lives: a journal nobody holds is a dead process's.
            fcntl.flock(self._jfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._journal_bytes = os.fstat(self._jfd).st_size
            self._journal_ok = True
        except OSError as exc:
            log.error("store: no write journal in %s (%s): records wait in memory until the "
                      "database takes them", self.spool, exc)
            self._journal_ok = False

    def _journal_write(self, ops: Sequence[dict[str, Any]]) -> None:
        """Append ``ops`` to the journal, fsync'd (caller holds ``_jlock``). On a full disk
        they, and every later record, wait in memory (``_unjournalled``, in order) until
        :meth:`_journal_retry` finds room; what the journal held stays in it."""
        if self._jfd is None:
            return
        if not self._journal_ok:
            self._unjournalled.extend(ops)
            return
        if not self._append(ops):
            self._unjournalled.extend(ops)

    def _append(self, ops: Sequence[dict[str, Any]]) -> bool:
        assert self._jfd is not None
        data = b"".join(json.dumps(op, ensure_ascii=False, separators=(",", ":")).encode()
                        + b"\n" for op in ops)
        try:
            view = memoryview(data)
            while view:
                n = os.write(self._jfd, view)
                view = view[n:]
            os.fsync(self._jfd)
        except OSError as exc:
            if self._journal_ok and time.monotonic() - self._full_logged > 60:
                # Once a minute at most: with the database up, the journal empties and
                # fails again on every batch while the disk stays full.
                self._full_logged = time.monotonic()
                log.error("store: journal %s: %s; records wait in memory until there is room "
                          "or the database takes them", self._journal, exc)
            self._journal_ok = False
            with suppress(OSError):  # drop a torn line; the records are in memory
                os.ftruncate(self._jfd, self._journal_bytes)
            return False
        self._journal_bytes += len(data)
        return True

    def _journal_retry(self) -> None:
        """After a full disk: append the records kept in memory once there is room."""
        if self._jfd is None or self._journal_ok or not self._unjournalled:
            return
        self._journal_ok = True  # let _append try (it turns it back off on failure)
        if self._append(self._unjournalled):
            log.warning("store: journal %s writable again (%d records from memory)",
                        self._journal, len(self._unjournalled))
            self._unjournalled = []

    def _journal_empty(self) -> None:
        """Everything is in the database: empty the journal (caller holds ``_jlock``)."""
        self._unjournalled = []
        if self._jfd is None:
            return
        try:
            os.ftruncate(self._jfd, 0)
            os.fsync(self._jfd)
            self._journal_bytes = 0
            self._journal_ok = True
        except OSError as exc:
            log.error("store: journal %s cannot be emptied: %s", self._journal, exc)

    def _wconnect(self) -> Any:
        if self._wconn is None:
            self._wconn = self._connect(autocommit=False)
            try:
                self._ensure_schema(self._wconn)
                if self.dsn:
                    self._wconn.commit()
            except BaseException:
                self._drop_write()
                raise
        return self._wconn

    def _drop_write(self) -> None:
        if self._wconn is not None:
            with suppress(Exception):
                self._wconn.close()
            self._wconn = None

    def _commit(self, ops: Sequence[dict[str, Any]]) -> None:
        """Apply ``ops`` in one transaction; an operation the database rejects (not an
        outage: bad data) is logged and skipped so it cannot hold up the others."""
        conn = self._wconnect()
        cur = conn.cursor()
        try:
            if not self.dsn:
                cur.execute("BEGIN IMMEDIATE")
            bad: list[int] = []
            for i, op in enumerate(ops):
                sp = f"s{i}"
                cur.execute(f"SAVEPOINT {sp}")
                try:
                    self._apply(cur, op)
                    cur.execute(f"RELEASE SAVEPOINT {sp}")
                except self._transient():
                    raise
                except Exception as exc:  # one bad record must not block all
                    cur.execute(f"ROLLBACK TO SAVEPOINT {sp}")
                    cur.execute(f"RELEASE SAVEPOINT {sp}")
                    bad.append(i)
                    self._keep_rejected(op, exc)
            if self.dsn:
                conn.commit()
            else:
                cur.execute("COMMIT")
        except BaseException:
            with suppress(Exception):
                if self.dsn:
                    conn.rollback()
                else:
                    cur.execute("ROLLBACK")
            raise
        finally:
            with suppress(Exception):
                cur.close()

    def _keep_rejected(self, op: dict[str, Any], exc: Exception) -> None:
        """A record the database refuses (bad data, not an outage) is set aside in
        ``<spool>/rejected.txt`` with the reason, for a person, so it cannot block the
        others and is not lost."""
        text = json.dumps(op, ensure_ascii=False)
        log.error("store: record rejected by the database (%s), set aside: %s", exc, text[:300])
        if self.spool is not None:
            with suppress(OSError), (self.spool / "rejected.txt").open("a") as f:
                f.write(f"{now()}\t{str(exc).strip()}\t{text}\n")

    def _replay_dead(self, conn_ops: Callable[[Sequence[dict[str, Any]]], None]) -> int:
        """Replay the journals of dead processes in this spool through ``conn_ops``; each
        is deleted once the database has it. Returns how many records were replayed."""
        if self.spool is None or not self.spool.is_dir():
            return 0
        total = 0
        for path in sorted(self.spool.glob("*.jsonl")):
            if self._journal is not None and path == self._journal:
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                continue
            try:
                if not _alive_lock(fd):
                    continue  # its process is alive: its writer will deliver it
                ops = read_journal(path)
                for i in range(0, len(ops), BATCH):
                    conn_ops(ops[i:i + BATCH])
                path.unlink()
                total += len(ops)
                log.info("store: replayed %d record(s) left by a dead process in %s",
                         len(ops), path)
            finally:
                os.close(fd)
        return total

    def _jrun(self) -> None:
        """The journal thread: queued writes to local disk at once (fsync'd per batch),
        whatever the database is doing, then over to the writer."""
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                new, self._queue = self._queue, []
                self._journalling = len(new)  # neither queued nor pending: still counted
                stopping = self._stop
            if new:
                with self._jlock:
                    self._journal_write(new)
                    with self._cv:
                        self._pending.extend(new)
                        self._journalling = 0
                        self._cv.notify_all()
            if stopping:
                with self._cv:
                    if not self._queue:
                        self._journal_done = True
                        self._cv.notify_all()
                        return

    def _run(self) -> None:
        """The writer thread: journalled writes into the database, in order, with retries."""
        delay = RETRY_MIN_S
        retry_at = 0.0
        dead_done = False
        last_try = False
        down_since: float | None = None
        while True:
            quiet = False
            with self._cv:
                while True:
                    stopping = self._stop and self._journal_done
                    if stopping and not last_try:
                        last_try, retry_at = True, 0.0  # closing: one more try, no backoff
                    work = bool(self._pending) or not dead_done
                    due = retry_at - time.monotonic()
                    if (work and due <= 0) or stopping:
                        break
                    idle = not work and self._journal_bytes and not self._queue
                    self._cv.wait(due if work else (1.0 if not idle else 0.5))
                    if idle and not self._pending and not self._queue:
                        quiet = True  # nothing for a while: time to empty the journal
                        break
            try:
                if not dead_done:
                    self._replayed += self._replay_dead(self._commit)
                    dead_done = True
                    self._started.set()
                while True:
                    with self._cv:
                        batch = [self._pending[i] for i in range(min(BATCH, len(self._pending)))]
                    if not batch:
                        break
                    self._commit(batch)
                    with self._cv:
                        for _ in batch:
                            self._pending.popleft()
                        self._cv.notify_all()
                with self._jlock, self._cv:
                    # All delivered (and nothing being journalled: we hold the journal):
                    # empty the journal when it is big, broken, or the line is quiet.
                    big = self._journal_bytes > JOURNAL_COMPACT_BYTES
                    if not self._pending and (not self._journal_ok or big or (
                            quiet and self._journal_bytes)):
                        self._journal_empty()
                if self._numbering:
                    # One block in hand, a spare once it is half used: leased here, in the
                    # background, long before the first ticket (the first call starts it).
                    with self._num_lock:
                        half = self._block is not None and self._block >= 0 and (
                            self._next > BLOCK_SIZE // 2)
                    self._lease_blocks_on(self._wconnect(), 2 if half else 1)
                if down_since is not None:
                    log.warning("store: the database answers again after %.1f s",
                                time.monotonic() - down_since)
                    down_since = None
                delay = RETRY_MIN_S
            except (StoreUnavailable, *self._transient()) as exc:
                self._drop_write()
                if down_since is None:
                    down_since = time.monotonic()
                    log.error("store: the database does not answer (%s); %d record(s) wait "
                              "in the %s", str(exc).strip(), len(self._pending),
                              "journal" if self._journal_ok else "memory")
                with self._jlock:
                    self._journal_retry()  # room on the disk again?
                retry_at = time.monotonic() + delay
                delay = min(RETRY_MAX_S, delay * 2)
                if not dead_done:
                    self._started.set()  # do not hold readers up: they will see the outage
            except Exception:  # the writer must outlive any surprise
                log.exception("store: writer error; retrying")
                self._drop_write()
                retry_at = time.monotonic() + delay
                delay = min(RETRY_MAX_S, delay * 2)
            if stopping:
                break
        self._drop_write()
        with self._jlock, self._cv:
            left = list(self._pending)
            if left:
                self._journal_retry()
                log.warning("store: %d record(s) not delivered at close; kept in %s for the "
                            "next start", len(left), self._journal if self._journal_ok else
                            "memory (the disk is full: they are lost with this process)")
            if self._jfd is not None:
                with suppress(OSError):
                    if not left and self._journal is not None:
                        self._journal.unlink()
                os.close(self._jfd)
                self._jfd = None

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every write so far is in the database; False after ``timeout`` s."""
        end = time.monotonic() + timeout
        self._started.wait(timeout)
        with self._cv:
            while self._queue or self._journalling or self._pending:
                left = end - time.monotonic()
                if left <= 0 or not self._writer.is_alive():
                    return False
                self._cv.wait(min(left, 0.2))
        return True

    @property
    def pending(self) -> int:
        """Writes not yet in the database."""
        with self._cv:
            return len(self._queue) + self._journalling + len(self._pending)

    @property
    def journalled(self) -> bool:
        """False while writes wait in memory only (the journal's disk is full)."""
        return self._journal_ok

    def replay_dead_spools(self, timeout: float = 30.0) -> int:
        """Records replayed from the journals of dead processes since the last call (waits
        for the writer's first pass, then replays any found since); StoreUnavailable when
        the database is down."""
        self._started.wait(timeout)

        def through_read(ops: Sequence[dict[str, Any]]) -> None:
            def run(cur: Any) -> None:
                for op in ops:
                    self._apply(cur, op)
            self._read(run)

        done, self._replayed = self._replayed, 0  # each replay is reported once
        return done + self._replay_dead(through_read)

    # --- reading ---

    def calls(self, last: int | None = None, sip_call_id: str | None = None,
              call_id: str | None = None) -> list[CallRecord]:
        """Calls, the one that started last first, each with its turns."""
        self.flush(READ_WAIT_S)
        where, args = [], []
        if sip_call_id:
            where.append("sip_call_id = ?")
            args.append(sip_call_id)
        if call_id:
            where.append("id = ?")
            args.append(call_id)
        sql = ("SELECT id, sip_call_id, worker, caller, dialled, started_at, answered_at, "
               "ended_at, language, path, result, recording, ended_by, reason, host, "
               "caller_verified, caller_from, language_by FROM calls")
        if where:
            sql += " WHERE " + " AND ".join(where)
        # Every time is UTC text of one width (see utc()): text order is time order.
        sql += " ORDER BY started_at DESC, id DESC"
        if last:
            sql += f" LIMIT {int(last)}"

        def run(cur: Any) -> list[CallRecord]:
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
                                      turns, r[14], bool(r[15]), r[16], r[17]))
            return out

        return self._read(run)  # type: ignore[no-any-return]

    # --- call-centre duties (synchronous: used by the CLI, not on a call) ---

    def upsert_applications(self, rows: Sequence[tuple[str, str, str]]) -> int:
        """Insert or replace (number, status, ISO date) rows; returns how many."""
        stamp = now()

        def run(cur: Any) -> None:
            for number, status, date in rows:
                cur.execute(self._q(
                    "INSERT INTO applications (number, status, status_date, imported_at) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (number) DO UPDATE SET "
                    "status = excluded.status, status_date = excluded.status_date, "
                    "imported_at = excluded.imported_at"), (number, status, date, stamp))

        self._read(run)
        return len(rows)

    def application(self, number: str) -> tuple[str, dt.date] | None:
        """(status, date) of an application, or None; StoreUnavailable when the database
        does not answer (call it off the call thread)."""
        def run(cur: Any) -> Any:
            cur.execute(self._q("SELECT status, status_date FROM applications WHERE number = ?"),
                        (number,))
            return cur.fetchone()

        row = self._read(run)
        return (row[0], dt.date.fromisoformat(row[1])) if row else None

    def tickets(self) -> list[dict[str, Any]]:
        self.flush(READ_WAIT_S)
        cols = ("ticket", "call_id", "caller", "language", "kind", "state", "recording",
                "duration_ms", "speech_ms", "ended_by", "created_at")

        def run(cur: Any) -> list[dict[str, Any]]:
            cur.execute(f"SELECT {', '.join(cols)} FROM tickets ORDER BY created_at, id")
            return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

        return self._read(run)  # type: ignore[no-any-return]

    def callbacks(self, outstanding_only: bool = False) -> list[dict[str, Any]]:
        self.flush(READ_WAIT_S)
        cols = ("id", "call_id", "caller", "language", "reason", "created_at", "done_at",
                "verified")
        sql = f"SELECT {', '.join(cols)} FROM callbacks"
        if outstanding_only:
            sql += " WHERE done_at IS NULL"

        def run(cur: Any) -> list[dict[str, Any]]:
            cur.execute(sql + " ORDER BY created_at, id")
            rows = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
            for row in rows:  # NULL: a row from before the column, unverified
                row["verified"] = bool(row["verified"])
            return rows

        return self._read(run)  # type: ignore[no-any-return]

    def callback_done(self, callback_id: int) -> bool:
        """Mark a callback made; False when there is no such outstanding callback."""
        self.flush(READ_WAIT_S)

        def run(cur: Any) -> bool:
            cur.execute(self._q("UPDATE callbacks SET done_at = ? WHERE id = ? AND "
                                "done_at IS NULL"), (now(), callback_id))
            return bool(cur.rowcount)

        return self._read(run)  # type: ignore[no-any-return]

    def execute(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """One statement (``?`` placeholders) on the read connection, for recovery; the rows
        it returns, if any."""
        def run(cur: Any) -> list[tuple[Any, ...]]:
            cur.execute(self._q(sql), tuple(args))
            return list(cur.fetchall()) if cur.description else []

        return self._read(run)  # type: ignore[no-any-return]

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what the database takes within ``timeout`` s; the rest stays in the
        journal for the next process."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        end = time.monotonic() + timeout
        self._jthread.join(timeout)
        self._writer.join(max(0.1, end - time.monotonic()))
        if self._writer.is_alive():
            log.warning("store: writer still busy after %.0f s at close; its journal %s is "
                        "replayed by the next start", timeout, self._journal)
        with self._lock:
            self._drop_read()
