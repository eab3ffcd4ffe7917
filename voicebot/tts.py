"""Prompt rendering: pyttsx3 on espeak-ng, into a content-addressed WAV cache.

A prompt's file name is the hash of everything that changes its sound (text,
voice, speaking rate, level, sample rate, engine versions), so an edited prompt
gets a new file and an unchanged one is never rendered again. Files are 8 kHz
(or 16 kHz) mono PCM16 WAV, written atomically. Dynamic text (hours, numbers)
goes through the same cache on demand.

Caller controls (issue 12): every prompt is cached at each speech rate in
:data:`voicebot.dialog.RATES` (espeak-ng itself speaks slower or faster, no
time-stretch), and :func:`apply_gain` makes a prompt louder at play time without
clipping.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import threading
import time
import wave
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np

from .dialog import RATES
from .errors import VoicebotError
from .frames import AudioFormatError, read_wav, resample, to_int16, write_wav

log = logging.getLogger(__name__)

TRIM_THRESHOLD = 200  # |sample| above which audio counts as sound when trimming (int16)
EDGE_MS = 10  # silence kept at each end after trimming
SYNTH_TIMEOUT_S = 10.0  # per attempt; espeak renders a long prompt in well under a second
SYNTH_ATTEMPTS = 3

LIMIT = 32000.0  # |sample| the gain limiter never exceeds (int16)
# How prompt levels are set; part of the cache key. 1 stopped at the peak and left some
# voices 3-4 dB quiet; 2 sent the gain past the peak through the limiter, timed for 8 kHz at
# every rate; 3 times the limiter for the cache's own sample rate.
LEVELLER = 3
LIMIT_ATTACK_DB_PER_MS = 2.4  # look-ahead ramp: 12 dB of reduction in 5 ms before a peak
LIMIT_RELEASE_DB_PER_MS = 0.24  # 12 dB of reduction released in 50 ms after a peak


class TtsError(VoicebotError):
    """espeak-ng could not render a text (missing voice, engine not installed)."""


def _complete_wav(path: Path) -> bool:
    """True once ``path`` holds a whole WAV (header frame count matches the file size)."""
    try:
        size = path.stat().st_size
        with wave.open(str(path), "rb") as w:
            return size >= 44 + w.getnframes() * w.getsampwidth() * w.getnchannels()
    except (OSError, EOFError, wave.Error):
        return False


class Synthesizer:
    """pyttsx3 with the espeak driver, serialised: the engine is not thread-safe."""

    _lock = threading.Lock()

    def __init__(self) -> None:
        self._engine = None

    def _get(self) -> object:
        if self._engine is None:
            import pyttsx3

            try:
                self._engine = pyttsx3.init("espeak")
                # The espeak driver prints "Audio saved to ..." from espeak's callback thread,
                # which would land in the middle of our own output (--json); silence it.
                from pyttsx3.drivers import espeak as driver

                driver.print = lambda *args, **kwargs: None  # type: ignore[attr-defined]
            except Exception as exc:
                raise TtsError(
                    f"pyttsx3 could not start espeak-ng ({exc}); install the Debian package "
                    "espeak-ng (make run/make test do it)") from exc
        return self._engine

    @staticmethod
    def engine_version() -> str:
        """pyttsx3 and espeak-ng versions: part of every cache key."""
        try:
            from pyttsx3.drivers import _espeak

            espeak = _espeak.Info().decode() if isinstance(_espeak.Info(), bytes) else str(
                _espeak.Info())
        except Exception:  # the version only keys the cache; a missing engine fails later
            espeak = "unknown"
        return f"pyttsx3-{version('pyttsx3')}/espeak-ng-{espeak}"

    def synthesize(self, text: str, voice: str, rate: int) -> tuple[np.ndarray, int]:
        """Render ``text``: (int16 mono samples, sample rate of espeak's output)."""
        with self._lock:
            engine = self._get()
            engine.setProperty("voice", voice)  # type: ignore[attr-defined]
            engine.setProperty("rate", rate)  # type: ignore[attr-defined]
            with tempfile.TemporaryDirectory(prefix="voicebot-tts-") as tmp:
                for attempt in range(SYNTH_ATTEMPTS):
                    out = Path(tmp) / f"say{attempt}.wav"
                    if self._render_once(engine, text, out):
                        return read_wav(out)
                    log.warning("espeak-ng dropped a synthesis (attempt %d): %r", attempt + 1,
                                text[:60])
        raise TtsError(f"espeak-ng rendered nothing for voice {voice!r}: {text!r}; check "
                       "`espeak-ng --voices` lists it")

    @staticmethod
    def _render_once(engine: object, text: str, out: Path) -> bool:
        """One synthesis into ``out``; False when espeak produced no file in time.

        pyttsx3's espeak driver synthesises on espeak's own thread and runAndWait() can
        return before the file is written; and a Synth() issued while espeak is still
        finishing the previous text is dropped. So: wait for espeak to be idle, start,
        then wait for a whole file and for the driver's callback to finish.
        """
        from pyttsx3.drivers import _espeak

        driver = getattr(getattr(engine, "proxy", None), "_driver", None)
        deadline = time.monotonic() + SYNTH_TIMEOUT_S
        while (_espeak.IsPlaying() or getattr(driver, "_speaking", False)) and \
                time.monotonic() < deadline:
            time.sleep(0.002)
        engine.save_to_file(text, str(out))  # type: ignore[attr-defined]
        engine.runAndWait()  # type: ignore[attr-defined]
        while not _complete_wav(out) and time.monotonic() < deadline:
            time.sleep(0.005)
        while getattr(driver, "_speaking", False) and time.monotonic() < deadline:
            time.sleep(0.002)
        return _complete_wav(out) and out.stat().st_size > 44


def trim(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Cut leading and trailing silence to EDGE_MS: silence before a reply is latency."""
    loud = np.flatnonzero(np.abs(samples.astype(np.int32)) > TRIM_THRESHOLD)
    if len(loud) == 0:
        return samples
    edge = sample_rate * EDGE_MS // 1000
    return samples[max(0, loud[0] - edge): loud[-1] + edge]


def normalize(samples: np.ndarray, target_dbfs: float, sample_rate: int) -> np.ndarray:
    """Scale to ``target_dbfs`` RMS over the sounding part, without clipping; sample_rate
    (Hz) sets the limiter's attack and release times.

    Voices with a high crest factor (espeak-ng's Russian: a few plosives 20 dB above the
    vowels) would stop 3-4 dB short of the level if the gain were capped by the peak, so
    every language would not sound equally loud; the gain past the peak goes through
    :func:`apply_gain`'s limiter instead, which turns down only those few peaks."""
    x = samples.astype(np.float64)
    active = x[np.abs(x) > TRIM_THRESHOLD]
    if len(active) == 0:
        return samples
    rms = float(np.sqrt(np.mean(active**2)))
    gain = (32768.0 * 10 ** (target_dbfs / 20.0)) / rms
    peak = float(np.abs(x).max())
    clean = min(gain, 32000.0 / peak)
    out = to_int16(x * clean)
    if gain <= clean * 1.01:
        return out
    return apply_gain(out, 20.0 * np.log10(gain / clean), sample_rate)


def _spread(d: np.ndarray, step_db: float, forward: bool) -> np.ndarray:
    """max over k >= 0 of d[n - k] - k*step_db (forward) or d[n + k] - k*step_db (backward).

    A max-plus convolution with a linear ramp, done by doubling: after the pass with
    shift s every offset below 2s is covered, so log2(reach) vectorised passes suffice."""
    out = d.copy()
    top = float(out.max())
    shift = 1
    while shift < len(out) and (shift // 2) * step_db < top:
        if forward:
            np.maximum(out[shift:], out[:-shift] - shift * step_db, out=out[shift:])
        else:
            np.maximum(out[:-shift], out[shift:] - shift * step_db, out=out[:-shift])
        shift *= 2
    return out


def apply_gain(samples: np.ndarray, gain_db: float, sample_rate: int = 8000) -> np.ndarray:
    """``samples`` (int16 mono) made ``gain_db`` dB louder, through a look-ahead peak limiter.

    gain_db 0 returns ``samples`` itself. Otherwise the signal is scaled by gain_db and a
    per-sample gain reduction (dB) is taken wherever a sample would pass LIMIT; that
    reduction is ramped in ahead of each peak at LIMIT_ATTACK_DB_PER_MS (so at most ~5 ms
    of look-ahead for 12 dB) and released after it at LIMIT_RELEASE_DB_PER_MS (12 dB in
    50 ms), so no sample exceeds LIMIT and the gain never steps. sample_rate (Hz) only
    scales those times. numpy only: a 10 s prompt takes a few milliseconds."""
    if gain_db == 0 or len(samples) == 0:
        return samples
    x = samples.astype(np.float64) * 10.0 ** (gain_db / 20.0)
    over = np.abs(x)
    # dB each sample must come down by; 0 where it is within the limit.
    need = 20.0 * np.log10(np.maximum(over, LIMIT) / LIMIT)
    if need.max() > 0:
        per_ms = sample_rate / 1000.0
        need = _spread(need, LIMIT_RELEASE_DB_PER_MS / per_ms, forward=True)
        need = _spread(need, LIMIT_ATTACK_DB_PER_MS / per_ms, forward=False)
        x *= 10.0 ** (-need / 20.0)
    # The reduction at each sample is at least what it needs: the clip only guards rounding.
    return np.clip(np.rint(x), -LIMIT, LIMIT).astype(np.int16)


@dataclass(frozen=True)
class BuildReport:
    """Counts of prompt files (one per text, voice and speech rate)."""

    rendered: int
    cached: int
    files: int


class PromptCache:
    """Content-addressed prompt audio under ``root``, plus an in-memory LRU of decoded audio.

    sample_rate: Hz of the cached audio; rate: espeak-ng words per minute at speech rate
    1.0; volume_dbfs: prompt RMS level in dBFS. Every lookup takes an optional ``rate``,
    a multiple of that words-per-minute (one of :data:`voicebot.dialog.RATES`)."""

    def __init__(self, root: Path, sample_rate: int = 8000, rate: int = 165,
                 volume_dbfs: float = -16.0, memory_items: int = 512) -> None:
        self.root = root
        self.sample_rate = sample_rate
        self.rate = rate
        self.volume_dbfs = volume_dbfs
        self.synth = Synthesizer()
        self._engine = Synthesizer.engine_version()
        self._mem: OrderedDict[str, np.ndarray] = OrderedDict()
        self._mem_items = memory_items
        self._lock = threading.Lock()

    def wpm(self, rate: float = 1.0) -> int:
        """espeak-ng words per minute for speech rate ``rate`` (a multiple of ``self.rate``)."""
        return self.rate if rate == 1.0 else round(self.rate * rate)

    def key(self, text: str, voice: str, rate: float = 1.0) -> str:
        """Cache key: the effective words per minute goes in "rate" (rate 1.0 is the
        configured wpm itself), and LEVELLER names how the level was set, so a change to
        :func:`normalize` re-renders every prompt instead of mixing old and new levels."""
        spec = {"text": text, "voice": voice, "rate": self.wpm(rate), "level": self.volume_dbfs,
                "sample_rate": self.sample_rate, "engine": self._engine,
                "leveller": LEVELLER}
        return hashlib.sha256(json.dumps(spec, sort_keys=True, ensure_ascii=False).encode()
                              ).hexdigest()

    def path(self, text: str, voice: str, rate: float = 1.0) -> Path:
        k = self.key(text, voice, rate)
        return self.root / k[:2] / f"{k}.wav"

    def has(self, text: str, voice: str, rate: float = 1.0) -> bool:
        return self.path(text, voice, rate).exists()

    def render(self, text: str, voice: str, rate: float = 1.0) -> np.ndarray:
        """Synthesize at speech rate ``rate`` (espeak-ng at :meth:`wpm` words per minute),
        resample, trim and level one text (no cache)."""
        samples, sr = self.synth.synthesize(text, voice, self.wpm(rate))
        samples = resample(samples, sr, self.sample_rate)
        return normalize(trim(samples, self.sample_rate), self.volume_dbfs, self.sample_rate)

    def cached(self, text: str, voice: str, rate: float = 1.0) -> np.ndarray | None:
        """The prompt's audio if it is rendered (memory or disk), else None: never renders.

        The call thread uses this, so a caller-triggered text (a number, a date) never runs
        espeak-ng there; :meth:`render_dynamic` renders it elsewhere."""
        k = self.key(text, voice, rate)
        with self._lock:
            hit = self._mem.get(k)
            if hit is not None:
                self._mem.move_to_end(k)
                return hit
        p = self.root / k[:2] / f"{k}.wav"
        try:
            samples, _ = read_wav(p)
        except (OSError, EOFError, wave.Error, AudioFormatError):
            return None
        self._remember(k, samples)
        return samples

    def render_dynamic(self, text: str, voice: str, rate: float = 1.0) -> np.ndarray:
        """Render a text callers trigger (numbers, tickets, dates) into the memory LRU only.

        Such texts are endless in number: written to the disk cache they would grow it
        without bound, so they live in the bounded in-memory LRU and are rendered again
        when they fall out of it."""
        hit = self.cached(text, voice, rate)
        if hit is not None:
            return hit
        samples = self.render(text, voice, rate)
        self._remember(self.key(text, voice, rate), samples)
        return samples

    def _remember(self, k: str, samples: np.ndarray) -> None:
        with self._lock:
            self._mem[k] = samples
            self._mem.move_to_end(k)
            while len(self._mem) > self._mem_items:
                self._mem.popitem(last=False)

    def get(self, text: str, voice: str, rate: float = 1.0) -> np.ndarray:
        """The prompt's audio at ``sample_rate`` and speech rate ``rate``, rendering it into
        the disk cache on first use (and again over a torn file)."""
        hit = self.cached(text, voice, rate)
        if hit is not None:
            return hit
        k = self.key(text, voice, rate)
        p = self.root / k[:2] / f"{k}.wav"
        samples = self.render(text, voice, rate)
        write_wav(p, samples, self.sample_rate)
        log.debug("rendered prompt %s (%s): %r", p.name, voice, text[:60])
        self._remember(k, samples)
        return samples

    def build(self, items: Iterable[tuple[str, str, str]], progress: bool = True,
              rates: Iterable[float] = RATES) -> BuildReport:
        """Render every (label, text, voice) at every speech rate in ``rates`` (default
        :data:`voicebot.dialog.RATES`) not yet in the cache; show progress. The report
        counts files: one per distinct text, voice and rate."""
        rates = tuple(rates)
        wanted: dict[str, tuple[str, str, str, float]] = {}
        for label, text, voice in items:
            for rate in rates:
                wanted.setdefault(self.key(text, voice, rate), (label, text, voice, rate))
        todo = [(k, *item) for k, item in wanted.items()
                if not (self.root / k[:2] / f"{k}.wav").exists()]
        if todo:
            from tqdm import tqdm

            for k, label, text, voice, rate in tqdm(todo, desc="rendering prompts",
                                                    unit="prompt", disable=not progress):
                try:
                    write_wav(self.root / k[:2] / f"{k}.wav", self.render(text, voice, rate),
                              self.sample_rate)
                except TtsError as exc:
                    raise TtsError(f"{label} (rate {rate:g}): {exc}") from exc
        return BuildReport(rendered=len(todo), cached=len(wanted) - len(todo), files=len(wanted))
