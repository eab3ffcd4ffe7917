"""Audio core cost per frame, Vosk real-time factor, model and recogniser memory.

Everything here runs in the benchmark's own process on the real components: the
receive path is a real :class:`~voicebot.session.CallSession` (DTMF detector,
endpointer, Vosk feed, classifier, dialog engine on its worker thread), fed 20 ms
frames of espeak-ng Korean speech and DTMF tones as a call would be.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import numpy as np

from ..asr import Recognizer, grammar_phrases
from ..dtmf import DtmfDetector, generate
from ..frames import AudioFrame, add_noise, resample, samples_per_frame, silence, split_frames
from ..session import VoiceCore
from ..vad import Endpointer
from .common import IN_HOURS, CallerVoice, Utterance, rss_mb, summary

KO = "ko"


def korean_utterances(core: VoiceCore, voice: CallerVoice, limit: int, rate: int = 8000,
                      node: str | None = None) -> list[Utterance]:
    """Keywords and training phrases of the Korean pack, spoken by espeak-ng."""
    pack = core.grammars.packs[KO]
    texts: list[str] = []
    nodes = [node] if node else list(core.grammars.menu.nodes)
    for nid in nodes:
        for o in core.grammars.menu.node(nid).options:
            ow = pack.options.get(o.id)
            if ow is None:
                continue
            texts.extend(ow.keywords)
            texts.extend(ow.phrases[:3])
    seen: set[str] = set()
    texts = [t for t in texts if not (t in seen or seen.add(t))][:limit]
    return [voice.say(t, pack.voice, rate) for t in texts]


def model_memory(core: VoiceCore) -> dict[str, Any]:
    """Load time and resident memory of the Korean model (measured around its first load)."""
    name = core.grammars.packs[KO].asr_model
    gc.collect()
    before = rss_mb()
    t0 = time.perf_counter()
    core.models.get(name)
    load_s = time.perf_counter() - t0
    after = rss_mb()
    return {"model": name, "load_s": round(load_s, 2), "rss_before_mb": round(before, 1),
            "rss_after_mb": round(after, 1), "rss_mb": round(after - before, 1),
            "already_loaded": load_s < 0.05}


def _heap_mb() -> float:
    """Heap bytes in use (MB), all malloc arenas: unlike RSS, blind to freed memory reused."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        # ctypes wants a list of (name, type) here.
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    try:
        f = libc.mallinfo2
    except AttributeError:  # not glibc >= 2.33: fall back on RSS
        return rss_mb()
    f.restype = MallInfo2
    m = f()
    return (m.uordblks + m.hblkhd) / 2**20


def recognizer_memory(core: VoiceCore, utts: list[Utterance], count: int) -> dict[str, Any]:
    """Resident memory each extra recogniser costs, grammar mode and free mode (MB)."""
    name = core.grammars.packs[KO].asr_model
    model = core.models.get(name)
    pack = core.grammars.packs[KO]
    phrases = grammar_phrases(pack, [o.id for o in core.grammars.menu.node("main").options],
                              True, core.models.has_unk(name))
    out: dict[str, Any] = {"recognizers": count, "measure": "glibc mallinfo2 bytes in use"}
    for mode in ("grammar", "free"):
        gc.collect()
        before = _heap_mb()
        recs = []
        for i in range(count):
            r = Recognizer(model, 8000, core.models.has_unk(name))
            r.set_grammar(phrases if mode == "grammar" else None)
            # Decoding state grows with the first utterance: feed one, as a live call has.
            r.accept(utts[i % len(utts)].audio)
            r.partial()
            recs.append(r)
        out[f"{mode}_mb_per_recognizer"] = round((_heap_mb() - before) / count, 2)
        del recs
        gc.collect()
    return out


def asr_rtf(core: VoiceCore, voice: CallerVoice, limit: int) -> dict[str, Any]:
    """Vosk real-time factor: CPU wall time to decode / audio duration, in 20 ms feeds."""
    name = core.grammars.packs[KO].asr_model
    model = core.models.get(name)
    pack = core.grammars.packs[KO]
    main = [o.id for o in core.grammars.menu.node("main").options]
    phrases = grammar_phrases(pack, main, True, core.models.has_unk(name))
    base = korean_utterances(core, voice, limit, 8000, node="main")
    out: dict[str, Any] = {"utterances": len(base)}
    for rate in (8000, 16000):
        utts = [a.audio if rate == 8000 else resample(a.audio, 8000, rate) for a in base]
        for mode in ("grammar", "free"):
            rec = Recognizer(model, rate, core.models.has_unk(name))
            rec.set_grammar(phrases if mode == "grammar" else None)
            n = samples_per_frame(rate)
            audio_s = 0.0
            busy = 0.0
            finals: list[float] = []
            for a in utts:
                padded = np.concatenate([silence(200, rate), a, silence(200, rate)])
                t0 = time.perf_counter()
                for i in range(0, len(padded), n):
                    rec.accept(padded[i:i + n])
                res = rec.finish()
                busy += time.perf_counter() - t0
                finals.append(res.finalize_ms)
                audio_s += len(padded) / rate
            out[f"{mode}_{rate // 1000}k"] = {
                "rtf": round(busy / audio_s, 4), "audio_s": round(audio_s, 1),
                "finalize_ms": summary(finals, 2)}
    return out


