"""Call-centre duties end to end: application status, messages with tickets, callbacks, and
the analysis report, in the simulator (real voice core, real Korean model) and over SIP.

Each simulated call runs against a private SQLite store; the SIP tests start one real
`voicebot serve --web` and call it with the softphone.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest
from conftest import AFTER_HOURS, IN_HOURS, inputs

from voicebot.config import load_config
from voicebot.duties import import_applications, read_applications
from voicebot.errors import VoicebotError
from voicebot.frames import write_wav
from voicebot.report import build
from voicebot.simulator import CallerInput, Simulator
from voicebot.store import Store

sys.path.insert(0, str(Path(__file__).parent))
from sipbot import free_udp_port, sip_options, write_config

VOICEBOT = str(Path(sys.executable).parent / "voicebot")
APPS = """number,status,date
12345,approved,2026-11-20
533,in_review,2025-03-01
4711,ready,2026-11-02
35,in_review,2025-03-01
abc,approved,2026-01-01
888,lost,2026-01-01
999,ready,2026-13-01
12345,rejected,2026-11-21
"""


@pytest.fixture(scope="module")
def duty_store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    folder = tmp_path_factory.mktemp("duties")
    store = Store(folder / "voicebot.sqlite")
    csv_path = folder / "apps.csv"
    csv_path.write_text(APPS, encoding="utf-8")
    rep = import_applications(store, csv_path)
    assert rep.imported == 4
    return store


@pytest.fixture(scope="module")
def dcore(core, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The shared voice core, with messages written under a private folder."""
    from dataclasses import replace

    folder = tmp_path_factory.mktemp("recordings")
    old = core.cfg
    core.cfg = replace(old, recording=replace(old.recording, folder=str(folder)))
    yield core
    core.cfg = old


def call(core, store, spec, language=None, at=IN_HOURS, caller="+994501234567"):  # type: ignore[no-untyped-def]
    return Simulator(core, inputs(*spec), at, language=language, store=store,
                     caller=caller).run()


def keys(res) -> list[str]:  # type: ignore[no-untyped-def]
    return [p.prompt.key for p in res.played]


def said(res, key: str) -> str:  # type: ignore[no-untyped-def]
    return next(p.prompt.text for p in res.played if p.prompt.key == key)


# --- import ---


def test_import_rejects_bad_rows_with_line_numbers_and_imports_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "apps.csv"
    path.write_text(APPS, encoding="utf-8")
    rows, errors = read_applications(path)
    assert [r[0] for r in rows] == ["12345", "533", "4711", "35"]
    assert [(e.line, e.field) for e in errors] == [(6, "number"), (7, "status"), (8, "date"),
                                                   (9, "number")]
    assert "already on line 2" in str(errors[-1])
    # The command: bad rows on stderr with file and line, good rows stored, exit 1.
    cfg_path = write_config(tmp_path / "bot", 5999)
    out = subprocess.run([VOICEBOT, "--config", str(cfg_path), "applications", "import",
                          str(path)], capture_output=True, text=True)
    assert out.returncode == 1
    assert f"{path}: line 7: status: 'lost' is not one of" in out.stderr
    assert "imported 4 application(s), rejected 4 row(s)" in out.stdout
    shown = subprocess.run([VOICEBOT, "--config", str(cfg_path), "applications", "show",
                            "4711"], capture_output=True, text=True)
    assert shown.stdout.strip() == "4711: ready since 2026-11-02"
    bad = tmp_path / "bad.csv"
    bad.write_text("id,state\n1,approved\n", encoding="utf-8")
    with pytest.raises(VoicebotError, match="line 1: header lacks column"):
        read_applications(bad)
    with pytest.raises(VoicebotError, match="no such file"):
        read_applications(tmp_path / "missing.csv")


# --- application status ---


@pytest.mark.parametrize("lang_key,lang,date_words", [
    ("1", "az", "20 noyabr"), ("2", "ru", "двадцатого ноября"),
    ("3", "en", "November twentieth"), ("4", "ko", "11월 20일")])
