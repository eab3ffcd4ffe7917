"""Property-based tests of the pure dialog engine: random calls, every language pack.

Hypothesis draws a byte string per call; a driver reads it as the caller's and the
shell's choices and turns it into a coherent event sequence: PromptFinished for plays
the engine actually issued (in order, as the player plays them), keys from the real
DTMF set, speech with the option ids of the Listen in force, the shell's answers (and
failures) to the requests the engine made, stray and late answers, faults, timeouts,
hang-ups and EndCall at any point, with time moving forward. Bytes shrink well, so a
failure comes back as a short call.

Properties, checked after every event:
- handle() never raises;
- every Play's prompts exist in their pack (non-empty text, no unfilled placeholder),
  or are the beep;
- when nothing plays and the call goes on, the bot either listens with a timer (a Listen
  is in force and the engine accepts input) or waits on the shell for a request it made;
- after EndCall, or a second Fault, the call hangs up once the plays finish, within a
  bounded number of actions, and nothing new starts (no Listen, Transfer, lookup or
  recording);
- after CallerHungUp nothing is played or transferred, and after the end nothing happens.
The run also checks that the generator reached every (mode, event type) pair.
"""

from __future__ import annotations

import datetime as dt
import time

import pytest
from conftest import AFTER_HOURS, HOLIDAY, IN_HOURS, SATURDAY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from voicebot.dialog import (
    BEEP,
    EVENT_TYPES,
    Action,
    ApplicationFound,
    CallbackFailed,
    CallerHungUp,
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
    LookupApplication,
    LookupFailed,
    Mode,
    Play,
    PromptFinished,
    RecordingFailed,
    RecordingSaved,
    RequestCallback,
    SpeechRecognized,
    SpeechStarted,
    StartRecording,
    StopListening,
    StopPlayback,
    StopRecording,
    StoreFailed,
    TicketFailed,
    Transfer,
    TransferFailed,
)
from voicebot.hours import WorkingHours
from voicebot.menus import APPLICATION_STATES, DTMF_KEYS, Grammars

EXAMPLES = 10_000  # random calls per language pack
MAX_EVENTS = 120  # events per call, besides the ones that finish the plays at the end
MIN_BYTES = 160  # long enough for a call to get past the menus into the duties
END_BOUND = 12  # actions allowed between EndCall (or the second Fault) and the HangUp
TIMES = (IN_HOURS, AFTER_HOURS, SATURDAY, HOLIDAY,
         dt.datetime(2026, 11, 23, 17, 59, 50, tzinfo=IN_HOURS.tzinfo))  # hours close mid-call
LANGUAGES = ("az", "ru", "en", "ko")


