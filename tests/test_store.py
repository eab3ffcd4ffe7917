"""The call store: SQLite (WAL) with several writer processes, and a real PostgreSQL."""

from __future__ import annotations

import contextlib
import datetime as dt
import glob
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from voicebot.config import load_config
from voicebot.dialog import Turn
from voicebot.errors import VoicebotError
from voicebot.store import CallRecord, Store, StoreUnavailable

BAKU = ZoneInfo("Asia/Baku")


def _turn(seq: int, option: str | None) -> Turn:
    return Turn(t_ms=1000.0 * seq, node="main", language="en", input="dtmf", heard=str(seq),
                confidence=1.0, option=option, result="accepted", prompt="hours",
                prompt_text="Operators take calls ...", barge_in=seq % 2 == 0, latency_ms=42.0)


def _writer(target: dict[str, str], worker: int, calls: int) -> None:
    store = Store(Path(target["path"])) if "path" in target else Store(dsn=target["dsn"])
    for i in range(calls):
        cid = f"w{worker}-{i}"
        store.call_started(cid, f"sip-{cid}", "<sip:caller@127.0.0.1>", "919", worker)
        store.call_answered(cid)
        store.add_turn(cid, _turn(1, "lang.en"))
        store.add_turn(cid, _turn(2, "main.hours"))
        store.open_ticket(cid, None, "en", "complaint")  # numbered locally, no round trip
        store.call_ended(cid, "completed", "en", f"/rec/{cid}.wav", "caller")
    store.close()