def test_status_by_keypad_in_every_language(dcore, duty_store, lang_key, lang, date_words) -> None:  # type: ignore[no-untyped-def]
    res = call(dcore, duty_store, [lang_key, "3", "12345#", "1"])
    assert [t.option for t in res.turns][:2] == [f"lang.{lang}", "main.status"]
    number_turn = res.turns[2]
    assert (number_turn.node, number_turn.heard, number_turn.result) == ("status", "12345#",
                                                                         "number")
    assert "1 2 3 4 5" in said(res, "status_readback")
    text = said(res, "status_approved")
    assert "1 2 3 4 5" in text and date_words in text
    assert "main_menu" in keys(res)[-2:] and res.result == "completed"


def test_status_other_year_and_unknown_number_then_operator(dcore, duty_store) -> None:  # type: ignore[no-untyped-def]
    res = call(dcore, duty_store, ["3", "533#", "1"], language="ru")
    assert "первого марта две тысячи двадцать пятого года" in said(res, "status_in_review")
    # Unknown, then "no" to the read-back, then silence: the third failure goes to an
    # operator in working hours, after a warning that says how to go on...
    res = call(dcore, duty_store, ["3", "42#", "1", "7#", "2", "silent", "silent"],
               language="en")
    assert "4 2" in said(res, "status_unknown")
    assert keys(res).count("status_ask") == 3
    assert keys(res)[-3:] == ["timeout_warning_digits", "no_input", "operator_transfer"], keys(res)
    assert res.result == "transferred"
    # ...and outside them to a callback offer.
    res = call(dcore, duty_store, ["3", "42#", "1", "42#", "1", "42#", "1", "1"], language="en",
               at=AFTER_HOURS)
    assert keys(res).count("status_unknown") == 3
    assert "callback_offer" in keys(res) and keys(res)[-2:] == ["callback_booked", "goodbye"]
    cb = duty_store.callbacks(outstanding_only=True)[-1]
    assert (cb["reason"], cb["language"], cb["caller"]) == ("status_failed", "en",
                                                            "+994501234567")


def test_status_by_korean_speech(dcore, duty_store) -> None:  # type: ignore[no-untyped-def]
    # The menu choice, the number and the yes are all spoken.
    res = call(dcore, duty_store, ["say:심사", "say:삼 오", "say:네"], language="ko")
    assert (res.turns[0].input, res.turns[0].option) == ("speech", "main.status")
    number = res.turns[1]
    assert number.input == "speech" and number.result == "number" and number.heard == "삼 오"
    assert "3 5" in said(res, "status_readback")
    assert res.turns[2].input == "speech" and res.turns[2].result == "accepted"
    assert "2025년 3월 1일" in said(res, "status_in_review")


