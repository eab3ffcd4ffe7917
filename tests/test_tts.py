"""Prompts render with real espeak-ng into the content-addressed cache."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from voicebot.frames import read_wav, rms_dbfs
from voicebot.tts import PromptCache


def test_every_prompt_of_every_pack_renders(core, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cache = PromptCache(tmp_path / "prompts", 8000, core.cfg.tts.rate, core.cfg.tts.volume_dbfs)
    prompts = core.all_prompts()
    langs = {p.language for p in prompts}
    assert langs == {"az", "ru", "en", "ko"}
    required = core.grammars.required_prompts()
    for lang in langs:
        assert required <= {p.key for p in prompts if p.language == lang}
    report = cache.build([(f"{p.language}.{p.key}", p.text, p.voice) for p in prompts],
                         progress=False)
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
        assert abs(rms_dbfs(samples[np.abs(samples) > 200]) - core.cfg.tts.volume_dbfs) < 4
        assert np.abs(samples[:80]).max() > 0  # no leading silence: it would be latency


def test_only_changed_prompts_render_again(tmp_path: Path) -> None:
    cache = PromptCache(tmp_path / "p", 8000, 165, -16.0)
    items = [("en.a", "For English, press 3.", "en-us"), ("ru.b", "Для русского нажмите 2.", "ru")]
    first = cache.build(items, progress=False)
    assert (first.rendered, first.cached) == (2, 0)
    path_a = cache.path(*items[0][1:])
    mtime = path_a.stat().st_mtime_ns
    again = cache.build(items, progress=False)
    assert (again.rendered, again.cached) == (0, 2)
    changed = [items[0], ("ru.b", "Для русского языка нажмите 2.", "ru")]
    third = cache.build(changed, progress=False)
    assert (third.rendered, third.cached) == (1, 1)
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
