"""Loading validates the menu and every pack; each kind of error names file, path, problem."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from voicebot.config import PROJECT_ROOT, load_config
from voicebot.errors import DataError, DataErrors
from voicebot.menus import MIN_PHRASES, load_grammars


def load_errors(root: Path) -> list[str]:
    try:
        load_grammars(root)
    except DataErrors as exc:
        return [str(e) for e in exc.errors]
    except DataError as exc:
        return [str(exc)]
    return []


def edit(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, count), encoding="utf-8")


def test_shipped_grammars_are_valid(grammars) -> None:  # type: ignore[no-untyped-def]
    assert set(grammars.packs) == {"az", "ru", "en", "ko"}
    ids = {o.id for o in grammars.menu.all_options()}
    for required in ["lang.az", "lang.ru", "lang.en", "lang.ko", "main.info", "main.hours",
                     "main.operator", "info.temporary_stay", "info.temporary_residence",
                     "info.permanent_residence", "info.employment", "info.registration"]:
        assert required in ids
    keys = {o.id: o.key for o in grammars.menu.all_options()}
    assert keys["main.operator"] == "0" and keys["info.registration"] == "5"
    assert keys["nav.repeat"] == "9" and keys["nav.back"] == "*"
    for pack in grammars.packs.values():
        for oid, words in pack.options.items():
            assert len(words.phrases) >= MIN_PHRASES, (pack.language, oid)
            assert words.keywords
    assert "상담원" in grammars.packs["ko"].options["main.operator"].keywords
    assert grammars.packs["az"].asr_model == "vosk-model-small-tr-0.3"
    for lang, pack in grammars.packs.items():
        assert "record" in pack.prompts["welcome"].lower() or lang != "en"


def test_unknown_key(grammars_copy: Path) -> None:
    edit(grammars_copy / "packs" / "en.toml", "[pack]\n", "[pack]\ncolour = \"blue\"\n")
    errors = load_errors(grammars_copy)
    assert len(errors) == 1
    assert re.search(r"packs/en\.toml: pack\.colour: unknown key; expected one of: .*voice",
                     errors[0])


def test_unknown_key_in_option(grammars_copy: Path) -> None:
    edit(grammars_copy / "packs" / "ru.toml", '[options."main.hours"]\n',
         '[options."main.hours"]\nsynonyms = ["x"]\n')
    (err,) = load_errors(grammars_copy)
    assert 'packs/ru.toml: options."main.hours".synonyms: unknown key' in err


def test_prompt_missing_in_one_language(grammars_copy: Path) -> None:
    path = grammars_copy / "packs" / "ru.toml"
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"^info_employment = .*\n", "", text, flags=re.M)
    path.write_text(text, encoding="utf-8")
    (err,) = load_errors(grammars_copy)
    assert "packs/ru.toml: prompts.info_employment: a prompt missing in this language" in err
    assert "az, en, ko" in err


def test_extra_prompt_in_one_language_is_missing_in_the_others(grammars_copy: Path) -> None:
    edit(grammars_copy / "packs" / "en.toml", "[prompts]\n", '[prompts]\nfarewell = "Bye."\n')
    errors = load_errors(grammars_copy)
    assert len(errors) == 3
    assert all("prompts.farewell: a prompt missing in this language (present in en)" in e
               for e in errors)


def test_two_options_on_one_key(grammars_copy: Path) -> None:
    edit(grammars_copy / "menu.toml", '{ id = "info.employment", key = "4"',
         '{ id = "info.employment", key = "2"')
    (err,) = load_errors(grammars_copy)
    assert "menu.toml: nodes.info.options[3].key: two options on one key: '2' is already " \
           "used by info.temporary_residence" in err


def test_option_key_clashing_with_repeat(grammars_copy: Path) -> None:
    edit(grammars_copy / "menu.toml", '{ id = "info.registration", key = "5"',
         '{ id = "info.registration", key = "9"')
    (err,) = load_errors(grammars_copy)
    assert "nodes.info.options[4].key: two options on one key: '9' is already used by " \
           "nav.repeat" in err


def test_option_without_keywords(grammars_copy: Path) -> None:
    path = grammars_copy / "packs" / "en.toml"
    text = path.read_text(encoding="utf-8")
    text = text.replace('keywords = ["four", "work", "employment", "job", "work permit"]',
                        "keywords = []")
    path.write_text(text, encoding="utf-8")
    (err,) = load_errors(grammars_copy)
    assert 'packs/en.toml: options."info.employment".keywords: option without keywords' in err


def test_too_few_phrases_and_missing_option(grammars_copy: Path) -> None:
    path = grammars_copy / "packs" / "en.toml"
    text = path.read_text(encoding="utf-8")
    start = text.index('[options."info.registration"]')
    end = text.index('[options."nav.repeat"]')
    path.write_text(text[:start] + text[end:], encoding="utf-8")
    edit(path, '"repeat please", "say that again", ', "")
    errors = load_errors(grammars_copy)
    assert any('options."info.registration": missing' in e for e in errors)
    assert any(f'options."nav.repeat".phrases: needs at least {MIN_PHRASES} training phrases'
               in e for e in errors)


def test_same_keyword_on_two_options_of_one_menu(grammars_copy: Path) -> None:
    edit(grammars_copy / "packs" / "en.toml",
         'keywords = ["two", "hours", "working hours", "opening hours", "schedule"]',
         'keywords = ["two", "hours", "working hours", "opening hours", "schedule", "operator"]')
    (err,) = load_errors(grammars_copy)
    assert "keyword 'operator' is also a keyword of main.hours at the same menu" in err


def test_unknown_placeholder_and_goto(grammars_copy: Path) -> None:
    edit(grammars_copy / "packs" / "en.toml", "from {open} to {close}", "from {opens} to {close}")
    edit(grammars_copy / "menu.toml", 'goto = "info"', 'goto = "infos"')
    errors = load_errors(grammars_copy)
    assert any("packs/en.toml: prompts.hours: unknown placeholder(s) ['opens']" in e
               for e in errors)
    assert any("menu.toml: nodes.main.options[0].goto: no node named 'infos'" in e
               for e in errors)


def test_malformed_toml_names_line(grammars_copy: Path) -> None:
    edit(grammars_copy / "packs" / "ko.toml", "[pack]\n", "[pack\n")
    (err,) = load_errors(grammars_copy)
    assert "packs/ko.toml: not valid TOML" in err and "line" in err


def test_pack_language_must_match_file(grammars_copy: Path) -> None:
    (grammars_copy / "packs" / "en.toml").rename(grammars_copy / "packs" / "xx.toml")
    errors = load_errors(grammars_copy)
    assert any("packs/xx.toml: pack.language: is 'en' but the file is xx.toml" in e
               for e in errors)


def test_config_errors_name_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "voicebot.toml"
    bad.write_text("[vad]\nhangover = 3\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"voicebot\.toml: vad\.hangover: unknown key"):
        load_config(bad)
    bad.write_text('[hours]\nopen = "9am"\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"hours: time '9am' is not HH:MM"):
        load_config(bad)
    bad.write_text("[nlu]\naccept = \"high\"\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"nlu\.accept: expected a number"):
        load_config(bad)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "voicebot", *args], capture_output=True,
                          text=True, cwd=PROJECT_ROOT, timeout=300)


def test_menus_check_cli_reports_errors_and_vocabulary(grammars_copy: Path, tmp_path: Path) -> None:
    ok = cli("menus", "check", "--strict")
    assert ok.returncode == 0, ok.stderr
    assert "every keyword and decoy is in vosk-model-small-ko-0.22's vocabulary" in ok.stdout
    assert "az: vocabulary not checked, model vosk-model-small-tr-0.3 is not installed" \
        in ok.stdout
    assert "voicebot models install vosk-model-small-tr-0.3" in ok.stdout

    # A Korean keyword the model does not know is reported with where it is.
    edit(grammars_copy / "packs" / "ko.toml", 'keywords = ["상담원", "상담사"]',
         'keywords = ["상담원", "상담사", "상담원으로요"]')
    conf = tmp_path / "voicebot.toml"
    models = PROJECT_ROOT / "models"
    conf.write_text(f'[paths]\ngrammars = "{grammars_copy}"\nmodels = "{models}"\n',
                    encoding="utf-8")
    bad = cli("--config", str(conf), "menus", "check", "--strict")
    assert bad.returncode == 1
    assert "word '상담원으로요'" in bad.stdout and 'options."main.operator".keywords' in bad.stdout

    broken = grammars_copy / "menu.toml"
    edit(broken, '{ id = "main.hours", key = "2"', '{ id = "main.hours", key = "1"')
    res = cli("--config", str(conf), "menus", "check")
    assert res.returncode == 2
    assert "nodes.main.options[1].key: two options on one key" in res.stderr


def test_menus_show_prints_tree() -> None:
    res = cli("menus", "show", "--lang", "en")
    assert res.returncode == 0, res.stderr
    assert "main.operator" in res.stdout and "operator, agent" in res.stdout
    assert "info.registration" in res.stdout
    assert "9  nav.repeat" in res.stdout


def test_year_words_num2words_cannot_do(grammars_copy: Path) -> None:
    edit(grammars_copy / "packs" / "ru.toml", 'year_words = { to = "ordinal", case = "genitive" }',
         'year_words = { to = "ordinal", case = "vocative" }')
    (err,) = load_errors(grammars_copy)
    assert "ru.toml" in str(err) and "format.year_words" in str(err)


@pytest.mark.parametrize("key", ["apology", "lookup_failed", "record_failed", "callback_failed"])
def test_failure_prompts_are_required_in_every_pack(grammars, grammars_copy: Path,
                                                    key: str) -> None:  # type: ignore[no-untyped-def]
    """The apologies the engine says when I/O fails (issue 10) must exist in every pack."""
    for pack in grammars.packs.values():
        assert pack.prompts[key].strip()
    path = grammars_copy / "packs" / "ko.toml"
    text = path.read_text(encoding="utf-8")
    path.write_text(re.sub(rf"^{key} = .*\n", "", text, flags=re.M), encoding="utf-8")
    (err,) = load_errors(grammars_copy)
    assert f"packs/ko.toml: prompts.{key}" in err
