"""Endpointing of one call's incoming audio: webrtcvad gated by frame energy.

:class:`Endpointer` turns a stream of :class:`~voicebot.frames.AudioFrame` into
two events: :class:`SpeechStarted` (prompt: it drives barge-in and opens the ASR
stream) and :class:`UtteranceEnded` (closes it). Every SpeechStarted is followed
by exactly one UtteranceEnded; speech shorter than ``min_utterance_ms`` ends with
``too_short=True``, so the dialog can ignore it after having stopped a prompt.

Why not webrtcvad alone: webrtcvad keeps saying "voiced" for 100-150 ms after
speech stops (its own overhang), and that delay would come out of the turn-latency
budget before any hangover. Here a frame is speech only when webrtcvad calls it
voiced *and* it carries energy: one 5 ms block ``energy_margin_db`` above the
noise floor, or the 20 ms mean ``frame_margin_db`` above it (weak fricatives in
noise), never below ``min_level_dbfs`` nor, inside an utterance, more than
``end_drop_db`` under its loudest block. The overhang frames are quiet, so the
``hangover_ms`` clock starts at the caller's last loud frame. Inside an utterance
a loud frame that webrtcvad calls unvoiced (a final /s/ at 8 kHz, the release of
a stop) still counts when it comes within ``hangover_ms`` of voiced speech.

The noise floor is the quietest frame of the last ``noise_window_ms`` of
non-speech (minimum statistics), so a 200 ms fricative cannot lift it, and a
louder line is learnt within that window. Inside an utterance, a whole window
whose level stays within 10 dB is line noise that switched on, not speech (speech
swings far more): it becomes the floor and the utterance ends. For a window after
an utterance, sound more than ``end_drop_db`` under its peak (its reverberation,
the background it came with) does not start a new one.

Boundaries come from the 5 ms block energies, not from the 10-30 ms webrtcvad
flags: the start walks back from the first speech frame over loud blocks (gaps up
to 80 ms, such as a fricative masked by noise for a moment or the quiet voicing
onset after an aspirated /t/, are stepped over; a click before the word is not),
and is moved past leading blocks far under the utterance's peak once that is
known; the end is the end of the last loud block.

How the caller feeds the recogniser (it then sees exactly a prefix of
``UtteranceEnded.audio``, missing only the final frame, which is hangover)::

    for event in endpointer.process(frame):
        if isinstance(event, SpeechStarted):
            asr.feed(event.preroll)            # runs up to the start of ``frame``
        else:
            asr.finish()
    if endpointer.in_speech:
        asr.feed(frame.samples)                # this frame too, when speech started in it

Frames are assumed contiguous (the telephony adapter conceals lost packets):
media time is the first frame's ``timestamp_ms`` plus the samples seen since.
Per ``frame_ms`` of audio the cost is one webrtcvad call and a handful of numpy
operations on the frame; there is no per-sample Python code.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import webrtcvad

from .config import VadConfig
from .frames import AudioFormatError, AudioFrame

__all__ = ["Endpointer", "SpeechStarted", "UtteranceEnded", "VadEvent"]

BLOCK_MS = 5  # resolution of the energy refinement (ms)
_DB_FULL_SCALE = 20.0 * math.log10(32768.0)  # dB of a full-scale int16 mean square
_SILENT_DBFS = -100.0  # level given to digital silence (dBFS)
_GAP_MS = 80  # quiet stretch (ms) the onset search steps over
_CLICK_MS = 30  # a loud run shorter than this (ms)...
_CLICK_GAP_MS = 40  # ...followed by this much quiet (ms) before the word is a click
_STATIONARY_DB = 10.0  # a noise window inside this level range is noise, not speech
_ONSET_MS = 600  # how far into an utterance the final start refinement looks (ms)
# The quietest frame of a noise window lies about 1 dB under the noise's mean level
# (white noise, 20 ms frames); the floor adds it back.
_MIN_BIAS = 10.0 ** (1.0 / 10.0)


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    """The caller started speaking.

    at_ms: media time (ms) when the detector became sure (the end of the webrtcvad
        frame that completed ``start_ms`` of speech); barge-in acts on it.
    start_ms: estimate (ms) of the first speech sample, from 5 ms block energies;
        UtteranceEnded.start_ms refines it.
    preroll: int16 audio from ``audio_start_ms`` (up to ``preroll_ms`` before
        ``start_ms``) to the start of the input frame that triggered the event, which
        the recogniser has not seen: feed it, then feed every input frame, this one
        included, while ``in_speech``. (With 20 ms input frames that frame ends at
        ``at_ms``.)
    audio_start_ms: media time (ms) of the first sample of ``preroll``.
    """

    at_ms: float
    start_ms: float
    preroll: np.ndarray = field(repr=False)
    audio_start_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class UtteranceEnded:
    """The utterance opened by the last :class:`SpeechStarted` is over.

    at_ms: media time (ms) when the end was declared (``end_ms + hangover_ms``
        rounded up to a frame, or the cut at ``max_utterance_ms``, or ``flush``).
    start_ms, end_ms: refined speech boundaries (ms, media time).
    audio: int16 samples from ``audio_start_ms`` to ``at_ms`` (for ``flush``: to the
        end of the audio received): preroll, speech and the trailing hangover.
    too_short: the speech lasted less than ``min_utterance_ms`` (a click, a cough):
        not worth recognising, but it still closes the SpeechStarted.
    truncated: cut at ``max_utterance_ms``, or by ``flush``, before the hangover ran out.
    audio_start_ms: media time (ms) of ``audio[0]``.
    """

    at_ms: float
    start_ms: float
    end_ms: float
    audio: np.ndarray = field(repr=False)
    too_short: bool = False
    truncated: bool = False
    audio_start_ms: float = 0.0

    @property
    def duration_ms(self) -> float:
        """Length of the speech itself, ``end_ms - start_ms`` (ms)."""
        return self.end_ms - self.start_ms


VadEvent = SpeechStarted | UtteranceEnded


def _db(mean_square: float) -> float:
    """Level of a mean square of int16 samples, in dBFS."""
    if mean_square <= 0.0:
        return _SILENT_DBFS
    return max(10.0 * math.log10(mean_square) - _DB_FULL_SCALE, _SILENT_DBFS)


def _mean_square(db: float) -> float:
    """Inverse of :func:`_db`."""
    return 10.0 ** ((db + _DB_FULL_SCALE) / 10.0)


class Endpointer:
    """Streaming endpointer for one call's incoming audio (one instance per call).

    config: thresholds and durations (:class:`~voicebot.config.VadConfig`).
    sample_rate: rate of the frames it will be given, 8000 or 16000 Hz.
    """

    def __init__(self, config: VadConfig | None = None, sample_rate: int = 8000) -> None:
        cfg = config if config is not None else VadConfig()
        _check_config(cfg, sample_rate)
        self.config = cfg
        self.sample_rate = sample_rate
        self._frame_ms = cfg.frame_ms
        self._n = sample_rate * cfg.frame_ms // 1000  # samples per webrtcvad frame
        self._blk = sample_rate * BLOCK_MS // 1000  # samples per energy block
        self._nblk = self._n // self._blk
        self._ms_per_sample = 1000.0 / sample_rate
        # Start rule: `need` speech frames among the last `window` frames (a majority).
        self._need = max(1, math.ceil(cfg.start_ms / cfg.frame_ms))
        self._window = 2 * self._need - 1
        self._window_mask = (1 << self._window) - 1
        self._noise_frames = max(1, cfg.noise_window_ms // cfg.frame_ms)
        self._hang = sample_rate * cfg.hangover_ms // 1000  # samples
        self._max_len = sample_rate * cfg.max_utterance_ms // 1000  # samples
        self._min_level_ms = _mean_square(cfg.min_level_dbfs)
        self._blk_ratio = 10.0 ** (cfg.energy_margin_db / 10.0)
        self._frm_ratio = 10.0 ** (cfg.frame_margin_db / 10.0)
        self._onset_frames = _ONSET_MS // cfg.frame_ms
        self._stationary_ratio = 10.0 ** (_STATIONARY_DB / 10.0)
        self._gap_blocks = _GAP_MS // BLOCK_MS + 1
        self._kernel = np.full(20 // BLOCK_MS, BLOCK_MS / 20.0)  # 20 ms moving average
        self._drop_ratio = 10.0 ** (-cfg.end_drop_db / 10.0)
        # Audio kept for preroll and the onset search (samples).
        self._keep = sample_rate * (cfg.preroll_ms + self._window * cfg.frame_ms + 100) // 1000
        # Block energies kept for the boundary searches: the start window and preroll
        # at speech-start, the hangover at the end (frames).
        self._keep_frames = 2 + max(self._window + cfg.preroll_ms // cfg.frame_ms,
                                    -(-cfg.hangover_ms // cfg.frame_ms) + 1)
        self._vad = webrtcvad.Vad(cfg.aggressiveness)
        self.reset()

    # -- public API ---------------------------------------------------------------------

    @property
    def in_speech(self) -> bool:
        """True between a SpeechStarted and its UtteranceEnded."""
        return self._in_speech

    @property
    def noise_floor_dbfs(self) -> float:
        """Current estimate of the line's noise level (dBFS, frame mean square)."""
        return _db(self._floor)

    def reset(self) -> None:
        """Forget everything: the next frame starts a new stream (a new call)."""
        self._t0: float | None = None
        self._received = 0  # samples received so far
        self._done = 0  # samples analysed so far (whole webrtcvad frames)
        self._pending = np.zeros(0, dtype=np.int16)
        self._current = self._pending  # the input frame being processed
        self._history: deque[tuple[int, np.ndarray]] = deque()  # (first sample, chunk)
        self._history_len = 0
        self._blocks: deque[tuple[int, np.ndarray]] = deque()  # (first sample, block energies)
        # Frame mean squares of recent non-speech audio; the floor is their minimum.
        self._noise: deque[float] = deque(maxlen=self._noise_frames)
        # Frame mean squares of every frame of the utterance's last noise window.
        self._recent: deque[float] = deque(maxlen=self._noise_frames)
        self._floor = 0.0  # noise floor (mean square of int16 samples)
        self._mask = 0  # start window, newest frame in bit 0
        self._in_speech = False
        self._utt_chunks: list[np.ndarray] = []
        self._utt_audio_start = 0  # sample index of the first sample of the utterance audio
        self._utt_start = 0  # refined start (sample index)
        self._last_loud = 0  # end of the last frame with speech energy (sample index)
        self._prev_end = 0  # refined end of the previous utterance (sample index)
        self._echo = 0.0  # level (mean square) the previous utterance still masks...
        self._echo_until = 0  # ...up to this sample index
        self._utt_peak = 0.0  # loudest 5 ms block (mean square) of the utterance
        self._last_voiced = 0  # end of the last webrtcvad-voiced loud frame (sample index)
        # Block energies from the estimated start on (the first _ONSET_MS of the utterance).
        self._onset: list[np.ndarray] = []

    def process(self, frame: AudioFrame) -> list[VadEvent]:
        """Analyse one frame of any length; return the events it caused, in time order."""
        if frame.sample_rate != self.sample_rate:
            raise AudioFormatError(
                f"Endpointer set up for {self.sample_rate} Hz got a {frame.sample_rate} Hz "
                "frame; make one Endpointer per stream rate"
            )
        x = frame.samples
        if self._t0 is None:
            self._t0 = frame.timestamp_ms
        if len(x) == 0:
            return []
        self._remember(x)
        self._current = x
        if self._in_speech:
            self._utt_chunks.append(x)
        n = self._n
        events: list[VadEvent] = []
        if len(self._pending) == 0 and len(x) == n:
            ev = self._step(x)
            if ev is not None:
                events.append(ev)
            return events
        buf = np.concatenate((self._pending, x)) if len(self._pending) else x
        usable = len(buf) - len(buf) % n
        for i in range(0, usable, n):
            ev = self._step(buf[i : i + n])
            if ev is not None:
                events.append(ev)
        self._pending = buf[usable:].copy()
        return events

    def flush(self, at_ms: float | None = None) -> list[VadEvent]:
        """End the utterance in progress (the call ended); [] when none is.

        at_ms: media time (ms) of the end; default: the end of the audio received.
        The audio of the event runs to the end of the audio received.
        """
        if not self._in_speech:
            return []
        at = self._time(self._received) if at_ms is None else float(at_ms)
        return [self._end(self._received, at, truncated=True)]

    # -- internals ----------------------------------------------------------------------

    def _time(self, sample_index: int) -> float:
        """Media time (ms) of a sample index."""
        return (self._t0 or 0.0) + sample_index * self._ms_per_sample

    def _remember(self, x: np.ndarray) -> None:
        """Keep the last ``_keep`` samples for preroll."""
        self._history.append((self._received, x))
        self._received += len(x)
        self._history_len += len(x)
        while self._history_len - len(self._history[0][1]) >= self._keep:
            self._history_len -= len(self._history.popleft()[1])

    def _audio(self, begin: int, end: int) -> np.ndarray:
        """Samples [begin, end) from the history (clipped to what is kept)."""
        parts = [c for s, c in self._history if s < end and s + len(c) > begin]
        if not parts:
            return np.zeros(0, dtype=np.int16)
        first = next(s for s, c in self._history if s < end and s + len(c) > begin)
        joined = np.concatenate(parts)
        return joined[max(0, begin - first) : end - first].copy()

    def _step(self, x: np.ndarray) -> VadEvent | None:
        """One webrtcvad frame ``x`` (``_n`` samples) starting at sample ``self._done``."""
        pos = self._done
        self._done = end = pos + self._n
        xf = x.astype(np.float32).reshape(self._nblk, self._blk)
        blocks = np.einsum("ij,ij->i", xf, xf) / self._blk  # mean square per 5 ms block
        loudest = float(blocks.max())
        mean = float(blocks.mean())
        voiced = self._vad.is_speech(x.tobytes(), self.sample_rate)
        self._blocks.append((pos, blocks))
        if len(self._blocks) > self._keep_frames:
            self._blocks.popleft()
        floor = self._floor if self._noise else mean * _MIN_BIAS
        thr_blk = max(floor * self._blk_ratio, self._min_level_ms)
        thr_frm = max(floor * self._frm_ratio, self._min_level_ms)

        if not self._in_speech:
            self._track_floor(mean)
            if end <= self._echo_until:
                # For a noise window after an utterance, sound more than end_drop_db below
                # its peak is its reverberation or the background it was recorded in (that
                # the noise floor has not yet learnt), not a new utterance.
                thr_blk = max(thr_blk, self._echo)
                thr_frm = max(thr_frm, self._echo)
            candidate = voiced and (loudest > thr_blk or mean > thr_frm)
            self._mask = ((self._mask << 1) | candidate) & self._window_mask
            if self._mask.bit_count() >= self._need:
                return self._start(end, thr_blk, thr_frm)
            return None

        peak_thr = self._utt_peak * self._drop_ratio
        loud = loudest > max(thr_blk, peak_thr) or mean > max(thr_frm, peak_thr)
        speech = loud and (voiced or end - self._last_voiced <= self._hang)
        if speech:
            if voiced:
                self._last_voiced = end
            if loudest > self._utt_peak:
                self._utt_peak = loudest
            self._last_loud = end
        if len(self._onset) < self._onset_frames:
            self._onset.append(blocks)
        self._check_stationary(mean)
        if not speech:
            self._track_floor(mean)
            if end - self._last_loud >= self._hang:
                return self._end(end, self._time(end))
        if end - self._utt_start >= self._max_len:
            return self._end(end, self._time(end), truncated=True)
        return None

    def _track_floor(self, mean: float) -> None:
        """Minimum statistics: the floor is the quietest recent non-speech frame.

        A weak fricative of a few hundred ms cannot lift it; a louder line is learnt
        within ``noise_window_ms``, a quieter one at once.
        """
        noise = self._noise
        if len(noise) == noise.maxlen and noise[0] * _MIN_BIAS == self._floor:
            noise.append(mean)
            self._floor = min(noise) * _MIN_BIAS
        else:
            noise.append(mean)
            if mean * _MIN_BIAS < self._floor or len(noise) == 1:
                self._floor = mean * _MIN_BIAS

    def _check_stationary(self, mean: float) -> None:
        """Inside an utterance: a whole noise window without a dip is noise, not speech.

        Speech swings by far more than _STATIONARY_DB within a second (syllables,
        closures, pauses); a line whose noise switched on after digital silence does
        not. Then that level becomes the floor, and the "utterance" ends.
        """
        recent = self._recent
        recent.append(mean)
        if len(recent) == recent.maxlen:
            low = min(recent)
            if max(recent) < low * self._stationary_ratio and low * _MIN_BIAS > self._floor:
                self._noise = deque(recent, maxlen=self._noise_frames)
                self._floor = low * _MIN_BIAS

    def _history_blocks(self) -> tuple[int, np.ndarray]:
        """Recent block energies as one array, and the sample index of its first block."""
        return self._blocks[0][0], np.concatenate([b for _, b in self._blocks])

    def _loud_blocks(self, energies: np.ndarray, thr_blk: float, thr_frm: float) -> np.ndarray:
        """Blocks that carry speech energy: loud alone, or above the frame threshold in a
        20 ms neighbourhood that is too (weak fricatives in noise). A quiet block next
        to a loud one does not count: edges stay where they are."""
        smooth = np.convolve(energies, self._kernel, mode="same")
        return (energies > thr_blk) | ((smooth > thr_frm) & (energies > thr_frm))

    def _start(self, end: int, thr_blk: float, thr_frm: float) -> SpeechStarted:
        """Open an utterance decided at sample ``end``; find where it began."""
        base, energies = self._history_blocks()
        loud = self._loud_blocks(energies, thr_blk, thr_frm)
        # The oldest speech frame in the start window, then back over loud blocks: a gap
        # of up to _GAP_MS does not stop the walk (the quiet voice onset between an
        # aspirated /t/ and its vowel, a fricative masked by noise for a moment), but a
        # click (a run under _CLICK_MS before a gap of over _CLICK_GAP_MS) is not speech.
        oldest = self._mask.bit_length() - 1
        first = max(0, (end - (oldest + 1) * self._n - base) // self._blk)
        idx = np.flatnonzero(loud[: first + self._nblk])
        i = first
        if len(idx):
            gaps = np.flatnonzero(np.diff(idx) > self._gap_blocks)
            idx = idx[gaps[-1] + 1 :] if len(gaps) else idx
            breaks = np.flatnonzero(np.diff(idx) > _CLICK_GAP_MS // BLOCK_MS)
            while len(breaks) and breaks[0] + 1 < _CLICK_MS // BLOCK_MS:
                idx = idx[breaks[0] + 1 :]
                breaks = breaks[1:] - (breaks[0] + 1)
            i = int(idx[0])
        # Never reach back into the previous utterance.
        start = max(base + i * self._blk, self._prev_end)
        audio_start = max(start - self.sample_rate * self.config.preroll_ms // 1000,
                          self._received - self._history_len, self._prev_end)
        # The preroll runs to the start of the current input frame: the caller feeds
        # that frame itself, like every frame while in_speech.
        frame_start = self._received - len(self._current)
        preroll = self._audio(audio_start, max(audio_start, frame_start))
        self._in_speech = True
        self._mask = 0
        self._recent.clear()
        self._utt_chunks = [preroll, self._current[max(0, audio_start - frame_start) :]]
        self._utt_audio_start = audio_start
        self._utt_start = start
        self._last_loud = end
        self._last_voiced = end
        self._onset = [energies[i:]]
        self._utt_peak = float(energies[i:].max()) if i < len(energies) else 0.0
        return SpeechStarted(self._time(end), self._time(start), preroll, self._time(audio_start))

    def _end(self, end: int, at_ms: float, truncated: bool = False) -> UtteranceEnded:
        """Close the utterance at sample ``end`` (declared at media time ``at_ms``)."""
        joined = np.concatenate(self._utt_chunks)
        audio = joined[: end - self._utt_audio_start].copy()
        peak_thr = self._utt_peak * self._drop_ratio
        floor = self._floor
        thr_blk = max(floor * self._blk_ratio, self._min_level_ms, peak_thr)
        thr_frm = max(floor * self._frm_ratio, self._min_level_ms, peak_thr)
        # The end: the last loud block up to the last loud frame.
        base, energies = self._history_blocks()
        upto = min(max(0, (self._last_loud - base) // self._blk), len(energies))
        loud = np.flatnonzero(self._loud_blocks(energies, thr_blk, thr_frm)[:upto])
        utt_end = self._last_loud
        if len(loud) and base + int(loud[-1] + 1) * self._blk > self._utt_start:
            utt_end = base + int(loud[-1] + 1) * self._blk
        # The walk-back at speech-start only knew the onset's level; with the utterance's
        # peak known, leading blocks more than end_drop_db below it are not speech either.
        onset = np.concatenate(self._onset)
        lead = np.flatnonzero(np.convolve(onset, self._kernel, mode="same") > peak_thr)
        if len(lead):
            self._utt_start = min(self._utt_start + int(lead[0]) * self._blk, utt_end)
        self._prev_end = utt_end
        self._echo = peak_thr
        self._echo_until = end + self._noise_frames * self._n
        start_ms = self._time(self._utt_start)
        end_ms = self._time(utt_end)
        self._in_speech = False
        self._utt_chunks = []
        self._mask = 0
        return UtteranceEnded(
            at_ms=at_ms,
            start_ms=start_ms,
            end_ms=end_ms,
            audio=audio,
            too_short=end_ms - start_ms < self.config.min_utterance_ms,
            truncated=truncated,
            audio_start_ms=self._time(self._utt_audio_start),
        )


def _check_config(cfg: VadConfig, sample_rate: int) -> None:
    """Refuse settings webrtcvad or the endpointer cannot work with, naming the field."""
    if sample_rate not in (8000, 16000):
        raise ValueError(f"Endpointer: sample_rate {sample_rate} Hz; use 8000 or 16000")
    if cfg.aggressiveness not in (0, 1, 2, 3):
        raise ValueError(f"vad.aggressiveness = {cfg.aggressiveness}; must be 0, 1, 2 or 3")
    if cfg.frame_ms not in (10, 20, 30):
        raise ValueError(f"vad.frame_ms = {cfg.frame_ms}; webrtcvad takes 10, 20 or 30 ms")
    for name in ("start_ms", "hangover_ms", "preroll_ms", "min_utterance_ms",
                 "energy_margin_db", "frame_margin_db", "end_drop_db"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"vad.{name} = {getattr(cfg, name)}; must be 0 or more")
    if cfg.noise_window_ms < cfg.frame_ms:
        raise ValueError(
            f"vad.noise_window_ms = {cfg.noise_window_ms}; must be at least vad.frame_ms"
        )
    if cfg.max_utterance_ms <= cfg.hangover_ms:
        raise ValueError(
            f"vad.max_utterance_ms = {cfg.max_utterance_ms}; must exceed vad.hangover_ms"
        )
