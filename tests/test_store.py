"""The call store: SQLite (WAL) with several writer processes, and a real PostgreSQL."""

from __future__ import annotations

import glob
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from voicebot.dialog import Turn
from voicebot.errors import VoicebotError
from voicebot.store import Store


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


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
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
    log = folder / "pg.log"
    subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w",
                    "-o", f"-h 127.0.0.1 -p {port} -k {folder} -F", "start"], check=True,
                   capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast",
                        "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def test_postgresql_store_with_several_writer_processes(postgres: str) -> None:
    check_many_writers({"dsn": postgres})


def test_bot_writes_its_calls_to_postgresql(postgres: str, tmp_path: Path) -> None:
    """A real call through `voicebot serve` configured with a DSN lands in PostgreSQL."""
    from sipbot import start_bot

    bot = start_bot(tmp_path, extra=f'[store]\ndsn = "{postgres}"\n')
    try:
        out = bot.call("--press", "3", "--press", "2", "--barge-in", "--json")
        assert out.returncode == 0, out.stderr[-2000:]
        deadline = time.monotonic() + 20
        store = Store(dsn=postgres)
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
