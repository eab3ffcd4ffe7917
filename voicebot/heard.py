"""Which prompts a caller actually heard: received audio matched against the prompt cache.

Tests judge a call from the caller's side: not what the bot says it played, but what
arrived at the phone. The softphone keeps every frame it received (8 kHz telephone band,
after G.711) and :class:`PromptMatcher` finds the rendered prompts in it by normalised
cross-correlation:

1. Heads: the first ``HEAD_MS`` of every candidate prompt is correlated with the whole
   received audio at once, by FFT, block by block (overlap-save, one FFT size, so the
   templates' spectra are computed once per matcher). Normalising by both energies makes
   the score independent of the line's level; G.711's quantisation noise (~35 dB below
   the speech) costs a few hundredths of it.
2. Extension: from each head hit, the prompt is followed window by window
   (``WINDOW_MS``), each window free to shift by up to ``DRIFT_MS`` against the previous
   one, since a jitter buffer may drop or repeat a frame. The match ends where the audio
   stops being the prompt: a prompt cut short by barge-in is heard partially, and the
   fraction heard is how far into the prompt the last matching window reaches.
3. Overlaps: prompts sharing their first words ("Did you say ...") all match the head;
   the one that goes on matching longest wins, and hits inside a longer match are dropped.

Bot speech no candidate explains (dynamic text such as a read-back number, a beep) is
reported as unknown segments (``key`` None).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import fft as sfft
from scipy import signal

from .frames import resample

log = logging.getLogger(__name__)

RATE = 8000  # the telephone band: every match runs at 8 kHz
HEAD_MS = 400  # the part of a prompt searched for everywhere
BLOCK = 1 << 15  # FFT size of the head search (4.1 s of audio at 8 kHz)
# A head scoring this much (normalised, -1..1) is a candidate. Low, because a jitter buffer
# that changes its delay inside the head (it does, in 10 ms steps, under load) splits it into
# two parts each aligned at another lag; the extension rejects what is not the prompt.
HEAD_NCC = 0.45
WINDOW_MS = 200  # extension step
WINDOW_NCC = 0.6  # a window of the prompt scoring this much still matches
DRIFT_MS = 80  # how far one window may slide against the previous (jitter buffer steps)
# A window that fails is looked for this far around: the bot's playback may stall for a few
# frames under load, or the jitter buffer jump by more than one step at once.
RESYNC_MS = 400
MAX_MISSES = 2  # consecutive failing windows (even after the wide search) end a match
MIN_SCORE = 0.8  # a match's mean window score: below, it is some other speech
MIN_WINDOWS = 2  # windows a match needs, unless it covers the whole (short) prompt
QUIET_DBFS = -45.0  # template windows quieter than this (pauses) are neither match nor miss
WHOLE = 0.95  # heard this much of a prompt: heard whole (the last window may be clipped)
UNKNOWN_MIN_MS = 300  # shorter unexplained speech is not reported
FRAME_MS = 20


@dataclass(frozen=True)
class Template:
    """One candidate prompt: key, language, text, audio (int16 at 8 kHz)."""

    key: str
    language: str
    text: str
    samples: np.ndarray

    @property
    def dynamic(self) -> bool:
        """Text with a placeholder ({number}): what was said differs from the template."""
        return "{" in self.text


@dataclass(frozen=True)
class Heard:
    """A prompt (or unknown bot speech) found in the received audio."""

    key: str | None  # None: bot speech no prompt explains
    language: str | None
    start_ms: float  # in the received audio, from its first sample
    duration_ms: float  # of received audio the match covers
    fraction: float | None  # of the prompt heard (None for unknown speech)
    score: float | None  # mean normalised correlation of the matching windows
    dynamic: bool = False

    @property
    def whole(self) -> bool:
        return self.fraction is not None and self.fraction >= WHOLE

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "language": self.language, "start_ms": round(self.start_ms),
                "duration_ms": round(self.duration_ms),
                "fraction": None if self.fraction is None else round(self.fraction, 3),
                "whole": self.whole, "score": None if self.score is None else round(self.score, 3),
                "dynamic": self.dynamic}


class PromptMatcher:
    """Finds candidate prompts in received audio; build once, use for many calls."""

    def __init__(self, templates: Iterable[Template]) -> None:
        seen: set[tuple[str, str, str]] = set()
        self.templates: list[Template] = []
        for t in templates:
            if (t.key, t.language, t.text) in seen or len(t.samples) < RATE // 10:
                continue
            seen.add((t.key, t.language, t.text))
            self.templates.append(t)
        self._audio = [t.samples.astype(np.float32) / 32768.0 for t in self.templates]
        self.head = RATE * HEAD_MS // 1000
        heads = np.zeros((len(self._audio), self.head), dtype=np.float32)
        self._head_len = np.zeros(len(self._audio), dtype=np.int64)
        for i, a in enumerate(self._audio):
            n = min(self.head, len(a))
            heads[i, :n] = a[:n]
            self._head_len[i] = n
        self._head_norm = np.sqrt(np.sum(heads.astype(np.float64) ** 2, axis=1)) + 1e-9
        # Correlation is convolution with the time-reversed head: one spectrum per template,
        # at the one block size every search uses.
        self._spectra = np.conj(sfft.rfft(heads, n=BLOCK, axis=1)).astype(np.complex64)

    @classmethod
    def from_core(cls, core: Any) -> PromptMatcher:
        """Every static prompt the packs can say (``VoiceCore.all_prompts()``), as rendered
        in the bot's prompt cache; prompts not rendered there are left out (logged)."""
        cache = core.prompts
        templates = []
        missing = 0
        for p in core.all_prompts():
            audio = cache.cached(p.text, p.voice)
            if audio is None:
                missing += 1
                continue
            if cache.sample_rate != RATE:
                audio = resample(audio, cache.sample_rate, RATE)
            templates.append(Template(p.key, p.language, p.text, audio))
        if missing:
            log.warning("%d prompts are not rendered in %s (`voicebot prompts build`): they "
                        "cannot be recognised", missing, cache.root)
        return cls(templates)

    # --- search ---

    def identify(self, samples: np.ndarray, rate: int = RATE) -> list[Heard]:
        """The prompts heard in ``samples`` (int16 mono at ``rate``), in order of start."""
        if rate != RATE:
            samples = resample(samples, rate, RATE)
        x = np.asarray(samples, dtype=np.float32) / 32768.0
        if len(x) < self.head or not self.templates:
            return self._unknown(x, [])
        energy = np.concatenate([[0.0], np.cumsum(x.astype(np.float64) ** 2)])
        hits = self._head_hits(x, energy)
        matches = [m for m in (self._extend(x, energy, ti, lag) for ti, lag in hits)
                   if m is not None]
        chosen = self._resolve(matches)
        return sorted(chosen + self._unknown(x, chosen), key=lambda h: h.start_ms)

    def _head_hits(self, x: np.ndarray, energy: np.ndarray) -> list[tuple[int, int]]:
        """(template index, lag) of every head scoring HEAD_NCC or more, one per head length."""
        head = self.head
        step = BLOCK - head + 1
        best: dict[int, list[tuple[int, float]]] = {}
        floor = 10 ** (QUIET_DBFS / 10) * head  # window energy of audio at QUIET_DBFS
        for start in range(0, len(x) - head + 1, step):
            block = x[start:start + BLOCK]
            lags = min(step, len(x) - head + 1 - start)
            win_e = energy[start + head:start + head + lags] - energy[start:start + lags]
            loud = win_e > floor
            if not loud.any():
                continue
            spec = sfft.rfft(block, n=BLOCK).astype(np.complex64)
            corr = sfft.irfft(self._spectra * spec[None, :], n=BLOCK, axis=1)[:, :lags]
            ncc = corr / (self._head_norm[:, None] * np.sqrt(np.maximum(win_e, 1e-12))[None, :])
            ncc[:, ~loud] = 0.0
            for ti in np.flatnonzero(ncc.max(axis=1) >= HEAD_NCC):
                row = ncc[ti]
                for lag in np.flatnonzero(row >= HEAD_NCC):
                    best.setdefault(int(ti), []).append((start + int(lag), float(row[lag])))
        hits: list[tuple[int, int]] = []
        for ti, cands in best.items():
            # Non-maximum suppression: the best lag of each run of close lags.
            cands.sort(key=lambda c: -c[1])
            kept: list[int] = []
            for lag, _ in cands:
                if all(abs(lag - k) >= self._head_len[ti] for k in kept):
                    kept.append(lag)
            hits.extend((ti, k) for k in kept)
        return hits

    def _extend(self, x: np.ndarray, energy: np.ndarray, ti: int, lag: int) -> Heard | None:
        """Follow template ``ti`` from ``lag`` while it keeps matching."""
        t = self._audio[ti]
        w = RATE * WINDOW_MS // 1000
        drift = RATE * DRIFT_MS // 1000
        resync = RATE * RESYNC_MS // 1000
        quiet = 10 ** (QUIET_DBFS / 10)
        shift = 0  # received position of template sample o is lag + o + shift
        misses = 0
        last_end = 0
        first_x: int | None = None
        last_x = lag
        scores: list[float] = []
        for o in range(0, len(t), w):
            tw = t[o:o + w]
            if len(tw) < w // 4:
                break
            t_e = float(np.dot(tw, tw))
            if t_e / len(tw) < quiet:
                continue  # a pause in the prompt says nothing about a match
            at = lag + o + shift
            if at + len(tw) > len(x):
                break  # the received audio ends here
            found = self._window(x, energy, tw, t_e, at, drift)
            if found is None or found[1] < WINDOW_NCC:
                found = self._window(x, energy, tw, t_e, at, resync)
            if found is not None and found[1] >= WINDOW_NCC:
                pos, score = found
                shift = pos - lag - o
                misses = 0
                scores.append(score)
                last_end = o + len(tw)
                last_x = pos + len(tw)
                if first_x is None:
                    first_x = pos - o
            else:
                misses += 1
                if misses >= MAX_MISSES:
                    break
        if not scores or first_x is None or float(np.mean(scores)) < MIN_SCORE:
            return None
        tpl = self.templates[ti]
        frac = min(1.0, last_end / len(t))
        if len(t) - last_end < w:  # the tail window may be shorter than a whole one
            frac = 1.0
        if len(scores) < MIN_WINDOWS and frac < 1.0:
            return None
        return Heard(tpl.key, tpl.language, 1000.0 * first_x / RATE,
                     1000.0 * (last_x - first_x) / RATE, frac, float(np.mean(scores)),
                     tpl.dynamic)

    @staticmethod
    def _window(x: np.ndarray, energy: np.ndarray, tw: np.ndarray, t_e: float, at: int,
                drift: int) -> tuple[int, float] | None:
        """Best (position, score) of template window ``tw`` within ``drift`` of ``at``."""
        lo = max(0, at - drift)
        hi = min(len(x), at + drift + len(tw))
        if hi - lo < len(tw):
            return None
        seg = x[lo:hi]
        corr = signal.correlate(seg, tw, mode="valid")
        seg_e = energy[lo + len(tw):hi + 1] - energy[lo:hi - len(tw) + 1]
        ncc = corr / np.sqrt(t_e * np.maximum(seg_e, 1e-12))
        ncc[seg_e / len(tw) < 10 ** (QUIET_DBFS / 10)] = 0.0
        k = int(np.argmax(ncc))
        return lo + k, float(ncc[k])

    @staticmethod
    def _resolve(matches: Sequence[Heard]) -> list[Heard]:
        """Longest match first; a match mostly inside one already taken is the same audio."""
        taken: list[Heard] = []
        for m in sorted(matches, key=lambda h: (-h.duration_ms, -(h.score or 0.0))):
            a, b = m.start_ms, m.start_ms + m.duration_ms
            overlap = max((min(b, t.start_ms + t.duration_ms) - max(a, t.start_ms)
                           for t in taken), default=0.0)
            if overlap <= 0.3 * (b - a):
                taken.append(m)
        return taken

    @staticmethod
    def _unknown(x: np.ndarray, known: Sequence[Heard]) -> list[Heard]:
        """Stretches of bot speech no match covers (pauses under 400 ms joined)."""
        n = RATE * FRAME_MS // 1000
        m = len(x) // n
        if m == 0:
            return []
        frames = x[: m * n].astype(np.float64).reshape(m, n)
        loud = 10 * np.log10(np.mean(frames * frames, axis=1) + 1e-12) > QUIET_DBFS
        for h in known:
            a = int(h.start_ms // FRAME_MS)
            b = int(np.ceil((h.start_ms + h.duration_ms) / FRAME_MS))
            loud[max(0, a - 5):b + 5] = False  # a match's edges (trim, PLC) are the prompt
        out: list[Heard] = []
        gap = 400 // FRAME_MS
        i = 0
        while i < m:
            if not loud[i]:
                i += 1
                continue
            j = i
            last = i
            while j < m and j - last <= gap:
                if loud[j]:
                    last = j
                j += 1
            if (last + 1 - i) * FRAME_MS >= UNKNOWN_MIN_MS:
                out.append(Heard(None, None, float(i * FRAME_MS),
                                 float((last + 1 - i) * FRAME_MS), None, None))
            i = last + 1
        return out


_MATCHERS: dict[tuple[str, str], PromptMatcher] = {}


def matcher_for(cfg: Any, grammars: Any = None) -> PromptMatcher:
    """The matcher for a config's packs and prompt cache, built once per process."""
    from .session import VoiceCore

    k = (str(cfg.source), str(cfg.audio_dir))
    if k not in _MATCHERS:
        _MATCHERS[k] = PromptMatcher.from_core(VoiceCore(cfg, grammars))
    return _MATCHERS[k]


def heard_json(heard: Sequence[Heard]) -> list[dict[str, Any]]:
    return [h.to_json() for h in heard]


def summarise(heard: Sequence[Heard]) -> str:
    """One line: key/language and percent heard, for logs and assertion messages."""
    return ", ".join(f"{h.key or '?'}/{h.language or '-'}@{h.start_ms / 1000:.1f}s"
                     f"({100 * (h.fraction or 0):.0f}%)" if h.key else
                     f"?@{h.start_ms / 1000:.1f}s({h.duration_ms:.0f}ms)" for h in heard)
