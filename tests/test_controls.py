"""Caller controls (issue 12) in the pure dialog engine, in every pack: help and its keys,
slower/faster/louder/quieter by voice and by key, more time, the operator from every menu,
the warning before a timeout moves the call on, and remembered settings.

The engine is the thing under test; grammars, hours and thresholds are the real ones.
"""

from __future__ import annotations

import pytest
from conftest import AFTER_HOURS, IN_HOURS
from test_dialog import Call

from voicebot.dialog import (
    CallerSettings,
    CallStarted,
    HangUp,
    Mode,
    Play,
    SaveCallerSettings,
    Transfer,
)

LANGS = ("az", "ru", "en", "ko")
CONTROL_IDS = ("ctl.help", "ctl.more_time", "ctl.slower", "ctl.faster", "ctl.louder",
               "ctl.quieter")


def at_home(grammars, cfg, lang: str, at=IN_HOURS) -> Call:  # type: ignore[no-untyped-def]
    return Call(grammars, cfg, at=at, language=lang, speech=frozenset({lang}))


def saved(c: Call) -> list[CallerSettings]:
    return [a.settings for a in c.actions if isinstance(a, SaveCallerSettings)]


def plays(c: Call) -> list[Play]:
    return [a for a in c.actions if isinstance(a, Play)]


@pytest.mark.parametrize("lang", LANGS)
def test_help_by_key_then_each_control_by_its_help_key(grammars, cfg, lang) -> None:  # type: ignore[no-untyped-def]
    c = at_home(grammars, cfg, lang)
    c.press("1")  # the information menu
    c.press("8")
    assert c.prompt_keys() == ["help"] and c.engine.node == "help"
    keys = {grammars.menu.option_by_id(o).key: o for o in c.listen().options
            if o.startswith("ctl.")}
    assert {k: keys[k] for k in "12346"} == {"1": "ctl.slower", "2": "ctl.faster",
                                              "3": "ctl.louder", "4": "ctl.quieter",
                                              "6": "ctl.more_time"}
    c.press("1")
    assert saved(c) == [CallerSettings(rate_step=-1)]
    # The acknowledgement and the menu the caller came from, both at the new rate.
    assert c.prompt_keys()[:2] == ["control_slower", "info_menu"]
    assert {p.rate for play in plays(c) for p in play.prompts} == {0.75}
    assert c.engine.node == "info" and c.engine.mode is Mode.MENU
    for expect_gain in (6, 12):
        c.press("8")
        c.press("3")
        assert saved(c) == [CallerSettings(-1, expect_gain, 0)]
        assert c.prompt_keys()[0] == "control_louder"
        assert {p.gain_db for play in plays(c) for p in play.prompts} == {expect_gain}
    c.press("8")
    c.press("3")  # already the loudest
    assert saved(c) == [] and c.prompt_keys()[0] == "control_limit"
    c.press("8")
    c.press("4")
    assert saved(c) == [CallerSettings(-1, 6, 0)] and c.prompt_keys()[0] == "control_quieter"
    c.press("8")
    c.press("2")
    assert saved(c) == [CallerSettings(0, 6, 0)] and c.prompt_keys()[0] == "control_faster"
    c.press("8")
    c.press("*")  # back, nothing changed
    assert saved(c) == [] and c.prompt_keys()[0] == "info_menu" and c.engine.node == "info"
    assert c.turns[-1].option == "nav.back" and c.turns[-1].result == "accepted"


