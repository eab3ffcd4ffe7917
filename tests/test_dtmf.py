"""In-band DTMF on real audio: generated tones in noise, the shared DTMF recordings
(checked against their labels and against multimon-ng), and talk-off over every
speech recording in ../shared/data/speech."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_data

from voicebot.config import DtmfConfig
from voicebot.dtmf import (
    COL_FREQS,
    DTMF_KEYS,
    FULL_SCALE,
    ROW_FREQS,
    DetectedDigit,
    DtmfDetector,
    detect_digits,
    dual_tone,
    generate,
    key_frequencies,
)
from voicebot.frames import (
    AudioFormatError,
    AudioFrame,
    add_noise,
    read_wav,
    read_wav_channels,
    resample,
    rms_dbfs,
    to_int16,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared(sub: str) -> Path:
    """A path under ../shared/data: skipped in a user's clone, a failure in CI."""
    return shared_data(sub)


def keys(digits: list[DetectedDigit]) -> str:
    return "".join(d.digit for d in digits)


def decode(x: np.ndarray, fs: int = 8000, frame_ms: int = 20,
           config: DtmfConfig | None = None) -> str:
    return keys(detect_digits(x, fs, config, frame_ms))


def pad(tone: np.ndarray, fs: int = 8000, lead_samples: int = 160,
        tail_ms: int = 200) -> np.ndarray:
    """Silence, the tone, silence; as int16."""
    return to_int16(np.concatenate([np.zeros(lead_samples), tone, np.zeros(fs * tail_ms // 1000)]))


def burst(key: str, ms: float, fs: int = 8000, level_dbfs: float = -15.0,
          twist_db: float = 0.0) -> np.ndarray:
    return dual_tone(*key_frequencies(key), ms, fs, level_dbfs, twist_db)


# --- generator -------------------------------------------------------------------------


def test_generated_tones_have_the_documented_frequencies_and_levels() -> None:
    fs = 8000
    x = generate("5", fs, on_ms=500, off_ms=0, level_dbfs=-20.0, twist_db=-3.0)
    assert x.dtype == np.int16 and len(x) == 4000
    spectrum = np.abs(np.fft.rfft(x.astype(np.float64)))
    freqs = np.fft.rfftfreq(len(x), 1 / fs)
    peaks = sorted(freqs[np.argsort(spectrum)[-2:]])
    assert peaks == [770.0, 1336.0]
    # Row at -20 dBFS, column 3 dB lower: amplitude ratio and summed power.
    low, high = spectrum[freqs == 770.0][0], spectrum[freqs == 1336.0][0]
    assert 20 * np.log10(high / low) == pytest.approx(-3.0, abs=0.05)
    expected = 10 * np.log10(10 ** (-20 / 10) + 10 ** (-23 / 10))
    assert rms_dbfs(x) == pytest.approx(expected, abs=0.05)

    layout = generate("12", fs, on_ms=100, off_ms=50, lead_ms=30)
    assert len(layout) == 8 * (30 + 2 * (100 + 50))
    assert not layout[:240].any() and layout[240:1040].any() and not layout[1040:1440].any()


def test_key_table_and_bad_input() -> None:
    for i, key in enumerate(DTMF_KEYS):
        assert key_frequencies(key) == (ROW_FREQS[i // 4], COL_FREQS[i % 4])
    assert key_frequencies("*") == (941.0, 1209.0) and key_frequencies("d") == (941.0, 1633.0)
    with pytest.raises(ValueError, match="not a DTMF key"):
        generate("12X")
    with pytest.raises(ValueError, match="clip"):
        generate("1", level_dbfs=-3.0)
    with pytest.raises(AudioFormatError, match="8000 Hz"):
        DtmfDetector(8000).process(AudioFrame(np.zeros(320, np.int16), 16000))


# --- all keys in noise -----------------------------------------------------------------


@pytest.mark.parametrize("fs", [8000, 16000])
@pytest.mark.parametrize("frame_ms", [10, 20])
@pytest.mark.parametrize("snr_db", [20.0, 12.0])
def test_all_keys_decoded_once_in_noise(fs: int, frame_ms: int, snr_db: float) -> None:
    rng = np.random.default_rng(fs + frame_ms + int(snr_db))
    lead_ms = 37
    x = add_noise(generate(DTMF_KEYS, fs, on_ms=100, off_ms=100, lead_ms=lead_ms), snr_db, rng)
    digits = detect_digits(x, fs, frame_ms=frame_ms)
    assert keys(digits) == DTMF_KEYS
    for i, d in enumerate(digits):
        onset = lead_ms + 200 * i
        assert abs(d.start_ms - onset) <= 5.0, d
        # Reported while the key is still down, not when the tone ends.
        assert d.start_ms < d.detected_ms < onset + 100, d


def test_noise_and_silence_alone_give_nothing() -> None:
    rng = np.random.default_rng(5)
    for level in (30.0, 300.0, 3000.0, 10000.0):
        assert decode(to_int16(rng.normal(0.0, level, 8000 * 10))) == ""
    assert decode(np.zeros(8000 * 5, np.int16)) == ""


# --- timing rules ----------------------------------------------------------------------


@pytest.mark.parametrize("snr_db", [None, 20.0])
def test_25_ms_tone_is_not_a_digit_and_45_ms_is_one(snr_db: float | None) -> None:
    rng = np.random.default_rng(11)
    for i, key in enumerate(DTMF_KEYS):
        lead = 160 + 7 * i  # a different alignment to the 5 ms block grid for every key
        short = pad(burst(key, 25), lead_samples=lead)
        long_ = pad(burst(key, 45), lead_samples=lead)
        if snr_db is not None:
            short, long_ = add_noise(short, snr_db, rng), add_noise(long_, snr_db, rng)
        assert decode(short) == "", key
        assert decode(long_) == key, key


def test_same_key_twice_with_a_50_ms_pause_is_two_presses() -> None:
    for i, key in enumerate(DTMF_KEYS):
        x = np.concatenate([burst(key, 60), np.zeros(400), burst(key, 60)])
        assert decode(pad(x, lead_samples=160 + 13 * i)) == key * 2


def test_a_10_ms_drop_out_inside_a_tone_is_bridged() -> None:
    for i, key in enumerate(DTMF_KEYS):
        for cut_ms in (20, 60, 120):
            x = burst(key, 210)
            x[8 * cut_ms : 8 * cut_ms + 80] = 0.0  # 10 ms of nothing, phase continues after
            digits = detect_digits(pad(x, lead_samples=160 + 3 * i))
            assert keys(digits) == key, (key, cut_ms)
            assert abs(digits[0].start_ms - 1000 * (160 + 3 * i) / 8000) <= 5.0


def test_different_keys_back_to_back_are_separate_presses() -> None:
    assert decode(generate("12D#9", on_ms=80, off_ms=0, lead_ms=20)) == "12D#9"


def test_long_press_is_reported_once() -> None:
    assert decode(generate("7", on_ms=5000, off_ms=100)) == "7"


def test_frame_size_and_timestamps_do_not_change_the_result() -> None:
    x = generate("159#", on_ms=60, off_ms=60, lead_ms=10)
    expected = [(d.digit, d.start_ms) for d in detect_digits(x)]
    rng = np.random.default_rng(2)
    det = DtmfDetector(8000)
    got: list[DetectedDigit] = []
    i = 0
    while i < len(x):  # ragged frames of 1..30 ms on a clock that starts at 5 s
        n = int(rng.integers(8, 240))
        frame = AudioFrame(x[i : i + n], 8000, 5000.0 + i / 8)
        for d in det.process(frame):
            assert d.detected_ms <= frame.end_ms
            got.append(d)
        i += n
    assert [(d.digit, round(d.start_ms - 5000.0, 6)) for d in got] == [
        (k, round(s, 6)) for k, s in expected
    ]
    det.reset()
    assert det.process(AudioFrame(to_int16(burst("1", 20)), 8000)) == []


# --- twist, frequency, level -----------------------------------------------------------


def test_twist_within_limits_is_accepted_and_beyond_rejected() -> None:
    rng = np.random.default_rng(3)
    relaxed = DtmfConfig(max_twist_db=12.0, max_reverse_twist_db=12.0)

    def heard(key: str, twist_db: float, config: DtmfConfig | None = None) -> str:
        # twist_db = column level - row level, dB.
        x = add_noise(pad(burst(key, 80, level_dbfs=-20.0, twist_db=twist_db)), 30.0, rng)
        return decode(x, config=config)

    for key in DTMF_KEYS:
        assert heard(key, -7.0) == key  # normal twist: low group 7 dB louder (limit 8)
        assert heard(key, +3.0) == key  # reverse twist: high group 3 dB louder (limit 4)
        assert heard(key, -10.0) == ""
        assert heard(key, +10.0) == ""
        assert heard(key, +6.0) == ""
        assert heard(key, -10.0, relaxed) == key and heard(key, +10.0, relaxed) == key


@pytest.mark.parametrize("fs", [8000, 16000])
def test_frequency_off_by_1_percent_is_accepted_and_by_5_percent_rejected(fs: int) -> None:
    rng = np.random.default_rng(4)
    for key in DTMF_KEYS:
        low, high = key_frequencies(key)

        def heard(f_low: float, f_high: float) -> str:
            x = pad(dual_tone(f_low, f_high, 80, fs, -15.0), fs, lead_samples=fs // 50)
            return decode(add_noise(x, 25.0, rng), fs)

        for dev in (-0.015, -0.01, 0.01, 0.015):
            assert heard(low * (1 + dev), high * (1 + dev)) == key, (key, dev)
        for dev in (-0.05, -0.035, 0.035, 0.05):
            assert heard(low * (1 + dev), high) == "", (key, "row", dev)
            assert heard(low, high * (1 + dev)) == "", (key, "column", dev)


def test_too_quiet_is_rejected() -> None:
    for key in "1590D":
        assert decode(pad(burst(key, 80, level_dbfs=-35.0))) == key
        assert decode(pad(burst(key, 80, level_dbfs=-45.0))) == ""
        quiet = DtmfConfig(min_level_dbfs=-50.0)
        assert decode(pad(burst(key, 80, level_dbfs=-45.0)), config=quiet) == key


def test_a_third_tone_in_the_same_group_must_be_well_below() -> None:
    """Relative peak: the strongest row (column) must dominate the others by 6 dB."""
    fs = 8000
    for key in DTMF_KEYS:
        low, high = key_frequencies(key)
        pair = dual_tone(low, high, 100, fs, -20.0)
        t = np.arange(len(pair)) / fs
        other_row = ROW_FREQS[(ROW_FREQS.index(low) + 2) % 4]
        other_col = COL_FREQS[(COL_FREQS.index(high) + 2) % 4]
        for f3 in (other_row, other_col):
            for below_db, expected in ((4.0, ""), (12.0, key)):
                amp = FULL_SCALE * np.sqrt(2.0) * 10 ** ((-20.0 - below_db) / 20)
                x = pad(pair + amp * np.sin(2 * np.pi * f3 * t))
                assert decode(x) == expected, (key, f3, below_db)


def test_a_single_tone_or_a_tone_with_speech_like_harmonics_is_not_a_digit() -> None:
    fs = 8000
    t = np.arange(fs // 2) / fs
    single = 8000.0 * np.sin(2 * np.pi * 770.0 * t)
    assert decode(pad(single)) == ""
    # A buzz at 140 Hz: its 5th harmonic (700 Hz) is a row tone, 9th (1260) near no column.
    buzz = sum(3000.0 / k * np.sin(2 * np.pi * 140.0 * k * t) for k in range(1, 25))
    assert decode(pad(buzz)) == ""


# --- shared recordings -----------------------------------------------------------------

_LABEL_KEYS = {"One": "1", "Two": "2", "Three": "3", "Four": "4", "Five": "5", "Six": "6",
               "Seven": "7", "Eight": "8", "Nine": "9", "Zero": "0", "Star": "*", "Hash": "#"}


def _stereo_labels(labels: Path) -> dict[int, list[tuple[str, float]]]:
    """(key, start ms) per channel, from the 'stereo_dtmf_tones.wav' section."""
    out: dict[int, list[tuple[str, float]]] = {0: [], 1: []}
    section = ""
    for line in labels.read_text().splitlines():
        if line.startswith("=="):
            section = line.strip("= ").strip()
            continue
        m = re.match(r"Start (\w+) (\d+):(\d+):([\d.]+) ch(\d)", line)
        if section == "stereo_dtmf_tones.wav" and m:
            name, hh, mm, ss, ch = m.groups()
            start = 1000.0 * (int(hh) * 3600 + int(mm) * 60 + float(ss))
            out[int(ch)].append((_LABEL_KEYS[name], start))
    return out


@pytest.mark.parametrize("fs", [8000, 16000])
def test_stereo_recording_decodes_to_its_labels(fs: int) -> None:
    dtmf = shared("dtmf")
    labels = _stereo_labels(dtmf / "expected_dtmf_from_tests.txt")
    assert "".join(k for k, _ in labels[0]) == "135790"
    assert "".join(k for k, _ in labels[1]) == "2468"
    data, rate = read_wav_channels(dtmf / "stereo_dtmf_tones.wav")
    for ch in (0, 1):
        x = resample(to_int16(data[:, ch] * 32767.0), rate, fs)
        for frame_ms in (10, 20):
            digits = detect_digits(x, fs, frame_ms=frame_ms)
            assert keys(digits) == "".join(k for k, _ in labels[ch]), (ch, frame_ms)
            # The labels are another detector's times: agree within 25 ms.
            for d, (_, start) in zip(digits, labels[ch], strict=True):
                assert abs(d.start_ms - start) <= 25.0, (d, start)


def _bursts(x: np.ndarray, fs: int) -> tuple[np.ndarray, np.ndarray]:
    """Durations and pauses (ms) of the tone bursts in x, from a 5 ms RMS envelope."""
    n = fs // 200
    env = np.sqrt(np.convolve(x.astype(np.float64) ** 2, np.ones(n) / n, mode="same"))
    on = env > 0.3 * np.median(env[env > 0.1 * env.max()])
    edges = np.flatnonzero(np.diff(on.astype(np.int8))) + 1
    starts, ends = edges[::2], edges[1::2]
    assert on[0] == 0 and len(starts) == len(ends)
    return 1000.0 * (ends - starts) / fs, 1000.0 * (starts[1:] - ends[:-1]) / fs


def test_very_short_tones_agree_with_multimon_ng() -> None:
    path = shared("dtmf/very_short_dtmf_tones.ogg")
    data, rate = read_wav_channels(path)
    assert np.array_equal(data[:, 0], data[:, 1])  # both channels carry the same tones
    x = to_int16(data[:, 0] * 32767.0)
    # What the file holds (measured): 8 groups of 10 bursts, each about 70 ms on with
    # about 32.5 ms pauses inside a group and 500 ms between groups. Every burst
    # meets the 40 ms rule, so every one must be a digit. The 32.5 ms pauses lie in
    # Q.24's don't-care band (above the 10 ms that must be bridged, below the 40 ms
    # that must separate); this detector splits at about 24 ms, so a repeated key
    # ("66", "44", "00" ...) counts twice there, as multimon-ng counts it.
    durations, pauses = _bursts(x, rate)
    assert len(durations) == 80
    assert durations.min() >= 60.0 and durations.max() <= 80.0
    short = pauses[pauses < 200.0]
    assert len(short) == 72 and short.min() >= 28.0 and short.max() <= 40.0
    x8 = resample(x, rate, 8000)
    ours = {frame_ms: decode(x8, 8000, frame_ms) for frame_ms in (10, 20)}
    assert len(ours[20]) == len(durations) and ours[10] == ours[20]
    assert decode(resample(x, rate, 16000), 16000) == ours[20]

    multimon = shutil.which("multimon-ng")
    if multimon is None:
        pytest.skip("multimon-ng is not installed (apt-get install multimon-ng): no reference")
    raw = resample(x, rate, 22050).astype("<i2").tobytes()
    run = subprocess.run([multimon, "-q", "-c", "-a", "DTMF", "-t", "raw", "-"], input=raw,
                         capture_output=True, timeout=60, check=True)
    reference = "".join(re.findall(r"^DTMF: (\S)", run.stdout.decode(), flags=re.M))
    assert len(reference) == len(durations)
    assert ours[20] == reference


def test_no_digit_in_any_speech_recording() -> None:
    """Talk-off: real speech (English digits by 3 speakers, English and Russian IVR
    voices) must never be taken for a key press."""
    files = sorted(shared("speech").rglob("*.wav"))
    assert len(files) > 1000
    false_digits = []
    for path in files:
        x, fs = read_wav(path)
        false_digits += [(path.relative_to(SHARED_DATA).as_posix(), d)
                         for d in detect_digits(x, fs)]
    assert false_digits == [], false_digits[:10]
