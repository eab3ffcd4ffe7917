"""Caller data on disk: private modes and ``[recording] keep_days`` (voicebot.retention).

Real files throughout: the modes a real call through a real `voicebot serve` leaves on its
recording, message, SQLite files and spool; an old group/world-readable tree made private
by ``secure_files``; ``purge`` on WAVs aged with ``os.utime``; the `voicebot recordings
purge` and `voicebot calls` commands as subprocesses.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import threading
import time
import wave
from pathlib import Path

import pytest
from sipbot import VOICEBOT, start_bot, write_config

from voicebot.config import Config, load_config
from voicebot.retention import DAY_S, purge, secure_files, start_daily, store_files
from voicebot.store import Store


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def make_cfg(folder: Path, extra: str = "") -> Config:
    """A config with its own var/, store and recordings under ``folder`` (no bot runs)."""
    return load_config(write_config(folder, 5999, extra))


def wav(path: Path, seconds: float = 0.5, age_days: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\0\0" * int(8000 * seconds))
    if age_days:
        t = time.time() - age_days * DAY_S
        os.utime(path, (t, t))
    return path


def old_tree(cfg: Config) -> dict[str, Path]:
    """Recordings, messages and a store as an older voicebot left them: 0644 and 0755."""
    rec = cfg.resolve(cfg.recording.folder)
    files = {
        "old_rec": wav(rec / "2026-08-01" / "c-old.wav", age_days=100),
        "new_rec": wav(rec / "2026-11-30" / "c-new.wav", age_days=2),
        "part_rec": wav(rec / "2026-08-01" / ".c-live.part.wav", age_days=100),
        "old_msg": wav(rec / "messages" / "2026-08-01" / "T100-complaint.wav", age_days=100),
        "new_msg": wav(rec / "messages" / "2026-11-30" / "T200-proposal.wav", age_days=1),
        "part_msg": wav(rec / "messages" / "2026-11-30" / "T300-report.wav.part"),
    }
    store = Store.from_config(cfg)
    store.close()
    for folder, _dirs, names in os.walk(cfg.var_dir):
        os.chmod(folder, 0o755)
        for n in names:
            os.chmod(Path(folder) / n, 0o644)
    return files


# --- secure_files ---


def test_secure_files_makes_an_old_tree_private_and_says_what_it_changed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = make_cfg(tmp_path)
    files = old_tree(cfg)
    prompt = tmp_path / "prompts" / "p.wav"  # not caller data: left as it is
    wav(prompt)
    os.chmod(prompt, 0o644)
    with caplog.at_level(logging.WARNING, "voicebot.retention"):
        changed = secure_files(cfg)
    everything = [Path(f) for f, _d, _n in os.walk(cfg.var_dir)]
    everything += [Path(f) / n for f, _d, names in os.walk(cfg.var_dir) for n in names]
    assert files["old_msg"] in everything and (cfg.var_dir / "spool") in everything
    for p in everything:
        assert mode(p) == (0o700 if p.is_dir() else 0o600), p
    db = store_files(cfg)[0]
    assert mode(db) == 0o600 and db.stat().st_size > 0
    assert len(changed) == len(everything)
    assert f"{files['old_rec']}: 0644 -> 0600" in changed
    assert f"{cfg.var_dir}: 0755 -> 0700" in changed
    # One log line for all of it; the second run has nothing to do and says nothing.
    lines = [r for r in caplog.records if r.name == "voicebot.retention"]
    assert len(lines) == 1 and f"{len(changed)} file(s)" in lines[0].getMessage()
    caplog.clear()
    assert secure_files(cfg) == []
    assert not [r for r in caplog.records if r.name == "voicebot.retention"]
    assert mode(prompt) == 0o644


def test_secure_files_covers_a_store_and_recordings_outside_var(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, 0o755)
    cfg = make_cfg(tmp_path / "bot", f'[store]\npath = "{data / "calls.sqlite"}"\n'
                                     f'[recording]\nfolder = "{tmp_path / "rec"}"\n')
    store = Store.from_config(cfg)
    store.close()
    rec = wav(tmp_path / "rec" / "2026-11-30" / "c1.wav")
    for p in (data / "calls.sqlite", rec):
        os.chmod(p, 0o644)
    os.chmod(rec.parent, 0o755)
    secure_files(cfg)
    assert mode(data / "calls.sqlite") == 0o600
    assert mode(rec) == 0o600 and mode(rec.parent) == 0o700 and mode(tmp_path / "rec") == 0o700
    # The folder of a store outside var/ may be shared: only the store's files change.
    assert mode(data) == 0o755


def test_secure_files_does_not_follow_links(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path / "bot")
    cfg.var_dir.mkdir(parents=True)
    other = tmp_path / "someone-elses.txt"
    other.write_text("x", encoding="utf-8")
    os.chmod(other, 0o644)
    (cfg.var_dir / "link").symlink_to(other)
    secure_files(cfg)
    assert mode(other) == 0o644


# --- purge ---


def test_purge_deletes_old_recordings_and_messages_keeps_new_ones_and_parts(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = make_cfg(tmp_path)
    f = old_tree(cfg)
    size = f["old_rec"].stat().st_size + f["old_msg"].stat().st_size
    with caplog.at_level(logging.INFO, "voicebot.retention"):
        res = purge(cfg, time.time())
    assert res.recordings == [f["old_rec"]] and res.messages == [f["old_msg"]]
    assert res.bytes == size and res.kept == 2 and res.parts_skipped == 2 and not res.errors
    assert not f["old_rec"].exists() and not f["old_msg"].exists()
    # New files and partial files of calls in progress (however old) are left alone.
    for k in ("new_rec", "new_msg", "part_rec", "part_msg"):
        assert f[k].exists(), k
    # The emptied message day folder goes; the recording day folder still holds a .part.
    assert res.folders_removed == [f["old_msg"].parent]
    assert f["part_rec"].parent.is_dir()
    (line,) = [r.getMessage() for r in caplog.records if r.name == "voicebot.retention"]
    assert ("deleted 1 recording(s) and 1 message(s) older than 90 days" in line
            and "kept 2" in line and "2 partial file(s)" in line), line
    again = purge(cfg, time.time())
    assert again.deleted == [] and again.kept == 2


def test_purge_age_is_against_now_and_keep_days(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, "[recording]\nkeep_days = 7\n")
    f = old_tree(cfg)
    # 2 and 1 days old today; ten days from now they are over 7 days old too.
    res = purge(cfg, time.time() + 10 * DAY_S, dry_run=True)
    assert sorted(res.deleted) == sorted([f["old_rec"], f["new_rec"], f["old_msg"],
                                          f["new_msg"]])
    assert all(p.exists() for p in res.deleted)  # dry run
    assert res.line().startswith("retention: would delete 2 recording(s) and 2 message(s) "
                                 "older than 7 days")


def test_keep_days_0_keeps_everything(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, "[recording]\nkeep_days = 0\n")
    f = old_tree(cfg)
    res = purge(cfg, time.time() + 3650 * DAY_S)
    assert res.deleted == [] and all(p.exists() for p in f.values())
    assert "keep_days = 0" in res.line()


def test_start_daily_runs_at_start_and_stops_at_once(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    f = old_tree(cfg)
    stop = threading.Event()
    t = start_daily(cfg, stop)
    deadline = time.monotonic() + 10
    while (f["old_rec"].exists() or mode(f["new_rec"]) != 0o600) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not f["old_rec"].exists() and not f["old_msg"].exists()
    assert mode(f["new_rec"]) == 0o600 and mode(cfg.var_dir) == 0o700
    started = time.monotonic()
    stop.set()  # the 24-hour wait ends now
    t.join(5)
    assert not t.is_alive() and time.monotonic() - started < 2


def test_recordings_purge_command(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    f = old_tree(cfg)
    config = str(tmp_path / "voicebot.toml")
    out = subprocess.run([VOICEBOT, "--config", config, "recordings", "purge", "--dry-run"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:2] == [f"would delete {f['old_rec']}", f"would delete {f['old_msg']}"]
    assert lines[2].startswith(f"{cfg.resolve(cfg.recording.folder)}: would delete 1 "
                               "recording(s) and 1 message(s) older than 90 days")
    assert f["old_rec"].exists() and f["old_msg"].exists()
    out = subprocess.run([VOICEBOT, "--config", config, "recordings", "purge"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and f"deleted {f['old_rec']}" in out.stdout, out
    assert not f["old_rec"].exists() and f["new_rec"].exists()


# --- a real call through a real `voicebot serve` ---


@pytest.mark.slow
def test_a_real_call_leaves_only_private_files_and_its_recording_is_purged(
        tmp_path: Path) -> None:
    """A proposal recorded over SIP: call recording, message, SQLite files and spool are
    0600 in 0700 folders although the bot was started with umask 022; aged past keep_days,
    `voicebot recordings purge` deletes them and `voicebot calls` says so."""
    old = os.umask(0o022)  # what a shell usually has: voicebot must not rely on it
    try:
        bot = start_bot(tmp_path / "bot")
    finally:
        os.umask(old)
    try:
        out = bot.call("--press", "3", "--press", "4", "--press", "2", "--say",
                       "Please add an English page about work permits.", "--json")
        assert out.returncode == 0, out.stderr[-3000:] + bot.log()[-3000:]
        (rec,) = bot.wait_calls(1)
        store = Store.from_config(bot.cfg)
        try:
            (ticket,) = store.tickets()
        finally:
            store.close()
        recording, message = Path(rec.recording or ""), Path(ticket["recording"])
        assert recording.is_file() and message.is_file(), (rec, ticket)
        var = bot.cfg.var_dir
        spool = list((var / "spool").glob("*.jsonl"))
        db = store_files(bot.cfg)
        private = [recording, message, *spool, *(p for p in db if p.exists())]
        assert spool and db[0] in private and db[1] in private  # the journal; WAL mode
        for p in private:
            assert mode(p) == 0o600, (p, oct(mode(p)))
        folders = [var, var / "spool", recording.parent, recording.parent.parent,
                   message.parent, message.parent.parent]
        for p in folders:
            assert mode(p) == 0o700, (p, oct(mode(p)))
        # Nothing in var/ is readable by group or others.
        for folder, _d, names in os.walk(var):
            for p in [Path(folder), *(Path(folder) / n for n in names)]:
                assert not mode(p) & 0o077, (p, oct(mode(p)))
    finally:
        assert bot.stop() == 0, bot.log()[-3000:]
    for p in (recording, message):
        t = time.time() - 100 * DAY_S
        os.utime(p, (t, t))
    dry = bot.cli("recordings", "purge", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would delete {recording}" in dry.stdout and f"would delete {message}" in dry.stdout
    assert recording.exists()
    done = bot.cli("recordings", "purge")
    assert done.returncode == 0 and "deleted 1 recording(s) and 1 message(s)" in done.stdout
    assert not recording.exists() and not message.exists()
    calls = bot.cli("calls")
    assert "recording: (deleted after keep_days = 90" in calls.stdout, calls.stdout
    assert str(recording) not in calls.stdout
