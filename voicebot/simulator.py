"""Calls on audio, without telephony: the real voice core driven by a scripted caller.

The simulator plays the part of the phone line. Every 20 ms of media time it
pulls the bot's audio, pushes the caller's audio (in-band DTMF tones, espeak-ng
speech in the call's language, or a recording), and waits for the call's worker
to catch up, so a call runs faster than real time and replays exactly.

The caller answers each prompt after it ends (or, with barge-in, while it
plays), one input per turn, and hangs up once the reply to its last input has
been said.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .dialog import Action, CallerHungUp, Transfer, TransferFailed, Turn
from .dtmf import DTMF_KEYS, generate
from .frames import AudioFrame, read_audio, samples_per_frame, silence, write_wav
from .menus import normalize_text
from .session import CallSession, PlayedPrompt, VoiceCore
from .store import Store
from .tts import PromptCache

TICK_MS = 20
CALLER_RATE_WPM = 150
CALLER_LEVEL_DBFS = -20.0


@dataclass(frozen=True)
class CallerInput:
    """One caller turn. kind: press (value = keys), say (text), say_wav (path), silent,
    hangup (the caller hangs up as soon as its previous input has been sent)."""

    kind: str
    value: str = ""

    def describe(self) -> str:
        return {"press": f"presses {self.value}", "say": f"says {self.value!r}",
                "say_wav": f"plays {self.value}", "silent": "stays silent",
                "hangup": "hangs up"}[self.kind]


@dataclass
class SimResult:
    turns: list[Turn]
    played: list[PlayedPrompt]
    caller: list[tuple[float, str]]
    result: str
    duration_ms: float
    language: str | None
    recording: Path | None = None
    notes: list[str] = field(default_factory=list)
    language_by: str = ""  # key, name or detected (issue 12); "" when preset or none


class Simulator:
    """One simulated call.

    at: wall-clock time of the call (sets working hours); language: start at its home menu.
    barge_in_ms: when set, the caller starts each input this long into the prompt instead
    of waiting for it to end. transfer_fails: the operator transfer fails (busy line);
    transfer_silent: the far end never answers the transfer request (a REFER lost).
    """

    def __init__(self, core: VoiceCore, inputs: Sequence[CallerInput], at: dt.datetime,
                 language: str | None = None, barge_in_ms: int | None = None,
                 transfer_fails: bool = False, sample_rate: int = 8000,
                 record: Path | None = None, reply_pause_ms: int = 400,
                 max_call_ms: int = 15 * 60 * 1000, store: Store | None = None,
                 caller: str = "simulator", transfer_silent: bool = False,
                 remember_settings: bool = False) -> None:
        self.core = core
        self.inputs = list(inputs)
        self.at = at
        self.language = language
        self.barge_in_ms = barge_in_ms
        self.transfer_fails = transfer_fails
        self.transfer_silent = transfer_silent
        self.rate = sample_rate
        self.record = record
        self.reply_pause_ms = reply_pause_ms
        self.max_call_ms = max_call_ms
        # With a store the call is recorded like a real one (calls, turns, tickets,
        # callbacks) and the status menu reads applications from it.
        self.store = store
        self.caller = caller
        # Only a caller given as a real number (voicebot simulate --caller) has its controls
        # remembered: otherwise one run's "louder" would carry into every later run.
        self.remember_settings = remember_settings
        self._voice_cache = PromptCache(core.cfg.audio_dir / "cache" / "caller", sample_rate,
                                        CALLER_RATE_WPM, CALLER_LEVEL_DBFS)
        self._transferred = False
        for inp in self.inputs:
            self._validate(inp)

    def _validate(self, inp: CallerInput) -> None:
        if inp.kind == "press":
            bad = [k for k in inp.value if k.upper() not in DTMF_KEYS]
            if not inp.value or bad:
                raise ValueError(f"--press {inp.value!r}: not DTMF keys (use 0-9, *, #, A-D)")
        elif inp.kind == "say_wav":
            read_audio(inp.value, self.rate)  # fails early with the file name
        elif inp.kind == "say" and not inp.value.strip():
            raise ValueError("--say needs words; use --silent for a turn without input")

    # --- caller audio ---

    def _speech_language(self, text: str, current: str | None) -> str:
        """Which voice says ``text``: the call's language, else the pack it belongs to."""
        if current:
            return current
        norm = normalize_text(text)
        packs = self.core.grammars.packs
        for lang, pack in packs.items():
            if any(normalize_text(k) == norm for ow in pack.options.values()
                   for k in ow.keywords):
                return lang
        if re.search(r"[\uac00-\ud7a3]", text):
            return "ko" if "ko" in packs else self.core.cfg.languages.default
        if re.search(r"[\u0400-\u04ff]", text):
            return "ru" if "ru" in packs else self.core.cfg.languages.default
        return self.core.cfg.languages.default

    def caller_audio(self, inp: CallerInput, language: str | None) -> np.ndarray:
        """The caller's audio for one input, at the call's sample rate."""
        lead = silence(100, self.rate)
        if inp.kind == "press":
            tones = generate(inp.value.upper(), self.rate, on_ms=100, off_ms=100)
            return np.concatenate([lead, tones])
        if inp.kind == "say":
            lang = self._speech_language(inp.value, language)
            voice = self.core.grammars.packs[lang].voice
            return np.concatenate([lead, self._voice_cache.get(inp.value, voice)])
        if inp.kind == "say_wav":
            return np.concatenate([lead, read_audio(inp.value, self.rate)])
        return np.zeros(0, dtype=np.int16)

    # --- the call ---

    def _on_action(self, action: Action, session: CallSession) -> None:
        if isinstance(action, Transfer):
            if self.transfer_fails:
                session.post(TransferFailed(session.player.tx_ms, "busy"))
            elif not self.transfer_silent:
                self._transferred = True

    def run(self) -> SimResult:
        core = self.core
        n = samples_per_frame(self.rate, TICK_MS)
        holder: list[CallSession] = []
        call_id = f"sim-{uuid.uuid4().hex[:12]}" if self.store is not None else "sim"
        store = self.store
        if store is not None:
            store.call_started(call_id, None, self.caller, "simulate",
                               started_at=self.at.isoformat(timespec="milliseconds"))
        session = core.session(call_id, self.rate,
                               on_action=lambda a: self._on_action(a, holder[0]),
                               on_turn=(lambda t: store.add_turn(call_id, t)) if store else None,
                               store=store, caller=self.caller,
                               remember_settings=self.remember_settings)
        holder.append(session)
        tx_all: list[np.ndarray] = []
        rx_all: list[np.ndarray] = []
        caller_log: list[tuple[float, str]] = []
        pending = list(self.inputs)
        sending = np.zeros(0, dtype=np.int16)
        send_pos = 0
        # The caller's input is answered once the bot logs a turn for it (a decision, a
        # no-match, a no-input timeout); only then may the caller go on or hang up.
        turns_needed = 0
        waiting_since: float | None = None
        t = 0.0
        try:
            session.start(self.at, self.language)
            session.drain()
            while t < self.max_call_ms:
                tx_all.append(session.pull_audio(n))
                answered = len(session.turns) >= turns_needed
                if (pending and pending[0].kind == "hangup" and send_pos >= len(sending)
                        and (answered or session.engine.mode == "recording"
                             or not session.engine.accepting_input)):
                    caller_log.append((t, pending.pop(0).describe()))
                    break
                if (answered and pending and send_pos >= len(sending)
                        and self._caller_may_speak(session, t, waiting_since)):
                    inp = pending.pop(0)
                    caller_log.append((t, inp.describe()))
                    sending = self.caller_audio(inp, session.engine.language)
                    send_pos = 0
                    # A message being recorded is no turn: the next input (# or hang-up)
                    # follows it at once.
                    recording = session.engine.mode == "recording"
                    turns_needed = len(session.turns) + (0 if recording else 1)
                chunk = sending[send_pos:send_pos + n]
                send_pos += n
                if len(chunk) < n:
                    chunk = np.concatenate([chunk, np.zeros(n - len(chunk), np.int16)])
                rx_all.append(chunk)
                session.push_audio(AudioFrame(chunk, self.rate, t))
                session.drain()
                t += TICK_MS
                if session.ended.is_set() or self._transferred:
                    break
                waiting_since = (waiting_since or t) if session.waiting_for_input else None
                if (not pending and len(session.turns) >= turns_needed
                        and send_pos >= len(sending) and session.engine.mode != "recording"
                        and waiting_since is not None and t - waiting_since >= self.reply_pause_ms):
                    break  # the caller heard the answer to its last input and hangs up
            if not session.ended.is_set():
                session.post(CallerHungUp(t))
                session.drain()
        finally:
            session.close()
        if store is not None:
            store.call_ended(call_id, session.result or session.engine.outcome,
                             session.engine.language, None, "caller",
                             language_by=session.engine.language_by)
        recording = None
        if self.record is not None:
            mix = _mix(rx_all, tx_all)
            recording = write_wav(self.record, mix, self.rate)
        result = session.result or session.engine.outcome
        return SimResult(session.turns, session.played, caller_log, result, t,
                         session.engine.language, recording,
                         language_by=session.engine.language_by)

    def _caller_may_speak(self, session: CallSession, t: float,
                          waiting_since: float | None) -> bool:
        if self.barge_in_ms is not None:
            cur = session.player.current()
            if cur is not None and session.listen is not None and session.engine.playing:
                play_id, started = cur
                bargeable = session.engine.st.playing.get(play_id, False)
                if bargeable and started is not None and t - started >= self.barge_in_ms:
                    return True
        return waiting_since is not None and t - waiting_since >= self.reply_pause_ms


