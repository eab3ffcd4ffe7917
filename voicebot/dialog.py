"""The dialog engine: a pure state machine, events in, actions out.

It knows the menu, the packs, the working hours and the thresholds; it knows
nothing of audio, threads, SIP or clocks. Time comes in on the events
(``t_ms``, media milliseconds since the call started; ``CallStarted.at`` is the
wall-clock start), so a scripted timeline replays exactly.

Turn-taking rules, as a call-centre engineer expects them:
- every menu prompt may be interrupted (barge-in) by speech or a key; the
  recording notice in the welcome may not: keys pressed during it are kept
  (type-ahead) and acted on when it ends;
- speech above the accept threshold is taken, between the thresholds confirmed
  with yes/no, below re-prompted;
- no-input and no-match re-prompt at most ``max_retries`` times, then the call
  goes to an operator in working hours, otherwise to the information menu; a
  second escalation outside hours says goodbye rather than loop.

Call-centre duties run as modes of the same machine: an application number is
collected key by key (``#`` ends) or from spoken digits, read back, and looked up
by the shell (LookupApplication -> ApplicationFound); a message is recorded by the
shell between StartRecording and StopRecording (-> RecordingSaved with its
ticket); an operator request outside hours, or a caller who hangs up while
waiting for the transfer, yields RequestCallback.

The engine is total, as VoiceXML's form interpretation algorithm catches every event
in every state: its modes are the ``Mode`` enumeration, and ``_DISPATCH`` names a
handler for every (mode, event) pair (checked when the module loads). Every I/O the
engine asks for has a failure event (LookupFailed, TicketFailed, RecordingFailed,
CallbackFailed, StoreFailed), and ``Fault`` covers errors in the shell and its silence
watchdog. Every failure the caller can notice has a spoken path: a short apology, then
the operator in working hours or a menu; a second Fault says goodbye and hangs up.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, get_args

from .hours import WorkingHours
from .menus import APPLICATION_STATES, HELP_NODE, Grammars, Node, Option, normalize_text
from .spoken import say_hours

# --- events (in) -------------------------------------------------------------------------

# Caller controls (issue 12): the speech rates a caller can step through (a multiple of
# the configured espeak-ng words per minute, rendered by espeak itself) and the gains.
RATES = (0.75, 1.0, 1.25)
GAINS_DB = (0, 6, 12)


@dataclass(frozen=True)
class CallerSettings:
    """What a caller changed for themselves, kept for the call and remembered for their
    number. rate_step: -1, 0, +1 (index into RATES around 1.0); gain_db: 0, 6 or 12 (dB over
    the prompt level); more_time: 0 (the node's no-input time), 1 (three times it), 2 (no
    no-input timer; the call still ends at max_call_s)."""

    rate_step: int = 0
    gain_db: int = 0
    more_time: int = 0

    @property
    def rate(self) -> float:
        return RATES[self.rate_step + 1]

    @property
    def default(self) -> bool:
        return self == CallerSettings()




@dataclass(frozen=True)
class CallStarted:
    """A call was answered. at: wall-clock time of the answer (tz-aware).
    language: start at that language's home menu instead of the language menu."""

    at: dt.datetime
    language: str | None = None
    t_ms: float = 0.0
    settings: CallerSettings | None = None  # remembered for this caller number (issue 12)


@dataclass(frozen=True)
class DtmfReceived:
    """A key press. method: "inband", "rfc4733" or "info"; t_ms when it was detected;
    input_end_ms when the caller's input ended (same as t_ms for keys)."""

    digit: str
    t_ms: float
    method: str = "inband"


@dataclass(frozen=True)
class SpeechStarted:
    """The caller started speaking (VAD); used for barge-in."""

    t_ms: float


@dataclass(frozen=True)
class SpeechRecognized:
    """A finished utterance, recognised and classified against the current Listen.

    text: what the ASR heard (keywords restored from ASR spellings).
    asr_confidence: mean word confidence from the recogniser, 0..1.
    option: the best option id among the Listen's options, or None (out of scope).
    score: combined ASR x classifier probability of ``option``, 0..1.
    input_end_ms: media time the caller's speech ended (refined VAD boundary).
    """

    t_ms: float
    language: str
    text: str
    asr_confidence: float
    option: str | None
    score: float
    input_end_ms: float = 0.0


@dataclass(frozen=True)
class PromptFinished:
    """Playback ``play_id`` reached its end (not emitted for stopped playback)."""

    play_id: int
    t_ms: float


@dataclass(frozen=True)
class InputTimeout:
    """No key and no speech for the Listen's no_input_ms after the prompts ended."""

    t_ms: float


@dataclass(frozen=True)
class CallerHungUp:
    t_ms: float


@dataclass(frozen=True)
class TransferFailed:
    """The operator transfer did not go through (busy, no answer, refused)."""

    t_ms: float
    reason: str = ""


@dataclass(frozen=True)
class EndCall:
    """The bot must end the call (service shutting down, maximum call length):
    say so, then hang up. reason: shutdown, max_duration."""

    t_ms: float
    reason: str


@dataclass(frozen=True)
class ApplicationFound:
    """The shell's answer to LookupApplication. status: one of
    menus.APPLICATION_STATES, or None when there is no such application; date: when the
    application reached that status."""

    t_ms: float
    number: str
    status: str | None
    date: dt.date | None = None


@dataclass(frozen=True)
class RecordingSaved:
    """The message recording ended and is stored under ``ticket``.

    duration_ms: audio kept; speech_ms: caller speech in it (VAD), 0 for an empty
    message; reason: key, silence, max_duration, hangup."""

    t_ms: float
    ticket: str
    duration_ms: float
    speech_ms: float
    reason: str


# Failures of the I/O the engine asks for. The shell answers every request with its
# success event or one of these; none may leave the caller in silence.


@dataclass(frozen=True)
class LookupFailed:
    """The answer to LookupApplication when the store could not be read."""

    t_ms: float
    reason: str = ""


@dataclass(frozen=True)
class TicketFailed:
    """StartRecording could not open its ticket or its message file: nothing is recorded."""

    t_ms: float
    reason: str = ""


@dataclass(frozen=True)
class RecordingFailed:
    """The message recording broke off with nothing usable (no RecordingSaved follows)."""

    t_ms: float
    reason: str = ""


@dataclass(frozen=True)
class CallbackFailed:
    """RequestCallback could not be stored."""

    t_ms: float
    reason: str = ""


@dataclass(frozen=True)
class StoreFailed:
    """A record write (call, turn, ticket) failed. The shell spools records, so the caller
    loses nothing and hears nothing of it: every mode ignores it."""

    t_ms: float
    reason: str = ""


@dataclass(frozen=True)
class Fault:
    """An internal error in the shell, or its silence watchdog fired (the caller has heard
    nothing and the bot is not listening with a timer). The engine apologises and moves
    on; a second Fault in a call says goodbye and hangs up; in closing it hangs up."""

    t_ms: float
    reason: str = ""


Event = (CallStarted | DtmfReceived | SpeechStarted | SpeechRecognized | PromptFinished
         | InputTimeout | CallerHungUp | TransferFailed | EndCall | ApplicationFound
         | RecordingSaved | LookupFailed | TicketFailed | RecordingFailed | CallbackFailed
         | StoreFailed | Fault)
EVENT_TYPES: tuple[type, ...] = get_args(Event)