@pytest.mark.parametrize("lang", LANGS)
def test_every_control_by_voice_at_every_menu(grammars, cfg, lang) -> None:  # type: ignore[no-untyped-def]
    pack = grammars.pack(lang)
    for node in grammars.menu.nodes:
        ids = {o.id for o in grammars.menu.choices(node)}
        assert set(CONTROL_IDS) <= ids, node
        for cid in CONTROL_IDS:
            assert pack.words(cid).keywords, (lang, cid)
    c = at_home(grammars, cfg, lang)
    c.press("1")
    c.say("ctl.slower", 0.9, lang)
    assert saved(c) == [CallerSettings(rate_step=-1)]
    assert c.prompt_keys()[:2] == ["control_slower", "info_menu"]
    c.say("ctl.faster", 0.9, lang)
    c.say("ctl.faster", 0.9, lang)
    assert saved(c) == [CallerSettings(rate_step=1)]
    assert all(p.rate == 1.25 for play in plays(c) for p in play.prompts)
    c.say("ctl.louder", 0.9, lang)
    assert saved(c) == [CallerSettings(1, 6, 0)]
    c.say("ctl.quieter", 0.9, lang)
    assert saved(c) == [CallerSettings(1, 0, 0)]
    c.say("ctl.quieter", 0.9, lang)
    assert c.prompt_keys()[0] == "control_limit"
    c.say("ctl.help", 0.9, lang)
    assert c.prompt_keys() == ["help"]
    # A control between the thresholds is confirmed like any option, then carried out.
    c.press("*")
    c.say("ctl.louder", 0.5, lang)
    assert c.prompt_keys() == ["confirm"]
    c.press("1")
    assert c.prompt_keys()[0] == "control_louder" and c.engine.settings.gain_db == 6
    assert c.turns[-1].option == "ctl.louder"


@pytest.mark.parametrize("lang", LANGS)
def test_more_time_triples_then_turns_the_timer_off(grammars, cfg, lang) -> None:  # type: ignore[no-untyped-def]
    c = at_home(grammars, cfg, lang)
    assert c.listen().no_input_ms == 6000
    c.press("6")
    assert c.prompt_keys()[:2] == ["control_more_time", "main_menu"]
    assert c.listen().no_input_ms == 18000
    c.say("ctl.more_time", 0.9, lang)
    assert c.prompt_keys()[0] == "control_no_timeout" and c.listen().no_input_ms == 0
    assert saved(c) == [CallerSettings(more_time=2)]
    c.press("6")
    assert c.prompt_keys()[0] == "control_limit" and c.listen().no_input_ms == 0
    # Every Listen after it has no timer: the number entry, a confirmation.
    c.press("3")
    assert c.engine.mode is Mode.DIGITS and c.listen().no_input_ms == 0


def test_no_input_time_is_longer_after_a_no_match_or_no_input(grammars, cfg) -> None:  # type: ignore[no-untyped-def]
    c = at_home(grammars, cfg, "en")
    c.press("7")  # no option
    assert c.prompt_keys()[0] == "no_match" and c.listen().no_input_ms == 9000
    c.press("1")
    assert c.listen().no_input_ms == 6000  # a good answer: back to the usual time
    c.timeout()
    assert c.prompt_keys()[0] == "no_input" and c.listen().no_input_ms == 9000
    c.press("6")
    c.press("7")
    assert c.listen().no_input_ms == 27000  # x3 for more time, x1.5 after the no-match


@pytest.mark.parametrize("lang", LANGS)
def test_operator_key_and_word_at_every_menu(grammars, cfg, lang) -> None:  # type: ignore[no-untyped-def]
    menu = grammars.menu
    assert "nav.operator" not in {o.id for o in menu.choices("main")}  # main has its own
    for node in ("info", "report", "language", "help"):
        assert "nav.operator" in {o.id for o in menu.choices(node)}, node
    c = at_home(grammars, cfg, lang)
    c.press("4")  # report menu
    c.press("0")
    assert c.engine.mode is Mode.TRANSFER and c.prompt_keys() == ["operator_transfer"]
    c.finish_prompts()
    assert any(isinstance(a, Transfer) for a in c.actions)
    c = at_home(grammars, cfg, lang)
    c.press("1")
    c.say("nav.operator", 0.9, lang)
    assert c.engine.mode is Mode.TRANSFER and c.turns[-1].option == "nav.operator"
    # At the language menu, before any language is chosen.
    c = Call(grammars, cfg)
    c.press("0")
    assert c.engine.mode is Mode.TRANSFER and c.engine.language == "az"
    # After hours: the hours and a callback offer, as at the main menu.
    c = at_home(grammars, cfg, lang, at=AFTER_HOURS)
    c.press("1")
    c.press("0")
    assert c.engine.mode is Mode.OFFER and c.prompt_keys()[0] == "operator_closed"


