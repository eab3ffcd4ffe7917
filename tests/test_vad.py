"""The endpointer (voicebot.vad) on real recordings from ../shared/data/speech.

Each recording is padded with silence (and, where stated, white noise at 20 dB SNR
from voicebot.frames.add_noise with a fixed seed) and streamed in 20 ms frames.

Where speech begins and ends ("the reference") is measured offline on the clean
recording, 5 ms block by block: the first and last block louder than -55 dBFS, than
40 dB under the recording's loudest block, and than the added noise (0 dB local
SNR: what is under the noise is not there to be found). A short leading run (< 30
ms, then > 50 ms of quiet) is a click of the recorder, and a short trailing one
after more than 200 ms of quiet a blip, not speech. The file's own extent is not the
reference: every asterisk file has 20-300 ms of digital silence around the word,
and many fsdd-en takes (lucas most) start with a click or end in 100-600 ms of room
noise.
"""

from __future__ import annotations

import zlib
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_data

from voicebot.config import VadConfig
from voicebot.frames import AudioFrame, add_noise, read_audio, resample, silence, split_frames
from voicebot.vad import Endpointer, SpeechStarted, UtteranceEnded, VadEvent

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SPEECH = DATA / "speech"
PAD_MS = 600.0  # silence before and after each recording
TOLERANCE_MS = 60.0
RATES = (8000, 16000)
SPEAKERS = ("george", "jackson", "lucas")
# Recordings chosen by rule, not by result: one take per digit and fsdd-en speaker, and
# the ten digits of each IVR voice.
SAMPLE = (
    [f"fsdd-en/{d}_{s}_{(7 * d + 17 * i) % 50}.wav" for i, s in enumerate(SPEAKERS)
     for d in range(10)]
    + [f"asterisk-en/en/digits/{d}.wav" for d in range(10)]
    + [f"asterisk-ru/digits/{d}.wav" for d in range(10)]
)
MULTI_WORD = "asterisk-en/en/1-yes-2-no.wav"  # "Press 1 for yes, or 2 for no."


@pytest.fixture(scope="module")
def need_data() -> None:
    shared_data("speech")


@cache
def clean(name: str) -> np.ndarray:
    """A recording at 8 kHz, as stored."""
    return read_audio(SPEECH / name, 8000)


def noise_power(x: np.ndarray, snr_db: float | None) -> float:
    """Mean square of the noise add_noise puts under ``x`` at ``snr_db`` (0 for none)."""
    if snr_db is None:
        return 0.0
    xf = x.astype(np.float64)
    active = xf[np.abs(xf) > 0.01 * (np.abs(xf).max() + 1e-9)]
    return float(np.mean(active**2)) / 10 ** (snr_db / 10.0)


def reference(x: np.ndarray, noise_ms: float = 0.0) -> tuple[float, float]:
    """Speech extent (ms) of clean 8 kHz audio ``x`` under noise of mean square ``noise_ms``."""
    blk = 40  # 5 ms
    m = len(x) // blk
    e = np.mean(x[: m * blk].astype(np.float64).reshape(m, blk) ** 2, axis=1)
    thr = max(32768.0**2 * 10 ** (-55 / 10), e.max() * 10 ** (-40 / 10), noise_ms)
    idx = np.flatnonzero(e > thr)
    runs = np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1)
    while len(runs) > 1 and len(runs[0]) < 6 and runs[1][0] - runs[0][-1] > 10:
        runs.pop(0)  # a click: under 30 ms, then more than 50 ms of quiet
    while len(runs) > 1 and len(runs[-1]) < 6 and runs[-1][0] - runs[-2][-1] > 40:
        runs.pop()  # a blip: under 30 ms, after more than 200 ms of quiet
    return runs[0][0] * 5.0, (runs[-1][-1] + 1) * 5.0


def padded(name: str, rate: int, snr_db: float | None) -> np.ndarray:
    """The recording between PAD_MS of silence, noise added at 8 kHz, then resampled."""
    x = np.concatenate([silence(PAD_MS), clean(name), silence(PAD_MS)])
    if snr_db is not None:
        x = add_noise(x, snr_db, np.random.default_rng(zlib.crc32(name.encode())))
    return resample(x, 8000, rate)


def run(
    samples: np.ndarray, rate: int, config: VadConfig | None = None, frame_ms: int = 20
) -> list[VadEvent]:
    """Stream ``samples`` through a new Endpointer; flush at the end."""
    ep = Endpointer(config, rate)
    events: list[VadEvent] = []
    for frame in split_frames(samples, rate, frame_ms):
        events += ep.process(frame)
    events += ep.flush()
    return events


