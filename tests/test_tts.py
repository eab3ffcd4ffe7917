"""Prompts render with real espeak-ng into the content-addressed cache."""

from __future__ import annotations

import hashlib
import json
import time
import wave
from pathlib import Path

import numpy as np

from voicebot.dialog import RATES
from voicebot.frames import read_wav, rms_dbfs
from voicebot.tts import LEVELLER, PromptCache, apply_gain


def test_every_prompt_of_every_pack_renders(core, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cache = PromptCache(tmp_path / "prompts", 8000, core.cfg.tts.rate, core.cfg.tts.volume_dbfs)
    prompts = core.all_prompts()
    langs = {p.language for p in prompts}
    assert langs == {"az", "ru", "en", "ko"}
    required = core.grammars.required_prompts()
    for lang in langs:
        assert required <= {p.key for p in prompts if p.language == lang}
    # Rate 1.0 only here (the other rates are the same texts, slower or faster; see below).
    report = cache.build([(f"{p.language}.{p.key}", p.text, p.voice) for p in prompts],
                         progress=False, rates=(1.0,))
    assert report.rendered == report.files  # everything new in an empty cache
    for p in prompts:
        path = cache.path(p.text, p.voice)
        with wave.open(str(path)) as w:
            assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 8000)
        samples, _ = read_wav(path)
        seconds = len(samples) / 8000
        letters = len("".join(p.text.split()))
        per_letter = seconds / letters
        # espeak-ng speaks Latin and Cyrillic at ~40-90 ms a letter, Hangul ~100-250 ms a
        # syllable; far outside means a wrong voice, lost text or silence.
        assert 0.02 < per_letter < 0.35, (p.language, p.key, seconds, letters)
        # Every language as loud as the others: within 2 dB of the level (the limiter
        # takes the peaks of high-crest voices instead of the whole prompt coming down).
        assert abs(rms_dbfs(samples[np.abs(samples) > 200]) - core.cfg.tts.volume_dbfs) < 2, \
            (p.language, p.key)
        assert np.abs(samples[:80]).max() > 0  # no leading silence: it would be latency


def test_only_changed_prompts_render_again(tmp_path: Path) -> None:
    cache = PromptCache(tmp_path / "p", 8000, 165, -16.0)
    items = [("en.a", "For English, press 3.", "en-us"), ("ru.b", "Для русского нажмите 2.", "ru")]
    n = len(RATES)  # build renders every item at every caller speech rate
    first = cache.build(items, progress=False)
    assert (first.rendered, first.cached, first.files) == (2 * n, 0, 2 * n)
    assert all(cache.has(t, v, r) for _, t, v in items for r in RATES)
    path_a = cache.path(*items[0][1:])
    mtime = path_a.stat().st_mtime_ns
    again = cache.build(items, progress=False)
    assert (again.rendered, again.cached) == (0, 2 * n)
    changed = [items[0], ("ru.b", "Для русского языка нажмите 2.", "ru")]
    third = cache.build(changed, progress=False)
    assert (third.rendered, third.cached) == (n, n)
    assert path_a.stat().st_mtime_ns == mtime
    # The voice and the speaking rate are part of the key, too.
    assert cache.key("x", "en-us") != cache.key("x", "ru")
    slower = PromptCache(tmp_path / "p", 8000, 140, -16.0)
    assert slower.key("x", "en-us") != cache.key("x", "en-us")


def test_dynamic_text_renders_on_demand_and_is_cached(tmp_path: Path) -> None:
    cache = PromptCache(tmp_path / "p", 16000, 165, -16.0)
    text = "Operators take calls Monday to Friday, from 9 a.m. to 6 p.m., Baku time."
    assert not cache.has(text, "en-us")
    audio = cache.get(text, "en-us")
    assert cache.has(text, "en-us")
    samples, rate = read_wav(cache.path(text, "en-us"))
    assert rate == 16000 and len(samples) == len(audio) and 3.0 < len(audio) / 16000 < 10.0


TEXT = "Operators take calls Monday to Friday, from 9 a.m. to 6 p.m., Baku time."


def test_rate_one_key_is_the_configured_rate_and_the_leveller(tmp_path: Path) -> None:
    cache = PromptCache(tmp_path / "p", 8000, 165, -16.0)
    # Rate 1.0 is keyed by the configured words per minute; the leveller is in the key, so
    # files levelled the old way are rendered again rather than mixed with new ones.
    spec = {"text": TEXT, "voice": "en-us", "rate": 165, "level": -16.0,
            "sample_rate": 8000, "engine": cache._engine, "leveller": LEVELLER}
    old = hashlib.sha256(json.dumps(spec, sort_keys=True, ensure_ascii=False).encode()
                         ).hexdigest()
    assert cache.key(TEXT, "en-us") == cache.key(TEXT, "en-us", 1.0) == old
    assert len({cache.key(TEXT, "en-us", r) for r in RATES}) == len(RATES)
    # The effective words per minute is what is keyed: rate 1.25 of 140 wpm is 175 wpm.
    assert PromptCache(tmp_path / "p", 8000, 140, -16.0).key(TEXT, "en-us", 1.25) == \
        PromptCache(tmp_path / "p", 8000, 175, -16.0).key(TEXT, "en-us")


def test_speech_rates_render_slower_and_faster(tmp_path: Path) -> None:
    cache = PromptCache(tmp_path / "p", 8000, 165, -16.0)
    normal = len(cache.get(TEXT, "en-us"))
    slow = len(cache.get(TEXT, "en-us", 0.75))
    fast = len(cache.get(TEXT, "en-us", 1.25))
    assert slow >= 1.2 * normal, (slow, normal)
    assert normal >= 1.1 * fast, (normal, fast)
    assert cache.has(TEXT, "en-us", 0.75) and cache.has(TEXT, "en-us", 1.25)


def test_gain_is_louder_and_never_clips(tmp_path: Path) -> None:
    cache = PromptCache(tmp_path / "p", 8000, 165, -16.0)
    audio = cache.get(TEXT, "en-us")
    assert apply_gain(audio, 0) is audio
    base = rms_dbfs(audio)
    louder = {}
    for gain in (6, 12):
        out = apply_gain(audio, gain)
        assert out.dtype == np.int16 and out.shape == audio.shape
        assert int(np.abs(out.astype(np.int32)).max()) <= 32000
        louder[gain] = rms_dbfs(out) - base
    # Prompts are levelled with their peaks at the limit already (espeak's crest factor is
    # ~18 dB), so the limiter takes back part of the gain: a hard clip would give 5.4 and
    # 9.3 dB; the 5 ms look-ahead / 50 ms release limiter gives ~4.7 and ~6.7 dB.
    assert 4.3 <= louder[6] <= 6.5, louder
    assert louder[12] >= 6.0 and louder[12] >= louder[6] + 1.5, louder
    # Quiet audio comes through at the full gain: the limiter only touches the peaks.
    quiet = (audio.astype(np.float64) * 10 ** (-14 / 20)).round().astype(np.int16)
    assert abs(rms_dbfs(apply_gain(quiet, 6)) - rms_dbfs(quiet) - 6) < 0.1
    assert rms_dbfs(apply_gain(quiet, 12)) - rms_dbfs(quiet) >= 11.0
    # Fast enough for the call thread: 10 s of audio in well under 50 ms.
    ten_s = np.tile(audio, 80000 // len(audio) + 1)[:80000]
    t0 = time.perf_counter()
    apply_gain(ten_s, 12)
    assert time.perf_counter() - t0 < 0.05
