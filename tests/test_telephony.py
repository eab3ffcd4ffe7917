"""The bot on real SIP: `voicebot serve` answered by the `voicebot call` softphone (pjsua2).

Calls run in parallel where they can (one worker holds 4 calls) because each lasts as
long as its prompts do. Every test finds its calls by SIP Call-ID in the bot's store.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sipbot import VOICEBOT, Bot, sip_options, start_bot

from voicebot.menus import Grammars
from voicebot.store import CallRecord

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bot(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    b = start_bot(tmp_path_factory.mktemp("bot"))
    yield b
    assert b.stop() == 0, b.log()[-3000:]


def turns(out: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def record_of(bot: Bot, out: subprocess.CompletedProcess[str]) -> CallRecord:
    """The bot's record of the call `voicebot call` just made, by its SIP Call-ID."""
    call_ids = {t["sip_call_id"] for t in turns(out)}
    assert len(call_ids) == 1, out.stdout
    return bot.wait_call(call_ids.pop())


def assert_recording(rec: CallRecord, min_s: float = 2.0) -> None:
    assert rec.recording, rec
    path = Path(rec.recording)
    assert path.exists() and path.suffix == ".wav"
    with wave.open(str(path)) as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2
        assert w.getnframes() / w.getframerate() >= min_s
    assert not list(path.parent.glob(".*.part.wav")) or all(
        p.stem.split(".")[1] != rec.id for p in path.parent.glob(".*.part.wav"))


def test_dtmf_navigation_in_three_languages_and_korean_speech(bot: Bot, grammars: Grammars):
    """az, ru, en by RFC 4733 keys, and Korean spoken selection over RTP, four calls at once."""
    jobs = {
        "az": ("--press", "1", "--press", "2", "--json"),
        "ru": ("--press", "2", "--press", "2", "--json"),
        "en": ("--press", "3", "--press", "2", "--json"),
        "ko": ("--press", "4", "--say", "정보", "--json"),
    }
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {lang: pool.submit(bot.call, *args) for lang, args in jobs.items()}
        outs = {lang: f.result() for lang, f in futures.items()}
    for lang in ("az", "ru", "en"):
        first, second = turns(outs[lang])
        assert first["input"] == "dtmf" and first["option"] == f"lang.{lang}"
        assert second["input"] == "dtmf" and second["option"] == "main.hours"
        assert second["prompt"] == "hours" and second["language"] == lang
        # The caller heard the hours in the chosen language (the pack's own words).
        assert second["prompt_text"].split()[0] in grammars.packs[lang].prompts["hours"]
        rec = record_of(bot, outs[lang])
        assert rec.language == lang and rec.path == [f"lang.{lang}", "main.hours"]
        assert rec.result == "completed" and rec.ended_at and rec.answered_at
        assert_recording(rec)
    first, spoken = turns(outs["ko"])
    assert first["option"] == "lang.ko"
    assert spoken["input"] == "speech" and spoken["heard"] == "정보"
    assert spoken["option"] == "main.info" and spoken["confidence"] >= 0.7
    rec = record_of(bot, outs["ko"])
    assert rec.language == "ko" and rec.path == ["lang.ko", "main.info"]


def test_barge_in_over_sip_stops_the_prompt(bot: Bot, tmp_path: Path):
    """Speech and a key given 1.5 s into a prompt cut it short; the bot's turn says so."""
    wav = tmp_path / "call.wav"
    with ThreadPoolExecutor(2) as pool:
        spoken = pool.submit(bot.call, "--press", "4", "--say", "정보", "--barge-in", "--json",
                             "--record", str(wav))
        keyed = pool.submit(bot.call, "--press", "3", "--press", "1", "--press", "2",
                            "--barge-in", "--json")
        spoken_out, keyed_out = spoken.result(), keyed.result()
    _, said = turns(spoken_out)
    assert said["heard"] == "정보" and said["option"] == "main.info" and said["barge_in"]
    _, info, stay = turns(keyed_out)
    assert info["option"] == "main.info" and info["barge_in"]
    assert stay["option"] == "info.temporary_residence" and stay["barge_in"]
    assert wav.exists() and wav.stat().st_size > 8000


def test_calls_command_lists_paths(bot: Bot):
    out = bot.cli("calls", "--json", "--last", "50")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert rows and all({"id", "path", "language", "result", "recording", "turns"} <= set(r)
                        for r in rows)
    assert any(r["language"] == "en" and "main.hours" in r["path"] for r in rows)
    text = bot.cli("calls", "--last", "5")
    assert text.returncode == 0 and "lang." in text.stdout


def test_wrong_number_and_dead_uri(bot: Bot):
    out = subprocess.run([VOICEBOT, "--config", str(bot.config_path), "call",
                          f"sip:112@127.0.0.1:{bot.port}", "--press", "1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "404" in out.stderr
    out = subprocess.run([VOICEBOT, "call", "tel:919", "--press", "1"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "SIP URI" in out.stderr


def test_busy_at_the_call_limit_then_polite_sigterm(tmp_path: Path):
    """A one-call bot answers 486 to a second call; SIGTERM ends the call politely, exit 0."""
    b = start_bot(tmp_path, extra="[sip]\nmax_calls = 1\n")
    try:
        first = subprocess.Popen([VOICEBOT, "--config", str(b.config_path), "call", b.uri,
                                  "--press", "3", "--silent", "--silent", "--silent", "--json"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not any(r.answered_at for r in b.calls()) and time.monotonic() < deadline:
            time.sleep(0.2)
        busy = b.call("--press", "1", timeout=60)
        assert busy.returncode == 1 and "486" in busy.stderr, busy.stderr
        time.sleep(1.0)
        assert b.stop(signal.SIGTERM) == 0
        first.communicate(timeout=60)
        (rec,) = b.calls()
        assert rec.ended_at and rec.ended_by == "bot" and rec.reason == "shutdown"
        assert rec.result in ("completed", "abandoned")
        assert "event=ended" in b.log() and "stopping" in b.log()
        assert sip_options("127.0.0.1", b.port, timeout=0.3) is None  # really gone
    finally:
        b.stop(signal.SIGKILL)