# --- actions (out) -----------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One prompt to say: pack language, prompt key, final text, TTS voice.
    rate: a multiple of the configured speech rate (one of RATES); gain_db: dB over the
    configured prompt level (one of GAINS_DB), applied with a limiter so nothing clips."""

    language: str
    key: str
    text: str
    voice: str
    rate: float = 1.0
    gain_db: int = 0


@dataclass(frozen=True)
class Play:
    """Queue prompts for playback after anything already queued.
    barge_in: caller speech or a key may stop it."""

    play_id: int
    prompts: tuple[Prompt, ...]
    barge_in: bool = True


@dataclass(frozen=True)
class StopPlayback:
    """Stop the current prompt and drop everything queued."""

    reason: str


@dataclass(frozen=True)
class Listen:
    """Accept keys and speech for these options from now on.

    node: menu node id ("confirm" while confirming).
    languages: packs whose recognisers listen (several at the language menu).
    options: option ids the caller can choose here.
    no_input_ms: silence after the prompts end that counts as no input.
    grammar: "options" (keywords of ``options``), "digits" (the pack's digit words, no
    classifier), or "none" (while recording a message: nothing is recognised).
    """

    node: str
    languages: tuple[str, ...]
    options: tuple[str, ...]
    no_input_ms: int
    grammar: str = "options"


@dataclass(frozen=True)
class StopListening:
    pass


@dataclass(frozen=True)
class Transfer:
    """Blind-transfer the call to an operator."""

    target: str
    language: str


@dataclass(frozen=True)
class HangUp:
    reason: str


@dataclass(frozen=True)
class LookupApplication:
    """Look the application up in the store; answer with ApplicationFound."""

    number: str
    language: str


@dataclass(frozen=True)
class StartRecording:
    """Record the caller's audio as a message of ``kind`` (complaint, proposal,
    violation) and open its ticket. The shell ends it by itself after ``max_ms`` (and
    posts RecordingSaved); silence is timed by the Listen that follows."""

    kind: str
    option: str
    language: str
    max_ms: int


@dataclass(frozen=True)
class StopRecording:
    """End the message recording, keep what was recorded, post RecordingSaved (not after a
    hang-up). reason: key, silence, hangup, call_ending (EndCall), fault, record_failed."""

    reason: str


@dataclass(frozen=True)
class RequestCallback:
    """Put the caller in the callback queue. reason: after_hours, hung_up_waiting,
    status_failed."""

    reason: str
    language: str


@dataclass(frozen=True)
class Turn:
    """One caller turn, for the call record and the transcript.

    input: "dtmf", "speech" or "none"; heard: the key or the recognised text;
    confidence: key 1.0, speech the combined score; option: option chosen or None;
    result: accepted, confirm, rejected (said no), no_match, no_input;
    prompt: key of the first prompt played in response (its text in prompt_text);
    barge_in: the input interrupted a prompt; latency_ms: input end to reply
    playback start, filled in by the shell that plays it (None until then).
    """

    t_ms: float
    node: str
    language: str | None
    input: str
    heard: str
    confidence: float | None
    option: str | None
    result: str
    prompt: str | None
    prompt_text: str | None
    barge_in: bool = False
    input_end_ms: float | None = None
    latency_ms: float | None = None


@dataclass(frozen=True)
class LogTurn:
    turn: Turn


@dataclass(frozen=True)
class SaveCallerSettings:
    """The caller changed a control: remember ``settings`` for their number (the shell
    stores them for 90 days; default settings forget the number)."""

    settings: CallerSettings


Action = (Play | StopPlayback | Listen | StopListening | Transfer | HangUp | LogTurn
          | LookupApplication | StartRecording | StopRecording | RequestCallback
          | SaveCallerSettings)


BEEP = "beep"  # prompt key of the tone before a message; the shell plays a tone, not TTS
MAX_NUMBER_DIGITS = 20
MAX_FAULTS = 2  # the first Fault is apologised for and the call goes on; the second ends it


class Mode(enum.StrEnum):
    """What the engine is doing. A StrEnum: the shell compares ``engine.mode`` to strings."""

    IDLE = "idle"  # before CallStarted
    MENU = "menu"  # a menu node, listening for its options
    CONFIRM = "confirm"  # "did you say ...?" after speech between the thresholds
    DIGITS = "digits"  # an application number is being entered
    STATUS_CONFIRM = "status_confirm"  # the number read back, yes/no
    LOOKUP = "lookup"  # waiting on the shell: LookupApplication -> ApplicationFound
    OFFER = "offer"  # a callback offered, yes/no
    RECORD_INTRO = "record_intro"  # the instructions and the beep before a message
    RECORDING = "recording"  # the caller's message is being recorded
    SAVING = "saving"  # waiting on the shell: StopRecording -> RecordingSaved
    TRANSFER = "transfer"  # "please hold", then waiting on the shell for the REFER result
    CLOSING = "closing"  # the last prompt (goodbye) plays, then HangUp
    ENDED = "ended"  # hung up: nothing more happens


DUTY_MODES = (Mode.DIGITS, Mode.STATUS_CONFIRM, Mode.LOOKUP, Mode.OFFER, Mode.RECORD_INTRO,
              Mode.RECORDING, Mode.SAVING)
# Modes where the caller's input is taken (a Listen with its timer is in force).
LISTENING_MODES = frozenset({Mode.MENU, Mode.CONFIRM, Mode.DIGITS, Mode.STATUS_CONFIRM,
                             Mode.OFFER, Mode.RECORDING})
# Modes that wait, without a timer of their own, for the shell: its answer to a request,
# the end of the last prompt, or CallStarted. The shell's watchdog posts Fault when it
# never comes (the caller hears nothing meanwhile).
SHELL_MODES = frozenset({Mode.IDLE, Mode.LOOKUP, Mode.SAVING, Mode.CLOSING})


@dataclass(frozen=True)
class DialogSettings:
    """Everything the engine needs besides the grammars.

    offered: languages offered at the language menu (in key order), those whose
    pack and model rules allow it; speech_languages: languages with an ASR model.
    """

    hours: WorkingHours
    default_language: str
    offered: tuple[str, ...]
    speech_languages: frozenset[str]
    accept: float = 0.70
    confirm: float = 0.40
    max_retries: int = 2
    no_input_ms: int = 6000
    digit_pause_ms: int = 1500  # silence after spoken digits that ends the number
    operator_uri: str = "sip:operator@127.0.0.1:5099"
    status_attempts: int = 3  # failed tries at the status menu before operator/callback
    record_max_ms: int = 120_000
    record_silence_ms: int = 5000


@dataclass
class _NumberEntry:
    """An application number being entered, by keys and spoken groups, until # or a pause."""

    digits: str = ""
    said: tuple[str, ...] = ()  # what ASR heard, group by group
    end_ms: float | None = None  # end of the last spoken group (media time)
    confidence: float = 1.0  # lowest ASR confidence over the spoken groups
    keyed: bool = False  # a key was pressed: speech is off for the rest of this entry


@dataclass
class _State:
    language: str | None = None
    node: str = ""
    mode: Mode = Mode.IDLE
    pending: Option | None = None
    retries: int = 0
    escalations: int = 0
    next_play: int = 1
    playing: dict[int, bool] = field(default_factory=dict)  # play id -> barge-in allowed
    typeahead: list[DtmfReceived] = field(default_factory=list)
    last_prompts: tuple[Prompt, ...] = ()
    confirmed: str | None = None  # the option the last "yes" confirmed
    served: bool = False  # the caller got information (a play option) at least once
    barged: bool = False  # speech stopped a prompt; its result is a barge-in turn
    transferred: bool = False  # the Transfer (REFER) was sent
    transfer_failures: int = 0
    started: dt.datetime | None = None
    entry: _NumberEntry = field(default_factory=_NumberEntry)
    number: str = ""  # number read back / looked up
    status_failures: int = 0
    callback_reason: str = ""
    record_option: Option | None = None
    callback_requested: bool = False
    served_before_callback: bool = False  # restored when the booked callback is not stored
    faults: int = 0
    ending: bool = False  # EndCall came: only the goodbye and the hang-up are left
    hangup_reason: str = "goodbye"  # HangUp reason once the closing prompt ends
    settings: CallerSettings = field(default_factory=CallerSettings)  # the caller's controls
    help_from: str = ""  # the menu node help was opened from (* and a control go back there)
    slack: bool = False  # the next Listen follows a no-input or no-match: 1.5x its time
    warned: bool = False  # the timeout warning was said for the Listen in force
    last_listen: Listen | None = None  # the Listen in force (the warning listens again)
    language_by: str = ""  # how the language was chosen: key, name or detected ("" preset)