def _mix(rx: list[np.ndarray], tx: list[np.ndarray]) -> np.ndarray:
    """Both directions of the call in one mono track, as a call recording is."""
    a = np.concatenate(rx).astype(np.int32) if rx else np.zeros(0, np.int32)
    b = np.concatenate(tx).astype(np.int32) if tx else np.zeros(0, np.int32)
    m = max(len(a), len(b))
    a = np.pad(a, (0, m - len(a)))
    b = np.pad(b, (0, m - len(b)))
    return np.clip(a + b, -32768, 32767).astype(np.int16)


def transcript_lines(res: SimResult) -> list[str]:
    """A readable transcript: prompts, caller inputs and decisions in time order."""
    events: list[tuple[float, int, str]] = []
    for p in res.played:
        events.append((p.t_ms, 0, f"bot     [{p.prompt.language}] {p.prompt.key}: "
                                  f"{p.prompt.text}"))
    for t, what in res.caller:
        events.append((t, 1, f"caller  {what}"))
    for turn in res.turns:
        conf = "" if turn.confidence is None else f" conf {turn.confidence:.2f}"
        lat = "" if turn.latency_ms is None else f", reply after {turn.latency_ms:.0f} ms"
        heard = f' "{turn.heard}"' if turn.heard else ""
        barge = ", barge-in" if turn.barge_in else ""
        events.append((turn.t_ms, 2,
                       f"turn    at {turn.node}: {turn.input}{heard}{conf} -> "
                       f"{turn.option or '-'} ({turn.result}{barge}{lat})"))
    events.sort(key=lambda e: (e[0], e[1]))
    lines = [f"{t / 1000:7.2f}s  {text}" for t, _, text in events]
    lines.append(f"{res.duration_ms / 1000:7.2f}s  call ended: {res.result}")
    return lines


def turn_json(turn: Turn) -> dict[str, object]:
    """One turn as the JSON line `voicebot simulate --json` prints."""
    return {
        "node": turn.node,
        "prompt": turn.prompt,
        "input": turn.input,
        "heard": turn.heard,
        "confidence": None if turn.confidence is None else round(turn.confidence, 4),
        "option": turn.option,
        "language": turn.language,
        "result": turn.result,
        "barge_in": turn.barge_in,
        "t_ms": round(turn.t_ms, 1),
        "latency_ms": None if turn.latency_ms is None else round(turn.latency_ms, 1),
        "prompt_text": turn.prompt_text,
    }