def pairs(events: list[VadEvent]) -> list[tuple[SpeechStarted, UtteranceEnded]]:
    """Events as (start, end) pairs, checking they alternate."""
    assert len(events) % 2 == 0, events
    out = []
    for s, e in zip(events[::2], events[1::2], strict=True):
        assert isinstance(s, SpeechStarted) and isinstance(e, UtteranceEnded), events
        out.append((s, e))
    return out


CONDITIONS = [(rate, snr) for rate in RATES for snr in (None, 20.0)]
IDS = [f"{rate}Hz-{'silence' if snr is None else f'{snr:g}dB'}" for rate, snr in CONDITIONS]


@pytest.fixture(scope="module")
def results(need_data) -> dict[tuple[int, float | None], dict[str, list[VadEvent]]]:
    return {
        (rate, snr): {name: run(padded(name, rate, snr), rate) for name in SAMPLE}
        for rate, snr in CONDITIONS
    }


@pytest.mark.parametrize(("rate", "snr"), CONDITIONS, ids=IDS)
def test_one_utterance_per_recording(results, rate, snr) -> None:
    for name, events in results[rate, snr].items():
        got = pairs(events)
        assert len(got) == 1, f"{name}: {[(e.start_ms, e.end_ms) for _, e in got]}"
        started, ended = got[0]
        assert not ended.too_short and not ended.truncated, name
        assert started.at_ms < ended.at_ms


# Misses (> 60 ms) tolerated per condition among the 50 recordings: about twice the
# corpus-wide rate (see test_boundaries_near_reference).
TOLERATED = {None: 2, 20.0: 4}


@pytest.mark.parametrize(("rate", "snr"), CONDITIONS, ids=IDS)
def test_boundaries_near_reference(results, rate, snr) -> None:
    """start_ms/end_ms within 60 ms of the reference; a few misses are tolerated.

    Why any: some edges sit at the reference's own threshold, where "is this still
    speech" has no sharp answer. The final /s/ of jackson's "six" fades into his
    recording's background at -50 dBFS; at 20 dB SNR the /f/ of "five", the
    aspiration of jackson's "two" or the release of a final /t/ after its closure
    (English "eight", Russian "шесть") is 0-3 dB above the noise, and a release more
    than hangover_ms after the vowel is not waited for. Over all 1779 recordings,
    97.9% (silence) and 95.7% (20 dB) have both boundaries within 60 ms at 8 kHz,
    97.5% and 95.7% at 16 kHz. No miss may exceed 250 ms.
    """
    misses = []
    for name, events in results[rate, snr].items():
        x = clean(name)
        ref_start, ref_end = reference(x, noise_power(x, snr))
        ended = events[-1]
        assert isinstance(ended, UtteranceEnded)
        err = (ended.start_ms - PAD_MS - ref_start, ended.end_ms - PAD_MS - ref_end)
        if max(abs(err[0]), abs(err[1])) > TOLERANCE_MS:
            misses.append((name, err))
    assert len(misses) <= TOLERATED[snr], misses
    assert all(max(abs(a), abs(b)) <= 250.0 for _, (a, b) in misses), misses


@pytest.mark.parametrize(("rate", "snr"), CONDITIONS, ids=IDS)
def test_speech_start_is_prompt_and_the_end_waits_only_the_hangover(results, rate, snr) -> None:
    """Barge-in acts on SpeechStarted.at_ms: a median of at most 100 ms after the
    reference start, within 150 ms for four recordings in five, never 300 ms.

    webrtcvad does not call a word-initial /s/ or /f/ (or a long aspirated /t/) voiced,
    so for those SpeechStarted comes start_ms into the vowel, the fricative's length
    later; the IVR voices draw out their /s/ to 150-200 ms. Over all 1779 recordings
    at 8 kHz: median 60 ms; over 150 ms for 0.8% in silence, 4.6% at 20 dB SNR (up
    to 12% of a 50-recording sample, as digits 4-7 start with /f/ or /s/).

    The end is declared hangover_ms after the last loud frame, not after webrtcvad's
    own overhang: UtteranceEnded.at_ms - end_ms is hangover_ms plus under two frames.
    """
    config = VadConfig()
    latency = []
    for name, events in results[rate, snr].items():
        x = clean(name)
        ref_start, _ = reference(x, noise_power(x, snr))
        started, ended = events[0], events[-1]
        assert isinstance(started, SpeechStarted) and isinstance(ended, UtteranceEnded)
        latency.append(started.at_ms - PAD_MS - ref_start)
        wait = ended.at_ms - ended.end_ms
        assert config.hangover_ms <= wait < config.hangover_ms + 2 * config.frame_ms, (
            name, wait)
    assert np.median(latency) <= 100.0, latency
    assert np.mean(np.array(latency) <= 150.0) >= 0.8, latency
    assert max(latency) < 300.0, latency


