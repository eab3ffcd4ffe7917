"""Start-up recovery of what a process killed with SIGKILL left behind.

The leftovers are made for real: worker processes record a call with pjsua2's
AudioMediaRecorder (a ``.part.wav`` whose header sizes PJSIP leaves 0 until it closes),
record a caller's message with MessageRecorder and write their call records while the
SQLite store is locked (so the records are still in their journals), and are killed
with SIGKILL in the middle.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing as mp
import os
import signal
import sqlite3
import subprocess
import sys
import time
import wave
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from sipbot import VOICEBOT, write_config

from voicebot.config import load_config
from voicebot.dialog import Turn
from voicebot.recovery import recover
from voicebot.store import Store
from voicebot.wavfile import repair

RATE = 8000


def _turn(seq: int, option: str | None) -> Turn:
    return Turn(t_ms=1000.0 * seq, node="main", language="en", input="dtmf", heard=str(seq),
                confidence=1.0, option=option, result="accepted", prompt="p", prompt_text="t")


def _tone_wav(path: Path) -> None:
    t = np.arange(RATE) / RATE
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes((6000 * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes())


def _worker(cfg_path: str, worker: int, tone: str, conn: Any) -> None:
    """A worker in the middle of a call: recording the call (pjsua2) and a message."""
    import pjsua2 as pj

    from voicebot.duties import MessageRecorder
    from voicebot.session import VoiceCore
    from voicebot.telephony import create_endpoint

    cfg = load_config(Path(cfg_path))
    store = Store.from_config(cfg)
    ep = create_endpoint()
    ec = pj.EpConfig()
    ec.uaConfig.threadCnt = 0
    ec.uaConfig.mainThreadOnly = True
    ec.logConfig.level = 0
    ec.logConfig.consoleLevel = 0
    ec.medConfig.clockRate = RATE
    ec.medConfig.sndClockRate = RATE
    ep.libInit(ec)
    ep.audDevManager().setNullDev()
    ep.libStart()
    conn.send("store open")
    assert conn.recv() == "go"  # the parent holds the store locked from here on
    call_id = f"w{worker}-call"
    store.call_started(call_id, f"sip-{call_id}", "+99450", "919", worker=worker)
    store.call_answered(call_id)
    store.add_turn(call_id, _turn(1, "lang.en"))
    store.add_turn(call_id, _turn(2, "main.complaint"))
    folder = Path(cfg.base / cfg.recording.folder) / time.strftime("%Y-%m-%d")
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / f".{call_id}.part.wav"  # as telephony names it
    player = pj.AudioMediaPlayer()
    player.createPlayer(tone)  # loops
    recorder = pj.AudioMediaRecorder()
    recorder.createRecorder(str(part))
    player.startTransmit(recorder)
    ticket = store.open_ticket(call_id, "+99450", "en", "complaint")
    # Named as the call session names it (message_path needs only the config).
    path = VoiceCore.message_path(SimpleNamespace(cfg=cfg), ticket, "complaint",  # type: ignore[arg-type]
                                  dt.datetime.now(dt.UTC))
    msg = MessageRecorder(path, RATE)
    tone_samples = (6000 * np.sin(2 * np.pi * 440 * np.arange(160) / RATE)).astype(np.int16)
    sent = False
    start = time.monotonic()
    while True:
        msg.write(tone_samples, speech=True)
        ep.libHandleEvents(20)
        if not sent and time.monotonic() - start > 1.5:
            conn.send({"call": call_id, "ticket": ticket, "part": str(part),
                       "message": str(msg.part)})
            sent = True


def _start(ctx: Any, cfg_path: Path, worker: int, tone: Path) -> tuple[Any, Any]:
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_worker, args=(str(cfg_path), worker, str(tone), child))
    proc.start()
    assert parent.poll(60), f"worker {worker} did not start"
    assert parent.recv() == "store open"
    return proc, parent


def _kill(proc: Any) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert proc.exitcode == -signal.SIGKILL


def _playable(path: Path, min_s: float) -> float:
    with wave.open(str(path), "rb") as w:
        n, rate = w.getnframes(), w.getframerate()
        data = w.readframes(n)
        assert w.getnchannels() == 1 and w.getsampwidth() == 2
    assert len(data) == 2 * n and path.stat().st_size == 44 + 2 * n  # header = data length
    assert n / rate >= min_s, f"{path}: only {n / rate:.2f} s"
    assert np.abs(np.frombuffer(data, "<i2")).max() > 1000  # the tone, not silence
    return n / rate


def test_recovery_after_sigkill(tmp_path: Path) -> None:
    cfg_path = write_config(tmp_path / "bot", 5999)
    cfg = load_config(cfg_path)
    tone = tmp_path / "tone.wav"
    _tone_wav(tone)
    Store.from_config(cfg).close()  # the schema
    db = cfg.base / cfg.store.path
    ctx = mp.get_context("spawn")
    w1, c1 = _start(ctx, cfg_path, 1, tone)
    w2, c2 = _start(ctx, cfg_path, 2, tone)
    # The database is locked while they work: their records stay in their journals.
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    procs = [w1, w2]
    try:
        c1.send("go")
        c2.send("go")
        assert c1.poll(60) and c2.poll(60)
        one, two = c1.recv(), c2.recv()
        _kill(w1)
        spool = cfg.var_dir / "spool"
        dead = [p for p in spool.glob("*.jsonl") if f"-{w1.pid}-" in p.name]
        assert dead and dead[0].stat().st_size > 0, "worker 1's records should be journalled"
        part1 = Path(one["part"])
        with part1.open("rb") as f:
            head = f.read(44)
        assert head[:4] == b"RIFF" and int.from_bytes(head[40:44], "little") == 0  # PJSIP's
        lock.execute("COMMIT")
        lock.close()

        # Worker 1 restarts: its call is closed, its files saved; worker 2's untouched.
        store = Store.from_config(cfg)
        try:
            rep = recover(cfg, store, worker=1)
            assert rep.error is None, rep.lines
            assert rep.replayed > 0 and not dead[0].exists()
            assert rep.calls_interrupted == [one["call"]]
            (rec1,) = store.calls(call_id=one["call"])
            assert rec1.result == "interrupted" and rec1.ended_at
            assert rec1.path == ["lang.en", "main.complaint"] and len(rec1.turns) == 2
            assert rec1.recording == str(part1.with_name(f"{one['call']}.wav"))
            _playable(Path(rec1.recording), 1.0)
            assert not part1.exists() and not Path(one["message"]).exists()
            tix = {t["ticket"]: t for t in store.tickets()}
            t1 = tix[one["ticket"]]
            assert t1["state"] == "interrupted" and t1["recording"]
            secs = _playable(Path(t1["recording"]), 1.0)
            assert abs(t1["duration_ms"] / 1000 - secs) < 0.01
            assert Path(two["part"]).exists() and Path(two["message"]).exists()
            assert set(map(Path, rep.skipped)) == {Path(two["part"]), Path(two["message"])}
            deadline = time.monotonic() + 30  # worker 2's writer retries with backoff
            while not store.calls(call_id=two["call"]) and time.monotonic() < deadline:
                time.sleep(0.2)
            (rec2,) = store.calls(call_id=two["call"])
            assert rec2.ended_at is None and rec2.result is None
            tix = {t["ticket"]: t for t in store.tickets()}
            assert tix[two["ticket"]]["state"] == "recording"
        finally:
            store.close()

        # The whole host restarts after worker 2 dies too.
        _kill(w2)
        store = Store.from_config(cfg)
        try:
            rep = recover(cfg, store, worker=None)
            assert rep.calls_interrupted == [two["call"]]
            (rec2,) = store.calls(call_id=two["call"])
            assert rec2.result == "interrupted" and rec2.recording
            _playable(Path(rec2.recording), 1.0)
            t2 = {t["ticket"]: t for t in store.tickets()}[two["ticket"]]
            assert t2["state"] == "interrupted"
            _playable(Path(t2["recording"]), 1.0)
            again = recover(cfg, store, worker=None)  # nothing left to do
            assert not any(again.counts.values()), again.lines
        finally:
            store.close()
        recordings = cfg.base / cfg.recording.folder
        assert not list(recordings.rglob("*.part*")), "a .part file was left"
        assert not list(spool.glob("*.jsonl"))
        out = subprocess.run([VOICEBOT, "--config", str(cfg_path), "calls"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        shown = [ln for ln in out.stdout.splitlines() if "-call  " in ln]
        assert len(shown) == 2 and all("interrupted" in ln for ln in shown), out.stdout
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()


def test_repair_leaves_a_complete_wav_alone_and_refuses_a_headless_file(
        tmp_path: Path) -> None:
    good = tmp_path / "good.wav"
    _tone_wav(good)
    before = good.read_bytes()
    info = repair(good)
    assert info is not None and info.frames == RATE and good.read_bytes() == before
    torn = tmp_path / "torn.wav"
    torn.write_bytes(before[:30])  # killed while writing the header
    assert repair(torn) is None


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
