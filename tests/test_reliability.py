"""No caller left in silence: the call session's failure paths on the real voice core.

Each test breaks one real thing the session depends on (a store whose table is gone, a
prompt cache that throws, a transfer nobody answers, a disk that fills up mid-message)
and checks what went out to the caller: the prompts the media clock actually pulled
from the player (``res.played``), and the call's end.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import wave
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import AFTER_HOURS, IN_HOURS, inputs

from voicebot.config import PROJECT_ROOT
from voicebot.session import VoiceCore
from voicebot.simulator import SimResult, Simulator
from voicebot.store import Store


def keys(res: SimResult) -> list[str]:
    return [p.prompt.key for p in res.played]


def after(res: SimResult, key: str) -> list[str]:
    played = keys(res)
    assert key in played, played
    return played[played.index(key) + 1:]


def core_with(core: VoiceCore, **dialog: object) -> VoiceCore:
    """The shared core (same loaded model) with other [dialog] settings."""
    cfg = replace(core.cfg, dialog=replace(core.cfg.dialog, **dialog))
    return VoiceCore(cfg, core.grammars, models=core.models)


def test_issue_reproduction_ends_back_at_a_menu(tmp_path: Path) -> None:
    """The command from the issue: three unknown numbers in hours, then a failed transfer."""
    out = subprocess.run(
        [str(PROJECT_ROOT / ".venv" / "bin" / "voicebot"), "simulate", "--lang", "en",
         "--press", "3", "--press", "99999#", "--press", "1", "--press", "99998#", "--press",
         "1", "--press", "99997#", "--press", "1", "--silent", "--at", "2026-11-24T11:00",
         "--transfer-fails"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    failed = next(i for i, line in enumerate(lines) if "transfer_failed" in line)
    assert any("main_menu" in line for line in lines[failed:]), out.stdout
    end = float(lines[-1].split("s", 1)[0])
    assert end < 300, lines[-1]  # not the 900 s of dead air until max_call_s


def test_store_that_cannot_be_read_gets_an_apology_and_the_operator(core, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import sqlite3

    store = Store(tmp_path / "voicebot.sqlite")
    # A real failure of the real store: the applications table is gone (a broken restore).
    with sqlite3.connect(tmp_path / "voicebot.sqlite") as db:
        db.execute("DROP TABLE applications")
    try:
        spec = inputs("3", "12345#", "1", "silent")
        inside = Simulator(core, spec, IN_HOURS, language="en", store=store).run()
        assert after(inside, "status_readback")[:2] == ["lookup_failed", "operator_transfer"]
        assert inside.result == "transferred"
        outside = Simulator(core, spec, AFTER_HOURS, language="en", store=store).run()
        assert "callback_offer" in after(outside, "lookup_failed")
    finally:
        store.close()


def test_an_exception_on_the_call_thread_is_apologised_for(core, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The intent model throws on an utterance (a torn model file): the caller hears the
    apology and is at a menu again, instead of sitting in a mode nobody moves on from."""
    model = core.intents["ko"]
    real = model.classify
    calls = []

    def broken_once(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(args)
        if len(calls) == 1:
            raise ValueError("X has 0 features, but the model expects 1024")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "classify", broken_once)
    res = Simulator(core, inputs("say:정보", "silent"), AFTER_HOURS, language="ko").run()
    assert calls, "the classifier was never asked"
    assert after(res, "apology")[0] == "main_menu", keys(res)
    assert res.duration_ms < 300_000  # silent retries, then the end: not 900 s of dead air


def test_watchdog_moves_a_caller_on_when_a_transfer_never_answers(core) -> None:  # type: ignore[no-untyped-def]
    """The REFER goes out and nothing ever comes back: after max_silence_s of dead air the
    caller hears the apology and gets the menu, not silence until max_call_s."""
    c = core_with(core, max_silence_s=4.0)
    res = Simulator(c, inputs("3", "0", "silent"), IN_HOURS, transfer_silent=True).run()
    played = [(p.prompt.key, p.t_ms) for p in res.played]
    transfer = next(t for k, t in played if k == "operator_transfer")
    apology = next(t for k, t in played if k == "apology")
    # The hold prompt (a few seconds) then 4 s of silence, not more.
    assert 4000 <= apology - transfer <= 4000 + 8000, played
    assert after(res, "apology")[0] == "main_menu"
    assert res.result != "transferred"


def test_max_call_length_holds_while_a_transfer_hangs(core) -> None:  # type: ignore[no-untyped-def]
    """max_call_s ends the call in transfer mode too, with the goodbye."""
    c = core_with(core, max_silence_s=120.0, max_call_s=40)
    res = Simulator(c, inputs("3", "0", "silent"), IN_HOURS, transfer_silent=True).run()
    assert keys(res)[-1] == "call_ending", keys(res)
    assert 40_000 <= res.duration_ms <= 40_000 + 15_000


@pytest.fixture
def tiny_disk(tmpfs) -> Path:  # type: ignore[no-untyped-def]
    """A 64 kB tmpfs: a few seconds of 8 kHz audio fill it."""
    return tmpfs("64k")


def test_disk_full_during_a_message_ends_it_normally(core, tmp_path: Path, tiny_disk: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = replace(core.cfg, recording=replace(core.cfg.recording, folder=str(tiny_disk)))
    c = VoiceCore(cfg, core.grammars, models=core.models)
    store = Store(tmp_path / "voicebot.sqlite")
    try:
        res = Simulator(c, inputs("4", "1", "say:The officer at the desk was rude to me and "
                                  "I waited three hours in the queue without any explanation "
                                  "at all, and nobody answered the phone either.", "2",
                                  "silent"), IN_HOURS, language="en", store=store).run()
        # The message ended when the disk filled, the ticket was said, the call went on.
        assert "record_saved" in keys(res) and "hours" in after(res, "record_saved")
        ticket = store.tickets()[-1]
        assert ticket["state"] == "received" and ticket["recording"], ticket
        with wave.open(ticket["recording"]) as w:
            seconds = w.getnframes() / w.getframerate()
        assert 1.0 < seconds < 5.0  # what fitted on the disk, a playable WAV
        assert not list(tiny_disk.rglob("*.part*"))
    finally:
        store.close()


def test_caller_texts_are_rendered_off_the_call_thread(core) -> None:  # type: ignore[no-untyped-def]
    """A read-back number is new text: it is rendered on the render thread, kept only in the
    bounded memory cache, and the call still hears it in order."""
    number = "9081726354"
    res = Simulator(core, inputs("3", number + "#", "2", "silent"), AFTER_HOURS,
                    language="en").run()
    readback = next(p for p in res.played if p.prompt.key == "status_readback")
    assert " ".join(number) in readback.prompt.text
    assert not core.prompts.path(readback.prompt.text, readback.prompt.voice).exists()
    assert after(res, "status_readback")[0] in ("status_ask", "no_match")
    assert dt.timedelta(milliseconds=res.duration_ms) < dt.timedelta(minutes=3)
