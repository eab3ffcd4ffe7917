"""The whole voice core on audio: prompts, in-band DTMF, VAD, real Vosk (Korean), classifier.

Calls run through the simulator, which feeds 20 ms frames of caller audio and pulls the
bot's audio on a virtual media clock, exactly as the telephony edge does in real time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import AFTER_HOURS, IN_HOURS, shared_data

from voicebot.config import PROJECT_ROOT
from voicebot.frames import read_wav, write_wav
from voicebot.simulator import CallerInput, Simulator


def press(*keys: str) -> list[CallerInput]:
    return [CallerInput("press", k) for k in keys]


def run(core, inputs, **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("at", IN_HOURS)
    return Simulator(core, inputs, **kw).run()


@pytest.mark.parametrize("lang_key,lang", [("1", "az"), ("2", "ru"), ("3", "en")])
def test_dtmf_paths_through_the_audio_pipeline(core, lang_key: str, lang: str) -> None:  # type: ignore[no-untyped-def]
    res = run(core, press(lang_key, "1", "2", "5", "9", "*", "2", "*", "7"), at=AFTER_HOURS)
    options = [t.option for t in res.turns]
    assert options == [f"lang.{lang}", "main.info", "info.temporary_residence",
                       "info.registration", "nav.repeat", "nav.back", "main.hours", "nav.back",
                       None]
    assert all(t.input == "dtmf" for t in res.turns)
    assert res.turns[-1].node == "language" and res.turns[-1].result == "no_match"
    heard = [p.prompt.key for p in res.played]
    assert heard[0] == "welcome" and "info_temporary_residence" in heard
    assert {p.prompt.language for p in res.played if p.prompt.key == "main_menu"} == {lang}
    # Every reply started within a few frames of the key being detected.
    assert all(t.latency_ms is not None and t.latency_ms < 200 for t in res.turns)


def test_operator_in_hours_transfers_and_outside_hours_offers_information(core) -> None:  # type: ignore[no-untyped-def]
    inside = run(core, press("3", "0"), at=IN_HOURS)
    assert inside.result == "transferred"
    assert inside.played[-1].prompt.key == "operator_transfer"
    outside = run(core, press("3", "0"), at=AFTER_HOURS)
    assert outside.result == "abandoned"  # the caller hung up after hearing the hours
    assert [p.prompt.key for p in outside.played][-3:] == ["operator_closed", "hours",
                                                           "callback_offer"]
    failed = run(core, press("3", "0"), at=IN_HOURS, transfer_fails=True)
    assert "transfer_failed" in [p.prompt.key for p in failed.played]


def test_retries_then_escalation_by_silence(core) -> None:  # type: ignore[no-untyped-def]
    silent = [CallerInput("silent")] * 4
    res = run(core, [CallerInput("press", "3"), *silent], at=AFTER_HOURS)
    assert [t.result for t in res.turns] == ["accepted"] + ["no_input"] * 4
    assert [t.input for t in res.turns[1:]] == ["none"] * 4
    # The third silence would move the caller on: they are warned first, then moved on.
    assert [t.prompt for t in res.turns[1:]] == ["no_input", "no_input", "timeout_warning",
                                                 "no_input"]
    keys = [p.prompt.key for p in res.played]
    assert keys.count("no_input") == 3 and keys.index("timeout_warning") < keys.index(
        "escalate_info")
    gap = res.turns[2].t_ms - res.turns[1].t_ms
    assert gap > core.cfg.dialog.no_input_ms  # the timer runs after the re-prompt ends


def test_korean_spoken_selection_succeeds(core) -> None:  # type: ignore[no-untyped-def]
    res = run(core, [CallerInput("say", "상담원")], language="ko", at=AFTER_HOURS)
    (turn,) = res.turns
    assert turn.input == "speech" and turn.heard == "상담원"
    assert turn.option == "main.operator" and turn.result == "accepted"
    assert turn.confidence >= core.cfg.nlu.accept
    assert turn.latency_ms is not None and turn.latency_ms > 0


def test_out_of_grammar_speech_reprompts(core) -> None:  # type: ignore[no-untyped-def]
    res = run(core, [CallerInput("say", "날씨가 좋네요")], language="ko")
    (turn,) = res.turns
    assert turn.input == "speech" and turn.option is None and turn.result == "no_match"
    assert turn.prompt == "no_match"
    assert [p.prompt.key for p in res.played][-2:] == ["no_match", "main_menu"] or \
        [p.prompt.key for p in res.played][-3:-1] == ["no_match", "main_menu"]


def test_barge_in_stops_the_prompt(core) -> None:  # type: ignore[no-untyped-def]
    res = run(core, [CallerInput("say", "상담원")], language="ko", barge_in_ms=1500,
              at=AFTER_HOURS)
    (turn,) = res.turns
    assert turn.barge_in and turn.option == "main.operator"
    menu = next(p for p in res.played if p.prompt.key == "main_menu")
    # The caller spoke 1.5 s into the menu; the reply came long before the menu's end.
    menu_len_ms = 1000 * len(core.prompts.get(menu.prompt.text, menu.prompt.voice)) / 8000
    assert turn.t_ms < menu.t_ms + menu_len_ms


def test_language_chosen_by_voice_then_keys(core) -> None:  # type: ignore[no-untyped-def]
    res = run(core, [CallerInput("say", "러시아어"), CallerInput("press", "2")])
    assert res.turns[0].input == "speech" and res.turns[0].option == "lang.ru"
    assert res.turns[0].language == "ko"  # heard by the Korean recogniser
    assert res.turns[1].option == "main.hours" and res.language == "ru"


def test_sixteen_khz_call_and_recording(core, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    wav = tmp_path / "call.wav"
    res = run(core, [CallerInput("press", "3"), CallerInput("press", "2")], sample_rate=16000,
              record=wav)
    assert [t.option for t in res.turns] == ["lang.en", "main.hours"]
    samples, rate = read_wav(wav)
    assert rate == 16000
    assert abs(len(samples) / rate - res.duration_ms / 1000) < 0.1
    assert np.abs(samples).max() > 1000


def test_recorded_caller_audio(core, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """--say-wav feeds a real recording: an English digit is speech, never a key press."""
    data = shared_data()
    res = run(core, [CallerInput("say_wav", str(data / "speech/fsdd-en/3_george_0.wav"))],
              language="ko")
    (turn,) = res.turns
    assert turn.input == "speech"  # Korean ASR hears something; no DTMF talk-off


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "voicebot", *args], capture_output=True,
                          text=True, cwd=PROJECT_ROOT, timeout=600)


def test_cli_done_when_commands() -> None:
    res = cli("simulate", "--press", "3", "--press", "1", "--press", "2", "--json")
    assert res.returncode == 0, res.stderr
    turns = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(turns) == 3
    for t in turns:
        assert {"node", "prompt", "input", "heard", "confidence", "option"} <= set(t)
    assert turns[-1]["option"] == "info.temporary_residence"
    assert turns[-1]["prompt"] == "info_temporary_residence"
    assert [t["input"] for t in turns] == ["dtmf"] * 3

    ko = cli("simulate", "--lang", "ko", "--say", "상담원", "--json")
    assert ko.returncode == 0, ko.stderr
    (turn,) = [json.loads(line) for line in ko.stdout.splitlines()]
    assert turn["option"] == "main.operator" and turn["input"] == "speech"


def test_cli_transcript_and_bad_input(tmp_path: Path) -> None:
    res = cli("simulate", "--at", "2026-11-23T10:00", "--press", "3", "--press", "0")
    assert res.returncode == 0, res.stderr
    assert "caller  presses 3" in res.stdout and "call ended: transferred" in res.stdout
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....WAVEjunk")
    err = cli("simulate", "--say-wav", str(bad))
    assert err.returncode == 2 and "bad.wav: not a readable audio file" in err.stderr
    err = cli("simulate", "--press", "x")
    assert err.returncode == 2 and "not DTMF keys" in err.stderr
    err = cli("simulate", "--at", "tomorrow")
    assert err.returncode == 2 and "ISO" in err.stderr


def test_speech_after_a_key_does_not_enter_the_number(core, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Korean caller at the number prompt: one stretch of caller audio with in-band "3", a
    # second of quiet, real spoken digits (espeak-ng through VAD and Vosk), then "5#". The
    # speech comes long after the key's tone (no masking): it is left out because a key
    # turned recognition off for this entry.
    sim = Simulator(core, [], at=IN_HOURS, language="ko")
    quiet = np.zeros(8000, dtype=np.int16)
    audio = np.concatenate([sim.caller_audio(CallerInput("press", "3"), "ko"), quiet,
                            sim.caller_audio(CallerInput("say", "칠 팔"), "ko"), quiet,
                            sim.caller_audio(CallerInput("press", "5#"), "ko")])
    wav = tmp_path / "key-speech-key.wav"
    write_wav(wav, audio, 8000)
    res = run(core, [*press("3"), CallerInput("say_wav", str(wav))], language="ko")
    number = next(t for t in res.turns if t.node == "status")
    assert (number.input, number.heard, number.result) == ("dtmf", "35#", "number")
    readback = next(p for p in res.played if p.prompt.key == "status_readback")
    assert "3 5" in readback.prompt.text and "7" not in readback.prompt.text


def test_korean_controls_and_language_from_the_first_words(core) -> None:  # type: ignore[no-untyped-def]
    # At the language menu the caller says "operator" in Korean: Korean, and the operator
    # path at once (after hours: the hours and a callback offer), language_by detected.
    res = run(core, [CallerInput("say", "상담원")], at=AFTER_HOURS)
    (turn,) = res.turns
    assert turn.option == "main.operator" and turn.language == "ko" and turn.node == "main"
    assert res.language == "ko" and res.language_by == "detected"
    assert [p.prompt.key for p in res.played][-3:] == ["operator_closed", "hours",
                                                       "callback_offer"]
    # "빠르게" (faster) at the main menu, then the operator: every later prompt at 1.25 x,
    # and the menu after it is shorter than at the normal rate. (Of the Korean control
    # words, espeak-ng's voice is heard right by the small model for 빠르게, 크게 말해,
    # 볼륨 줄여 and 도움말; its 천천히 is heard as a decoy, so slower is tested by key.)
    res = run(core, [CallerInput("say", "빠르게"), CallerInput("say", "상담원")], language="ko",
              at=IN_HOURS)
    assert [t.option for t in res.turns] == ["ctl.faster", "main.operator"]
    keys = [p.prompt.key for p in res.played]
    assert keys[keys.index("control_faster") + 1] == "main_menu"
    menus = [p.prompt for p in res.played if p.prompt.key == "main_menu"]
    assert (menus[0].rate, menus[-1].rate) == (1.0, 1.25)
    normal = core.prompts.get(menus[0].text, menus[0].voice)
    fast = core.prompts.get(menus[-1].text, menus[-1].voice, rate=1.25)
    assert len(fast) <= 0.85 * len(normal)
    assert res.result == "transferred"
    # Louder by voice: the prompts after it carry the gain.
    res = run(core, [CallerInput("say", "크게 말해")], language="ko", at=IN_HOURS)
    assert [t.option for t in res.turns] == ["ctl.louder"]
    assert {p.prompt.gain_db for p in res.played[-2:]} == {6}
