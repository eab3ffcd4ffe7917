"""Speech recognition with Vosk: models shared per host, one recogniser per call.

A ``vosk.Model`` is large (the Korean small model is about 500 MB resident) and
read-only once loaded, so :class:`ModelStore` loads each model once per process
and every call's :class:`Recognizer` shares it. Recognisers are cheap and hold
one call's decoding state.

At a menu the recogniser runs in grammar mode: its language model is a small
bigram model over the node's keywords, the pack's decoy words, and "[unk]" where
the model's vocabulary has it. Vosk's Korean model has no "[unk]", so without
decoys any speech would be forced onto the nearest keyword; decoys give
out-of-grammar speech somewhere else to go, and the intent classifier treats them
as out of scope. Free mode (the model's full language model) serves open phrases.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .config import Config
from .menus import Menu, Pack, normalize_text
from .models import ModelLocation, explicit_problem, fix_hint, resolve

log = logging.getLogger(__name__)

UNK = "[unk]"


@dataclass(frozen=True)
class Word:
    """One recognised word: text, confidence 0..1, start/end in seconds of fed audio."""

    word: str
    conf: float
    start: float
    end: float


@dataclass(frozen=True)
class AsrResult:
    """A final recognition result.

    text: the words, space-separated ("" when nothing was recognised).
    words: per-word detail; confidence: mean word confidence (0 when no words).
    audio_ms: audio fed for this utterance (ms); finalize_ms: wall time FinalResult took.
    """

    text: str
    words: tuple[Word, ...]
    confidence: float
    audio_ms: float
    finalize_ms: float


class ModelStore:
    """Loads each Vosk model once per process and hands the same object to every call."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._models: dict[str, object] = {}
        self._unk: dict[str, bool] = {}
        self._lock = threading.Lock()
        self._locations: dict[str, ModelLocation | None] = {}
        self.load_seconds: dict[str, float] = {}

    def location(self, name: str) -> ModelLocation | None:
        if name not in self._locations:
            self._locations[name] = resolve(self.cfg, name)
        return self._locations[name]

    def available(self, name: str) -> bool:
        return self.location(name) is not None

    def get(self, name: str) -> object:
        """The loaded ``vosk.Model``; loads it on first use (thread-safe)."""
        with self._lock:
            model = self._models.get(name)
            if model is not None:
                return model
            loc = self.location(name)
            if loc is None:
                from .errors import ModelMissing

                raise ModelMissing(f"ASR model {name} is not installed; {fix_hint(self.cfg, name)}")
            import vosk

            vosk.SetLogLevel(-1)
            t0 = time.perf_counter()
            model = vosk.Model(str(loc.path))
            self.load_seconds[name] = time.perf_counter() - t0
            self._unk[name] = model.vosk_model_find_word(UNK) >= 0
            self._models[name] = model
            log.info("loaded ASR model %s from %s (%s) in %.1f s", name, loc.path, loc.source,
                     self.load_seconds[name])
            return model

    def has_unk(self, name: str) -> bool:
        self.get(name)
        return self._unk[name]

    def loaded(self) -> list[str]:
        return list(self._models)

    def speech_languages(self, packs: Iterable[Pack]) -> frozenset[str]:
        """Languages whose pack's model is installed."""
        return frozenset(p.language for p in packs if self.available(p.asr_model))

    def missing_report(self, packs: Iterable[Pack]) -> list[str]:
        """One line per pack whose model is missing, with the command that fixes it."""
        lines = []
        for p in packs:
            if self.available(p.asr_model):
                continue
            problem = explicit_problem(self.cfg, p.asr_model)
            lines.append(
                f"{p.language} ({p.name}): ASR model {p.asr_model} is not installed, so this "
                f"language runs by DTMF only. {problem + '. ' if problem else ''}"
                f"To fix, {fix_hint(self.cfg, p.asr_model)}"
            )
        return lines