class DialogEngine:
    """One call's dialog. ``handle(event)`` returns the actions to carry out, in order."""

    def __init__(self, grammars: Grammars, settings: DialogSettings) -> None:
        self.g = grammars
        self.menu = grammars.menu
        self.s = settings
        self.st = _State()

    # -- read-only views for the shell and tests --

    @property
    def language(self) -> str | None:
        return self.st.language

    @property
    def node(self) -> str:
        return self.st.node

    @property
    def mode(self) -> Mode:
        return self.st.mode

    @property
    def playing(self) -> bool:
        return bool(self.st.playing)

    @property
    def accepting_input(self) -> bool:
        """The caller's input is taken now (menus, confirmations, numbers, messages): a
        Listen with its no-input timer is in force once the prompts end."""
        return self.st.mode in LISTENING_MODES

    @property
    def waiting_on_shell(self) -> bool:
        """The engine waits, with no timer of its own, for the shell: a lookup, the end of a
        message, the REFER result, the end of the goodbye (or CallStarted). If the caller
        hears nothing meanwhile for too long, the shell's watchdog should post Fault."""
        mode = self.st.mode
        return mode in SHELL_MODES or (mode is Mode.TRANSFER and self.st.transferred)

    @property
    def outcome(self) -> str:
        """transferred (to an operator), completed (information given, or said goodbye),
        or abandoned (the caller left before being served)."""
        if self.st.transferred:
            return "transferred"
        return "completed" if self.st.served else "abandoned"

    # -- event dispatch --

    def handle(self, event: Event) -> list[Action]:
        """The actions for one event. Every (mode, event) pair has its handler in
        ``_DISPATCH``; an event a mode does not concern is ignored there explicitly."""
        out = _DISPATCH[self.st.mode][type(event)](self, event)
        for a in reversed(out):
            if isinstance(a, Listen):
                self.st.last_listen = a
                break
        return out

    @property
    def settings(self) -> CallerSettings:
        return self.st.settings

    @property
    def language_by(self) -> str:
        """How the caller's language was chosen: "key", "name" (said the language's name),
        "detected" (said a home-menu option in it at the language menu), or "" (the call
        started in a language, or none was chosen)."""
        return self.st.language_by

    def _ignore(self, ev: Event) -> list[Action]:
        return []

    # -- helpers building prompts --

    def _now(self, t_ms: float) -> dt.datetime:
        assert self.st.started is not None
        return self.st.started + dt.timedelta(milliseconds=t_ms)

    def _open(self, t_ms: float) -> bool:
        return self.st.started is not None and self.s.hours.is_open(self._now(t_ms))

    def _prompt(self, key: str, language: str | None = None, **params: str) -> Prompt:
        lang = language or self.st.language or self.s.default_language
        pack = self.g.pack(lang)
        text = say_hours(pack, self.s.hours) if key == "hours" else pack.text(key, **params)
        # Every prompt carries the caller's rate and loudness, so a change takes effect at
        # the next prompt.
        return Prompt(lang, key, text, pack.voice, self.st.settings.rate,
                      self.st.settings.gain_db)

    def _prompts(self, key: str) -> tuple[Prompt, ...]:
        """``key`` in the caller's language, or, before a language is chosen, in every
        offered language (as the language menu is said)."""
        if self.st.language is not None:
            return (self._prompt(key),)
        langs = [lang for lang in self.s.offered if lang in self.g.packs]
        return tuple(self._prompt(key, lang) for lang in langs or [self.s.default_language])

    def _offered_here(self, node: Node, spoken: bool = False) -> tuple[Option, ...]:
        """A node's choices (``spoken``: what may be said there, see Menu.spoken_choices),
        without languages that are not offered on this line."""
        choices = self.menu.spoken_choices(node.id) if spoken else self.menu.choices(node.id)
        return tuple(o for o in choices if o.kind != "language" or o.target in self.s.offered)

    def _menu_prompts(self, node_id: str) -> tuple[Prompt, ...]:
        node = self.menu.node(node_id)
        if node.multilingual:
            langs = [o.target for o in node.options
                     if o.kind == "language" and o.target in self.s.offered]
            return tuple(self._prompt(node.prompt, lang) for lang in langs)
        if node_id == HELP_NODE:
            return self._prompts(node.prompt)
        prompts = [self._prompt(node.prompt)]
        if self.st.language in self.s.speech_languages:
            prompts.append(self._prompt("speech_hint"))
        return tuple(prompts)

    def _no_input_ms(self, base: int | None = None) -> int:
        """The no-input time of the next Listen: the configured one, x3 after "more time",
        0 (no timer) after a second "more time", and x1.5 right after a no-input or a
        no-match (the caller is struggling: give them longer)."""
        ms = self.s.no_input_ms if base is None else base
        more = self.st.settings.more_time
        if more >= 2:
            return 0
        if more == 1:
            ms *= 3
        if self.st.slack:
            ms = ms * 3 // 2
        self.st.slack = False
        return ms

    def _listen(self, node_id: str) -> Listen:
        node = self.menu.node(node_id)
        if node.multilingual:
            langs = tuple(lang for lang in self.s.offered if lang in self.s.speech_languages)
        else:
            lang = self.st.language or self.s.default_language
            langs = (lang,) if lang in self.s.speech_languages else ()
        return Listen(node_id, langs, tuple(o.id for o in self._offered_here(node, True)),
                      self._no_input_ms())

    def _play(self, prompts: tuple[Prompt, ...], barge_in: bool = True,
              remember: bool = True) -> Play:
        pid = self.st.next_play
        self.st.next_play += 1
        self.st.playing[pid] = barge_in
        if remember:
            self.st.last_prompts = prompts
        return Play(pid, prompts, barge_in)

    def _stop(self, reason: str) -> list[Action]:
        if not self.st.playing:
            return []
        self.st.playing.clear()
        return [StopPlayback(reason)]

    def _go_menu(self, node_id: str, lead: tuple[Prompt, ...] = ()) -> list[Action]:
        """Enter a menu node: say ``lead`` prompts, then the node's menu, and listen."""
        self.st.node = node_id
        self.st.mode = Mode.MENU
        self.st.pending = None
        self.st.warned = False
        return [self._play((*lead, *self._menu_prompts(node_id))), self._listen(node_id)]

    def _menu_node(self) -> str:
        """The menu to return to: the current node if it is a menu node (the status,
        callback and message duties are not), else home, or the language menu before a
        language was chosen."""
        if self.st.node == HELP_NODE and self.st.help_from:
            return self.st.help_from
        if self.st.node in self.menu.nodes:
            return self.st.node
        return self.menu.home if self.st.language is not None else self.menu.start

    def _turn(self, t_ms: float, input_: str, heard: str, confidence: float | None,
              option: str | None, result: str, actions: list[Action], barge_in: bool,
              input_end_ms: float | None, node: str, language: str | None) -> LogTurn:
        first = next((a.prompts[0] for a in actions if isinstance(a, Play) and a.prompts), None)
        return LogTurn(Turn(
            t_ms=t_ms, node=node, language=language, input=input_, heard=heard,
            confidence=confidence, option=option, result=result,
            prompt=first.key if first else None, prompt_text=first.text if first else None,
            barge_in=barge_in, input_end_ms=input_end_ms))

    # -- the call's start and end --

    def _on_start(self, ev: CallStarted) -> list[Action]:
        self.st.started = ev.at
        # A language without a pack (a misconfigured line) starts at the language menu
        # rather than leave the caller in silence.
        language = ev.language if ev.language in self.g.packs else None
        welcome_lang = language or self.s.default_language
        # The caller's remembered controls apply from the first prompt; one short sentence
        # after the welcome says so (only where the menu has controls to change them back).
        restored: tuple[Prompt, ...] = ()
        if ev.settings is not None and not ev.settings.default and self.menu.controls:
            self.st.settings = _clamp(ev.settings)
            restored = (self._prompt("settings_restored", welcome_lang),)
        welcome = self._play((self._prompt("welcome", welcome_lang), *restored),
                             barge_in=False, remember=False)
        if language:
            self.st.language = language
            return [welcome, *self._go_menu(self.menu.home)]
        return [welcome, *self._go_menu(self.menu.start)]

    def _on_hang_up(self, ev: CallerHungUp) -> list[Action]:
        mode = self.st.mode
        self.st.mode = Mode.ENDED
        self.st.playing.clear()
        out: list[Action] = [StopListening()]
        if mode is Mode.RECORDING:
            out.append(StopRecording("hangup"))  # what the caller said so far is kept
        if mode is Mode.TRANSFER and not self.st.transferred:
            # The caller gave up while waiting for an operator: call them back.
            self.st.callback_requested = True
            out.append(RequestCallback("hung_up_waiting", self._lang()))
        return out

    def _leave(self, reason: str) -> list[Action]:
        """Stop whatever the current mode has going (prompts, listening, a message being
        recorded) before the engine takes another path."""
        out = self._stop(reason)
        self.st.typeahead.clear()
        self.st.pending = None
        self.st.barged = False
        out.append(StopListening())
        if self.st.mode is Mode.RECORDING:
            out.append(StopRecording(reason))  # the shell keeps what was recorded
        return out

    def _close(self, prompts: tuple[Prompt, ...], reason: str) -> list[Action]:
        """Say ``prompts`` (not interruptible), then hang up with ``reason``."""
        self.st.mode = Mode.CLOSING
        self.st.hangup_reason = reason
        return [self._play(prompts, barge_in=False, remember=False)]

    def _on_end_call(self, ev: EndCall) -> list[Action]:
        """Shutdown or the maximum call length, in any live mode: goodbye, then HangUp. In
        transfer after the REFER went out the engine does not wait for its result."""
        out = self._leave("call_ending")
        self.st.ending = True
        return [*out, *self._close((self._prompt("call_ending"),), ev.reason or "call_ending")]

    def _end_call_closing(self, ev: EndCall) -> list[Action]:
        """A goodbye is already playing: the hang-up follows it."""
        self.st.ending = True
        if self.st.playing:
            return []
        self.st.mode = Mode.ENDED
        return [HangUp(ev.reason or "call_ending")]

    def _closing_prompt_finished(self, ev: PromptFinished) -> list[Action]:
        self.st.playing.pop(ev.play_id, None)
        if self.st.playing:
            return []
        self.st.mode = Mode.ENDED
        return [HangUp(self.st.hangup_reason)]

    # -- failures: apologise, then the operator or a menu --

    def _recover(self, lead: tuple[Prompt, ...], t_ms: float,
                 operator: bool = True) -> list[Action]:
        """After a failure: ``lead`` (the apology), then in working hours the operator, else
        (or when the operator is what failed) the menu to return to."""
        if operator and self._open(t_ms):
            if self.st.language is None:
                self.st.language = self.s.default_language
            return self._to_operator(lead)
        return self._go_menu(self._menu_node(), lead)

    def _on_fault(self, ev: Fault) -> list[Action]:
        """An error in the shell or dead air: apologise and move on; the second one ends
        the call (an engine that keeps faulting must not keep the caller on the line)."""
        self.st.faults += 1
        # After the REFER went out, the transfer is what is stuck: do not try it again.
        operator = not (self.st.mode is Mode.TRANSFER and self.st.transferred)
        # A transfer the far end never answered did not happen: the caller is still here.
        self.st.transferred = False
        out = self._leave("fault")
        apology = self._prompts("apology")
        if self.st.faults >= MAX_FAULTS or self.st.mode is Mode.IDLE:
            return [*out, *self._close((*apology, *self._prompts("goodbye")), "fault")]
        return [*out, *self._recover(apology, ev.t_ms, operator)]

    def _fault_closing(self, ev: Fault) -> list[Action]:
        """A fault while the goodbye plays (or should): hang up now, nothing is left to say."""
        self.st.faults += 1
        self.st.mode = Mode.ENDED
        return [*self._stop("fault"), HangUp("fault")]

    def _on_transfer_failed(self, ev: TransferFailed) -> list[Action]:
        self.st.transferred = False
        self.st.transfer_failures += 1
        stop = self._stop("transfer_failed")
        return [*stop, *self._go_menu(self._menu_node(), (self._prompt("transfer_failed"),))]

    def _lookup_failed(self, ev: LookupFailed) -> list[Action]:
        """The store could not be read: the operator in hours, else a callback offer."""
        lead = (self._prompt("lookup_failed"),)
        self.st.status_failures = 0
        if self._open(ev.t_ms):
            return self._recover(lead, ev.t_ms)
        return self._offer_callback((*lead, self._prompt("operator_closed")), "status_failed")

    def _record_failed(self, ev: TicketFailed | RecordingFailed) -> list[Action]:
        """No ticket, no file, or the recording broke off: the message is not kept."""
        self.st.record_option = None
        out = self._leave("record_failed")
        return [*out, *self._recover((self._prompt("record_failed"),), ev.t_ms)]

    def _closing_callback_failed(self, ev: CallbackFailed) -> list[Action]:
        """The callback just promised was not stored: take the promise back (unless the
        call is ending anyway) and let the caller go on."""
        if self.st.ending or not self.st.callback_requested:
            return []
        self.st.callback_requested = False
        self.st.served = self.st.served_before_callback
        out = self._stop("callback_failed")
        return [*out, *self._recover((self._prompt("callback_failed"),), ev.t_ms)]

    # -- menus --

    def _on_prompt_finished(self, ev: PromptFinished) -> list[Action]:
        barge_in = self.st.playing.pop(ev.play_id, None)
        actions: list[Action] = []
        if barge_in is False and self.st.typeahead:
            # Keys pressed during the recording notice act now, in order, each in the mode
            # the previous one left.
            pending, self.st.typeahead = self.st.typeahead, []
            for d in pending:
                actions.extend(self.handle(d))
        return actions

    def _intro_finished(self, ev: PromptFinished) -> list[Action]:
        self.st.playing.pop(ev.play_id, None)
        if self.st.playing:
            return []
        return self._start_recording()

    def _transfer_prompt_finished(self, ev: PromptFinished) -> list[Action]:
        self.st.playing.pop(ev.play_id, None)
        if self.st.playing or self.st.transferred:
            return []
        self.st.transferred = True
        return [Transfer(self.s.operator_uri, self._lang())]

    def _menu_speech_started(self, ev: SpeechStarted) -> list[Action]:
        if self.st.playing and all(self.st.playing.values()):
            self.st.barged = True
            return self._stop("barge-in: speech")
        return []

    def _current_choices(self, spoken: bool = False) -> tuple[Option, ...]:
        if self.st.mode is Mode.CONFIRM:
            return self.menu.confirm_choices()
        return self._offered_here(self.menu.node(self.st.node), spoken)

    def _menu_dtmf(self, ev: DtmfReceived) -> list[Action]:
        if self.st.playing and not all(self.st.playing.values()):
            self.st.typeahead.append(ev)
            return []
        barge = bool(self.st.playing)
        lang = self.st.language
        actions = self._stop("barge-in: key")
        option = next((o for o in self._current_choices() if o.key == ev.digit), None)
        node = "confirm" if self.st.mode is Mode.CONFIRM else self.st.node
        if option is None:
            out = self._failure("no_match", ev.t_ms)
            return [*actions, self._turn(ev.t_ms, "dtmf", ev.digit, 1.0, None, "no_match", out,
                                         barge, ev.t_ms, node, lang), *out]
        out = self._choose(option, ev.t_ms)
        if option.kind == "language":
            self.st.language_by = "key"
        result = "rejected" if option.id == self.menu.no.id else "accepted"
        chosen = self._chosen_id(option)
        return [*actions, self._turn(ev.t_ms, "dtmf", ev.digit, 1.0, chosen, result, out, barge,
                                     ev.t_ms, node, lang), *out]

    def _chosen_id(self, option: Option) -> str | None:
        """The option a turn records: yes records the option it confirmed."""
        if option.id == self.menu.yes.id:
            return self.st.confirmed
        if option.id == self.menu.no.id:
            return None
        return option.id

    def _menu_speech(self, ev: SpeechRecognized) -> list[Action]:
        if self.st.playing and not all(self.st.playing.values()):
            # Talking over the recording notice is not an answer (keys typed ahead are):
            # the notice plays on and the keys pressed during it still count.
            self.st.barged = False
            return []
        barge = bool(self.st.playing) or self.st.barged
        self.st.barged = False
        actions = self._stop("barge-in: speech")
        node = "confirm" if self.st.mode is Mode.CONFIRM else self.st.node
        choices = {o.id: o for o in self._current_choices(spoken=True)}
        option = choices.get(ev.option) if ev.option else None
        if (option is not None and self.st.mode is Mode.MENU and self.st.language is None
                and self.menu.home in self.menu.nodes
                and option.id in {o.id for o in self.menu.node(self.menu.home).options}
                and ev.score >= self.s.confirm and ev.language in self.g.packs
                and ev.language in self.s.offered):
            # The caller said what they want in their own language at the language menu:
            # that language is theirs, and the words are taken as said at the home menu.
            self.st.language = ev.language
            self.st.language_by = "detected"
            self.st.node = self.menu.home
            self.st.barged = barge
            return [*actions, *self._menu_speech(ev)]
        if option is not None and option.id not in {o.id for o in self._current_choices()} \
                and option.id not in {o.id for o in self.menu.controls}:
            option = None  # a home-menu word in a language not offered: no match here
        # While confirming, anything above the lower threshold counts: a confirmation
        # of a confirmation would only annoy the caller.
        accept = self.s.confirm if self.st.mode is Mode.CONFIRM else self.s.accept
        if option is not None and ev.score >= accept:
            out = self._choose(option, ev.t_ms)
            result = "rejected" if option.id == self.menu.no.id else "accepted"
            turn = self._turn(ev.t_ms, "speech", ev.text, ev.score, self._chosen_id(option),
                              result, out, barge, ev.input_end_ms, node, ev.language)
            return [*actions, turn, *out]
        if option is not None and ev.score >= self.s.confirm and ev.language in self.g.packs:
            self.st.mode = Mode.CONFIRM
            self.st.pending = option
            label = self.g.pack(ev.language).words(option.id).label
            out: list[Action] = [
                self._play((self._prompt("confirm", ev.language, label=label),)),
                Listen("confirm", (ev.language,),
                       tuple(o.id for o in self.menu.confirm_choices()), self._no_input_ms()),
            ]
            turn = self._turn(ev.t_ms, "speech", ev.text, ev.score, None, "confirm", out, barge,
                              ev.input_end_ms, node, ev.language)
            return [*actions, turn, *out]
        out = self._failure("no_match", ev.t_ms)
        turn = self._turn(ev.t_ms, "speech", ev.text, ev.score, None, "no_match", out, barge,
                          ev.input_end_ms, node, ev.language)
        return [*actions, turn, *out]

    def _warn(self, digits: bool = False) -> list[Action] | None:
        """Before a no-input timeout ends the call or moves the caller on: once, say that the
        bot is still listening and how to ask for more time, and listen again (issue 12).
        None when the warning was already said for this Listen (the timeout goes ahead)."""
        if self.st.warned or self.st.last_listen is None or not self.menu.controls:
            return None
        self.st.warned = True
        key = "timeout_warning_digits" if digits else "timeout_warning"
        return [self._play(self._prompts(key), remember=False), self.st.last_listen]

    def _menu_timeout(self, ev: InputTimeout) -> list[Action]:
        if self.st.playing:
            return []
        node = "confirm" if self.st.mode is Mode.CONFIRM else self.st.node
        lang = self.st.language
        warning = self._warn() if self.st.retries >= self.s.max_retries else None
        if warning is not None:
            return [self._turn(ev.t_ms, "none", "", None, None, "no_input", warning, False,
                               None, node, lang), *warning]
        out = self._failure("no_input", ev.t_ms)
        return [self._turn(ev.t_ms, "none", "", None, None, "no_input", out, False, None, node,
                           lang), *out]

    # -- choosing --

    def _choose(self, option: Option, t_ms: float) -> list[Action]:
        """Carry out an option; returns the actions (without the turn log)."""
        self.st.warned = False
        if option.kind == "control":
            return self._control(option.target)
        self.st.retries = 0
        if option.id == self.menu.yes.id:
            pending = self.st.pending
            self.st.mode = Mode.MENU
            self.st.pending = None
            if pending is None:
                return self._go_menu(self.st.node)
            self.st.confirmed = pending.id
            return self._choose(pending, t_ms)
        if option.id == self.menu.no.id:
            self.st.mode = Mode.MENU
            self.st.pending = None
            return self._failure("no_match", t_ms)
        if option.id == self.menu.repeat.id:
            return [self._play(self.st.last_prompts or self._menu_prompts(self.st.node)),
                    self._listen(self.st.node)]
        if option.id == self.menu.back.id:
            if self.st.node == HELP_NODE:
                return self._go_menu(self._menu_node())
            parent = self.menu.node(self.st.node).back or self.st.node
            return self._go_menu(parent)
        if self.menu.operator is not None and option.id == self.menu.operator.id:
            return self._operator(t_ms)
        if option.kind == "language":
            self.st.language = option.target
            self.st.language_by = "name"  # a key press says "key" (_menu_dtmf)
            return self._go_menu(self.menu.home)
        if option.kind == "goto":
            return self._go_menu(option.target)
        if option.kind == "play":
            self.st.served = True
            return self._go_menu(self.st.node, (self._prompt(option.target),))
        if option.kind == "action" and option.target == "operator":
            return self._operator(t_ms)
        if option.kind == "action" and option.target == "status":
            self.st.status_failures = 0
            return self._ask_number()
        if option.kind == "record":
            return self._record_intro(option)
        raise ValueError(f"option {option.id} has an unknown kind {option.kind}")

    # -- caller controls (issue 12) --

    def _control(self, name: str) -> list[Action]:
        """Help opens the help menu; every other control changes the caller's setting (or
        says it is at its limit), acknowledges it at the new setting, and says the menu the
        caller was at again. A control is no retry: the caller is doing well."""
        if name == "help":
            if self.st.node != HELP_NODE:
                self.st.help_from = self.st.node
            return self._go_menu(HELP_NODE)
        old = self.st.settings
        rate, gain, more = old.rate_step, old.gain_db, old.more_time
        if name == "slower":
            rate -= 1
        elif name == "faster":
            rate += 1
        elif name == "louder":
            gain += 6
        elif name == "quieter":
            gain -= 6
        elif name == "more_time":
            more += 1
        new = _clamp(CallerSettings(rate, gain, more))
        node = self._menu_node()
        if new == old:
            return self._go_menu(node, (self._prompt("control_limit"),))
        self.st.settings = new
        key = {"more_time": "control_no_timeout" if new.more_time >= 2 else "control_more_time"
               }.get(name, f"control_{name}")
        return [SaveCallerSettings(new), *self._go_menu(node, (self._prompt(key),))]

    def _to_operator(self, lead: tuple[Prompt, ...]) -> list[Action]:
        self.st.mode = Mode.TRANSFER
        self.st.transferred = False
        return [self._play((*lead, self._prompt("operator_transfer")), barge_in=False),
                StopListening()]

    def _operator(self, t_ms: float) -> list[Action]:
        if self.st.language is None:
            self.st.language = self.s.default_language
        if self._open(t_ms):
            return self._to_operator(())
        lead = (self._prompt("operator_closed"), self._prompt("hours"))
        return self._offer_callback(lead, "after_hours")

    def _failure(self, kind: str, t_ms: float) -> list[Action]:
        """No input or no match: re-prompt, or escalate after max_retries."""
        node = self.st.node
        self.st.mode = Mode.MENU
        self.st.pending = None
        self.st.retries += 1
        if self.st.retries <= self.s.max_retries:
            self.st.slack = True
            return self._go_menu(node, (self._prompt(kind),))
        self.st.retries = 0
        self.st.escalations += 1
        if self.st.language is None:
            self.st.language = self.s.default_language
        return self._escalate(kind, t_ms)

    def _escalate(self, kind: str, t_ms: float) -> list[Action]:
        lead = (self._prompt(kind),)
        # A second escalation after the operators could not take the call says goodbye, as
        # outside hours: a silent line must not cycle between menu and transfer for ever.
        open_ = self._open(t_ms) and not (self.st.escalations > 1 and self.st.transfer_failures)
        if open_:
            return self._to_operator(lead)
        # A caller who asked for more time is never hung up on for silence: they get the
        # information menu again (the call still ends at max_call_s).
        if self.st.escalations > 1 and not self.st.settings.more_time:
            self.st.served = True  # the bot ends the call itself, politely
            return [*self._close((*lead, self._prompt("goodbye")), "goodbye"), StopListening()]
        return self._go_menu(self.menu.fallback, (*lead, self._prompt("escalate_info")))

    # -- call-centre duties: application status, messages, callbacks --

    def _lang(self) -> str:
        return self.st.language or self.s.default_language

    def _speech_langs(self) -> tuple[str, ...]:
        lang = self._lang()
        return (lang,) if lang in self.s.speech_languages else ()

    def _yes_no_listen(self) -> Listen:
        return Listen("confirm", self._speech_langs(),
                      tuple(o.id for o in self.menu.confirm_choices()), self._no_input_ms())

    def _number_listen(self, keyed: bool = False) -> Listen:
        """The Listen for an application number: spoken digits (and "more time") until a key
        is pressed, keys only after it."""
        more = self.menu.control("more_time")
        options = (more.id,) if more is not None and not keyed else ()
        return Listen("status", () if keyed else self._speech_langs(), options,
                      self._no_input_ms(), "digits")

    @staticmethod
    def spell(digits: str) -> str:
        """A number said digit by digit ("1 2 3"), as call centres read numbers back."""
        return " ".join(digits)

    def _ask_number(self, lead: tuple[Prompt, ...] = ()) -> list[Action]:
        self.st.node = "status"
        self.st.mode = Mode.DIGITS
        self.st.entry = _NumberEntry()
        self.st.pending = None
        self.st.warned = False
        return [self._play((*lead, self._prompt("status_ask"))), self._number_listen()]

    def _status_failure(self, kind: str, t_ms: float,
                        lead: tuple[Prompt, ...] = ()) -> list[Action]:
        """A failed try at the status menu: ask again, or after status_attempts hand over to
        an operator (in hours) or offer a callback."""
        self.st.status_failures += 1
        lead = lead or (self._prompt(kind),)
        if self.st.status_failures < self.s.status_attempts:
            self.st.slack = kind in ("no_input", "no_match")
            return self._ask_number(lead)
        self.st.status_failures = 0
        if self._open(t_ms):
            return self._to_operator(lead)
        return self._offer_callback((*lead, self._prompt("operator_closed")), "status_failed")

    def _number_done(self, t_ms: float, key: str = "", barge: bool = False) -> list[Action]:
        """The number is complete (``#``, or a pause after it): one turn for all of it."""
        entry = self.st.entry
        spoken = entry.said
        heard = " ".join(spoken) if spoken else entry.digits + key
        result = "number" if entry.digits else "no_match"
        end = entry.end_ms if spoken else t_ms
        confidence = entry.confidence if spoken else 1.0
        out = self._number_entered(t_ms)
        return [self._turn(t_ms, "speech" if spoken else "dtmf", heard, confidence, None, result,
                           out, barge, end, "status", self.st.language), *out]

    def _number_entered(self, t_ms: float) -> list[Action]:
        if not self.st.entry.digits:
            return self._status_failure("no_match", t_ms)
        self.st.number = self.st.entry.digits
        self.st.entry = _NumberEntry()
        self.st.mode = Mode.STATUS_CONFIRM
        return [self._play((self._prompt("status_readback", number=self.spell(self.st.number)),)),
                self._yes_no_listen()]

    def _offer_callback(self, lead: tuple[Prompt, ...], reason: str) -> list[Action]:
        self.st.mode = Mode.OFFER
        self.st.node = "callback"
        self.st.callback_reason = reason
        self.st.retries = 0
        return [self._play((*lead, self._prompt("callback_offer"))), self._yes_no_listen()]

    def _record_intro(self, option: Option) -> list[Action]:
        self.st.mode = Mode.RECORD_INTRO
        self.st.node = "record"
        self.st.record_option = option
        # The instructions and the beep are not interruptible: the message starts after it.
        beep = Prompt(self._lang(), BEEP, "", "")
        return [self._play((self._prompt("record_instructions"), beep), barge_in=False),
                StopListening()]

    def _start_recording(self) -> list[Action]:
        option = self.st.record_option
        assert option is not None
        self.st.mode = Mode.RECORDING
        return [StartRecording(option.target, option.id, self._lang(), self.s.record_max_ms),
                Listen("record", (), (), self.s.record_silence_ms, "none")]

    def _yes_no(self, key: str | None, option: str | None) -> bool | None:
        if key is not None:
            return True if key == self.menu.yes.key else False if key == self.menu.no.key \
                else None
        if option == self.menu.yes.id:
            return True
        if option == self.menu.no.id:
            return False
        return None

    def _recording_key(self, ev: DtmfReceived) -> list[Action]:
        # Any key ends the message (# is what the prompt says); the tone is cut off.
        self.st.mode = Mode.SAVING
        return [StopRecording("key"), StopListening()]

    def _recording_silence(self, ev: InputTimeout) -> list[Action]:
        if self.st.playing:
            return []
        self.st.mode = Mode.SAVING
        return [StopRecording("silence"), StopListening()]

    def _duty_speech_started(self, ev: SpeechStarted) -> list[Action]:
        if self.st.playing and all(self.st.playing.values()):
            self.st.barged = True
            return self._stop("barge-in: speech")
        return []

    def _duty_dtmf(self, ev: DtmfReceived) -> list[Action]:
        mode = self.st.mode
        if self.st.playing and not all(self.st.playing.values()):
            return []
        barge = bool(self.st.playing)
        stop = self._stop("barge-in: key")
        if mode is Mode.DIGITS:
            if ev.digit == self.menu.back.key:
                out = self._go_menu(self.menu.home)
                return [*stop, self._turn(ev.t_ms, "dtmf", ev.digit, 1.0, self.menu.back.id,
                                          "accepted", out, barge, ev.t_ms, "status",
                                          self.st.language), *out]
            if ev.digit.isdigit() and len(self.st.entry.digits) < MAX_NUMBER_DIGITS:
                self.st.entry.digits += ev.digit  # no turn per digit: the number is one turn
                if self.st.entry.keyed:
                    return stop
                # The caller is keying the number: from now on background talk must not add
                # digits to it, so recognition stops for this entry (keys and the timer go on).
                self.st.entry.keyed = True
                return [*stop, self._number_listen(keyed=True)]
            if ev.digit != "#":
                return stop
            return [*stop, *self._number_done(ev.t_ms, "#", barge)]
        control = self._duty_key(ev, barge)
        if control is not None:
            return [*stop, *control]
        answer = self._yes_no(ev.digit, None)
        return [*stop, *self._answer(answer, ev.t_ms, "dtmf", ev.digit, 1.0, barge, ev.t_ms,
                                     self.st.language)]

    def _duty_key(self, ev: DtmfReceived, barge: bool) -> list[Action] | None:
        """At a yes/no question of a duty: 0 reaches the operator, 6 gives more time (the
        question is asked again at the new setting); None for every other key."""
        node = "confirm" if self.st.mode is Mode.STATUS_CONFIRM else "callback"
        op, more = self.menu.operator, self.menu.control("more_time")
        if op is not None and ev.digit == op.key:
            self.st.warned = False
            out = self._operator(ev.t_ms)
            chosen: str = op.id
        elif more is not None and ev.digit == more.key:
            out = self._more_time_here()
            chosen = more.id
        else:
            return None
        return [self._turn(ev.t_ms, "dtmf", ev.digit, 1.0, chosen, "accepted", out, barge,
                           ev.t_ms, node, self.st.language), *out]

    def _more_time_here(self) -> list[Action]:
        """"More time" in a duty: acknowledged, then the same question or number prompt again
        with the longer timer."""
        self.st.warned = False
        old = self.st.settings
        new = _clamp(replace(old, more_time=old.more_time + 1))
        if new == old:
            ack, save = self._prompt("control_limit"), []
        else:
            self.st.settings = new
            ack = self._prompt("control_no_timeout" if new.more_time >= 2
                               else "control_more_time")
            save = [SaveCallerSettings(new)]
        if self.st.mode is Mode.DIGITS:
            listen = self._number_listen(self.st.entry.keyed)
        else:
            listen = self._yes_no_listen()
        question = "status_ask" if self.st.mode is Mode.DIGITS else (
            "callback_offer" if self.st.mode is Mode.OFFER else "")
        if self.st.mode is Mode.STATUS_CONFIRM:
            again = self._prompt("status_readback", number=self.spell(self.st.number))
        else:
            again = self._prompt(question)
        return [*save, self._play((ack, again)), listen]

    def _duty_speech(self, ev: SpeechRecognized) -> list[Action]:
        mode = self.st.mode
        if self.st.playing and not all(self.st.playing.values()):
            self.st.barged = False
            return []
        barge = bool(self.st.playing) or self.st.barged
        self.st.barged = False
        stop = self._stop("barge-in: speech")
        if mode is Mode.DIGITS and self.st.entry.keyed:
            return stop  # speech after a key in this entry is not part of the number
        if mode is Mode.DIGITS:
            pack = self.g.packs.get(ev.language) or self.g.pack(self._lang())
            said = pack.parse_digits(ev.text)
            if said:
                # More groups may follow: the number ends after digit_pause_ms of silence
                # (InputTimeout) or on #, and is one turn then.
                entry = self.st.entry
                entry.digits = (entry.digits + said)[:MAX_NUMBER_DIGITS]
                entry.said = (*entry.said, ev.text)
                entry.end_ms = ev.input_end_ms
                entry.confidence = min(entry.confidence, ev.asr_confidence)
                return [*stop, Listen("status", self._speech_langs(), (),
                                      self.s.digit_pause_ms, "digits")]
            if self._says(ev, "more_time"):
                return [*stop, *self._more_time_here()]
            if self.st.entry.digits:
                return stop  # a cough or a word between groups: keep waiting for digits
            out = self._number_entered(ev.t_ms)
            return [*stop, self._turn(ev.t_ms, "speech", ev.text, ev.asr_confidence, None,
                                      "no_match", out, barge, ev.input_end_ms, "status",
                                      ev.language), *out]
        answer = self._yes_no(None, ev.option if ev.score >= self.s.confirm else None)
        return [*stop, *self._answer(answer, ev.t_ms, "speech", ev.text, ev.score, barge,
                                     ev.input_end_ms, ev.language)]

    def _says(self, ev: SpeechRecognized, control: str) -> bool:
        """The utterance is one of ``control``'s keywords in its language (the digits
        grammar has no classifier, so the words themselves decide)."""
        option = self.menu.control(control)
        pack = self.g.packs.get(ev.language)
        if option is None or pack is None or option.id not in pack.options:
            return False
        words = pack.words(option.id)
        said = normalize_text(ev.text)
        return bool(said) and any(said in (normalize_text(k), words.asr_phrase(k))
                                  for k in words.keywords)

    def _answer(self, answer: bool | None, t_ms: float, input_: str, heard: str,
                confidence: float | None, barge: bool, input_end_ms: float | None,
                language: str | None) -> list[Action]:
        """Yes, no or neither to a read-back number or to a callback offer."""
        mode = self.st.mode
        node = "confirm" if mode is Mode.STATUS_CONFIRM else "callback"
        option = None  # yes/no here answer a question, they choose no menu option
        result = "no_match" if answer is None else ("accepted" if answer else "rejected")
        if mode is Mode.STATUS_CONFIRM:
            if answer:
                self.st.mode = Mode.LOOKUP
                out: list[Action] = [StopListening(),
                                     LookupApplication(self.st.number, self._lang())]
            else:
                out = self._status_failure("no_match", t_ms)
        elif answer:
            self.st.served_before_callback = self.st.served
            self.st.served = True
            self.st.callback_requested = True
            out = [RequestCallback(self.st.callback_reason, self._lang()), StopListening(),
                   *self._close((self._prompt("callback_booked"), self._prompt("goodbye")),
                                "goodbye")]
        elif answer is False:
            out = self._go_menu(self.menu.fallback)
        else:
            self.st.retries += 1
            if self.st.retries <= self.s.max_retries:
                self.st.mode = Mode.OFFER
                self.st.slack = True
                out = [self._play((self._prompt("no_match"), self._prompt("callback_offer"))),
                       self._yes_no_listen()]
            else:
                out = self._go_menu(self.menu.fallback, (self._prompt("no_match"),))
        return [self._turn(t_ms, input_, heard, confidence, option, result, out, barge,
                           input_end_ms, node, language), *out]

    def _duty_timeout(self, ev: InputTimeout) -> list[Action]:
        mode = self.st.mode
        if self.st.playing:
            return []
        if mode is Mode.DIGITS and self.st.entry.digits:
            # The caller paused after spoken digits, or keyed a number but forgot #: the
            # number is complete.
            return self._number_done(ev.t_ms)
        # The timeout that would move the caller on (to the operator, a callback offer or
        # the information menu) is warned about first.
        last = (self.st.status_failures + 1 >= self.s.status_attempts if mode in
                (Mode.DIGITS, Mode.STATUS_CONFIRM) else self.st.retries >= self.s.max_retries)
        warning = self._warn(digits=mode is Mode.DIGITS) if last else None
        if warning is not None:
            node = {Mode.DIGITS: "status", Mode.STATUS_CONFIRM: "confirm"}.get(mode, "callback")
            return [self._turn(ev.t_ms, "none", "", None, None, "no_input", warning, False,
                               None, node, self.st.language), *warning]
        if mode is Mode.DIGITS:
            out = self._status_failure("no_input", ev.t_ms)
            node = "status"
        elif mode is Mode.STATUS_CONFIRM:
            out = self._status_failure("no_input", ev.t_ms)
            node = "confirm"
        else:  # offer
            self.st.retries += 1
            node = "callback"
            if self.st.retries <= self.s.max_retries:
                self.st.slack = True
                out = [self._play((self._prompt("no_input"), self._prompt("callback_offer"))),
                       self._yes_no_listen()]
            else:
                out = self._go_menu(self.menu.fallback, (self._prompt("no_input"),))
        return [self._turn(ev.t_ms, "none", "", None, None, "no_input", out, False, None, node,
                           self.st.language), *out]

    def _on_application(self, ev: ApplicationFound) -> list[Action]:
        number = self.spell(ev.number)
        if ev.status is None:
            return self._status_failure("status_unknown", ev.t_ms,
                                        (self._prompt("status_unknown", number=number),))
        if ev.status not in APPLICATION_STATES:
            # The store answered with a state no pack can say: as good as no answer.
            return self._lookup_failed(LookupFailed(ev.t_ms, f"unknown status {ev.status!r}"))
        from .spoken import say_date

        self.st.served = True
        self.st.status_failures = 0
        today = self._now(ev.t_ms).date()
        date = say_date(self.g.pack(self._lang()), ev.date, today) if ev.date else ""
        said = self._prompt(f"status_{ev.status}", number=number, date=date)
        return self._go_menu(self.menu.home, (said,))

    def _on_recording_saved(self, ev: RecordingSaved) -> list[Action]:
        option = self.st.record_option
        self.st.record_option = None
        heard = f"{ev.duration_ms / 1000:.1f} s message"
        if ev.speech_ms <= 0:
            out = self._go_menu("report" if "report" in self.menu.nodes else self.menu.home,
                                (self._prompt("record_empty"),))
            return [self._turn(ev.t_ms, "none", heard, None, None, "no_input", out, False,
                               None, "record", self.st.language), *out]
        self.st.served = True
        ticket = self._prompt("record_saved", ticket=self.spell(ev.ticket))
        out = self._go_menu(self.menu.home, (ticket,))
        return [self._turn(ev.t_ms, "speech", heard, None, option.id if option else None,
                           "recorded", out, False, None, "record", self.st.language), *out]


