"""A caller's accessibility settings remembered for their number (issue 12): the store
(real SQLite), the 90-day limit and its purge, and `voicebot callers show/forget`."""

from __future__ import annotations

import datetime as dt
import sqlite3
import subprocess
import time
from pathlib import Path

from sipbot import VOICEBOT, write_config

from voicebot.config import load_config
from voicebot.dialog import CallerSettings
from voicebot.retention import forget_old_settings
from voicebot.store import Store


def check_round_trip(store: Store) -> None:
    now = dt.datetime.now(dt.UTC)
    assert store.caller_settings("+994501112233") is None
    store.save_caller_settings("+994501112233", CallerSettings(-1, 12, 1))
    store.flush()
    assert store.caller_settings("+994501112233") == CallerSettings(-1, 12, 1)
    store.save_caller_settings("+994501112233", CallerSettings(1, 0, 2))
    store.flush()
    assert store.caller_settings("+994501112233") == CallerSettings(1, 0, 2)
    # Back to the defaults: nothing is kept for the number.
    store.save_caller_settings("+994501112233", CallerSettings())
    store.flush()
    assert store.caller_settings("+994501112233") is None
    assert store.execute("SELECT COUNT(*) FROM caller_settings WHERE number = ?",
                         ("+994501112233",)) == [(0,)]
    # Older than 90 days: not applied, and purged.
    store.save_caller_settings("old", CallerSettings(0, 6, 0), at=now - dt.timedelta(days=91))
    store.save_caller_settings("recent", CallerSettings(0, 6, 0),
                               at=now - dt.timedelta(days=89))
    store.flush()
    assert store.caller_settings("old") is None
    assert store.caller_settings("recent") == CallerSettings(0, 6, 0)
    assert store.purge_caller_settings(now - dt.timedelta(days=90)) == 1
    assert store.forget_caller("recent") == 1 and store.forget_caller("recent") == 0


def test_settings_round_trip_limit_and_forget_in_sqlite(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    try:
        check_round_trip(store)
    finally:
        store.close()


def test_an_older_store_gains_the_table_and_the_column(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:  # a store as written before issue 12
        db.execute("CREATE TABLE calls (id TEXT PRIMARY KEY, sip_call_id TEXT, worker "
                   "INTEGER, caller TEXT, dialled TEXT, started_at TEXT, answered_at TEXT, "
                   "ended_at TEXT, language TEXT, path TEXT, result TEXT, recording TEXT, "
                   "ended_by TEXT, reason TEXT)")
    store = Store(path)
    try:
        store.call_started("c1", None, "+1", "919")
        store.call_ended("c1", "completed", "ko", None, "caller", language_by="detected")
        (rec,) = store.calls()
        assert rec.language == "ko" and rec.language_by == "detected"
        store.save_caller_settings("+1", CallerSettings(1, 6, 0))
        store.flush()
        assert store.caller_settings("+1") == CallerSettings(1, 6, 0)
    finally:
        store.close()


def test_callers_show_forget_and_the_daily_purge(tmp_path: Path) -> None:
    cfg_path = write_config(tmp_path / "bot", 5999)
    cfg = load_config(cfg_path)
    store = Store.from_config(cfg)
    try:
        store.save_caller_settings("+994551234567", CallerSettings(-1, 6, 1))
        store.save_caller_settings("+994550000000", CallerSettings(0, 12, 0),
                                   at=dt.datetime.now(dt.UTC) - dt.timedelta(days=100))
    finally:
        store.close()

    def cli(*args: str) -> str:
        out = subprocess.run([VOICEBOT, "--config", str(cfg_path), "callers", *args],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "speech rate x0.75, louder by 6 dB, more time x3" in cli("show", "+994551234567")
    assert "nothing remembered" in cli("show", "+994550000000")  # past 90 days
    assert forget_old_settings(cfg, time.time()) == 1
    assert "remembered settings removed" in cli("forget", "+994551234567")
    assert "nothing was remembered" in cli("forget", "+994551234567")
    assert "nothing remembered" in cli("show", "+994551234567")


def test_the_next_call_from_the_number_starts_with_its_settings(core, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Through the voice core: a caller turns the prompts up (8 3); their next call starts
    louder and says so in one sentence; another number, or a simulated caller with no
    number, starts with the defaults."""
    from conftest import IN_HOURS

    from voicebot.simulator import CallerInput, Simulator

    store = Store(tmp_path / "voicebot.sqlite")
    try:
        def call(keys: list[str], number: str, remember: bool = True):  # type: ignore[no-untyped-def]
            return Simulator(core, [CallerInput("press", k) for k in keys], IN_HOURS,
                             language="en", store=store, caller=number,
                             remember_settings=remember).run()

        first = call(["8", "3"], "+994501112233")
        assert [t.option for t in first.turns] == ["ctl.help", "ctl.louder"]
        deadline = time.monotonic() + 5  # saved on the I/O pool
        while store.caller_settings("+994501112233") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.caller_settings("+994501112233") == CallerSettings(gain_db=6)
        again = call(["9"], "+994501112233")
        keys = [p.prompt.key for p in again.played]
        assert keys[:3] == ["welcome", "settings_restored", "main_menu"]
        assert {p.prompt.gain_db for p in again.played} == {6}
        for other in (call(["9"], "+994509998877"), call(["9"], "+994501112233", False)):
            assert "settings_restored" not in [p.prompt.key for p in other.played]
            assert {p.prompt.gain_db for p in other.played} == {0}
    finally:
        store.close()
