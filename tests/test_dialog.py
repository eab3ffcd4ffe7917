"""The dialog engine on scripted timelines: events in, actions out, no audio.

The engine is the thing under test; grammars, hours and thresholds are the real ones.
"""

from __future__ import annotations

import datetime as dt

import pytest
from conftest import AFTER_HOURS, HOLIDAY, IN_HOURS, SATURDAY

from voicebot.dialog import (
    _DISPATCH,
    EVENT_TYPES,
    ApplicationFound,
    CallbackFailed,
    CallerHungUp,
    CallStarted,
    DialogEngine,
    DialogSettings,
    DtmfReceived,
    EndCall,
    Fault,
    HangUp,
    InputTimeout,
    Listen,
    LogTurn,
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
from voicebot.menus import Grammars


class Call:
    """Drives one engine like the shell does: plays end when told, time moves on."""

    def __init__(self, grammars: Grammars, cfg, at: dt.datetime = IN_HOURS,  # type: ignore[no-untyped-def]
                 language: str | None = None, speech: frozenset[str] = frozenset({"ko"}),
                 offered: tuple[str, ...] = ("az", "ru", "en", "ko")) -> None:
        settings = DialogSettings(hours=WorkingHours.from_config(cfg.hours), default_language="az",
                                  offered=offered, speech_languages=speech, accept=0.7,
                                  confirm=0.4, max_retries=2, no_input_ms=6000,
                                  operator_uri="sip:operator@example")
        self.engine = DialogEngine(grammars, settings)
        self.t = 0.0
        self.queue: list[Play] = []
        self.turns = []
        self.actions = self.send(CallStarted(at, language))

    def send(self, event):  # type: ignore[no-untyped-def]
        actions = self.engine.handle(event)
        for a in actions:
            if isinstance(a, Play):
                self.queue.append(a)
            elif isinstance(a, StopPlayback):
                self.queue.clear()
            elif isinstance(a, LogTurn):
                self.turns.append(a.turn)
        self.actions = actions
        return actions

    def finish_prompts(self) -> list:  # type: ignore[type-arg]
        out = []
        while self.queue:
            play = self.queue.pop(0)
            self.t += 1000
            out.extend(self.send(PromptFinished(play.play_id, self.t)))
        return out

    def press(self, digit: str, wait: bool = True):  # type: ignore[no-untyped-def]
        if wait:
            self.finish_prompts()
        self.t += 500
        return self.send(DtmfReceived(digit, self.t))

    def say(self, option: str | None, score: float, language: str = "ko", text: str = "x"):  # type: ignore[no-untyped-def]
        self.finish_prompts()
        self.t += 800
        return self.send(SpeechRecognized(self.t, language, text, 1.0, option, score, self.t - 300))

    def timeout(self):  # type: ignore[no-untyped-def]
        self.finish_prompts()
        self.t += 6000
        return self.send(InputTimeout(self.t))

    def prompt_keys(self, actions=None) -> list[str]:  # type: ignore[no-untyped-def]
        acts = self.actions if actions is None else actions
        return [p.key for a in acts if isinstance(a, Play) for p in a.prompts]

    def listen(self) -> Listen:
        return next(a for a in reversed(self.actions) if isinstance(a, Listen))


@pytest.mark.parametrize("lang,key", [("az", "1"), ("ru", "2"), ("en", "3")])
def test_every_path_by_dtmf(grammars, cfg, lang, key):  # type: ignore[no-untyped-def]
    """Each language: choose it, then every main and information option, repeat and back."""
    c = Call(grammars, cfg, at=IN_HOURS)
    assert c.prompt_keys()[0] == "welcome"
    assert c.engine.node == "language"
    c.press(key)
    assert c.engine.language == lang and c.engine.node == "main"
    assert c.prompt_keys()[0] == "main_menu"
    assert all(p.language == lang for a in c.actions if isinstance(a, Play) for p in a.prompts)

    c.press("2")  # working hours, then back to the main menu
    assert c.turns[-1].option == "main.hours"
    assert c.prompt_keys()[:2] == ["hours", "main_menu"]
    hours_text = next(p.text for a in c.actions if isinstance(a, Play) for p in a.prompts)
    assert "{" not in hours_text

    c.press("1")
    assert c.engine.node == "info" and c.turns[-1].option == "main.info"
    infos = ["info.temporary_stay", "info.temporary_residence", "info.permanent_residence",
             "info.employment", "info.registration"]
    for i, option in enumerate(infos, start=1):
        c.press(str(i))
        assert c.turns[-1].option == option
        assert c.prompt_keys() == [f"info_{option.split('.')[1]}", "info_menu"]
        assert c.engine.node == "info"
    c.press("9")  # repeat: the last information again
    assert c.turns[-1].option == "nav.repeat"
    assert c.prompt_keys() == ["info_registration", "info_menu"]
    c.press("*")  # back to main
    assert c.engine.node == "main" and c.prompt_keys()[0] == "main_menu"
    c.press("*")  # back to the language menu, which is said in every offered language
    assert c.engine.node == "language"
    assert [p.language for a in c.actions if isinstance(a, Play) for p in a.prompts] == \
        ["az", "ru", "en", "ko"]
    c.press("7")
    assert c.turns[-1].result == "no_match"  # 7 is not an option of the language menu
    c.press("3")
    c.press("0")
    assert c.turns[-1].option == "main.operator"
    assert c.prompt_keys() == ["operator_transfer"]
    assert not any(isinstance(a, Transfer) for a in c.actions)  # only after "please hold"
    after = c.finish_prompts()
    assert next(a for a in after if isinstance(a, Transfer)).target == "sip:operator@example"


@pytest.mark.parametrize("at", [AFTER_HOURS, SATURDAY, HOLIDAY])
def test_operator_outside_hours_offers_information(grammars, cfg, at):  # type: ignore[no-untyped-def]
    c = Call(grammars, cfg, at=at, language="en")
    c.press("0")
    assert c.turns[-1].option == "main.operator"
    # Outside hours the caller hears when operators work and is offered a callback;
    # declining it leads to the information menu, as before the callback queue existed.
    assert c.prompt_keys()[:3] == ["operator_closed", "hours", "callback_offer"]
    assert not any(isinstance(a, Transfer) for a in c.finish_prompts())
    c.press("2")
    assert c.turns[-1].result == "rejected" and c.turns[-1].node == "callback"
    assert c.prompt_keys()[:1] == ["info_menu"]
    assert c.engine.node == "info"
    assert not any(isinstance(a, Transfer) for a in c.finish_prompts())


def test_hours_prompt_says_configured_hours(grammars, cfg):  # type: ignore[no-untyped-def]
    texts = {}
    for lang in ("en", "ru", "az", "ko"):
        c = Call(grammars, cfg, language=lang)
        c.press("2")
        texts[lang] = next(p.text for a in c.actions if isinstance(a, Play) for p in a.prompts)
    assert "Monday to Friday" in texts["en"] and "9 a.m." in texts["en"]
    assert "6 p.m." in texts["en"]
    assert "с понедельника по пятницу" in texts["ru"] and "девяти часов" in texts["ru"]
    assert "9" in texts["az"] and "18" in texts["az"]
    assert "월요일" in texts["ko"]


def test_no_input_twice_then_operator_in_hours(grammars, cfg):  # type: ignore[no-untyped-def]
    c = Call(grammars, cfg, at=IN_HOURS, language="ru")
    c.timeout()
    assert c.prompt_keys()[:2] == ["no_input", "main_menu"]
    c.timeout()
    assert c.prompt_keys()[:2] == ["no_input", "main_menu"]
    c.timeout()  # the next silence moves the call on: the caller is warned first
    assert c.prompt_keys() == ["timeout_warning"]
    c.timeout()
    assert c.prompt_keys() == ["no_input", "operator_transfer"]
    assert any(isinstance(a, Transfer) for a in c.finish_prompts())
    assert [t.result for t in c.turns] == ["no_input"] * 4
    assert all(t.input == "none" for t in c.turns)


def test_no_match_escalates_to_information_then_goodbye_after_hours(grammars, cfg):  # type: ignore[no-untyped-def]
    c = Call(grammars, cfg, at=AFTER_HOURS, language="en")
    c.press("7")
    c.press("5")
    assert c.prompt_keys()[:2] == ["no_match", "main_menu"]
    c.press("7")  # third failure: outside hours, to the information menu
    assert c.prompt_keys()[:3] == ["no_match", "escalate_info", "info_menu"]
    assert c.engine.node == "info"
    c.press("7")
    c.timeout()
    c.timeout()  # this silence would move the call on: a warning first
    assert c.prompt_keys() == ["timeout_warning"]
    c.timeout()  # a second escalation ends the call politely instead of looping
    assert c.prompt_keys() == ["no_input", "goodbye"]
    assert any(isinstance(a, HangUp) for a in c.finish_prompts())
    assert c.engine.mode == "ended"


def test_language_menu_escalates_in_default_language(grammars, cfg):  # type: ignore[no-untyped-def]
    c = Call(grammars, cfg, at=AFTER_HOURS)
    for _ in range(3):
        c.timeout()
    # No language is chosen yet: the warning is said in every offered language.
    assert c.engine.language is None
    assert [(p.key, p.language) for a in c.actions if isinstance(a, Play) for p in a.prompts] \
        == [("timeout_warning", lang) for lang in ("az", "ru", "en", "ko")]
    c.timeout()
    assert c.engine.language == "az"
    assert c.prompt_keys()[:3] == ["no_input", "escalate_info", "info_menu"]


def test_speech_thresholds_accept_confirm_reject(grammars, cfg):  # type: ignore[no-untyped-def]
    c = Call(grammars, cfg, language="ko")
    c.say("main.hours", 0.9)
    assert c.turns[-1].option == "main.hours" and c.turns[-1].result == "accepted"
    c.say("main.info", 0.55)  # between thresholds: ask
    assert c.turns[-1].result == "confirm" and c.turns[-1].option is None
    assert c.prompt_keys() == ["confirm"]
    confirm_text = next(a for a in c.actions if isinstance(a, Play)).prompts[0].text
    assert grammars.pack("ko").words("main.info").label in confirm_text
    assert c.listen().node == "confirm"
    assert c.listen().options == ("confirm.yes", "confirm.no")
    c.say("confirm.yes", 0.5)  # yes/no needs only the lower threshold
    assert c.turns[-1].option == "main.info" and c.engine.node == "info"
    c.say("info.employment", 0.5)
    c.press("2")  # no, by key
    assert c.turns[-1].result == "rejected"
    assert c.prompt_keys()[:2] == ["no_match", "info_menu"]
    c.say("info.employment", 0.2)  # below the confirm threshold
    assert c.turns[-1].result == "no_match"
    c.say(None, 0.0, text="날씨")  # out of scope
    assert c.turns[-1].result == "no_match" and c.turns[-1].heard == "날씨"


def test_barge_in_stops_menu_but_not_recording_notice(grammars, cfg):  # type: ignore[no-untyped-def]
    c = Call(grammars, cfg, language="ko")
    welcome, menu = c.queue[0], c.queue[1]
    assert welcome.barge_in is False and menu.barge_in is True
    assert c.send(SpeechStarted(300)) == []  # the recording notice plays on
    assert c.send(DtmfReceived("2", 500)) == []  # kept as type-ahead
    # A whole utterance over the notice is ignored and does not lose the key typed ahead.
    assert c.send(SpeechRecognized(1500, "ko", "나비", 1.0, None, 0.0, 1400)) == []
    c.queue.pop(0)
    out = c.send(PromptFinished(welcome.play_id, 2000))
    assert any(isinstance(a, StopPlayback) for a in out)  # the menu is cut short
    assert c.turns[-1].option == "main.hours" and c.turns[-1].barge_in
    # Speech during the reply stops it at once; the result is a barge-in turn.
    out = c.send(SpeechStarted(2600))
    assert any(isinstance(a, StopPlayback) for a in out)
    c.send(SpeechRecognized(3500, "ko", "상담원", 1.0, "main.operator", 0.95, 3300))
    assert c.turns[-1].option == "main.operator"


def test_transfer_failure_returns_to_menu(grammars, cfg):  # type: ignore[no-untyped-def]
    c = Call(grammars, cfg, at=IN_HOURS, language="en")
    c.press("0")
    c.finish_prompts()
    out = c.send(TransferFailed(c.t + 100, "486 Busy"))
    assert c.prompt_keys(out)[:2] == ["transfer_failed", "main_menu"]
    assert c.engine.mode == "menu"


def test_listen_languages_follow_installed_models(grammars, cfg):  # type: ignore[no-untyped-def]
    c = Call(grammars, cfg, speech=frozenset({"ko"}))
    assert c.listen().languages == ("ko",)  # the language menu listens where it can
    c.press("3")
    assert c.listen().languages == ()  # English has no model here: keys only
    assert "speech_hint" not in c.prompt_keys()
    c.press("*")
    c.press("4")
    assert c.engine.language == "ko" and c.listen().languages == ("ko",)
    assert "speech_hint" in c.prompt_keys()


def test_language_not_offered_is_not_a_choice(grammars, cfg):  # type: ignore[no-untyped-def]
    c = Call(grammars, cfg, offered=("az", "ru", "en"), speech=frozenset())
    assert [p.language for a in c.actions if isinstance(a, Play) for p in a.prompts][1:] == \
        ["az", "ru", "en"]
    c.press("4")
    assert c.turns[-1].result == "no_match"


def test_hang_up_ends_everything(grammars, cfg):  # type: ignore[no-untyped-def]
    c = Call(grammars, cfg, language="en")
    c.send(CallerHungUp(1500))
    assert c.engine.mode == "ended"
    assert c.send(DtmfReceived("1", 1600)) == []


def test_spoken_number_in_groups_is_one_turn_after_the_pause(grammars, cfg):  # type: ignore[no-untyped-def]
    call = Call(grammars, cfg, language="ko")
    call.press("3")  # main.status: the number prompt
    call.finish_prompts()
    # Two groups with a pause between them: no reply, no turn, only a shorter silence timer.
    for text in ("삼 오", "칠"):
        out = call.say(None, 0.9, text=text)
        assert not [a for a in out if isinstance(a, (Play, LogTurn))]
        listen = next(a for a in out if isinstance(a, Listen))
        assert listen.grammar == "digits" and listen.no_input_ms == 1500
    end_of_speech = call.t - 300
    call.t += 1500
    out = call.send(InputTimeout(call.t))
    turn = next(a.turn for a in out if isinstance(a, LogTurn))
    assert (turn.input, turn.heard, turn.result) == ("speech", "삼 오 칠", "number")
    assert turn.input_end_ms == end_of_speech  # its latency includes the pause
    readback = next(a for a in out if isinstance(a, Play))
    assert readback.prompts[0].key == "status_readback" and "3 5 7" in readback.prompts[0].text
    # A number said with no digit words at all is a no-match at once.
    call = Call(grammars, cfg, language="ko")
    call.press("3")
    out = call.say(None, 0.0, text="날씨")
    turn = next(a.turn for a in out if isinstance(a, LogTurn))
    assert turn.result == "no_match"



def test_a_key_in_the_number_turns_speech_off_for_that_entry(grammars, cfg):  # type: ignore[no-untyped-def]
    call = Call(grammars, cfg, language="ko")
    call.press("3")  # main.status: the number prompt, listening for keys and spoken digits
    call.finish_prompts()
    out = call.press("4")
    listen = next(a for a in out if isinstance(a, Listen))
    # Recognition stops (no languages) but the number and its timer go on.
    assert listen.grammar == "digits" and listen.languages == ()
    assert listen.no_input_ms == cfg.dialog.no_input_ms
    # Background talk that still reaches the engine adds nothing and ends nothing.
    out = call.say(None, 0.9, text="칠 팔")
    assert not [a for a in out if isinstance(a, (Play, LogTurn))]
    assert not [a for a in call.press("2") if isinstance(a, Listen)]  # said once per entry
    out = call.press("#")
    turn = next(a.turn for a in out if isinstance(a, LogTurn))
    assert (turn.input, turn.heard, turn.result) == ("dtmf", "42#", "number")
    readback = next(a for a in out if isinstance(a, Play))
    assert "4 2" in readback.prompts[0].text and "7" not in readback.prompts[0].text
    # A new entry (after "no" to the read-back) listens for speech again.
    out = call.press("2")
    listen = next(a for a in out if isinstance(a, Listen))
    assert listen.grammar == "digits" and listen.languages == ("ko",)


# --- totality: every mode handles every event, every failure has a spoken path ----------


def keys_of(actions) -> list[str]:  # type: ignore[no-untyped-def]
    return [p.key for a in actions if isinstance(a, Play) for p in a.prompts]


def status_tries_then_operator(c: Call) -> None:
    """Three unknown application numbers at the status menu (the issue's reproduction)."""
    c.press("3")
    for number in ("99999", "99998", "99997"):
        for d in number + "#":
            c.press(d, wait=d == number[0])
        c.press("1")  # yes, the number is right
        assert isinstance(c.actions[-1], LookupApplication)
        c.send(ApplicationFound(c.t + 50, number, None))


def test_dispatch_table_names_a_handler_for_every_mode_and_event() -> None:
    assert set(_DISPATCH) == set(Mode)
    for mode, row in _DISPATCH.items():
        assert set(row) == set(EVENT_TYPES), mode
    # The shell reads the mode as a string.
    assert Mode.TRANSFER == "transfer" and f"{Mode.LOOKUP}" == "lookup"


def test_failed_transfer_after_status_tries_returns_to_the_main_menu(grammars, cfg):  # type: ignore[no-untyped-def]
    """Issue 10: the TransferFailed handler looked up the node "status" as a menu."""
    c = Call(grammars, cfg, at=IN_HOURS, language="en")
    status_tries_then_operator(c)
    assert c.prompt_keys() == ["status_unknown", "operator_transfer"]
    assert c.engine.mode == "transfer" and not c.engine.waiting_on_shell
    assert any(isinstance(a, Transfer) for a in c.finish_prompts())
    assert c.engine.waiting_on_shell  # the REFER is out: its result comes from the shell
    out = c.send(TransferFailed(c.t + 100, "486 Busy"))
    assert keys_of(out)[:2] == ["transfer_failed", "main_menu"]
    assert c.engine.mode == "menu" and c.engine.node == "main" and c.listen().node == "main"


def test_failed_transfer_through_the_simulator_ends_at_the_menu(core) -> None:  # type: ignore[no-untyped-def]
    """The issue's reproduction on audio: `voicebot simulate ... --transfer-fails`."""
    from voicebot.simulator import CallerInput, Simulator

    inputs = [CallerInput("press", "3")]
    for number in ("99999#", "99998#", "99997#"):
        inputs += [CallerInput("press", number), CallerInput("press", "1")]
    inputs.append(CallerInput("silent"))
    res = Simulator(core, inputs, at=dt.datetime(2026, 11, 24, 11, 0, tzinfo=IN_HOURS.tzinfo),
                    language="en", transfer_fails=True).run()
    heard = [p.prompt.key for p in res.played]
    i = heard.index("transfer_failed")
    assert heard[i - 1] == "operator_transfer" and heard[i + 1] == "main_menu"
    assert res.turns[-1].node == "main" and res.turns[-1].result == "no_input"
    assert res.duration_ms < 5 * 60_000  # not left in silence until max_call_s


def test_lookup_failure_operator_in_hours_callback_after(grammars, cfg):  # type: ignore[no-untyped-def]
    for at, expect in ((IN_HOURS, ["lookup_failed", "operator_transfer"]),
                       (AFTER_HOURS, ["lookup_failed", "operator_closed", "callback_offer"])):
        c = Call(grammars, cfg, at=at, language="ru")
        c.press("3")
        for d in "123#":
            c.press(d, wait=d == "1")
        c.press("1")
        assert c.engine.mode == "lookup" and c.engine.waiting_on_shell
        out = c.send(LookupFailed(c.t + 30, "database is down"))
        assert keys_of(out) == expect
        assert all(p.language == "ru" for a in out if isinstance(a, Play) for p in a.prompts)
    c.press("1")  # yes, call me back
    assert RequestCallback("status_failed", "ru") in c.actions
    # An unknown state from the store is no answer either.
    c = Call(grammars, cfg, at=IN_HOURS, language="en")
    c.press("3")
    c.press("7")
    c.press("#", wait=False)
    c.press("1")
    out = c.send(ApplicationFound(c.t + 30, "7", "lost_in_the_mail"))
    assert keys_of(out) == ["lookup_failed", "operator_transfer"]


def start_message(c: Call) -> None:
    c.press("4")
    c.press("1")  # a complaint: instructions and the beep, then the recording starts
    after = c.finish_prompts()
    assert any(isinstance(a, StartRecording) for a in after)
    assert c.engine.mode == "recording" and c.engine.accepting_input


def test_message_failures_apologise_then_menu_or_operator(grammars, cfg):  # type: ignore[no-untyped-def]
    c = Call(grammars, cfg, at=AFTER_HOURS, language="en")
    start_message(c)
    out = c.send(TicketFailed(c.t + 20, "no space left on device"))
    assert keys_of(out)[:2] == ["record_failed", "main_menu"]
    assert StopListening() in out and c.engine.mode == "menu"
    # The recording broke off after the caller pressed #: the message is gone.
    c = Call(grammars, cfg, at=IN_HOURS, language="ko")
    start_message(c)
    c.press("#")
    assert c.engine.mode == "saving" and c.engine.waiting_on_shell
    out = c.send(RecordingFailed(c.t + 20, "disk full"))
    assert keys_of(out) == ["record_failed", "operator_transfer"]
    assert c.engine.mode == "transfer"


def test_callback_not_stored_takes_the_promise_back(grammars, cfg):  # type: ignore[no-untyped-def]
    c = Call(grammars, cfg, at=AFTER_HOURS, language="az")
    c.press("0")
    c.press("1")  # yes: callback_booked and goodbye play, then the call would end
    assert c.engine.mode == "closing" and c.engine.outcome == "completed"
    out = c.send(CallbackFailed(c.t + 10, "database is down"))
    assert isinstance(out[0], StopPlayback)
    assert keys_of(out)[:2] == ["callback_failed", "main_menu"]
    assert c.engine.mode == "menu" and c.engine.outcome == "abandoned"
    assert not any(isinstance(a, HangUp) for a in c.finish_prompts())


def test_store_failures_are_not_the_callers_business(grammars, cfg):  # type: ignore[no-untyped-def]
    """Records are spooled by the shell: a failed write changes nothing in the dialog."""
    c = Call(grammars, cfg, at=IN_HOURS, language="en")
    assert c.send(StoreFailed(c.t, "disk full")) == []
    start_message(c)
    assert c.send(StoreFailed(c.t, "disk full")) == [] and c.engine.mode == "recording"


def test_failures_a_mode_did_not_ask_for_are_ignored(grammars, cfg):  # type: ignore[no-untyped-def]
    c = Call(grammars, cfg, at=IN_HOURS, language="en")
    stray = [LookupFailed(1.0), TicketFailed(1.0), RecordingFailed(1.0), CallbackFailed(1.0),
             TransferFailed(1.0, "late"), ApplicationFound(1.0, "1", "ready"),
             RecordingSaved(1.0, "9", 1000.0, 500.0, "key"), CallStarted(IN_HOURS)]
    for ev in stray:
        assert c.send(ev) == [], ev
    assert c.engine.mode == "menu" and c.engine.node == "main"
    c.press("3")  # at the number prompt, a late lookup answer or message failure is no input
    for ev in stray:
        assert c.send(ev) == [], ev
    assert c.engine.mode == "digits"


def test_fault_apologises_then_operator_and_a_second_one_hangs_up(grammars, cfg):  # type: ignore[no-untyped-def]
    c = Call(grammars, cfg, at=IN_HOURS, language="en")
    c.press("3")
    out = c.send(Fault(c.t + 10, "watchdog"))
    assert keys_of(out) == ["apology", "operator_transfer"]
    assert c.engine.mode == "transfer"
    out = c.send(Fault(c.t + 20, "error"))
    assert keys_of(out) == ["apology", "goodbye"]
    assert not any(isinstance(a, (Listen, Transfer)) for a in out)
    assert c.finish_prompts()[-1] == HangUp("fault") and c.engine.mode == "ended"


def test_fault_after_hours_and_on_the_language_menu(grammars, cfg):  # type: ignore[no-untyped-def]
    c = Call(grammars, cfg, at=AFTER_HOURS)  # no language chosen yet
    c.finish_prompts()
    out = c.send(Fault(c.t + 10, "watchdog"))
    # Sorry in every offered language, then the language menu again.
    assert [(p.key, p.language) for a in out if isinstance(a, Play) for p in a.prompts][:4] == \
        [("apology", lang) for lang in ("az", "ru", "en", "ko")]
    assert c.engine.node == "language" and c.listen().node == "language"
    # A fault while recording keeps what was recorded and goes back to the main menu.
    c = Call(grammars, cfg, at=AFTER_HOURS, language="ru")
    start_message(c)
    out = c.send(Fault(c.t + 10, "error"))
    assert StopRecording("fault") in out and keys_of(out)[:2] == ["apology", "main_menu"]


def test_fault_while_waiting_for_the_refer_result_does_not_transfer_again(grammars, cfg):  # type: ignore[no-untyped-def]
    c = Call(grammars, cfg, at=IN_HOURS, language="en")
    c.press("0")
    c.finish_prompts()
    assert c.engine.waiting_on_shell
    out = c.send(Fault(c.t + 10_000, "watchdog"))
    assert keys_of(out)[:2] == ["apology", "main_menu"]
    assert not any(isinstance(a, Transfer) for a in out)


def test_fault_while_closing_hangs_up_at_once(grammars, cfg):  # type: ignore[no-untyped-def]
    c = Call(grammars, cfg, at=AFTER_HOURS, language="en")
    c.press("0")
    c.press("1")  # callback booked: goodbye plays
    assert c.engine.waiting_on_shell
    out = c.send(Fault(c.t + 10, "error"))
    assert out == [StopPlayback("fault"), HangUp("fault")]


@pytest.mark.parametrize("where", ["menu", "transfer_playing", "transfer_sent", "closing",
                                   "recording", "lookup", "offer"])
def test_end_call_says_goodbye_and_hangs_up_in_every_mode(grammars, cfg, where):  # type: ignore[no-untyped-def]
    c = Call(grammars, cfg, at=AFTER_HOURS if where in ("closing", "offer") else IN_HOURS,
             language="en")
    if where.startswith("transfer"):
        c.press("0")
        if where == "transfer_sent":
            c.finish_prompts()
    elif where == "closing":
        c.press("0")
        c.press("1")
    elif where == "recording":
        start_message(c)
    elif where == "lookup":
        c.press("3")
        c.press("5")
        c.press("#", wait=False)
        c.press("1")
    elif where == "offer":
        c.press("0")
    out = c.send(EndCall(c.t + 10, "shutdown"))
    after = c.finish_prompts()
    if where == "closing":
        assert out == []  # the goodbye already plays; the hang-up follows it
    else:
        assert keys_of(out) == ["call_ending"]
        assert not any(isinstance(a, (Listen, Transfer)) for a in out + after)
    if where == "recording":
        assert StopRecording("call_ending") in out
    assert isinstance(after[-1], HangUp) and c.engine.mode == "ended"


def test_silent_line_with_failing_operators_ends_politely(grammars, cfg):  # type: ignore[no-untyped-def]
    """In hours, a silent caller whose transfers fail must not cycle menu -> operator for
    ever: the second escalation after a failed transfer says goodbye."""
    c = Call(grammars, cfg, at=IN_HOURS, language="en")
    for _ in range(4):  # three silences, the warning, the last silence
        c.timeout()
    c.finish_prompts()
    c.send(TransferFailed(c.t, "503"))
    for _ in range(4):
        c.timeout()
    assert c.prompt_keys() == ["no_input", "goodbye"]
    assert isinstance(c.finish_prompts()[-1], HangUp)


def test_unknown_start_language_falls_back_to_the_language_menu(grammars, cfg):  # type: ignore[no-untyped-def]
    c = Call(grammars, cfg, language="xx")
    assert c.engine.node == "language" and c.engine.language is None
    assert c.prompt_keys()[0] == "welcome"


def test_language_from_the_first_words_at_the_language_menu(grammars, cfg):  # type: ignore[no-untyped-def]
    # Every pack's recogniser hears its home-menu words at the language menu.
    c = Call(grammars, cfg, speech=frozenset({"ko", "en"}))
    listen = c.listen()
    assert listen.node == "language" and set(listen.languages) == {"ko", "en"}
    assert {"main.operator", "main.info", "lang.ko"} <= set(listen.options)
    c.say("main.operator", 0.9, "ko", "상담원")
    assert c.engine.language == "ko" and c.engine.language_by == "detected"
    assert c.engine.mode is Mode.TRANSFER
    assert c.prompt_keys() == ["operator_transfer"]
    assert c.actions[-2].prompts[0].language == "ko"  # type: ignore[attr-defined]
    assert c.turns[-1].option == "main.operator" and c.turns[-1].node == "main"
    # Between the thresholds: confirmed in the detected language, at the home menu.
    c = Call(grammars, cfg, speech=frozenset({"ko", "en"}))
    c.say("main.info", 0.5, "en", "information")
    assert c.engine.language == "en" and c.engine.mode is Mode.CONFIRM
    assert c.prompt_keys() == ["confirm"]
    c.press("1")
    assert c.engine.node == "info"
    # Below the confirm threshold: the language question again, nothing chosen.
    c = Call(grammars, cfg, speech=frozenset({"ko", "en"}))
    c.say("main.info", 0.3, "en", "information")
    assert c.engine.language is None and c.prompt_keys()[0] == "no_match"
    assert c.engine.node == "language"
    # A language name, or a key, says so too.
    c.say("lang.en", 0.9, "en", "english")
    assert c.engine.language == "en" and c.engine.language_by == "name"
    c = Call(grammars, cfg)
    c.press("2")
    assert c.engine.language == "ru" and c.engine.language_by == "key"