def test_status_number_said_in_groups_with_a_pause(dcore, duty_store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Callers say numbers in groups: "삼 오" ... "삼 오" is 3535, not 35 and a stray 35.
    from voicebot.simulator import CALLER_LEVEL_DBFS, CALLER_RATE_WPM
    from voicebot.tts import PromptCache

    rate = 8000
    caller = PromptCache(tmp_path / "voice", rate, CALLER_RATE_WPM, CALLER_LEVEL_DBFS)
    group = caller.get("삼 오", dcore.grammars.packs["ko"].voice)
    groups = [group, np.zeros(rate * 7 // 10, np.int16), group]
    wav = write_wav(tmp_path / "groups.wav", np.concatenate(groups), rate)
    res = Simulator(dcore, [CallerInput("press", "3"), CallerInput("say_wav", str(wav)),
                            CallerInput("say", "네")], IN_HOURS, language="ko",
                    store=duty_store).run()
    number = res.turns[1]
    assert (number.input, number.result) == ("speech", "number"), res.turns
    assert number.heard == "삼 오 삼 오", number.heard
    assert "3 5 3 5" in said(res, "status_readback")
    assert "3 5 3 5" in said(res, "status_unknown")


# --- complaints, proposals and reports ---


def _wav_seconds(path: str) -> float:
    with wave.open(path) as w:
        return w.getnframes() / w.getframerate()


def test_complaint_by_keypad_ends_on_hash_with_ticket(dcore, duty_store) -> None:  # type: ignore[no-untyped-def]
    res = call(dcore, duty_store, ["4", "1", "say:The officer at the desk was rude to me and I "
                                   "waited three hours.", "#"], language="en")
    assert [t.option for t in res.turns] == ["main.report", "report.complaint",
                                             "report.complaint"]
    assert keys(res)[keys(res).index("record_instructions") + 1] == "beep"
    ticket = duty_store.tickets()[-1]
    assert ticket["ended_by"] == "key" and ticket["kind"] == "complaint"
    assert ticket["state"] == "received" and ticket["speech_ms"] > 2000
    assert " ".join(ticket["ticket"]) in said(res, "record_saved")
    assert 3.0 < _wav_seconds(ticket["recording"]) < 12.0
    assert not Path(ticket["recording"] + ".part").exists()


def test_proposal_by_korean_speech_ends_on_silence(dcore, duty_store) -> None:  # type: ignore[no-untyped-def]
    res = call(dcore, duty_store, ["say:민원", "say:아이디어", "say:홈페이지에 영어 안내를 "
                                   "추가해 주세요."], language="ko")
    assert [(t.input, t.option) for t in res.turns] == [
        ("speech", "main.report"), ("speech", "report.proposal"), ("speech", "report.proposal")]
    ticket = duty_store.tickets()[-1]
    assert (ticket["kind"], ticket["language"], ticket["ended_by"]) == ("proposal", "ko",
                                                                        "silence")
    # 5 s of silence after the message end it, and they are in the recording.
    assert _wav_seconds(ticket["recording"]) >= 5.0
    assert ticket["ticket"][0] in said(res, "record_saved")


def test_hang_up_during_a_message_keeps_what_was_said(dcore, duty_store) -> None:  # type: ignore[no-untyped-def]
    res = call(dcore, duty_store, ["4", "3", "say:Someone is working without a permit at the "
                                   "market.", "hangup"], language="en")
    assert res.result == "abandoned" and "record_saved" not in keys(res)
    ticket = duty_store.tickets()[-1]
    assert (ticket["kind"], ticket["ended_by"], ticket["state"]) == ("violation", "hangup",
                                                                     "received")
    with wave.open(ticket["recording"]) as w:
        audio = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    assert len(audio) / 8000 > 2.0 and np.abs(audio).max() > 1000  # the caller's speech


# --- callbacks ---


def test_callbacks_after_hours_and_hung_up_while_waiting(dcore, duty_store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    before = len(duty_store.callbacks())
    res = call(dcore, duty_store, ["0", "1"], language="ru", at=AFTER_HOURS, caller="+99455")
    assert keys(res)[-2:] == ["callback_booked", "goodbye"]
    res = call(dcore, duty_store, ["0", "hangup"], language="az", caller="+99470")
    assert keys(res)[-1] == "operator_transfer" and res.result != "transferred"
    declined = call(dcore, duty_store, ["0", "2"], language="en", at=AFTER_HOURS)
    assert keys(declined)[-1] == "info_menu"
    new = duty_store.callbacks()[before:]
    assert [(c["caller"], c["language"], c["reason"]) for c in new] == [
        ("+99455", "ru", "after_hours"), ("+99470", "az", "hung_up_waiting")]


def test_callbacks_command(tmp_path: Path) -> None:
    cfg_path = write_config(tmp_path / "bot", 5999)
    store = Store.from_config(load_config(cfg_path))
    first = store.add_callback("c1", "+99450", "az", "after_hours")
    store.add_callback("c2", "+99451", "ko", "hung_up_waiting")
    store.close()

    def vb(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([VOICEBOT, "--config", str(cfg_path), "callbacks", *args],
                              capture_output=True, text=True)

    assert "+99450" in vb("list").stdout and "+99451" in vb("list").stdout
    assert vb("done", str(first)).returncode == 0
    assert "+99450" not in vb("list").stdout
    again = vb("done", str(first))
    assert again.returncode == 2 and "no such outstanding callback" in again.stderr
    assert vb("export", str(tmp_path / "cb.csv"), "--all").returncode == 0
    rows = list(csv.DictReader((tmp_path / "cb.csv").open(encoding="utf-8")))
    assert [(r["caller"], bool(r["done_at"])) for r in rows] == [("+99450", True),
                                                                 ("+99451", False)]


# --- the report ---


def test_report_from_simulated_calls(dcore, duty_store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # The store holds the calls of the tests above; add a day of other calls.
    call(dcore, duty_store, ["3", "1", "2"], at=IN_HOURS.replace(day=24))
    call(dcore, duty_store, ["say:상담원"], language="ko", at=IN_HOURS.replace(day=24))
    out = tmp_path / "report"
    rep = build(duty_store, out)
    total = len(duty_store.calls())
    assert rep.calls == total >= 15
    for name in ("index.html", "report.md", "calls_per_day.png", "exits.png", "services.png",
                 "input_by_node.png", "speech_by_prompt.png"):
        assert (out / name).stat().st_size > 1000, name
    per_day = list(csv.DictReader((out / "calls_per_day.csv").open(encoding="utf-8")))
    assert sum(int(r["total"]) for r in per_day) == total
    assert {r["day"] for r in per_day} >= {"2026-11-23", "2026-11-24"}
    services = {r["option"]: int(r["requests"])
                for r in csv.DictReader((out / "services.csv").open(encoding="utf-8"))}
    assert services["main.status"] >= 7 and services["report.complaint"] >= 1
    by_node = {r["node"]: r for r in csv.DictReader((out / "input_by_node.csv").open())}
    assert int(by_node["status"]["dtmf"]) >= 6 and int(by_node["status"]["speech"]) >= 1
    speech = {r["node"]: r for r in csv.DictReader((out / "speech_by_prompt.csv").open())}
    assert 0.0 <= float(speech["main"]["no_match_rate"]) <= 1.0
    outstanding = list(csv.DictReader((out / "callbacks_outstanding.csv").open()))
    assert len(outstanding) == len(duty_store.callbacks(outstanding_only=True)) >= 2
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "![Calls per day and language](calls_per_day.png)" in md
    # --since leaves out the earlier day.
    later = build(duty_store, tmp_path / "later", since=IN_HOURS.replace(day=24).date())
    assert later.calls == 2


# --- over SIP, and the live report page in a browser ---


@pytest.fixture(scope="module")
def web_bot(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """`voicebot serve --web` on free loopback ports, with applications imported."""
    folder = tmp_path_factory.mktemp("sipduties")
    port = free_udp_port()
    web_port = free_udp_port(5400, 5999)
    cfg_path = write_config(folder, port)
    apps = folder / "apps.csv"
    apps.write_text(APPS, encoding="utf-8")
    subprocess.run([VOICEBOT, "--config", str(cfg_path), "applications", "import", str(apps)],
                   capture_output=True, text=True)
    log = (folder / "serve.log").open("w", encoding="utf-8")
    proc = subprocess.Popen([VOICEBOT, "serve", "--config", str(cfg_path), "--at",
                             "2026-11-23T10:30", "--web", f"127.0.0.1:{web_port}"],
                            stdout=log, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    end = time.monotonic() + 90
    while sip_options("127.0.0.1", port) is None:
        assert proc.poll() is None and time.monotonic() < end, \
            (folder / "serve.log").read_text()
        time.sleep(0.3)
    yield {"cfg": cfg_path, "uri": f"sip:919@127.0.0.1:{port}", "web": web_port,
           "folder": folder, "store": lambda: Store.from_config(load_config(cfg_path))}
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def sip_call(bot, *args: str) -> list[dict]:  # type: ignore[no-untyped-def, type-arg]
    out = subprocess.run([VOICEBOT, "--config", str(bot["cfg"]), "call", bot["uri"], *args,
                          "--json"], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr + (bot["folder"] / "serve.log").read_text()[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_status_and_report_over_sip_by_keys(web_bot) -> None:  # type: ignore[no-untyped-def]
    rows = sip_call(web_bot, "--press", "3", "--press", "3", "--press", "4711#", "--press", "1")
    assert [r["option"] for r in rows][:2] == ["lang.en", "main.status"]
    assert rows[2]["heard"] == "4711#" and "4 7 1 1" in rows[2]["prompt_text"]
    # The status is said after the store's answer, a reply the yes-turn does not carry.
    assert rows[3]["result"] == "accepted" and rows[3]["node"] == "confirm"
    rows = sip_call(web_bot, "--press", "3", "--press", "4", "--press", "2", "--say",
                    "Please add an English page about work permits.")
    assert [r["option"] for r in rows] == ["lang.en", "main.report", "report.proposal",
                                           "report.proposal"]
    assert rows[-1]["prompt"] == "record_saved"
    store = web_bot["store"]()
    try:
        ticket = store.tickets()[-1]
    finally:
        store.close()
    assert ticket["kind"] == "proposal" and ticket["ended_by"] == "silence"
    # The softphone's From is sip:caller@...; no P-Asserted-Identity: From's user part.
    assert ticket["caller"] == "caller"
    assert _wav_seconds(ticket["recording"]) > 6.0
    assert " ".join(ticket["ticket"]) in rows[-1]["prompt_text"]


def test_status_and_complaint_over_sip_by_korean_speech(web_bot) -> None:  # type: ignore[no-untyped-def]
    # The menu choice and the yes are spoken over RTP; the number is keyed. Spoken Korean
    # digits are tested in the simulator: espeak-ng's single-syllable digits through G.711
    # are misheard by the small model ("삼 오" -> "음악 오"), the read-back catches that.
    rows = sip_call(web_bot, "--press", "4", "--say", "심사", "--press", "35#", "--say", "네")
    assert (rows[1]["input"], rows[1]["option"]) == ("speech", "main.status")
    assert rows[2]["heard"] == "35#" and "3 5" in rows[2]["prompt_text"]
    assert (rows[3]["input"], rows[3]["result"]) == ("speech", "accepted")
    rows = sip_call(web_bot, "--press", "4", "--say", "민원", "--say", "민원", "--say",
                    "직원이 너무 불친절했어요.")
    assert [(r["input"], r["option"]) for r in rows][1:] == [
        ("speech", "main.report"), ("speech", "report.complaint"), ("speech", "report.complaint")]


def test_live_report_page_in_headless_chromium(web_bot, tmp_path) -> None:  # type: ignore[no-untyped-def]
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("chromium is not installed; `make test` installs it "
                    "(scripts/install-system-deps)")
    url = f"http://127.0.0.1:{web_bot['web']}/"
    page = urllib.request.urlopen(url, timeout=60).read().decode()
    charts = [p for p in ("calls_per_day.png", "services.png", "input_by_node.png")
              if f'src="{p}"' in page]
    assert len(charts) == 3
    for p in charts:
        assert urllib.request.urlopen(url + p, timeout=30).read()[:4] == b"\x89PNG"
    post = urllib.request.Request(url, data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError):  # read-only
        urllib.request.urlopen(post, timeout=10)
    shot = tmp_path / "page.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", f"--screenshot={shot}", "--window-size=1000,1400",
                    url], capture_output=True, timeout=120)
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # The bar charts' default colours (matplotlib C0 blue, C1 orange) are in the page.
    blue = (np.abs(img - [31, 119, 180]).sum(axis=2) < 40).sum()
    orange = (np.abs(img - [255, 127, 14]).sum(axis=2) < 40).sum()
    assert blue > 500 and orange > 100, (blue, orange)