class Bytes:
    """The hypothesis-drawn choices, read one byte at a time (zeros once used up)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.i = 0

    def __bool__(self) -> bool:
        return self.i < len(self.data)

    def byte(self) -> int:
        b = self.data[self.i] if self.i < len(self.data) else 0
        self.i += 1
        return b

    def pick(self, seq):  # type: ignore[no-untyped-def]
        return seq[self.byte() % len(seq)]


class Driver:
    """Plays the shell and the caller around one engine and checks the properties."""

    def __init__(self, grammars: Grammars, hours: WorkingHours, lang: str,
                 choices: Bytes, seen: set[tuple[str, str]]) -> None:
        self.g = grammars
        self.lang = lang
        self.c = choices
        self.seen = seen
        speech = frozenset(LANGUAGES) if choices.byte() % 4 else frozenset()
        self.engine = DialogEngine(grammars, DialogSettings(
            hours=hours, default_language="az", offered=LANGUAGES, speech_languages=speech,
            max_retries=2, no_input_ms=6000, operator_uri="sip:operator@example"))
        self.t = 0.0
        self.queue: list[int] = []  # plays issued, not finished nor stopped, in order
        self.issued: set[int] = set()
        self.listen: Listen | None = None
        self.lookups: list[str] = []  # numbers asked for, not answered yet
        self.recording = False  # StartRecording issued, RecordingSaved not yet posted
        self.saving = False  # StopRecording issued, RecordingSaved not yet posted
        self.transfer = False  # Transfer issued, no result yet
        self.callbacks = 0  # RequestCallback issued, not failed yet
        self.hung_up = False  # the caller hung up
        self.ended = False  # the engine hung up
        self.ending: int | None = None  # actions since EndCall / the second Fault
        self.faults = 0
        self.started = False  # CallStarted was sent

    # -- sending --

    def send(self, ev: Event) -> list[Action]:
        before = self.engine.mode
        self.seen.add((str(before), type(ev).__name__))
        finished = self.ended or self.hung_up
        out = self.engine.handle(ev)  # must not raise
        if isinstance(ev, PromptFinished) and ev.play_id in self.queue:
            self.queue.remove(ev.play_id)
        if isinstance(ev, CallStarted):
            self.started = True
        if finished:
            assert out == [], f"{ev} after the end gave {out}"
        for a in out:
            self.apply(a)
        if isinstance(ev, CallerHungUp) and not finished:
            self.hung_up = True
            self.queue.clear()
        if isinstance(ev, EndCall) and not finished and self.ending is None:
            self.ending = 0
        if isinstance(ev, Fault) and not finished and before is not Mode.ENDED:
            self.faults += 1
            if self.faults >= 2 and self.ending is None:
                self.ending = 0
        if self.ending is not None and not self.ended:
            self.ending += len(out)
            assert self.ending <= END_BOUND, f"{self.ending} actions since EndCall, no HangUp"
        self.check_waiting()
        return out

    def apply(self, a: Action) -> None:
        if isinstance(a, Play):
            assert not self.hung_up, f"played {a} after the caller hung up"
            self.check_prompts(a)
            if self.ending is not None:
                # The goodbye (call_ending) may start; nothing else.
                assert [p.key for p in a.prompts] == ["call_ending"], a
            self.queue.append(a.play_id)
            self.issued.add(a.play_id)
        elif isinstance(a, StopPlayback):
            self.queue.clear()
        elif isinstance(a, Listen):
            assert not self.hung_up and self.ending is None, f"{a} after the end"
            self.listen = a
        elif isinstance(a, StopListening):
            self.listen = None
        elif isinstance(a, Transfer):
            assert not self.hung_up and self.ending is None, f"{a} after the end"
            self.transfer = True
        elif isinstance(a, HangUp):
            assert not self.hung_up
            self.ended = True
            self.queue.clear()
        elif isinstance(a, LookupApplication):
            assert self.ending is None
            self.lookups.append(a.number)
        elif isinstance(a, StartRecording):
            assert self.ending is None
            self.recording = True
        elif isinstance(a, StopRecording):
            if self.recording:
                self.recording = False
                self.saving = a.reason != "hangup"
        elif isinstance(a, RequestCallback):
            self.callbacks += 1

    def check_prompts(self, play: Play) -> None:
        assert play.prompts, "an empty play"
        for p in play.prompts:
            if p.key == BEEP:
                continue
            pack = self.g.pack(p.language)
            assert p.key in pack.prompts, f"{p.key} is not in the {p.language} pack"
            assert p.text.strip() and "{" not in p.text, f"{p.key}: {p.text!r}"

    def check_waiting(self) -> None:
        eng = self.engine
        assert eng.playing == bool(self.queue), (eng.playing, self.queue)
        if self.queue or self.ended or self.hung_up:
            return
        assert eng.mode is not Mode.ENDED, "ended without a HangUp"
        if self.listen is not None and eng.accepting_input:
            return
        assert eng.waiting_on_shell, f"silence: mode {eng.mode}, listen {self.listen}"
        # ... and waits for something the shell was actually asked for.
        mode = eng.mode
        if mode is Mode.IDLE:
            assert not self.started, "CallStarted left the engine idle"
        elif mode is Mode.LOOKUP:
            assert self.lookups, "lookup mode without a lookup"
        elif mode is Mode.SAVING:
            assert self.saving, "saving with no recording being saved"
        elif mode is Mode.TRANSFER:
            assert self.transfer, "transfer mode with no Transfer"
        else:
            raise AssertionError(f"waits on the shell in mode {mode} with nothing asked")

    # -- choosing the next event --

    def tick(self, lo: int = 20, hi: int = 8000) -> float:
        self.t += lo + (self.c.byte() * 257 + self.c.byte()) % (hi - lo)
        return self.t

    def key(self) -> str:
        """A key: mostly one the Listen in force takes (so calls get deep into the menus and
        duties), else any key of the keypad."""
        c = self.c
        listen = self.listen
        kind = c.byte() % 8
        if listen is not None and listen.grammar == "digits" and kind < 6:
            return c.pick("0123456789#" if kind else "#*")
        if listen is not None and listen.options and kind < 5:
            return self.g.menu.option_by_id(c.pick(listen.options)).key
        return c.pick(DTMF_KEYS[:12] if kind < 7 else DTMF_KEYS)

    def speech(self) -> SpeechRecognized:
        c = self.c
        listen = self.listen
        langs = listen.languages if listen and listen.languages else (self.lang,)
        lang = c.pick(langs)
        pack = self.g.pack(lang)
        kind = c.byte() % 4
        option = None
        if listen and listen.grammar == "digits" and kind:
            words = [ws[0] for ws in pack.digit_words.values()] or ["1"]
            text = " ".join(c.pick(words) for _ in range(1 + c.byte() % 4))
        elif listen and listen.options and kind:
            option = c.pick(listen.options)
            text = c.pick(pack.words(option).keywords) if option in pack.options else "x"
        else:
            text = c.pick(("", "hello", *pack.decoys))
        score = c.pick((0.05, 0.3, 0.45, 0.6, 0.75, 0.95))
        t = self.tick()
        return SpeechRecognized(t, lang, text, score, option, score, t - 300)

    def shell_answer(self) -> Event | None:
        """An answer to a request the engine made, if any is outstanding."""
        c = self.c
        if self.lookups and c.byte() % 3:
            number = self.lookups.pop(0)
            if c.byte() % 4 == 0:
                return LookupFailed(self.tick(), "database down")
            status = c.pick((None, *APPLICATION_STATES, "bogus"))
            date = dt.date(2026, 1 + c.byte() % 12, 1 + c.byte() % 28)
            return ApplicationFound(self.tick(), number, status, date)
        if (self.recording or self.saving) and c.byte() % 2:
            kind = c.byte() % 4
            if self.recording and kind == 0:
                self.recording = False
                return TicketFailed(self.tick(), "disk full")
            self.recording = self.saving = False
            if kind == 1:
                return RecordingFailed(self.tick(), "broke off")
            speech = c.pick((0.0, 1500.0))
            return RecordingSaved(self.tick(), str(c.byte()), 4000.0, speech, "key")
        if self.transfer and c.byte() % 2:
            self.transfer = False
            return TransferFailed(self.tick(), "486 Busy")
        if self.callbacks and c.byte() % 3 == 0:
            self.callbacks -= 1
            return CallbackFailed(self.tick(), "store down")
        return None

    def stray(self) -> Event:
        """An event the current mode may not expect: a late answer, a fault, a stray key."""
        c = self.c
        t = self.tick(1, 500)
        return c.pick((
            lambda: ApplicationFound(t, "123", c.pick(APPLICATION_STATES), dt.date(2026, 5, 1)),
            lambda: LookupFailed(t), lambda: TicketFailed(t), lambda: RecordingFailed(t),
            lambda: CallbackFailed(t), lambda: StoreFailed(t, "disk full"),
            lambda: TransferFailed(t, "503"), lambda: Fault(t, "watchdog"),
            lambda: RecordingSaved(t, "7", 1000.0, c.pick((0.0, 800.0)), "silence"),
            lambda: PromptFinished(c.pick(sorted(self.issued)) if self.issued else 99, t),
            lambda: InputTimeout(t), lambda: CallStarted(IN_HOURS, None, t),
            lambda: EndCall(t, "shutdown"), lambda: DtmfReceived(c.pick(DTMF_KEYS), t),
            lambda: SpeechStarted(t), self.speech,
        ))()

    def any_event(self) -> Event:
        """A stray event or a hang-up (before the call starts, after it ended)."""
        return CallerHungUp(self.tick(1, 500)) if self.c.byte() % 8 == 0 else self.stray()

    def next_event(self) -> Event:
        c = self.c
        r = c.byte()
        if self.queue and r < 90:
            return PromptFinished(self.queue[0], self.tick(300, 9000))
        if r < 125:
            return DtmfReceived(self.key(), self.tick(), c.pick(("inband", "rfc4733", "info")))
        if r < 145:
            return self.speech()
        if r < 155:
            return SpeechStarted(self.tick())
        if r < 185 and not self.queue:
            # The shell's timer: only when listening, after the prompts ended.
            return InputTimeout(self.tick(1500, 7000))
        if r < 215:
            answer = self.shell_answer()
            if answer is not None:
                return answer
        if r < 240:
            return self.stray()
        if r < 248:
            return EndCall(self.tick(1, 500), c.pick(("shutdown", "max_duration")))
        if r < 252:
            return Fault(self.tick(1, 500), "error")
        return CallerHungUp(self.tick(1, 500))

    # -- one call --

    def run(self) -> None:
        c = self.c
        early = c.byte() % 3 if c.byte() % 3 == 0 else 0
        for _ in range(early):
            self.send(self.any_event())  # events before the call started
        at = c.pick(TIMES)
        language = self.lang if c.byte() % 4 else None
        self.send(CallStarted(at, language, 0.0))
        n = 0
        while c and n < MAX_EVENTS and not (self.ended or self.hung_up):
            self.send(self.next_event())
            n += 1
        if self.ended or self.hung_up:
            for _ in range(2):  # nothing happens after the end
                self.send(self.any_event())
            return
        if self.ending is not None:
            # The plays finish; the call must end on its own.
            while self.queue:
                self.send(PromptFinished(self.queue[0], self.tick(300, 9000)))
            assert self.ended, f"no HangUp after EndCall (mode {self.engine.mode})"


@pytest.mark.parametrize("lang", LANGUAGES)
def test_random_calls_keep_the_engine_total(grammars, cfg, lang: str) -> None:  # type: ignore[no-untyped-def]
    hours = WorkingHours.from_config(cfg.hours)
    seen: set[tuple[str, str]] = set()
    calls = 0

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.binary(min_size=MIN_BYTES, max_size=4 * MAX_EVENTS))
    def random_call(data: bytes) -> None:
        nonlocal calls
        calls += 1
        Driver(grammars, hours, lang, Bytes(data), seen).run()

    t0 = time.perf_counter()
    random_call()
    elapsed = time.perf_counter() - t0
    print(f"{lang}: {calls} random calls in {elapsed:.1f} s")
    assert calls >= EXAMPLES
    # The generator reached every (mode, event) pair: the properties were checked there.
    wanted = {(str(m), t.__name__) for m in Mode for t in EVENT_TYPES}
    assert not wanted - seen, f"never exercised: {sorted(wanted - seen)}"
