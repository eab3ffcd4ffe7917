"""The caller-side judge: G.711 in numpy, and prompts found in received audio by correlation.

Real rendered prompts (the bot's own cache under audio/prompts) go through a real G.711
round trip, at another level, with noise, a prompt cut short by barge-in and a frame lost
as a jitter buffer loses one; the matcher must name what was said, where, and how much of
it. On real SIP calls the same matcher is checked in tests/test_telephony.py.
"""

from __future__ import annotations

import io
import sys
import warnings

import numpy as np
import pytest
import soundfile

from voicebot import g711
from voicebot.config import Config
from voicebot.heard import RATE, Heard, PromptMatcher, Template, matcher_for, summarise
from voicebot.menus import Grammars
from voicebot.tts import PromptCache

ALL_PCM = np.arange(-32768, 32768, dtype=np.int16)


@pytest.mark.parametrize("law", ["alaw", "ulaw"])
def test_g711_matches_the_reference_codecs(law: str) -> None:
    # libsndfile's G.711: an independent implementation, on every Python version.
    raw = io.BytesIO()
    soundfile.write(raw, np.zeros(1, np.int16), RATE, subtype=law.upper(), format="RAW")
    codes = np.arange(256, dtype=np.uint8)
    ref_dec, _ = soundfile.read(io.BytesIO(codes.tobytes()), dtype="int16", format="RAW",
                                subtype=law.upper(), samplerate=RATE, channels=1)
    assert np.array_equal(g711.decode(codes, law), ref_dec)
    buf = io.BytesIO()
    soundfile.write(buf, ALL_PCM, RATE, subtype=law.upper(), format="RAW")
    ref_enc = np.frombuffer(buf.getvalue(), dtype=np.uint8)
    mine = g711.encode(ALL_PCM, law)
    # libsndfile rounds to the nearest level where G.711's reference truncates: they differ
    # only on the few inputs at a quantisation boundary, by one level (at most ~1/8 of it).
    assert np.mean(mine == ref_enc) > 0.99
    diff = np.abs(g711.decode(mine, law).astype(int) - g711.decode(ref_enc, law).astype(int))
    assert np.all(diff <= np.maximum(32, np.abs(ALL_PCM.astype(int)) // 8))
    if sys.version_info < (3, 13):  # audioop (removed in 3.13) is the reference algorithm
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import audioop
        lin2 = audioop.lin2alaw if law == "alaw" else audioop.lin2ulaw
        assert np.array_equal(mine, np.frombuffer(lin2(ALL_PCM.tobytes(), 2), np.uint8))
    # The codec's error is relative: ~35 dB below the signal at speech levels.
    x = (np.sin(np.arange(8000) * 2 * np.pi * 440 / RATE) * 6000).astype(np.int16)
    err = g711.round_trip(x, law).astype(float) - x
    assert 20 * np.log10(np.std(x) / np.std(err)) > 30


def test_g711_rejects_an_unknown_law() -> None:
    with pytest.raises(ValueError, match="alaw"):
        g711.encode(ALL_PCM[:10], "gsm")


@pytest.fixture(scope="module")
def matcher(cfg: Config, grammars: Grammars) -> PromptMatcher:
    return matcher_for(cfg, grammars)


def _tpl(m: PromptMatcher, key: str, lang: str) -> np.ndarray:
    return next(t.samples for t in m.templates if t.key == key and t.language == lang)


def _sil(ms: int) -> np.ndarray:
    return np.zeros(RATE * ms // 1000, dtype=np.int16)


def _line(x: np.ndarray, gain: float, law: str, seed: int = 0) -> np.ndarray:
    """A telephone line: another level, a little noise, then G.711 both ways."""
    rng = np.random.default_rng(seed)
    y = x.astype(np.float64) * gain + rng.normal(0.0, 20.0, len(x))
    return g711.round_trip(np.clip(y, -32768, 32767).astype(np.int16), law)


def test_matcher_candidates_are_every_rendered_prompt(matcher: PromptMatcher,
                                                      grammars: Grammars) -> None:
    langs = {t.language for t in matcher.templates}
    assert langs == set(grammars.packs)
    keys = {(t.key, t.language) for t in matcher.templates}
    for lang in grammars.packs:
        for key in ("welcome", "language_item", "main_menu", "info_menu", "call_ending",
                    "goodbye", "no_match"):
            assert (key, lang) in keys
    assert any(t.dynamic for t in matcher.templates)  # {number} read-backs are marked


@pytest.mark.parametrize("law,gain", [("alaw", 0.35), ("ulaw", 1.6)])
def test_prompts_found_through_g711_with_barge_in_and_a_lost_frame(
        matcher: PromptMatcher, cfg: Config, law: str, gain: float) -> None:
    welcome = _tpl(matcher, "welcome", "en")
    items = [_tpl(matcher, "language_item", lang) for lang in ("az", "ru", "en", "ko")]
    main = _tpl(matcher, "main_menu", "ru")
    info = _tpl(matcher, "info_menu", "ru")
    bye = _tpl(matcher, "call_ending", "ru")
    # Speech that is no prompt: the English voice saying something else.
    other = PromptCache(cfg.audio_dir / "cache" / "test-heard", RATE).get(
        "This sentence is not one of the prompts.", "en")
    cut = int(len(main) * 0.4)  # barge-in 40 % into the main menu
    parts: list[np.ndarray] = [_sil(600), welcome, _sil(300)]
    starts = {"welcome": 600.0}
    t = 600 + 1000 * len(welcome) / RATE + 300
    for lang, it in zip(("az", "ru", "en", "ko"), items, strict=True):
        starts[f"item-{lang}"] = t
        parts += [it, _sil(300)]
        t += 1000 * len(it) / RATE + 300
    starts["main"] = t
    parts += [main[:cut], _sil(200)]
    t += 1000 * cut / RATE + 200
    starts["info"] = t
    parts += [info, _sil(800)]
    t += 1000 * len(info) / RATE + 800
    starts["other"] = t
    parts += [other, _sil(500)]
    t += 1000 * len(other) / RATE + 500
    starts["bye"] = t
    parts += [bye, _sil(700)]
    sent = np.concatenate(parts)
    got = _line(sent, gain, law)
    # A jitter buffer dropping one 20 ms frame in the middle of the info menu.
    drop = int((starts["info"] + 500 * len(info) / RATE) * RATE / 1000)
    got = np.concatenate([got[:drop], got[drop + 160:]])
    heard = matcher.identify(got, RATE)
    known = [h for h in heard if h.key]
    assert [(h.key, h.language) for h in known] == [
        ("welcome", "en"), ("language_item", "az"), ("language_item", "ru"),
        ("language_item", "en"), ("language_item", "ko"), ("main_menu", "ru"),
        ("info_menu", "ru"), ("call_ending", "ru")], summarise(heard)
    for h, what in zip(known, ("welcome", "item-az", "item-ru", "item-en", "item-ko", "main",
                               "info"), strict=False):
        assert abs(h.start_ms - starts[what]) <= 30, (what, h)
    assert abs(known[-1].start_ms - (starts["bye"] - 20)) <= 30  # after the lost frame
    assert all(h.whole for h in known if h.key != "main_menu"), summarise(heard)
    main_heard = known[5]
    assert not main_heard.whole and 0.33 <= (main_heard.fraction or 0) <= 0.45
    assert all((h.score or 0) > 0.9 for h in known)
    # The sentence that is no prompt is reported as unknown speech, where it was said.
    unknown = [h for h in heard if h.key is None]
    assert len(unknown) == 1, summarise(heard)
    assert abs(unknown[0].start_ms - (starts["other"] - 20)) <= 100
    assert abs(unknown[0].duration_ms - 1000 * len(other) / RATE) <= 200
    as_json = unknown[0].to_json()
    assert as_json["key"] is None and as_json["fraction"] is None
    line = summarise(heard)  # what `voicebot call --heard` prints
    assert line.startswith("welcome/en@0.6s(100%)") and "main_menu/ru@" in line and "?@" in line


def test_shared_first_words_pick_the_prompt_that_goes_on(matcher: PromptMatcher) -> None:
    """"I am sorry, I did not ..." starts no_input and no_match alike: the one that goes on
    matching is the one said; "Did you say X?" likewise among the confirm prompts."""
    confirms = [t for t in matcher.templates if t.key == "confirm" and t.language == "en"]
    assert len(confirms) > 3
    said = confirms[2]
    x = np.concatenate([_sil(400), _tpl(matcher, "no_match", "en"), _sil(300), said.samples,
                        _sil(400)])
    heard = [h for h in matcher.identify(_line(x, 0.8, "alaw"), RATE) if h.key]
    assert [(h.key, h.whole) for h in heard] == [("no_match", True), ("confirm", True)], \
        summarise(heard)
    # Which confirm: the matcher reports the template; its duration is that prompt's.
    assert abs(heard[1].duration_ms - 1000 * len(said.samples) / RATE) < 60


def test_silence_noise_and_foreign_speech_are_no_prompt(matcher: PromptMatcher) -> None:
    rng = np.random.default_rng(3)
    noise = (rng.normal(0, 3000, RATE * 4)).astype(np.int16)
    tone = (np.sin(np.arange(RATE * 2) * 2 * np.pi * 1000 / RATE) * 8000).astype(np.int16)
    x = np.concatenate([_sil(2000), noise, _sil(500), tone, _sil(500)])
    heard = matcher.identify(_line(x, 1.0, "ulaw"), RATE)
    assert not [h for h in heard if h.key], summarise(heard)
    assert matcher.identify(np.zeros(100, np.int16), RATE) == []


def test_received_at_16_khz_is_matched_in_the_telephone_band(matcher: PromptMatcher) -> None:
    from voicebot.frames import resample

    x = np.concatenate([_sil(300), _tpl(matcher, "goodbye", "az"), _sil(300)])
    wide = resample(_line(x, 1.0, "alaw"), RATE, 16000)
    (h,) = [h for h in matcher.identify(wide, 16000) if h.key]
    assert (h.key, h.language, h.whole) == ("goodbye", "az", True)
    assert abs(h.start_ms - 300) <= 30


def test_a_matcher_on_given_templates() -> None:
    """The matcher takes any templates (a QA team's own recordings): heard partially."""
    rng = np.random.default_rng(5)
    a = (rng.normal(0, 4000, RATE * 3)).astype(np.int16)
    m = PromptMatcher([Template("a", "xx", "noise a", a)])
    x = np.concatenate([_sil(1000), a[: RATE * 2], _sil(1000)])
    (h,) = m.identify(_line(x, 0.5, "alaw"), RATE)
    assert isinstance(h, Heard) and h.key == "a" and h.language == "xx"
    assert abs((h.fraction or 0) - 2 / 3) < 0.08 and not h.whole
    assert abs(h.start_ms - 1000) <= 30