def _clamp(s: CallerSettings) -> CallerSettings:
    """Settings inside their ranges (remembered ones may come from an older version)."""
    return CallerSettings(max(-1, min(1, s.rate_step)),
                          max(GAINS_DB[0], min(GAINS_DB[-1], s.gain_db // 6 * 6)),
                          max(0, min(2, s.more_time)))


# --- the dispatch table: every mode names a handler for every event ------------------------

_Handler = Callable[[DialogEngine, Any], list[Action]]
_E = DialogEngine

# What every live mode does with the call's end, a record that could not be written
# (spooled by the shell: the caller hears nothing of it) and a repeated CallStarted.
_COMMON: dict[type, _Handler] = {
    CallStarted: _E._ignore, CallerHungUp: _E._on_hang_up, EndCall: _E._on_end_call,
    StoreFailed: _E._ignore, Fault: _E._on_fault,
}
# Late or stray answers to requests the current mode did not make (a lookup, a message,
# a transfer or a callback abandoned after a Fault or a hang-up): ignored.
_STRAY: dict[type, _Handler] = {
    TransferFailed: _E._ignore, ApplicationFound: _E._ignore, RecordingSaved: _E._ignore,
    LookupFailed: _E._ignore, TicketFailed: _E._ignore, RecordingFailed: _E._ignore,
    CallbackFailed: _E._ignore,
}
_NO_INPUT: dict[type, _Handler] = {  # the caller's input is not taken in this mode
    DtmfReceived: _E._ignore, SpeechStarted: _E._ignore, SpeechRecognized: _E._ignore,
    InputTimeout: _E._ignore,
}
_MENU: dict[type, _Handler] = {
    **_COMMON, **_STRAY,
    DtmfReceived: _E._menu_dtmf, SpeechStarted: _E._menu_speech_started,
    SpeechRecognized: _E._menu_speech, InputTimeout: _E._menu_timeout,
    PromptFinished: _E._on_prompt_finished,
}
_YES_NO_OR_DIGITS: dict[type, _Handler] = {
    **_COMMON, **_STRAY,
    DtmfReceived: _E._duty_dtmf, SpeechStarted: _E._duty_speech_started,
    SpeechRecognized: _E._duty_speech, InputTimeout: _E._duty_timeout,
    PromptFinished: _E._on_prompt_finished,
}
_DISPATCH: dict[Mode, dict[type, _Handler]] = {
    Mode.IDLE: {
        **_STRAY, **_NO_INPUT,
        CallStarted: _E._on_start, PromptFinished: _E._ignore,
        CallerHungUp: _E._on_hang_up, EndCall: _E._on_end_call, StoreFailed: _E._ignore,
        Fault: _E._on_fault,  # the start itself failed: sorry, goodbye
    },
    Mode.MENU: _MENU,
    Mode.CONFIRM: _MENU,
    Mode.DIGITS: _YES_NO_OR_DIGITS,
    Mode.STATUS_CONFIRM: _YES_NO_OR_DIGITS,
    Mode.OFFER: _YES_NO_OR_DIGITS,
    Mode.LOOKUP: {
        **_COMMON, **_STRAY, **_NO_INPUT,
        PromptFinished: _E._on_prompt_finished,
        ApplicationFound: _E._on_application, LookupFailed: _E._lookup_failed,
    },
    Mode.RECORD_INTRO: {  # the instructions and the beep are not interruptible
        **_COMMON, **_STRAY, **_NO_INPUT,
        PromptFinished: _E._intro_finished,
    },
    Mode.RECORDING: {
        **_COMMON, **_STRAY,
        DtmfReceived: _E._recording_key, SpeechStarted: _E._ignore,
        SpeechRecognized: _E._ignore,  # nothing is recognised in a message
        InputTimeout: _E._recording_silence, PromptFinished: _E._on_prompt_finished,
        RecordingSaved: _E._on_recording_saved,  # ended by the shell at max_ms
        TicketFailed: _E._record_failed, RecordingFailed: _E._record_failed,
    },
    Mode.SAVING: {
        **_COMMON, **_STRAY, **_NO_INPUT,
        PromptFinished: _E._on_prompt_finished,
        RecordingSaved: _E._on_recording_saved,
        TicketFailed: _E._record_failed, RecordingFailed: _E._record_failed,
    },
    Mode.TRANSFER: {  # "please hold" is not interruptible; then the REFER result
        **_COMMON, **_STRAY, **_NO_INPUT,
        PromptFinished: _E._transfer_prompt_finished,
        TransferFailed: _E._on_transfer_failed,
    },
    Mode.CLOSING: {
        **_STRAY, **_NO_INPUT,
        CallStarted: _E._ignore, CallerHungUp: _E._on_hang_up, StoreFailed: _E._ignore,
        PromptFinished: _E._closing_prompt_finished,
        EndCall: _E._end_call_closing, Fault: _E._fault_closing,
        CallbackFailed: _E._closing_callback_failed,  # the goodbye after a booked callback
    },
    Mode.ENDED: dict.fromkeys(EVENT_TYPES, _E._ignore),
}


def _check_dispatch() -> None:
    """Fail at import if a mode misses an event or names one that is not an Event."""
    for mode in Mode:
        row = _DISPATCH.get(mode)
        if row is None:
            raise RuntimeError(f"dialog: mode {mode} has no row in _DISPATCH")
        missing = [t.__name__ for t in EVENT_TYPES if t not in row]
        extra = [t.__name__ for t in row if t not in EVENT_TYPES]
        if missing or extra:
            raise RuntimeError(f"dialog: mode {mode} handles no {missing}, unknown {extra}")


_check_dispatch()
