"""One call on the voice core, and the per-host resources all calls share.

Threads: the media clock (PJSIP's, or the simulator loop) calls ``push_audio`` and
``pull_audio``; both only copy and enqueue or slice. A worker thread per call owns
everything else — DTMF detector, VAD, Vosk recognisers, intent classifiers and the
dialog engine — and takes its work from one queue, so no lock guards the engine.

Timers run on media time (the timestamps of the caller's frames), so a simulated
call replays exactly and a stalled RTP stream cannot fire a no-input timeout.

Nothing here may leave a caller in silence: every I/O the engine asks for (a lookup, a
ticket, a callback, a message file, a record) runs off the call thread or cannot block,
and answers the engine with success or a failure event; an exception on the worker
thread becomes a ``Fault`` the engine apologises for; a watchdog posts ``Fault`` when the
caller has heard nothing for ``[dialog] max_silence_s`` while nobody listens with a
timer; ``max_call_s`` ends the call in every mode, by force if the goodbye never ends.
Texts callers trigger (numbers, tickets, dates) are rendered on a render thread, never
on the call thread.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .asr import ModelStore, Recognizer, grammar_phrases
from .config import Config
from .dialog import (
    BEEP,
    Action,
    ApplicationFound,
    CallbackFailed,
    CallerHungUp,
    CallerSettings,
    CallStarted,
    DialogEngine,
    DialogSettings,
    DtmfReceived,
    EndCall,
    Event,
    Fault,
    HangUp,
    InputTimeout,
    Listen,
    LogTurn,
    LookupApplication,
    LookupFailed,
    Play,
    Prompt,
    PromptFinished,
    RecordingSaved,
    RequestCallback,
    SaveCallerSettings,
    SpeechRecognized,
    SpeechStarted,
    StartRecording,
    StopListening,
    StopPlayback,
    StopRecording,
    StoreFailed,
    TicketFailed,
    Transfer,
    Turn,
)
from .dtmf import DtmfDetector
from .duties import MessageRecorder
from .frames import AudioFrame, resample
from .hours import WorkingHours
from .menus import Grammars, load_grammars
from .nlu import IntentModel, load_or_train, turn_score
from .playback import Player
from .store import Store
from .tts import PromptCache, apply_gain
from .vad import Endpointer, UtteranceEnded
from .vad import SpeechStarted as VadSpeechStarted

log = logging.getLogger(__name__)

PROMPT_GAP_MS = 300  # pause between two prompts of one play
DTMF_DEDUPE_MS = 250  # the same key from two methods (RFC 4733 + in-band) within this is one
DTMF_MASKS_SPEECH_MS = 200  # an utterance this close to a key press is the tone, not speech
FORCE_END_MS = 30_000  # a call asked to end (shutdown, max length) that has not ended by
# then is hung up without waiting any more for its goodbye
FAULT_SPACING_MS = 1000  # faults closer than this are one fault (one error on every frame)
MAX_FAULTS = 3  # after this many the call is ended by the shell itself, engine or not

# Work that must not run on a call thread, shared by every call of the process: store reads
# (a database that stalls must not freeze a call) and espeak-ng renders (serialised by the
# synthesiser anyway, so one thread).
SETTINGS_WAIT_S = 0.3  # longest a call start waits for the caller's remembered settings
_IO_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="voicebot-io")
_RENDER_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="voicebot-tts")


class VoiceCore:
    """What every call on this host shares: config, grammars, models, classifiers, prompts.

    Build it once per process (models load once, ~500 MB for Korean); then
    ``session()`` per call.
    """

    def __init__(self, cfg: Config, grammars: Grammars | None = None,
                 models: ModelStore | None = None) -> None:
        self.cfg = cfg
        self.grammars = grammars or load_grammars(cfg.grammars_dir)
        self.models = models or ModelStore(cfg)
        self.hours = WorkingHours.from_config(cfg.hours)
        self.prompts = PromptCache(cfg.audio_dir / "prompts", cfg.tts.sample_rate, cfg.tts.rate,
                                   cfg.tts.volume_dbfs)
        packs = self.grammars.packs
        self.speech_languages = self.models.speech_languages(packs.values())
        self.offered = self._offered()
        self._intents: dict[str, IntentModel] | None = None
        self.settings = DialogSettings(
            hours=self.hours, default_language=cfg.languages.default, offered=self.offered,
            speech_languages=self.speech_languages, accept=cfg.nlu.accept,
            confirm=cfg.nlu.confirm, max_retries=cfg.dialog.max_retries,
            no_input_ms=cfg.dialog.no_input_ms, digit_pause_ms=cfg.dialog.digit_pause_ms,
            operator_uri=cfg.operator.uri)
        if cfg.languages.default not in packs:
            from .errors import DataError

            raise DataError(cfg.source, "languages.default",
                            f"no pack {cfg.languages.default!r}; have {', '.join(sorted(packs))}")

    @property
    def intents(self) -> dict[str, IntentModel]:
        """Intent models of the languages with speech, loaded (or trained) on first use."""
        if self._intents is None:
            self._intents = load_or_train(self.cfg.models_dir, self.grammars,
                                          sorted(self.speech_languages))
        return self._intents

    def _offered(self) -> tuple[str, ...]:
        """Languages on the language menu: packs in key order, "with_model" ones only with it."""
        wanted = self.cfg.languages.offered
        out = []
        for node in self.grammars.menu.nodes.values():
            for o in node.options:
                if o.kind != "language" or o.target not in self.grammars.packs:
                    continue
                pack = self.grammars.packs[o.target]
                if wanted and o.target not in wanted:
                    continue
                if pack.offer == "with_model" and o.target not in self.speech_languages:
                    continue
                out.append(o.target)
        return tuple(out)

    def startup_report(self) -> list[str]:
        """Lines to print once at start-up: models missing and what fixes them."""
        return self.models.missing_report(self.grammars.packs.values())

    def load_models(self) -> None:
        """Load every available ASR model now (before forking workers or taking calls)."""
        for lang in sorted(self.speech_languages):
            self.models.get(self.grammars.packs[lang].asr_model)

    def engine(self) -> DialogEngine:
        return DialogEngine(self.grammars, self.settings)

    def all_prompts(self) -> list[Prompt]:
        """Every prompt the engine can say with this configuration (for `prompts build`)."""
        eng = self.engine()
        eng.st.started = dt.datetime.now(self.hours.tz)
        out: list[Prompt] = []
        for lang, pack in self.grammars.packs.items():
            for key in sorted(self.grammars.required_prompts() | set(pack.prompts)):
                if key == "confirm":
                    labels = sorted({ow.label for ow in pack.options.values()})
                    out.extend(eng._prompt("confirm", lang, label=lb) for lb in labels)
                else:
                    out.append(eng._prompt(key, lang))
        return out

    def session(self, call_id: str, sample_rate: int = 8000,
                on_action: Callable[[Action], None] | None = None,
                on_turn: Callable[[Turn], None] | None = None,
                store: Store | None = None, caller: str | None = None,
                caller_verified: bool = False, remember_settings: bool = True) -> CallSession:
        """One call. store: where application statuses are read and tickets, messages and
        callbacks are written (without one the status menu finds nothing and messages are
        not kept); caller: the caller's number, for callbacks; caller_verified: it is a
        P-Asserted-Identity from a trusted peer, not just what From said; remember_settings:
        read and save the caller's controls for that number (a simulated caller that is
        not a real number has none)."""
        session = CallSession(self, call_id, sample_rate, on_action, on_turn)
        session.store = store
        session.caller = caller
        session.caller_verified = caller_verified
        session.remember_settings = remember_settings
        return session

    def message_path(self, ticket: str, kind: str, at: dt.datetime) -> Path:
        """Where a recorded message goes: <recording folder>/messages/<day>/<ticket>-<kind>.wav."""
        folder = Path(self.cfg.recording.folder)
        folder = folder if folder.is_absolute() else self.cfg.base / folder
        return folder / "messages" / at.strftime("%Y-%m-%d") / f"{ticket}-{kind}.wav"


@dataclass
class PlayedPrompt:
    """A prompt as the caller heard it: when it started (tx ms) and whether it was cut."""

    t_ms: float
    prompt: Prompt
    play_id: int


@dataclass
class _Utterance:
    start_ms: float
    languages: tuple[str, ...]
    masked: bool = False  # a DTMF tone, not speech


@dataclass
class CallStats:
    """Per-call measurements for logs and benchmarks (all ms)."""

    frames: int = 0
    frame_cost_us: list[float] = field(default_factory=list)
    asr_finalize_ms: list[float] = field(default_factory=list)
    decision_ms: list[float] = field(default_factory=list)
    barge_in_ms: list[float] = field(default_factory=list)


class CallSession:
    """The voice core running one call. Create via :meth:`VoiceCore.session`."""

    def __init__(self, core: VoiceCore, call_id: str, sample_rate: int,
                 on_action: Callable[[Action], None] | None,
                 on_turn: Callable[[Turn], None] | None) -> None:
        self.core = core
        self.call_id = call_id
        self.sample_rate = sample_rate
        self.engine = core.engine()
        self._on_action = on_action
        self._on_turn = on_turn
        self._q: queue.Queue[tuple[str, object]] = queue.Queue()
        self.player = Player(sample_rate, on_start=self._play_started,
                             on_finish=self._play_finished, on_mark=self._prompt_mark)
        self.dtmf = DtmfDetector(sample_rate, core.cfg.dtmf)
        self.vad = Endpointer(core.cfg.vad, sample_rate)
        self._recognizers: dict[str, Recognizer] = {}
        self.listen: Listen | None = None
        self._utt: _Utterance | None = None
        self._quiet_since: float | None = None
        self._now_ms = 0.0
        self._last_digit: tuple[str, float, str] | None = None
        self._pending_turns: list[tuple[Turn, int]] = []
        self._awaiting_reply: list[Turn] = []  # logged before a lookup; replied to later
        self._play_started_ms: dict[int, float] = {}
        self.turns: list[Turn] = []
        self.played: list[PlayedPrompt] = []
        self.result: str | None = None  # completed, transferred, abandoned
        self.ended = threading.Event()
        self.notice_done = threading.Event()  # the recording notice has been said in full
        self._notice_play: int | None = None
        self.store: Store | None = None
        self.caller: str | None = None
        self.caller_verified = False  # caller came from a trusted P-Asserted-Identity
        self.remember_settings = True  # the caller's controls are kept for their number
        self.started_at: dt.datetime | None = None
        self._recorder: MessageRecorder | None = None
        self._ticket: str | None = None
        self._record_max_ms = 0.0
        self.stats = CallStats()
        self._deferred: list[Play] = []  # plays waiting for a render, in order
        self._rendering = False  # a render for the first deferred play is under way
        self._unheard_since: float | None = None  # watchdog: media ms the silence began
        self._end_asked_ms: float | None = None  # EndCall posted at (media ms)
        self._faults: list[float] = []  # media ms of each fault
        self._hangup_after: int | None = None  # last resort: hang up when this play ends
        self._transfer_progress = False  # the far end reported the transfer is going on
        self.max_call_ms = core.cfg.dialog.max_call_s * 1000.0
        self.max_silence_ms = core.cfg.dialog.max_silence_s * 1000.0
        self._idle = threading.Condition()
        self._busy = 0
        self._thread = threading.Thread(target=self._run, name=f"call-{call_id}", daemon=True)
        self._thread.start()

    # --- media-clock side: never block ---

    def push_audio(self, frame: AudioFrame) -> None:
        """Hand a caller frame to the worker (called from the media clock thread)."""
        self._enqueue("frame", frame)

    def pull_audio(self, n: int) -> np.ndarray:
        """The bot's next ``n`` samples (called from the media clock thread)."""
        return self.player.pull(n)

    def post(self, event: Event) -> None:
        """Hand a signalling event (hang-up, transfer result, end of call) to the worker."""
        self._enqueue("event", event)

    def post_digit(self, digit: str, method: str) -> None:
        """A key from signalling (RFC 4733 or SIP INFO); the worker times and de-duplicates it."""
        self._enqueue("digit", (digit, method))

    def transfer_progress(self) -> None:
        """The far end accepted the transfer and reports progress (a provisional NOTIFY): the
        caller hears the new call ringing, so the silence watchdog must not cut in."""
        self._transfer_progress = True

    def _enqueue(self, kind: str, item: object) -> None:
        with self._idle:
            self._busy += 1
        self._q.put_nowait((kind, item))

    def _hold(self) -> None:
        """Count work done elsewhere for this call (a lookup, a render) as queued, so
        ``drain`` waits for it: the simulator then replays the same way every time."""
        with self._idle:
            self._busy += 1

    def _release_hold(self) -> None:
        with self._idle:
            self._busy -= 1
            if self._busy == 0:
                self._idle.notify_all()

    # --- control ---

    def start(self, at: dt.datetime, language: str | None = None) -> None:
        """Start the dialog. The caller's remembered controls (issue 12) are read from the
        store on the I/O pool, never on the calling (SIP) thread; the call starts when they
        are read, or after SETTINGS_WAIT_S without them (a slow store must not keep the
        caller waiting in silence)."""
        self.started_at = at
        if (self.store is None or not self.caller or not self.remember_settings
                or not self.core.grammars.menu.controls):
            self.post(CallStarted(at, language, 0.0))
            return
        store, caller = self.store, self.caller
        once = threading.Lock()
        self._hold()

        def begin(settings: CallerSettings | None) -> None:
            if once.acquire(blocking=False):
                self.post(CallStarted(at, language, 0.0, settings))
                self._release_hold()

        def read() -> None:
            try:
                begin(store.caller_settings(caller))
            except Exception as exc:
                log.error("call %s: remembered settings not read: %s", self.call_id, exc)
                begin(None)

        timer = threading.Timer(SETTINGS_WAIT_S, begin, (None,))
        timer.daemon = True
        timer.start()
        try:
            _IO_POOL.submit(read)
        except RuntimeError:  # shutting down
            begin(None)

    def drain(self, timeout: float = 30.0) -> None:
        """Block until the worker has handled everything queued (simulator lock-step)."""
        with self._idle:
            if not self._idle.wait_for(lambda: self._busy == 0, timeout):
                raise TimeoutError(f"call {self.call_id}: worker did not catch up")

    def close(self) -> None:
        """Stop the worker thread (after a hang-up has been posted or the call ended)."""
        self._q.put_nowait(("stop", None))
        self._thread.join(timeout=10)

    @property
    def speaking(self) -> bool:
        """The bot is saying something, or has something rendered for it to say next."""
        return self.player.busy or bool(self._deferred)

    @property
    def waiting_for_input(self) -> bool:
        """The bot has said everything and listens: the caller's turn."""
        return (self.listen is not None and not self.speaking and not self.engine.playing
                and self.engine.accepting_input)

    # --- player callbacks (media clock thread): only enqueue ---

    def _play_started(self, play_id: int, t_ms: float) -> None:
        self._play_started_ms[play_id] = t_ms

    def _play_finished(self, play_id: int, t_ms: float) -> None:
        self.post(PromptFinished(play_id, t_ms))

    def _prompt_mark(self, tag: object, t_ms: float) -> None:
        if isinstance(tag, tuple):
            play_id, prompt = tag
            self.played.append(PlayedPrompt(t_ms, prompt, play_id))

    # --- worker ---

    def _run(self) -> None:
        while True:
            kind, item = self._q.get()
            try:
                if kind == "stop":
                    return
                if kind == "frame":
                    self._on_frame(item)  # type: ignore[arg-type]
                elif kind == "digit":
                    digit, method = item  # type: ignore[misc]
                    self._digit(digit, self._now_ms, method)
                elif kind == "rendered":
                    self._flush_deferred()
                else:
                    self._dispatch(item)  # type: ignore[arg-type]
            except Exception as exc:
                # One bad frame or event must not kill the call, nor leave it in a mode that
                # waits for something that will never come: the engine apologises and moves on.
                log.exception("call %s: error handling %s", self.call_id, kind)
                self._fault(f"{kind}: {type(exc).__name__}: {exc}")
            finally:
                with self._idle:
                    self._busy -= 1
                    if self._busy == 0:
                        self._idle.notify_all()

    def _on_frame(self, frame: AudioFrame) -> None:
        t0 = time.perf_counter()
        self._now_ms = frame.end_ms
        self.stats.frames += 1
        for d in self.dtmf.process(frame):
            self._digit(d.digit, d.detected_ms, "inband")
        for ev in self.vad.process(frame):
            if isinstance(ev, VadSpeechStarted):
                self._speech_started(ev)
            elif isinstance(ev, UtteranceEnded):
                self._utterance_ended(ev)
        if self._utt is not None and self.vad.in_speech and not self._utt.masked:
            for lang in self._utt.languages:
                self._recognizers[lang].accept(frame.samples)
        if self._recorder is not None:
            self._recorder.write(frame.samples, self.vad.in_speech)
            if getattr(self._recorder, "failed", None):
                # The disk is full (or the file broke): the message ends here, normally, with
                # what was written; the call goes on.
                log.error("call %s: message %s stopped: %s", self.call_id, self._ticket,
                          self._recorder.failed)
                self._stop_recording("disk_full")
            elif self._recorder.duration_ms >= self._record_max_ms:
                self._stop_recording("max_duration")
        self._check_timeout()
        self._check_watchdog()
        self._flush_turns()
        self.stats.frame_cost_us.append((time.perf_counter() - t0) * 1e6)

    # --- never silence, never forever ---

    def _check_watchdog(self) -> None:
        """Post Fault when the caller has heard nothing for max_silence_ms while no Listen with
        a timer is in force; end the call at max_call_ms in every mode, by force if need be."""
        if self.ended.is_set():
            return
        now = self._now_ms
        if now >= self.max_call_ms and self._end_asked_ms is None:
            self.end_call("max_duration")
            return
        if self._end_asked_ms is not None and now - self._end_asked_ms >= FORCE_END_MS:
            log.error("call %s: asked to end %.0f ms ago and still going (mode %s); hanging "
                      "up", self.call_id, now - self._end_asked_ms, self.engine.mode)
            self._force_end("forced")
            return
        timed = self.listen is not None and self.engine.accepting_input
        transferring = self.engine.mode == "transfer" and self._transfer_progress
        if self.speaking or timed or transferring:
            self._unheard_since = None
            return
        if self._unheard_since is None:
            self._unheard_since = now
        elif now - self._unheard_since >= self.max_silence_ms:
            self._unheard_since = None
            log.warning("call %s: watchdog: %.0f ms of silence in mode %s", self.call_id,
                        self.max_silence_ms, self.engine.mode)
            self._fault(f"watchdog: silence in mode {self.engine.mode}")

    def end_call(self, reason: str) -> None:
        """Ask the engine to end the call (say goodbye, hang up); forced after FORCE_END_MS.
        Worker thread; the shell posts EndCall instead, which lands here."""
        if self._end_asked_ms is None:
            self._end_asked_ms = self._now_ms
        self._dispatch(EndCall(self._now_ms, reason))

    def _fault(self, reason: str) -> None:
        """An error or dead air: the engine apologises and moves on; if the engine itself
        keeps failing, the shell says sorry and hangs up on its own."""
        if self.ended.is_set():
            return
        now = self._now_ms
        if self._faults and now - self._faults[-1] < FAULT_SPACING_MS:
            return
        self._faults.append(now)
        if len(self._faults) <= MAX_FAULTS:
            try:
                self._dispatch(Fault(now, reason))
                return
            except Exception:
                log.exception("call %s: the engine failed on a fault too", self.call_id)
        self._last_resort()

    def _last_resort(self) -> None:
        """Say sorry and goodbye without the engine, then hang up."""
        if self._hangup_after is not None or self.ended.is_set():
            return
        self.player.stop()
        self._deferred.clear()
        self.listen = None
        lang = self.engine.language or self.core.cfg.languages.default
        pack = self.core.grammars.packs[lang]
        prompts = []
        for key in ("apology", "goodbye"):
            if key in pack.prompts:
                prompts.append(Prompt(lang, key, pack.text(key), pack.voice))
        self._hangup_after = -1
        play = Play(-1, tuple(prompts), barge_in=False)
        if not self._play(play, now=True):
            self._force_end("error")

    def _force_end(self, reason: str) -> None:
        """Hang up now (the shell's HangUp), whatever the engine's mode."""
        if self.ended.is_set():
            return
        action = HangUp(reason)
        if self._on_action is not None:
            try:
                self._on_action(action)
            except Exception:
                log.exception("call %s: hang-up failed", self.call_id)
        self._finish(self.engine.outcome if self.result is None else self.result)

    def _check_timeout(self) -> None:
        listening = self.listen is not None and self.engine.accepting_input
        if not listening or self.speaking or self.engine.playing or self.vad.in_speech:
            self._quiet_since = None
            return
        if self._quiet_since is None:
            self._quiet_since = self._now_ms
        elif (self.listen.no_input_ms > 0  # type: ignore[union-attr]
              # 0: the caller asked for all the time they need; max_call_s still ends it
              and self._now_ms - self._quiet_since >= self.listen.no_input_ms):  # type: ignore[union-attr]
            self._quiet_since = None
            self._dispatch(InputTimeout(self._now_ms))

    def _digit(self, digit: str, t_ms: float, method: str) -> None:
        last = self._last_digit
        if last and last[0] == digit and last[2] != method and t_ms - last[1] < DTMF_DEDUPE_MS:
            return
        self._last_digit = (digit, t_ms, method)
        self._quiet_since = None  # a key is input: the no-input time starts again after it
        if self._utt is not None:
            self._utt.masked = True
        self._dispatch_timing_barge_in(DtmfReceived(digit, t_ms, method), t_ms)

    def _speech_started(self, ev: VadSpeechStarted) -> None:
        langs = self.listen.languages if self.listen else ()
        masked = bool(self._last_digit and ev.start_ms - self._last_digit[1] < DTMF_MASKS_SPEECH_MS)
        self._utt = _Utterance(ev.start_ms, langs, masked)
        if not masked:
            for lang in langs:
                self._recognizers[lang].accept(ev.preroll)
            self._dispatch_timing_barge_in(SpeechStarted(ev.at_ms), ev.at_ms)

    def _dispatch_timing_barge_in(self, event: Event, heard_ms: float) -> None:
        """Dispatch; if the input cut a prompt, note how long after ``heard_ms`` it went quiet
        (tx media time of the stop; the two media clocks start within a frame of each other)."""
        busy, before = self.player.busy, self.player.stopped_at_ms
        self._dispatch(event)
        after = self.player.stopped_at_ms
        if busy and after is not None and after != before:
            self.stats.barge_in_ms.append(max(0.0, after - heard_ms))

    def _utterance_ended(self, ev: UtteranceEnded) -> None:
        utt, self._utt = self._utt, None
        if utt is None:
            return
        results = []
        if self.listen is not None and self.listen.grammar == "digits":
            self._digits_ended(utt, ev)
            return
        for lang in utt.languages:
            res = self._recognizers[lang].finish()
            self.stats.asr_finalize_ms.append(res.finalize_ms)
            results.append((lang, res))
        if utt.masked or ev.too_short or not results or self.listen is None:
            return  # the tone of a key, a click, or speech after listening stopped
        t0 = time.perf_counter()
        best: SpeechRecognized | None = None
        node = self.listen.node if self.listen else ""
        for lang, res in results:
            intent = self.core.intents[lang].classify(node, res.text,
                                                      self.listen.options if self.listen else None)
            score = (turn_score(intent.probability, res.confidence,
                                self.core.cfg.asr.min_word_confidence) if intent.option else 0.0)
            cand = SpeechRecognized(self._now_ms, lang, res.text, res.confidence, intent.option,
                                    score, ev.end_ms)
            if best is None or cand.score > best.score or (cand.text and not best.text):
                best = cand
        self.stats.decision_ms.append((time.perf_counter() - t0) * 1000)
        assert best is not None
        self._dispatch(best)

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, PromptFinished) and event.play_id == self._hangup_after:
            self._force_end("error")
            return
        if isinstance(event, EndCall) and self._end_asked_ms is None:
            self._end_asked_ms = self._now_ms
        actions = self.engine.handle(event)
        first_play = next((a for a in actions if isinstance(a, Play)), None)
        if first_play is not None and self._awaiting_reply:
            # Turns answered only after a lookup: their reply is this play.
            head = first_play.prompts[0] if first_play.prompts else None
            for turn in self._awaiting_reply:
                if turn.prompt is None and head is not None:
                    turn = replace(turn, prompt=head.key, prompt_text=head.text)
                self._pending_turns.append((turn, first_play.play_id))
            self._awaiting_reply = []
        # The engine logs a turn just before the play that answers it; the turn is emitted
        # once that play's first sample goes out, which is when its latency is known.
        for i, action in enumerate(actions):
            if isinstance(action, LogTurn):
                # Its reply is the first play after it (keys typed ahead during the welcome
                # come out as several turns, each with its own reply, in one batch).
                reply = next((a.play_id for a in actions[i + 1:] if isinstance(a, Play)),
                             next((a.play_id for a in actions if isinstance(a, Play)), None))
                if reply is None and any(isinstance(a, LookupApplication) for a in actions):
                    self._awaiting_reply.append(action.turn)
                elif reply is None:
                    self._emit_turn(action.turn)
                else:
                    self._pending_turns.append((action.turn, reply))
            else:
                self._do(action)
            if isinstance(action, Transfer):
                self._transfer_progress = False
            if self._on_action is not None:
                self._on_action(action)
        if isinstance(event, PromptFinished) and event.play_id == self._notice_play:
            self.notice_done.set()
        if isinstance(event, CallerHungUp):
            self._finish(self.engine.outcome)

    def _do(self, action: Action) -> None:
        match action:
            case Play():
                self._play(action)
            case StopPlayback():
                stopped = set(self.player.stop()) | {p.play_id for p in self._deferred}
                self._deferred.clear()
                # A reply cut before its first sample went out has no latency to wait for.
                cut = [(t, p) for t, p in self._pending_turns
                       if p in stopped and p not in self._play_started_ms]
                if cut:
                    self._pending_turns = [tp for tp in self._pending_turns if tp not in cut]
                    for turn, _ in cut:
                        self._emit_turn(turn)
            case Listen():
                self._listen(action)
            case StopListening():
                self.listen = None
            case HangUp():
                self._finish(self.engine.outcome)
            case LookupApplication():
                self._lookup(action)
            case StartRecording():
                self._start_recording(action)
            case StopRecording():
                self._stop_recording(action.reason)
            case RequestCallback():
                self._request_callback(action)
            case SaveCallerSettings():
                self._save_settings(action)

    def _save_settings(self, action: SaveCallerSettings) -> None:
        """Remember the caller's controls for their number, off the call thread; a failure
        is logged (the call goes on with its settings)."""
        store, caller = self.store, self.caller
        if store is None or not caller or not self.remember_settings:
            return

        def save() -> None:
            try:
                store.save_caller_settings(caller, action.settings)
            except Exception as exc:
                log.error("call %s: settings not remembered: %s", self.call_id, exc)

        try:
            _IO_POOL.submit(save)
        except RuntimeError:  # the pool is shut down: the process is exiting
            log.warning("call %s: settings not remembered (shutting down)", self.call_id)

    # --- duties: the store's answers go back to the engine as events, through the queue ---

    def _lookup(self, action: LookupApplication) -> None:
        """Read the store on the I/O pool (a stalled database must not freeze the call);
        the answer comes back through the queue as ApplicationFound or LookupFailed."""
        store = self.store
        if store is None:
            self._enqueue("event", ApplicationFound(self._now_ms, action.number, None, None))
            return
        self._hold()

        def done(fut: Future[tuple[str, dt.date] | None]) -> None:
            try:
                found = fut.result()
            except Exception as exc:
                log.error("call %s: application lookup failed: %s", self.call_id, exc)
                self._enqueue("event", LookupFailed(self._now_ms, str(exc)))
            else:
                status, date = found if found else (None, None)
                self._enqueue("event", ApplicationFound(self._now_ms, action.number, status,
                                                        date))
            finally:
                self._release_hold()

        try:
            _IO_POOL.submit(store.application, action.number).add_done_callback(done)
        except RuntimeError as exc:  # the pool is shut down: the process is exiting
            self._release_hold()
            self._enqueue("event", LookupFailed(self._now_ms, str(exc)))

    def _request_callback(self, action: RequestCallback) -> None:
        log.info("call %s callback requested reason=%s caller=%s verified=%s", self.call_id,
                 action.reason, self.caller, self.caller_verified)
        if self.store is None:
            return
        try:
            self.store.add_callback(self.call_id, self.caller, action.language, action.reason,
                                    verified=self.caller_verified)
        except Exception as exc:
            log.error("call %s: callback not stored: %s", self.call_id, exc)
            self._enqueue("event", CallbackFailed(self._now_ms, str(exc)))

    def _start_recording(self, action: StartRecording) -> None:
        if self.store is None:
            log.warning("call %s: no store, the %s message is not kept", self.call_id,
                        action.kind)
            ticket = "0"
        else:
            try:
                ticket = self.store.open_ticket(self.call_id, self.caller, action.language,
                                                action.kind)
            except Exception as exc:
                log.error("call %s: no ticket for the %s message: %s", self.call_id,
                          action.kind, exc)
                self._enqueue("event", TicketFailed(self._now_ms, str(exc)))
                return
        at = self.started_at or dt.datetime.now(dt.UTC)
        path = self.core.message_path(ticket, action.kind, at)
        try:
            recorder = MessageRecorder(path, self.sample_rate)
        except OSError as exc:
            log.error("call %s: cannot record the %s message to %s: %s", self.call_id,
                      action.kind, path, exc)
            if self.store is not None:
                try:
                    self.store.close_ticket(ticket, None, 0.0, 0.0, "failed")
                except Exception:
                    log.exception("call %s: ticket %s not closed", self.call_id, ticket)
            self._enqueue("event", TicketFailed(self._now_ms, str(exc)))
            return
        self._ticket = ticket
        self._recorder = recorder
        self._record_max_ms = action.max_ms
        log.info("call %s recording %s message, ticket %s -> %s", self.call_id, action.kind,
                 ticket, path)

    def _stop_recording(self, reason: str) -> None:
        rec, self._recorder = self._recorder, None
        if rec is None or self._ticket is None:
            return
        try:
            path: Path | None = rec.finish()
        except OSError as exc:
            log.error("call %s: message %s not saved: %s", self.call_id, self._ticket, exc)
            path = None
        if self.store is not None:
            try:
                self.store.close_ticket(self._ticket, str(path) if path else None,
                                        rec.duration_ms, rec.speech_ms, reason)
            except Exception as exc:
                log.error("call %s: ticket %s not closed: %s", self.call_id, self._ticket, exc)
        if reason != "hangup" and not self.ended.is_set():
            self._enqueue("event", RecordingSaved(self._now_ms, self._ticket, rec.duration_ms,
                                                  rec.speech_ms, reason))

    def _digits_ended(self, utt: _Utterance, ev: UtteranceEnded) -> None:
        """An utterance at the number prompt: digit words, no intent classifier."""
        results = [(lang, self._recognizers[lang].finish()) for lang in utt.languages]
        if utt.masked or ev.too_short or not results:
            return
        lang, res = max(results, key=lambda r: (bool(r[1].text), r[1].confidence))
        self._dispatch(SpeechRecognized(self._now_ms, lang, res.text, res.confidence, None,
                                        res.confidence, ev.end_ms))

    def _play(self, play: Play, now: bool = False) -> bool:
        """Queue a play; texts not yet rendered are rendered on the render thread and the
        play (and any after it) waits for them. False if nothing could be queued."""
        if any(p.key == "welcome" for p in play.prompts):
            self._notice_play = play.play_id
        if now:
            return self._enqueue_play(play, render=True)
        self._deferred.append(play)
        self._flush_deferred()
        return True

    def _flush_deferred(self) -> None:
        """Hand the plays whose audio is ready to the player, in order."""
        while self._deferred:
            missing = self._missing_audio(self._deferred[0])
            if missing:
                self._render_later(missing)
                return
            self._enqueue_play(self._deferred.pop(0))

    def _missing_audio(self, play: Play) -> list[Prompt]:
        try:
            return [p for p in play.prompts
                    if p.key != BEEP and self.core.prompts.cached(p.text, p.voice, p.rate) is None]
        except Exception:
            # The cache itself failed: drop the play, or every play after it would wait
            # behind it for ever; the error goes on to the fault path.
            self._deferred.remove(play)
            raise

    def _render_later(self, prompts: list[Prompt]) -> None:
        """Render on the render thread; come back through the queue when done."""
        if self._rendering:
            return
        self._rendering = True
        self._hold()
        cache = self.core.prompts

        def work() -> None:
            try:
                for p in prompts:
                    try:
                        cache.render_dynamic(p.text, p.voice, p.rate)
                    except Exception:
                        log.exception("call %s: cannot render %r", self.call_id, p.text[:60])
            finally:
                self._rendering = False
                self._enqueue("rendered", None)
                self._release_hold()

        try:
            _RENDER_POOL.submit(work)
        except RuntimeError:  # shutting down: say what can be said
            self._rendering = False
            self._release_hold()

    def _enqueue_play(self, play: Play, render: bool = False) -> bool:
        gap = np.zeros(self.sample_rate * PROMPT_GAP_MS // 1000, dtype=np.int16)
        parts: list[np.ndarray] = []
        marks: list[tuple[int, object]] = []
        offset = 0
        for prompt in play.prompts:
            if prompt.key == BEEP:
                audio: np.ndarray | None = beep(self.sample_rate)
            else:
                audio = self.core.prompts.cached(prompt.text, prompt.voice, prompt.rate)
                if audio is None and render:
                    try:
                        audio = self.core.prompts.render_dynamic(prompt.text, prompt.voice,
                                                                 prompt.rate)
                    except Exception:
                        log.exception("call %s: cannot render %r", self.call_id, prompt.key)
                if audio is None:
                    # Rendering failed: leave the prompt out rather than the whole play.
                    log.error("call %s: prompt %s has no audio; skipped", self.call_id,
                              prompt.key)
                    continue
                audio = resample(audio, self.core.prompts.sample_rate, self.sample_rate)
                if prompt.gain_db:
                    audio = apply_gain(audio, prompt.gain_db, self.sample_rate)
            if parts:
                parts.append(gap)
                offset += len(gap)
            marks.append((offset, (play.play_id, prompt)))
            parts.append(audio)
            offset += len(audio)
        # Even an empty play is queued (a gap): its PromptFinished moves the engine on.
        self.player.enqueue(play.play_id, np.concatenate(parts) if parts else gap, marks)
        return bool(parts)

    def _listen(self, listen: Listen) -> None:
        self.listen = listen
        for lang in listen.languages:
            rec = self._recognizers.get(lang)
            if rec is None:
                name = self.core.grammars.packs[lang].asr_model
                model = self.core.models.get(name)
                rec = Recognizer(model, self.sample_rate, self.core.models.has_unk(name))
                self._recognizers[lang] = rec
            if listen.grammar == "digits":
                # Digit words only, plus decoys so other speech has somewhere to go.
                pack = self.core.grammars.packs[lang]
                rec.set_grammar([*pack.digit_grammar(),
                                 # "more time" (the Listen's options) is heard too
                                 *grammar_phrases(pack, listen.options, True, rec.has_unk)])
            elif self.core.cfg.asr.grammar:
                pack = self.core.grammars.packs[lang]
                rec.set_grammar(grammar_phrases(pack, listen.options, True, rec.has_unk))
            else:
                rec.set_grammar(None)

    def _flush_turns(self, final: bool = False) -> None:
        """Emit turns whose reply started playing, with the input-to-reply latency."""
        if final:
            for turn in self._awaiting_reply:
                self._emit_turn(turn)
            self._awaiting_reply = []
        keep = []
        for turn, play_id in self._pending_turns:
            started = self._play_started_ms.get(play_id)
            if started is not None or final:
                latency = (started - turn.input_end_ms
                           if started is not None and turn.input_end_ms is not None else None)
                self._emit_turn(replace(turn, latency_ms=latency))
            else:
                keep.append((turn, play_id))
        self._pending_turns = keep

    def _emit_turn(self, turn: Turn) -> None:
        self.turns.append(turn)
        log.info("call %s turn node=%s input=%s heard=%r conf=%s option=%s result=%s "
                 "latency_ms=%s", self.call_id, turn.node, turn.input, turn.heard,
                 None if turn.confidence is None else round(turn.confidence, 3), turn.option,
                 turn.result, None if turn.latency_ms is None else round(turn.latency_ms))
        if self._on_turn is not None:
            try:
                self._on_turn(turn)
            except Exception as exc:
                log.error("call %s: turn not stored: %s", self.call_id, exc)
                if not self.ended.is_set():
                    self._enqueue("event", StoreFailed(self._now_ms, str(exc)))

    def _finish(self, result: str) -> None:
        if self.ended.is_set():
            return
        self.result = result
        if self._recorder is not None:
            self._stop_recording("hangup")  # the caller left mid-message: keep what was said
        self._flush_turns(final=True)
        self.player.stop()
        self._deferred.clear()
        self.listen = None
        self.ended.set()


def beep(sample_rate: int, ms: int = 400, hz: float = 1000.0, dbfs: float = -14.0) -> np.ndarray:
    """The tone before a message: the caller starts speaking when it ends."""
    t = np.arange(sample_rate * ms // 1000) / sample_rate
    amp = 32767 * 10 ** (dbfs / 20) * np.sqrt(2)
    tone = amp * np.sin(2 * np.pi * hz * t)
    ramp = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)  # 10 ms fades: no clicks
    return (tone * ramp).astype(np.int16)