@pytest.mark.usefixtures("need_data")
@pytest.mark.parametrize("input_ms", [20, 30])
def test_the_recogniser_sees_the_whole_utterance(input_ms) -> None:
    """Preroll, then every input frame while in_speech, rebuild UtteranceEnded.audio."""
    for name in SAMPLE[::5]:
        x = padded(name, 8000, 20.0)
        ep = Endpointer()
        fed: list[np.ndarray] = []
        ended = None
        for frame in split_frames(x, 8000, input_ms):
            events = ep.process(frame)
            for event in events:
                if isinstance(event, SpeechStarted):
                    assert event.audio_start_ms <= event.start_ms
                    assert event.start_ms - event.audio_start_ms <= VadConfig().preroll_ms
                    assert event.audio_start_ms + 1000.0 * len(event.preroll) / 8000 == (
                        pytest.approx(frame.timestamp_ms)
                    )
                    assert frame.timestamp_ms < event.at_ms <= frame.end_ms
                    fed.append(event.preroll)
                else:
                    ended = event
            if ep.in_speech:
                fed.append(frame.samples)
        assert ended is not None, name
        heard = np.concatenate(fed)
        assert np.array_equal(heard, ended.audio[: len(heard)]), name
        assert len(ended.audio) - len(heard) <= 8 * input_ms, name  # the last frame: hangover
        assert ended.audio_start_ms + 1000.0 * len(ended.audio) / 8000 == (
            pytest.approx(ended.at_ms)
        )
        ref_start, ref_end = reference(clean(name), noise_power(clean(name), 20.0))
        assert ended.audio_start_ms <= PAD_MS + ref_start - 100.0  # preroll before speech
        assert ended.at_ms >= PAD_MS + ref_end  # and nothing of it cut off


@pytest.mark.usefixtures("need_data")
@pytest.mark.parametrize("rate", RATES)
def test_multi_word_prompt_is_one_utterance(rate) -> None:
    got = pairs(run(padded(MULTI_WORD, rate, None), rate))
    assert len(got) == 1, [(e.start_ms, e.end_ms) for _, e in got]
    ref_start, ref_end = reference(clean(MULTI_WORD))
    assert got[0][1].start_ms - PAD_MS == pytest.approx(ref_start, abs=TOLERANCE_MS)
    assert got[0][1].end_ms - PAD_MS == pytest.approx(ref_end, abs=TOLERANCE_MS)


@pytest.mark.usefixtures("need_data")
@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("snr", [None, 20.0])
def test_two_recordings_a_second_apart_are_two_utterances(rate, snr) -> None:
    first, second = "fsdd-en/6_george_0.wav", "asterisk-ru/digits/8.wav"
    gap = silence(1000.0)
    x = np.concatenate([silence(PAD_MS), clean(first), gap, clean(second), silence(PAD_MS)])
    if snr is not None:
        x = add_noise(x, snr, np.random.default_rng(7))
    got = pairs(run(resample(x, 8000, rate), rate))
    assert len(got) == 2, [(e.start_ms, e.end_ms) for _, e in got]
    second_at = PAD_MS + 1000.0 * len(clean(first)) / 8000 + 1000.0
    for (_, ended), offset, name in ((got[0], PAD_MS, first), (got[1], second_at, second)):
        ref_start, ref_end = reference(clean(name), noise_power(clean(name), snr))
        assert ended.start_ms - offset == pytest.approx(ref_start, abs=TOLERANCE_MS), name
        assert ended.end_ms - offset == pytest.approx(ref_end, abs=TOLERANCE_MS), name


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("level_dbfs", [-70.0, -55.0, -45.0, -35.0])
def test_silence_and_line_noise_are_not_speech(rate, level_dbfs) -> None:
    assert run(silence(5000.0, rate), rate) == []
    rng = np.random.default_rng(11)
    sigma = 32768.0 * 10 ** (level_dbfs / 20.0)
    noise = np.clip(np.rint(rng.normal(0.0, sigma, 5 * rate)), -32768, 32767).astype(np.int16)
    assert run(noise, rate) == []


def test_noise_switching_on_is_learnt_within_the_noise_window() -> None:
    """Line noise starting after digital silence looks like an onset at first; within
    noise_window_ms it is the floor, and no further utterance follows."""
    rng = np.random.default_rng(5)
    noise = np.clip(np.rint(rng.normal(0.0, 32768 * 10 ** (-30 / 20), 8 * 8000)), -32768, 32767)
    x = np.concatenate([silence(2000.0), noise.astype(np.int16)])
    got = pairs(run(x, 8000))
    assert len(got) <= 1
    for _, ended in got:
        assert ended.at_ms <= 2000.0 + VadConfig().noise_window_ms + 400.0