def test_the_timeout_that_moves_the_caller_on_is_warned_first(grammars, cfg) -> None:  # type: ignore[no-untyped-def]
    c = at_home(grammars, cfg, "en")
    c.timeout()
    c.timeout()
    assert c.prompt_keys()[0] == "no_input" and c.engine.mode is Mode.MENU
    before = c.listen()
    c.timeout()  # the next one would transfer: warned first, same menu, same Listen
    assert c.prompt_keys() == ["timeout_warning"] and c.engine.mode is Mode.MENU
    assert c.listen() == before
    assert c.turns[-1].result == "no_input" and c.turns[-1].prompt == "timeout_warning"
    c.timeout()
    assert c.engine.mode is Mode.TRANSFER
    # In number entry the warning says how to go on without a key that is a digit.
    c = at_home(grammars, cfg, "en")
    c.press("3")
    for _ in range(c.engine.s.status_attempts - 1):
        c.timeout()
        assert c.prompt_keys()[-1] == "status_ask"
    c.timeout()
    assert c.prompt_keys() == ["timeout_warning_digits"] and c.engine.mode is Mode.DIGITS
    c.timeout()
    assert c.engine.mode is Mode.TRANSFER


def test_spoken_more_time_while_entering_a_number(grammars, cfg) -> None:  # type: ignore[no-untyped-def]
    c = at_home(grammars, cfg, "ko")
    c.press("3")
    assert "ctl.more_time" in c.listen().options and c.listen().grammar == "digits"
    word = grammars.pack("ko").words("ctl.more_time").keywords[0]
    c.say(None, 0.9, "ko", word)
    assert c.prompt_keys() == ["control_more_time", "status_ask"]
    assert c.engine.mode is Mode.DIGITS and c.listen().no_input_ms == 18000
    # Keys at the yes/no questions of the duties: 6 more time, 0 the operator.
    c.press("1")
    c.press("2")
    c.press("#")
    assert c.engine.mode is Mode.STATUS_CONFIRM
    c.press("6")
    assert c.prompt_keys() == ["control_no_timeout", "status_readback"]
    assert c.engine.mode is Mode.STATUS_CONFIRM and c.listen().no_input_ms == 0
    c.press("0")
    assert c.engine.mode is Mode.TRANSFER


def test_a_caller_who_asked_for_more_time_is_never_hung_up_on_for_silence(grammars, cfg) -> None:  # type: ignore[no-untyped-def]
    # After hours a silent caller is said goodbye to after the second escalation...
    c = at_home(grammars, cfg, "en", at=AFTER_HOURS)
    for _ in range(12):
        c.timeout()
        if any(isinstance(a, HangUp) for a in c.finish_prompts()):
            break
    assert c.engine.mode is Mode.ENDED
    # ... one who asked for more time keeps being served until max_call_s ends the call.
    c = at_home(grammars, cfg, "en", at=AFTER_HOURS)
    c.press("6")
    for _ in range(40):
        c.timeout()
        assert not any(isinstance(a, HangUp) for a in c.finish_prompts())
        assert c.engine.mode in (Mode.MENU, Mode.OFFER), c.engine.mode
    assert c.engine.mode is not Mode.ENDED


@pytest.mark.parametrize("lang", LANGS)
def test_remembered_settings_apply_from_the_first_prompt_and_are_said(grammars, cfg, lang) -> None:  # type: ignore[no-untyped-def]
    c = Call(grammars, cfg, language=lang, speech=frozenset({lang}))
    c.engine = type(c.engine)(grammars, c.engine.s)
    c.queue.clear()
    c.send(CallStarted(IN_HOURS, lang, 0.0, CallerSettings(-1, 12, 1)))
    assert c.prompt_keys()[:2] == ["welcome", "settings_restored"]
    prompts = [p for play in plays(c) for p in play.prompts]
    assert {(p.rate, p.gain_db) for p in prompts} == {(0.75, 12)}
    assert c.listen().no_input_ms == 18000
    # Default settings say nothing extra.
    c.engine = type(c.engine)(grammars, c.engine.s)
    c.queue.clear()
    c.send(CallStarted(IN_HOURS, lang, 0.0, CallerSettings()))
    assert "settings_restored" not in c.prompt_keys()