def check_many_writers(target: dict[str, str]) -> None:
    """Three processes (like three workers) write calls at once; nothing is lost."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(target, w, 15)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = Store(Path(target["path"])) if "path" in target else Store(dsn=target["dsn"])
    try:
        recs = store.calls(last=1000)
        assert len(recs) == 45
        for r in recs:
            assert r.path == ["lang.en", "main.hours"] and r.result == "completed"
            assert [t["seq"] for t in r.turns] == [1, 2] and r.turns[1]["barge_in"] is True
            assert r.ended_at and r.answered_at and r.language == "en"
        (one,) = store.calls(sip_call_id="sip-w1-3")
        assert one.id == "w1-3" and one.worker == 1
        # Ticket numbers from three processes: unique, said digit by digit (>= 6 digits).
        tickets = [t["ticket"] for t in store.tickets() if t["call_id"].startswith("w")]
        assert len(tickets) == len(set(tickets)) == 45
        assert all(t.isdigit() and len(t) >= 6 for t in tickets)
    finally:
        store.close()


def test_sqlite_wal_with_several_writer_processes(tmp_path: Path) -> None:
    check_many_writers({"path": str(tmp_path / "calls.sqlite")})
    assert (tmp_path / "calls.sqlite-wal").exists() or (tmp_path / "calls.sqlite").exists()


def test_unreadable_store_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(VoicebotError, match=r"broken\.sqlite"):
        Store(bad)


@dataclass
class Cluster:
    """A throwaway PostgreSQL cluster that a test may stop and start again."""

    dsn: str
    pg_ctl: list[str]
    data: Path
    log: Path
    options: str

    def stop(self) -> None:
        subprocess.run([*self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop"],
                       check=True, capture_output=True)

    def start(self) -> None:
        subprocess.run([*self.pg_ctl, "-D", str(self.data), "-l", str(self.log), "-w",
                        "-o", self.options, "start"], check=True, capture_output=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[Cluster]:
    """A throwaway PostgreSQL cluster (Debian's postgresql), trust auth on loopback."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        pytest.fail("PostgreSQL is not installed; scripts/install-system-deps installs it")
    bindir = Path(bins[-1]).parent
    # Not under pytest's tmp folder: that is private to root, and postgres must reach it.
    folder = Path(tempfile.mkdtemp(prefix="voicebot-pg-"))
    data = folder / "data"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # PostgreSQL refuses to run as root: run it as the postgres user when we are root.
    prefix: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "-A", "trust",
                    "-U", "postgres", "--no-sync"], check=True, capture_output=True)
    cluster = Cluster(f"postgresql://postgres@127.0.0.1:{port}/postgres",
                      [*prefix, str(bindir / "pg_ctl")], data, folder / "pg.log",
                      f"-h 127.0.0.1 -p {port} -k {folder} -F")
    cluster.start()
    try:
        yield cluster
    finally:
        subprocess.run([*cluster.pg_ctl, "-D", str(data), "-m", "fast", "stop"],
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def test_postgresql_store_with_several_writer_processes(postgres: Cluster) -> None:
    check_many_writers({"dsn": postgres.dsn})


def test_bot_writes_its_calls_to_postgresql(postgres: Cluster, tmp_path: Path) -> None:
    """A real call through `voicebot serve` configured with a DSN lands in PostgreSQL."""
    from sipbot import start_bot

    bot = start_bot(tmp_path, extra=f'[store]\ndsn = "{postgres.dsn}"\n')
    try:
        out = bot.call("--press", "3", "--press", "2", "--barge-in", "--json")
        assert out.returncode == 0, out.stderr[-2000:]
        deadline = time.monotonic() + 20
        store = Store(dsn=postgres.dsn)
        try:
            while time.monotonic() < deadline:
                recs = [r for r in store.calls(last=100) if r.dialled == "919" and r.ended_at]
                if recs:
                    break
                time.sleep(0.3)
            assert recs and recs[0].path == ["lang.en", "main.hours"], bot.log()[-2000:]
            assert recs[0].language == "en" and recs[0].result == "completed"
        finally:
            store.close()
        assert not (tmp_path / "var" / "voicebot.sqlite").exists()
    finally:
        assert bot.stop() == 0


# --- times: one form (UTC), ordered by time, shown in local time ---

OLD_CALLS = """CREATE TABLE calls (id TEXT PRIMARY KEY, sip_call_id TEXT, worker INTEGER,
    caller TEXT, dialled TEXT, started_at TEXT, answered_at TEXT, ended_at TEXT,
    language TEXT, path TEXT, result TEXT, recording TEXT, ended_by TEXT, reason TEXT)"""


def test_times_stored_in_utc_and_calls_ordered_by_time(tmp_path: Path) -> None:
    """Rows of the previous release (times with offsets) are migrated on open; new rows
    in any offset sort with them by time, not by text."""
    db = tmp_path / "old.sqlite"
    con = sqlite3.connect(db)
    con.execute(OLD_CALLS)
    old = [("baku", "2026-11-24T11:00:00.000+04:00"),  # 07:00 UTC; the simulator's form
           ("sip", "2026-11-24T08:00:00.000+00:00"),  # 08:00 UTC; telephony's form
           ("west", "2026-11-24T05:30:00.000-03:00")]  # 08:30 UTC
    for cid, start in old:
        con.execute("INSERT INTO calls (id, started_at, ended_at, path) VALUES (?, ?, ?, '[]')",
                    (cid, start, start))
    con.commit()
    con.close()
    store = Store(db)
    try:
        recs = store.calls()
        assert [r.id for r in recs] == ["west", "sip", "baku"]
        assert [r.started_at for r in recs] == ["2026-11-24T08:30:00.000+00:00",
                                                "2026-11-24T08:00:00.000+00:00",
                                                "2026-11-24T07:00:00.000+00:00"]
        assert all(r.ended_at == r.started_at for r in recs)
        store.call_started("new-baku", None, None, "simulate",
                           started_at=dt.datetime(2026, 11, 24, 12, 45, tzinfo=BAKU))  # 08:45Z
        store.call_started("new-utc", "x", None, "919", started_at="2026-11-24T08:40:00Z")
        assert [r.id for r in store.calls(last=3)] == ["new-baku", "new-utc", "west"]
        (one,) = store.calls(call_id="new-baku")
        assert one.started_at == "2026-11-24T08:45:00.000+00:00"
        assert one.host == socket.gethostname()
    finally:
        store.close()
    raw = sqlite3.connect(db).execute("SELECT started_at FROM calls WHERE id = 'baku'")
    assert raw.fetchone()[0] == "2026-11-24T07:00:00.000+00:00"  # migrated in the file


def test_report_days_are_local_days(tmp_path: Path) -> None:
    from voicebot.report import analyse

    store = Store(tmp_path / "r.sqlite", tz=BAKU)
    try:
        # 22:30 UTC on the 23rd is 02:30 on the 24th in Baku: the call centre's 24th.
        store.call_started("late", None, None, "919", started_at="2026-11-23T22:30:00+00:00")
        store.call_started("day", None, None, "919", started_at="2026-11-24T09:00:00+04:00")
        rep = analyse(store, since=dt.date(2026, 11, 24))
        (per_day,) = [t for t in rep.tables if t.name == "calls_per_day"]
        assert [r[0] for r in per_day.rows] == ["2026-11-24"] and per_day.rows[0][-1] == 2
    finally:
        store.close()


def test_calls_last_1_is_the_call_that_started_last(tmp_path: Path) -> None:
    """A simulated call (Baku time) and a later SIP-style call (UTC): `voicebot calls
    --last 1` (the real CLI) shows the later one, in the call centre's time."""
    from sipbot import VOICEBOT, write_config

    cfg_path = write_config(tmp_path / "bot", 5999)
    sim = subprocess.run([VOICEBOT, "--config", str(cfg_path), "simulate", "--lang", "en",
                          "--press", "3", "--press", "2", "--at", "2026-11-24T11:00"],
                         capture_output=True, text=True, timeout=300)
    assert sim.returncode == 0, sim.stderr[-2000:]
    store = Store.from_config(load_config(cfg_path))
    # One hour after the simulated call (07:00 UTC), written as telephony writes it.
    store.call_started("sip-later", "abc@127.0.0.1", "<sip:1@127.0.0.1>", "919", worker=0,
                       started_at="2026-11-24T08:00:00.000+00:00")
    store.call_ended("sip-later", "completed", "en", None, "caller")
    store.close()
    out = subprocess.run([VOICEBOT, "--config", str(cfg_path), "calls", "--last", "1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and "sip-later" in lines[0], out.stdout
    assert lines[0].startswith("2026-11-24 12:00:00+04:00"), lines[0]
    both = subprocess.run([VOICEBOT, "--config", str(cfg_path), "calls", "--json"],
                          capture_output=True, text=True, timeout=60)
    recs = [json.loads(ln) for ln in both.stdout.splitlines()]
    assert [r["dialled"] for r in recs] == ["919", "simulate"]
    assert recs[1]["started_at"] == "2026-11-24T07:00:00.000+00:00"


# --- writes leave the call: PostgreSQL outage, full disk, dead processes' journals ---


def _write_call(store: Store, cid: str, worker: int | None = None) -> tuple[str, int]:
    store.call_started(cid, f"sip-{cid}", "+99450", "919", worker)
    store.call_answered(cid)
    for seq, opt in ((1, "lang.en"), (2, "main.complaint"), (3, None)):
        store.add_turn(cid, _turn(seq, opt))
    ticket = store.open_ticket(cid, "+99450", "en", "complaint")
    store.close_ticket(ticket, f"/rec/{ticket}.wav", 3000.0, 2500.0, "silence")
    cb = store.add_callback(cid, "+99450", "en", "after_hours")
    store.call_ended(cid, "completed", "en", None, "caller")
    return ticket, cb


def _outage_child(dsn: str, spool: str, conn: Any) -> None:
    """A worker that writes during the outage, then waits to be killed."""
    store = Store(dsn=dsn, spool=Path(spool))
    made = [_write_call(store, f"dead-{i}") for i in range(2)]
    while store.pending and not list(Path(spool).glob(f"*-{os.getpid()}-*.jsonl")):
        time.sleep(0.05)
    time.sleep(0.5)  # the writer has journalled them (fsync'd per batch)
    conn.send(made)
    time.sleep(3600)


def _check_calls(recs: list[Any], ids: list[str]) -> None:
    """Exactly the calls ``ids`` (among others' in a shared database), each whole, once."""
    prefixes = tuple({i.split("-")[0] for i in ids})
    recs = [r for r in recs if r.id.startswith(prefixes)]
    by = {r.id: r for r in recs}
    assert sorted(by) == sorted(ids) and len(recs) == len(ids)
    for cid in ids:
        r = by[cid]
        assert r.result == "completed" and r.answered_at and r.ended_at, cid
        assert r.path == ["lang.en", "main.complaint"], cid
        assert [t["seq"] for t in r.turns] == [1, 2, 3], cid


def test_postgresql_outage_loses_nothing(postgres: Cluster, tmp_path: Path) -> None:
    """PostgreSQL stopped for 10 s: writes return at once, reads say the store is down,
    a process killed meanwhile leaves its journal; after the restart everything arrives
    in order, once, and replaying a journal again duplicates nothing."""
    spool = tmp_path / "spool"
    store = Store(dsn=postgres.dsn, spool=spool)
    child = None
    try:
        before = [f"pre-{i}" for i in range(3)]
        for cid in before:
            _write_call(store, cid)
        assert store.flush(20)
        postgres.stop()
        down = time.monotonic()
        t0 = time.perf_counter()
        during = [f"out-{i}" for i in range(5)]
        made = [_write_call(store, cid) for cid in during]  # never raises
        assert time.perf_counter() - t0 < 1.0  # 40 writes: none waited for the database
        tickets = [t for t, _ in made]
        assert len(set(tickets)) == 5 and all(len(t) >= 6 and t.isdigit() for t in tickets)
        with pytest.raises(StoreUnavailable, match="does not answer"):
            store.calls(last=5)
        with pytest.raises(StoreUnavailable):
            store.application("12345")
        from sipbot import VOICEBOT, write_config

        cfg_path = write_config(tmp_path / "bot", 5999, extra=f'[store]\ndsn = "{postgres.dsn}"')
        listing = subprocess.run([VOICEBOT, "--config", str(cfg_path), "calls"],
                                 capture_output=True, text=True, timeout=60)
        assert listing.returncode == 2 and "does not answer" in listing.stderr, listing
        assert store.pending >= 40
        ctx = mp.get_context("spawn")
        parent, conn = ctx.Pipe()
        child = ctx.Process(target=_outage_child, args=(postgres.dsn, str(spool), conn))
        child.start()
        assert parent.poll(60), "the child did not write"
        dead_made = parent.recv()
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join(10)
        journals = [p for p in spool.glob("*.jsonl") if f"-{child.pid}-" in p.name]
        assert journals and journals[0].stat().st_size > 0
        saved = journals[0].read_bytes()
        time.sleep(max(0.0, 10.0 - (time.monotonic() - down)))
        postgres.start()
        assert store.flush(30), f"{store.pending} records still pending"
        # The next process replays the dead one's journal.
        other = Store(dsn=postgres.dsn, spool=spool)
        try:
            recs = other.calls(last=100)
        finally:
            other.close()
        dead = [f"dead-{i}" for i in range(2)]
        _check_calls(recs, before + during + dead)
        listing = subprocess.run([VOICEBOT, "--config", str(cfg_path), "calls", "--json"],
                                 capture_output=True, text=True, timeout=60)
        assert listing.returncode == 0, listing.stderr
        _check_calls([CallRecord(**json.loads(ln)) for ln in listing.stdout.splitlines()],
                     before + during + dead)
        assert [r.id for r in recs if r.id.startswith(("pre-", "out-"))] == (
            before + during)[::-1]
        assert not journals[0].exists()
        # Replaying the same journal again (as if a process died mid-replay) adds nothing.
        (spool / "otherhost-999999-1.jsonl").write_bytes(saved)
        third = Store(dsn=postgres.dsn, spool=spool)
        try:
            _check_calls(third.calls(last=100), before + during + dead)
            tix = [t for t in third.tickets() if t["call_id"] in before + during + dead]
            cbs = [c for c in third.callbacks() if c["call_id"] in before + during + dead]
        finally:
            third.close()
        assert len(tix) == len({t["ticket"] for t in tix}) == 10
        assert {t["ticket"] for t in tix} >= set(tickets) | {t for t, _ in dead_made}
        assert all(t["state"] == "received" for t in tix)
        assert len(cbs) == len({c["id"] for c in cbs}) == 10
        assert not (spool / "otherhost-999999-1.jsonl").exists()
    finally:
        if child is not None and child.is_alive():
            child.kill()
        store.close()
        with contextlib.suppress(subprocess.CalledProcessError):
            postgres.start()


@pytest.fixture
def tiny_disk(tmpfs) -> Path:  # type: ignore[no-untyped-def]
    """A 2 MB tmpfs, to be filled up."""
    return tmpfs("2m")


def fill(folder: Path, leave: int = 0) -> Path:
    """Fill the file system of ``folder`` up; then free ``leave`` bytes of it."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as f:
        block = b"\0" * 65536
        try:
            while True:
                f.write(block)
        except OSError:
            pass
        for size in (4096, 512, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def test_sqlite_on_a_full_disk_keeps_writes_in_memory(tiny_disk: Path) -> None:
    store = Store(tiny_disk / "voicebot.sqlite")
    try:
        _write_call(store, "before")
        assert store.flush(10)
        filler = fill(tiny_disk)
        ids = [f"full-{i}" for i in range(30)]
        t0 = time.perf_counter()
        for cid in ids:
            _write_call(store, cid)  # never raises
        assert time.perf_counter() - t0 < 1.0
        deadline = time.monotonic() + 10
        while store.pending and time.monotonic() < deadline:
            time.sleep(0.1)
        assert store.pending > 0, "the full disk took every record"
        assert not store.journalled, "the journal should have fallen back to memory"
        filler.unlink()
        assert store.flush(30), f"{store.pending} records still pending"
        _check_calls(store.calls(last=100), ["before", *ids])
        assert len(store.tickets()) == len(store.callbacks()) == 31
    finally:
        store.close()


def test_message_recorder_on_a_full_disk_keeps_a_playable_wav(tiny_disk: Path) -> None:
    from voicebot.duties import MessageRecorder

    rate = 8000
    path = tiny_disk / "messages" / "2026-11-24" / "1001000-complaint.wav"
    rec = MessageRecorder(path, rate)
    fill(tiny_disk, leave=24000)  # room for about 1.5 s of 8 kHz audio
    tone = (8000 * np.sin(2 * np.pi * 440 * np.arange(rate * 10) / rate)).astype(np.int16)
    for i in range(0, len(tone), 160):  # 10 s of 20 ms frames: none raises
        rec.write(tone[i:i + 160], speech=True)
    assert rec.failed and "space" in rec.failed.lower()
    assert 0.5 < rec.duration_ms / 1000 < 2.0
    final = rec.finish()
    assert final == path and final.exists() and not rec.part.exists()
    with wave.open(str(final), "rb") as w:
        assert w.getframerate() == rate and w.getnchannels() == 1
        frames = w.readframes(w.getnframes())
        assert w.getnframes() == rec.samples
    got = np.frombuffer(frames, "<i2")
    assert np.array_equal(got, tone[:len(got)])  # what was written is what was kept
    assert final.stat().st_size == 44 + 2 * rec.samples


def test_close_keeps_what_the_database_did_not_take(tmp_path: Path) -> None:
    """Closing while the database is locked leaves the records in the journal; the next
    process to open the store delivers them."""
    db = tmp_path / "voicebot.sqlite"
    store = Store(db)
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        _write_call(store, "kept-0")
        store.close(timeout=15)  # one last try (5 s busy wait), then it gives up
        (journal,) = (tmp_path / "spool").glob("*.jsonl")
        assert len(journal.read_text().splitlines()) == 9
    finally:
        lock.execute("COMMIT")
        lock.close()
    again = Store(db)
    try:
        _check_calls(again.calls(), ["kept-0"])
    finally:
        again.close()
    assert not list((tmp_path / "spool").glob("*.jsonl"))


def test_a_write_after_close_is_kept_for_the_next_start(tmp_path: Path) -> None:
    store = Store(tmp_path / "voicebot.sqlite")
    store.call_started("late-0", None, None, "919")
    store.close()
    store.call_ended("late-0", "completed", "en", None, "caller")  # a call ending at shutdown
    again = Store(tmp_path / "voicebot.sqlite")
    try:
        (rec,) = again.calls()
        assert rec.id == "late-0" and rec.result == "completed"
    finally:
        again.close()


def test_caller_settings_in_postgresql(postgres: Cluster) -> None:
    from test_caller_settings import check_round_trip

    store = Store(dsn=postgres.dsn)
    try:
        store.execute("DELETE FROM caller_settings")
        check_round_trip(store)
    finally:
        store.close()