@pytest.mark.usefixtures("need_data")
@pytest.mark.parametrize("vad_frame_ms", [10, 20, 30])
def test_frame_sizes(vad_frame_ms) -> None:
    """webrtcvad frames of 10/20/30 ms work, and how the input is cut does not matter."""
    config = VadConfig(frame_ms=vad_frame_ms)
    for name in ("fsdd-en/3_jackson_4.wav", "asterisk-ru/digits/7.wav"):
        x = padded(name, 8000, None)
        ref_start, ref_end = reference(clean(name))
        seen = set()
        for input_ms in (10, 20, 30, 7):
            n = 8000 * input_ms // 1000
            ep = Endpointer(config, 8000)
            events: list[VadEvent] = []
            for i in range(0, len(x), n):
                events += ep.process(AudioFrame(x[i : i + n], 8000, 1000.0 * i / 8000))
            got = pairs(events)
            assert len(got) == 1, (name, input_ms)
            started, ended = got[0]
            assert ended.start_ms - PAD_MS == pytest.approx(ref_start, abs=TOLERANCE_MS)
            assert ended.end_ms - PAD_MS == pytest.approx(ref_end, abs=TOLERANCE_MS)
            seen.add((started.at_ms, started.start_ms, ended.at_ms, ended.start_ms, ended.end_ms))
        assert len(seen) == 1, seen


@pytest.mark.usefixtures("need_data")
def test_timestamps_follow_the_stream_and_reset_starts_a_new_one() -> None:
    name = "fsdd-en/0_george_0.wav"
    x = padded(name, 8000, None)
    ep = Endpointer()
    first = [e for f in split_frames(x, 8000, 20, start_ms=5000.0) for e in ep.process(f)]
    ep.reset()
    again = [e for f in split_frames(x, 8000, 20) for e in ep.process(f)]
    assert len(first) == len(again) == 2
    for a, b in zip(first, again, strict=True):
        assert a.at_ms - 5000.0 == pytest.approx(b.at_ms)
        assert a.start_ms - 5000.0 == pytest.approx(b.start_ms)


@pytest.mark.usefixtures("need_data")
def test_flush_ends_the_utterance_in_progress() -> None:
    x = padded(MULTI_WORD, 8000, None)
    ep = Endpointer()
    events: list[VadEvent] = []
    for frame in split_frames(x[: 8000 * 1500 // 1000], 8000, 20):  # hang up mid-prompt
        events += ep.process(frame)
    assert ep.in_speech and len(events) == 1
    (ended,) = ep.flush(1500.0)
    assert isinstance(ended, UtteranceEnded) and ended.truncated and not ep.in_speech
    assert ended.at_ms == 1500.0 and ended.start_ms == pytest.approx(events[0].start_ms, abs=60)
    assert ep.flush() == []


@pytest.mark.usefixtures("need_data")
def test_max_utterance_cuts_long_speech() -> None:
    config = VadConfig(max_utterance_ms=1000)
    got = pairs(run(padded(MULTI_WORD, 8000, None), 8000, config))
    assert len(got) >= 2
    assert got[0][1].truncated
    assert got[0][1].at_ms - got[0][1].start_ms <= 1000.0 + config.frame_ms


@pytest.mark.usefixtures("need_data")
def test_a_burst_shorter_than_min_utterance_is_flagged_too_short() -> None:
    """A 70 ms cut of a real vowel: SpeechStarted (barge-in) and a too_short end."""
    x = clean("asterisk-en/en/digits/0.wav")
    blk = 40
    e = np.mean(x[: len(x) // blk * blk].astype(np.float64).reshape(-1, blk) ** 2, axis=1)
    loudest = int(np.argmax(e)) * blk
    burst = x[max(0, loudest - 280) : max(0, loudest - 280) + 560]
    got = pairs(run(np.concatenate([silence(PAD_MS), burst, silence(PAD_MS)]), 8000))
    assert len(got) == 1
    assert got[0][1].too_short and got[0][1].duration_ms < VadConfig().min_utterance_ms


def test_wrong_rate_and_bad_settings_are_refused() -> None:
    ep = Endpointer(sample_rate=8000)
    with pytest.raises(ValueError, match="16000 Hz"):
        ep.process(AudioFrame(np.zeros(320, dtype=np.int16), 16000))
    with pytest.raises(ValueError, match=r"vad\.frame_ms"):
        Endpointer(VadConfig(frame_ms=25))
    with pytest.raises(ValueError, match=r"vad\.aggressiveness"):
        Endpointer(VadConfig(aggressiveness=4))
    with pytest.raises(ValueError, match="sample_rate"):
        Endpointer(sample_rate=44100)