def grammar_phrases(pack: Pack, option_ids: Iterable[str], with_decoys: bool = True,
                    has_unk: bool = False) -> list[str]:
    """The phrases of a node's grammar, as the ASR model spells them."""
    phrases: list[str] = []
    for oid in option_ids:
        ow = pack.options.get(oid)
        if ow is None:
            continue
        phrases.extend(ow.asr_phrase(k) for k in ow.keywords)
    if with_decoys:
        phrases.extend(normalize_text(d) for d in pack.decoys)
    if has_unk:
        phrases.append(UNK)
    seen: set[str] = set()
    return [p for p in phrases if not (p in seen or seen.add(p))]


@dataclass(frozen=True)
class MissingWord:
    where: str  # options."main.info".keywords or asr.decoys
    phrase: str
    word: str


def vocabulary_report(model: object, pack: Pack, menu: Menu) -> list[MissingWord]:
    """Keywords and decoys whose words are not in the model's vocabulary.

    Vosk silently drops such words from a grammar, so a keyword that is missing here
    can never be recognised; give it an ``asr_words`` spelling the model knows.
    """
    missing: list[MissingWord] = []
    find = model.vosk_model_find_word  # type: ignore[attr-defined]
    for o in menu.all_options():
        ow = pack.options.get(o.id)
        if ow is None:
            continue
        for k in ow.keywords:
            phrase = ow.asr_phrase(k)
            for w in phrase.split():
                if find(w) < 0:
                    missing.append(MissingWord(f'options."{o.id}".keywords', k, w))
    for d in pack.decoys:
        for w in normalize_text(d).split():
            if find(w) < 0:
                missing.append(MissingWord("asr.decoys", d, w))
    return missing


class Recognizer:
    """One call's streaming recogniser for one language.

    Not thread-safe: one call's worker thread owns it. The grammar may only change
    between utterances (Vosk refuses while decoding), which is when menus change.
    """

    def __init__(self, model: object, sample_rate: int, has_unk: bool = False) -> None:
        import vosk

        self.sample_rate = sample_rate
        self.has_unk = has_unk
        self._model = model
        self._rec = vosk.KaldiRecognizer(model, float(sample_rate))
        self._rec.SetWords(True)
        self._grammar: tuple[str, ...] | None = None  # None: free mode
        self._fed = 0
        self.grammar_switch_ms: list[float] = []

    @property
    def grammar(self) -> tuple[str, ...] | None:
        return self._grammar

    def set_grammar(self, phrases: Sequence[str] | None) -> None:
        """Restrict to ``phrases`` (grammar mode) or None for free mode; no-op when unchanged."""
        new = tuple(phrases) if phrases is not None else None
        if new == self._grammar:
            return
        if self._fed:
            # Vosk aborts on a grammar change mid-utterance; drop the unfinished audio.
            self.reset()
        t0 = time.perf_counter()
        self._rec.SetGrammar(json.dumps(list(new), ensure_ascii=False) if new else "[]")
        self.grammar_switch_ms.append((time.perf_counter() - t0) * 1000)
        self._grammar = new

    def accept(self, samples: np.ndarray) -> None:
        """Feed int16 mono audio at ``sample_rate`` (any length; 20 ms frames normally)."""
        self._rec.AcceptWaveform(samples.astype("<i2", copy=False).tobytes())
        self._fed += len(samples)

    def partial(self) -> str:
        """The current partial hypothesis (text so far)."""
        return str(json.loads(self._rec.PartialResult()).get("partial", ""))

    def finish(self) -> AsrResult:
        """End the utterance and return the final result; the recogniser is ready again."""
        t0 = time.perf_counter()
        raw = json.loads(self._rec.FinalResult())
        finalize_ms = (time.perf_counter() - t0) * 1000
        words = tuple(Word(w["word"], float(w.get("conf", 1.0)), float(w.get("start", 0.0)),
                           float(w.get("end", 0.0)))
                      for w in raw.get("result", []) if w.get("word") != UNK)
        audio_ms = 1000.0 * self._fed / self.sample_rate
        self._fed = 0
        text = " ".join(w.word for w in words)
        conf = float(np.mean([w.conf for w in words])) if words else 0.0
        return AsrResult(text, words, conf, audio_ms, finalize_ms)

    def reset(self) -> None:
        """Drop any audio fed since the last result."""
        self._rec.Reset()
        self._fed = 0