def _call_audio(core: VoiceCore, voice: CallerVoice, rate: int, seconds: float,
                rng: np.random.Generator) -> np.ndarray:
    """A caller's side of a busy call: Korean speech, pauses, now and then a key, line noise."""
    utts = korean_utterances(core, voice, 40, rate)
    parts: list[np.ndarray] = []
    total = 0
    i = 0
    while total < seconds * rate:
        if i % 5 == 4:
            parts.append(generate(str(rng.integers(0, 10)), rate, 100, 100))
        else:
            parts.append(utts[i % len(utts)].audio)
        parts.append(silence(float(rng.integers(600, 1500)), rate))
        total += sum(len(p) for p in parts[-2:])
        i += 1
    return add_noise(np.concatenate(parts), 30.0, rng)


def frame_cost(core: VoiceCore, voice: CallerVoice, seconds: float, rate: int = 8000
               ) -> dict[str, Any]:
    """Per-frame cost of the receive path and of its stages alone (µs per 20 ms frame).

    receive_path: the call session's own per-frame timer (DTMF + VAD + Vosk feed + whatever
    the frame triggers: finalisation, classification, the dialog engine) on its worker
    thread, while the bot plays its prompts as on a call.
    """
    rng = np.random.default_rng(4)
    audio = _call_audio(core, voice, rate, seconds, rng)
    frames = list(split_frames(audio, rate))
    n = samples_per_frame(rate)
    session = core.session("bench-frame-cost", rate)
    try:
        session.start(IN_HOURS, KO)
        session.drain()
        for f in frames:
            session.pull_audio(n)
            session.push_audio(f)
            session.drain()
    finally:
        session.close()
    path_us = list(session.stats.frame_cost_us)

    def timed(fn: Any, items: list[Any]) -> list[float]:
        out = []
        for it in items:
            t0 = time.perf_counter_ns()
            fn(it)
            out.append((time.perf_counter_ns() - t0) / 1000.0)
        return out

    vad = Endpointer(core.cfg.vad, rate)
    vad_us = timed(vad.process, frames)
    det = DtmfDetector(rate, core.cfg.dtmf)
    dtmf_us = timed(det.process, frames)
    other = 16000 if rate == 8000 else 8000
    up_us = timed(lambda f: resample(f.samples, rate, other), frames)
    # Vosk feed alone: speech frames only (silence is not fed on the real path).
    name = core.grammars.packs[KO].asr_model
    rec = Recognizer(core.models.get(name), rate, core.models.has_unk(name))
    rec.set_grammar(grammar_phrases(core.grammars.packs[KO],
                                    [o.id for o in core.grammars.menu.node("main").options],
                                    True, core.models.has_unk(name)))
    speech = [f for f in frames if float(np.abs(f.samples).max()) > 2000][:3000]
    feed_us = timed(lambda f: rec.accept(f.samples), speech)
    rec.finish()
    return {
        "sample_rate": rate, "frames": len(frames), "audio_s": round(len(audio) / rate, 1),
        "receive_path_us": summary(path_us, 1),
        "vad_us": summary(vad_us, 1), "dtmf_us": summary(dtmf_us, 1),
        f"resample_{rate // 1000}k_to_{other // 1000}k_us": summary(up_us, 1),
        "asr_feed_speech_frame_us": summary(feed_us, 1),
        "turns": len(session.turns),
        "session_asr_finalize_ms": summary(session.stats.asr_finalize_ms, 2),
        "session_decision_ms": summary(session.stats.decision_ms, 2),
        "_raw": {"receive_path_us": path_us},
    }


def endpointing_wait(core: VoiceCore, utts: list[Utterance]) -> list[float]:
    """Media time (ms) from the refined end of speech to the endpointer's decision."""
    out: list[float] = []
    for u in utts:
        ep = Endpointer(core.cfg.vad, u.rate)
        audio = np.concatenate([silence(400, u.rate), u.audio, silence(1500, u.rate)])
        for f in split_frames(audio, u.rate):
            for ev in ep.process(AudioFrame(f.samples, u.rate, f.timestamp_ms)):
                if type(ev).__name__ == "UtteranceEnded" and not ev.too_short:  # type: ignore
                    out.append(ev.at_ms - ev.end_ms)  # type: ignore[attr-defined]
    return out
