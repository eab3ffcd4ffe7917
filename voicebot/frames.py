"""The one audio frame type, and the conversions into and out of it.

Every stage of voicebot exchanges :class:`AudioFrame`: signed 16-bit mono
samples with the sample rate and the media timestamp on the frame. Telephony
works at 8 kHz (PCMU/PCMA) or 16 kHz (G.722); 20 ms is the default frame.
"""

from __future__ import annotations

import io
import os
import tempfile
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr

SUPPORTED_RATES = (8000, 16000)
DEFAULT_RATE = 8000
DEFAULT_FRAME_MS = 20


class AudioFormatError(ValueError):
    """Audio that voicebot cannot use; the message names the file and the fix."""


@dataclass(frozen=True, slots=True)
class AudioFrame:
    """A block of caller or bot audio.

    samples: int16 mono PCM.
    sample_rate: samples per second (Hz).
    timestamp_ms: media time of the first sample, in milliseconds since the
        start of the stream (the call), on the clock that produced the frame.
    """

    samples: np.ndarray
    sample_rate: int = DEFAULT_RATE
    timestamp_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.samples.dtype != np.int16 or self.samples.ndim != 1:
            raise AudioFormatError(
                f"AudioFrame needs int16 mono samples, got {self.samples.dtype} "
                f"with shape {self.samples.shape}"
            )

    @property
    def duration_ms(self) -> float:
        """Length of the frame in milliseconds."""
        return 1000.0 * len(self.samples) / self.sample_rate

    @property
    def end_ms(self) -> float:
        """Media time just after the last sample, in milliseconds."""
        return self.timestamp_ms + self.duration_ms

    def to_bytes(self) -> bytes:
        """Little-endian PCM16, as webrtcvad, Vosk and PJSIP take it."""
        return self.samples.astype("<i2", copy=False).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, sample_rate: int, timestamp_ms: float = 0.0) -> AudioFrame:
        """Copy little-endian PCM16 bytes into a frame (the copy frees the caller's buffer)."""
        return cls(np.frombuffer(data, dtype="<i2").astype(np.int16), sample_rate, timestamp_ms)


def samples_per_frame(sample_rate: int, frame_ms: int = DEFAULT_FRAME_MS) -> int:
    """Number of samples in one frame of ``frame_ms`` milliseconds."""
    return sample_rate * frame_ms // 1000


def split_frames(
    samples: np.ndarray,
    sample_rate: int,
    frame_ms: int = DEFAULT_FRAME_MS,
    start_ms: float = 0.0,
) -> Iterator[AudioFrame]:
    """Cut a signal into consecutive frames; the last partial frame is zero-padded."""
    n = samples_per_frame(sample_rate, frame_ms)
    total = len(samples)
    for i in range(0, total, n):
        chunk = samples[i : i + n]
        if len(chunk) < n:
            chunk = np.concatenate([chunk, np.zeros(n - len(chunk), dtype=np.int16)])
        yield AudioFrame(np.ascontiguousarray(chunk, dtype=np.int16), sample_rate,
                         start_ms + 1000.0 * i / sample_rate)


def to_int16(x: np.ndarray) -> np.ndarray:
    """Round and clip a float or integer signal to int16."""
    if x.dtype == np.int16:
        return x
    if np.issubdtype(x.dtype, np.floating):
        return np.clip(np.rint(x), -32768, 32767).astype(np.int16)
    return np.clip(x, -32768, 32767).astype(np.int16)


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample int16 mono audio with soxr (high quality, band-limited)."""
    if from_rate == to_rate:
        return samples
    out = soxr.resample(samples.astype(np.float32), from_rate, to_rate, quality="HQ")
    return to_int16(out)


def silence(duration_ms: float, sample_rate: int = DEFAULT_RATE) -> np.ndarray:
    """Digital silence of the given length (ms)."""
    return np.zeros(round(sample_rate * duration_ms / 1000.0), dtype=np.int16)


def read_audio(path: str | os.PathLike[str], sample_rate: int = DEFAULT_RATE) -> np.ndarray:
    """Read any audio file libsndfile knows (WAV, FLAC, OGG...) as int16 mono at ``sample_rate``.

    Stereo is mixed down. Raises :class:`AudioFormatError` naming the file.
    """
    import soundfile

    p = Path(path)
    if not p.is_file():
        raise AudioFormatError(f"{p}: no such audio file")
    try:
        data, rate = soundfile.read(str(p), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises its own and RuntimeError subclasses
        raise AudioFormatError(
            f"{p}: not a readable audio file ({exc}); give a WAV, FLAC or OGG recording"
        ) from exc
    if data.shape[0] == 0:
        raise AudioFormatError(f"{p}: the file holds no audio samples")
    mono = data.mean(axis=1) * 32767.0
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate, quality="HQ")
    return to_int16(mono)


def read_wav_channels(path: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """Read an audio file keeping its channels: (float32 array of shape [n, channels], rate)."""
    import soundfile

    data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    return data, int(rate)


def wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    """Encode int16 mono samples as a WAV file in memory."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(to_int16(samples).astype("<i2").tobytes())
    return buf.getvalue()


def write_wav(path: str | os.PathLike[str], samples: np.ndarray, sample_rate: int) -> Path:
    """Write int16 mono WAV atomically: a reader never sees half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(wav_bytes(samples, sample_rate))
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def read_wav(path: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """Read a PCM16 mono WAV written by :func:`write_wav`: (samples, rate)."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise AudioFormatError(f"{path}: expected PCM16 mono WAV")
        data = w.readframes(w.getnframes())
        return np.frombuffer(data, dtype="<i2").astype(np.int16), w.getframerate()


def rms_dbfs(samples: np.ndarray) -> float:
    """Root-mean-square level in dB relative to int16 full scale (-inf for silence)."""
    if len(samples) == 0:
        return float("-inf")
    rms = float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)))
    return 20.0 * np.log10(rms / 32768.0) if rms > 0 else float("-inf")


def add_noise(samples: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """Add white Gaussian noise at ``snr_db`` relative to the signal's RMS over its voiced part."""
    x = samples.astype(np.float64)
    active = x[np.abs(x) > 0.01 * (np.abs(x).max() + 1e-9)]
    power = float(np.mean(active**2)) if len(active) else 1.0
    noise = rng.normal(0.0, np.sqrt(power / (10 ** (snr_db / 10.0))), len(x))
    return to_int16(x + noise)
