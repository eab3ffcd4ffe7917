"""sipp against a real `voicebot serve`: RFC 4733 and SIP INFO DTMF, Korean speech as RTP,
blind transfer by REFER, hang-ups at awkward moments, re-INVITE, no RTP, wrong numbers and
garbage on the SIP port.

One bot serves the whole module (it loads the 500 MB Korean model once); every test makes its
own calls and finds their records by the Call-IDs it gave sipp. Scenarios live in tests/sipp/;
their caller audio is headerless A-law (sipp's rtp_stream sends a file's bytes as they are, so a
WAV header would reach the bot as a click at every loop).
"""

from __future__ import annotations

import json
import re
import socket
import uuid
import wave
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sipbot import Bot, record_ids, sip_options, sipp, sipp_call_id, start_bot

from voicebot.store import CallRecord, Store


@pytest.fixture(scope="module")
def bot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bot]:
    # 3 s without RTP ends a call: short enough for the no-RTP test, and every other
    # scenario streams RTP all along as a real phone does.
    b = start_bot(tmp_path_factory.mktemp("sippbot"), extra="[sip]\nno_rtp_timeout_s = 3\n")
    try:
        yield b
    finally:
        code = b.stop()
    assert code == 0, f"voicebot serve exited with {code}:\n{b.log()[-4000:]}"


def run(bot: Bot, scenario: str, *, service: str | None = None,
        timeout: float = 90.0) -> str:
    """Run one call of a scenario; it must pass in sipp's eyes. Returns its SIP Call-ID."""
    tag = f"{Path(scenario).stem}-{uuid.uuid4().hex[:8]}"
    proc = sipp(scenario, bot, service=service, timeout=timeout, call_id=tag)
    if proc.returncode != 0:
        errors = "\n".join(p.read_text(errors="replace")[-3000:]
                           for p in bot.folder.glob(f"sipp-{scenario}-*-errors.log"))
        raise AssertionError(f"sipp {scenario} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}\n{errors}\n"
                             f"bot log:\n{bot.log()[-4000:]}")
    return sipp_call_id(tag)


def ended(bot: Bot, sip_call_id: str, before: set[str]) -> CallRecord:
    """The complete record of a call that ``before`` (record ids) did not hold."""
    rec = bot.wait_call(sip_call_id)
    assert rec.id not in before
    assert rec.ended_at and rec.started_at and rec.result, rec
    return rec


def turns(rec: CallRecord) -> list[tuple[str, str, str | None, str]]:
    """(node, input, option, result) of each turn."""
    return [(t["node"], t["input"], t["option"], t["result"]) for t in rec.turns]


def assert_wav(path: str | None) -> None:
    assert path, "the call has no recording"
    with wave.open(path, "rb") as w:  # raises on a file that is not a complete WAV
        assert w.getnchannels() == 1 and w.getsampwidth() == 2
        assert w.getframerate() in (8000, 16000)
        assert w.getnframes() > w.getframerate()  # more than a second of audio


def assert_answers(bot: Bot) -> None:
    assert bot.proc.poll() is None, bot.log()[-4000:]
    assert sip_options("127.0.0.1", bot.port, timeout=2.0) == 200


def test_rfc4733_dtmf_en_hours(bot: Bot) -> None:
    """The issue's acceptance check: RFC 4733 3 then 2 shows up in `voicebot calls --json`."""
    before = record_ids(bot)
    cid = run(bot, "rfc4733_dtmf.xml")
    ended(bot, cid, before)
    out = bot.cli("calls", "--json", "--last", "50")
    assert out.returncode == 0, out.stderr
    rec = next(r for r in map(json.loads, out.stdout.splitlines()) if r["sip_call_id"] == cid)
    assert rec["language"] == "en"
    assert "main.hours" in rec["path"]
    assert rec["path"][:1] == ["lang.en"]
    assert rec["result"] == "completed"
    assert [t["input"] for t in rec["turns"]][:2] == ["dtmf", "dtmf"]
    assert_wav(rec["recording"])
    assert Path(rec["recording"]).is_file()


def test_sip_info_dtmf(bot: Bot) -> None:
    """application/dtmf-relay INFO reaches the dialog like RFC 4733."""
    before = record_ids(bot)
    rec = ended(bot, run(bot, "info_dtmf.xml"), before)
    assert rec.language == "en"
    assert rec.path == ["lang.en", "main.hours"]
    assert turns(rec)[:2] == [("language", "dtmf", "lang.en", "accepted"),
                              ("main", "dtmf", "main.hours", "accepted")]
    assert rec.result == "completed"
    assert_wav(rec.recording)


def test_speech_operator_transfer_succeeds(bot: Bot) -> None:
    """Korean "상담원" as RTP is recognised; the REFER succeeds (NOTIFY sipfrag 200)."""
    before = record_ids(bot)
    rec = ended(bot, run(bot, "speech_transfer_ok.xml"), before)
    assert rec.language == "ko"
    speech = [t for t in rec.turns if t["input"] == "speech"]
    assert len(speech) == 1, rec.turns
    assert speech[0]["heard"] == "상담원"
    assert speech[0]["option"] == "main.operator" and speech[0]["result"] == "accepted"
    assert rec.path == ["lang.ko", "main.operator"]
    assert rec.result == "transferred"
    assert rec.ended_by == "transfer"
    assert_wav(rec.recording)


def test_speech_no_match_then_failed_transfer_returns_to_menu(bot: Bot) -> None:
    """Out-of-grammar speech gives no match; a transfer the caller's side reports as failed
    (NOTIFY sipfrag 503) brings the caller back to the main menu, where a key still works."""
    before = record_ids(bot)
    rec = ended(bot, run(bot, "speech_transfer_fail.xml"), before)
    assert rec.language == "ko"
    got = turns(rec)
    assert got[0] == ("language", "dtmf", "lang.ko", "accepted")
    assert got[1] == ("main", "speech", None, "no_match")
    assert rec.turns[1]["heard"] != "상담원"
    assert got[2] == ("main", "speech", "main.operator", "accepted")
    assert rec.turns[2]["heard"] == "상담원"
    # Back at the main menu after the failed transfer: key 2 there plays the hours.
    assert got[3] == ("main", "dtmf", "main.hours", "accepted")
    assert rec.path == ["lang.ko", "main.operator", "main.hours"]
    assert rec.result == "completed"  # not "transferred": the operator was never reached
    assert rec.ended_by == "caller"
    assert_wav(rec.recording)


def test_hangups_at_awkward_moments(bot: Bot) -> None:
    """BYE during the welcome, in the middle of an utterance, while a transfer is pending,
    and a caller that never ACKs: each call ends with a complete record, and the bot keeps
    answering. The four run at once (the bot's call limit is 4) to save time."""
    before = record_ids(bot)
    scenarios = ["bye_welcome.xml", "bye_speech.xml", "bye_transfer.xml", "no_ack.xml"]
    with ThreadPoolExecutor(len(scenarios)) as pool:
        cids = dict(zip(scenarios, pool.map(lambda s: run(bot, s), scenarios), strict=True))
    recs = {s: ended(bot, cid, before) for s, cid in cids.items()}

    welcome = recs["bye_welcome.xml"]
    assert welcome.result == "abandoned" and welcome.ended_by == "caller"
    assert welcome.path == [] and welcome.language is None

    mid_speech = recs["bye_speech.xml"]
    assert mid_speech.result == "abandoned" and mid_speech.ended_by == "caller"
    assert mid_speech.path == ["lang.ko"]
    # The utterance was cut off by the hang-up: no speech turn was decided on.
    assert [t["input"] for t in mid_speech.turns] == ["dtmf"]

    pending = recs["bye_transfer.xml"]
    assert pending.path == ["lang.ko", "main.operator"]
    assert pending.ended_by == "caller"
    # The caller's phone accepted the REFER (202) and then left the call, as a transferee
    # does: the bot counts the call as handed to the operator.
    assert pending.result == "transferred"

    no_ack = recs["no_ack.xml"]
    assert no_ack.ended_by == "bot" and no_ack.reason == "no_ack"
    assert no_ack.answered_at is None  # never confirmed
    assert no_ack.result == "abandoned"

    assert_answers(bot)
    after = record_ids(bot)
    rec = ended(bot, run(bot, "bye_welcome.xml"), after)
    assert rec.result == "abandoned"


def test_hang_up_while_waiting_for_the_operator_queues_a_callback(bot: Bot) -> None:
    before = record_ids(bot)
    rec = ended(bot, run(bot, "bye_waiting.xml"), before)
    assert rec.path == ["lang.ko", "main.operator"] and rec.ended_by == "caller"
    assert rec.result != "transferred"
    store = Store.from_config(bot.cfg)
    try:
        queued = [c for c in store.callbacks(outstanding_only=True) if c["call_id"] == rec.id]
    finally:
        store.close()
    assert [(c["reason"], c["language"]) for c in queued] == [("hung_up_waiting", "ko")]
    # From is sip:caller@...; no P-Asserted-Identity: From's user part, unverified.
    assert queued[0]["caller"] == "caller" and not queued[0]["verified"]


def test_reinvite_hold_and_resume(bot: Bot) -> None:
    """re-INVITE to hold (sendonly) and to resume: keys sent afterwards are acted on."""
    before = record_ids(bot)
    rec = ended(bot, run(bot, "reinvite.xml"), before)
    assert rec.language == "en"
    assert rec.path == ["lang.en", "main.hours"]
    assert rec.result == "completed"
    assert rec.ended_by == "caller"
    assert_wav(rec.recording)


def test_no_rtp_hangs_up(bot: Bot) -> None:
    """No RTP at all: the bot sends BYE itself after no_rtp_timeout_s (sipp expects it)."""
    before = record_ids(bot)
    rec = ended(bot, run(bot, "no_rtp.xml"), before)
    assert rec.ended_by == "bot"
    assert rec.reason == "no_rtp"
    assert rec.result == "abandoned"


GARBAGE = [
    b"\x00\xff\xfe garbage \x80\x81" * 20,
    b"INVITE sip:919@127.0.0.1 SIP/2.0\r\n\r\n",
    b"HELLO WORLD\r\n\r\n",
    b"SIP/2.0 200 OK\r\nCall-ID: nothing\r\n\r\n",
    (b"INVITE sip:919@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKx\r\n"
     b"From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:919@127.0.0.1>\r\nCall-ID: garbage-cseq\r\n"
     b"CSeq: abc INVITE\r\nContent-Length: 99999\r\n\r\nv=0"),
    (b"INVITE sip:919@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKy\r\n"
     b"From: <sip:a@127.0.0.1>;tag=2\r\nTo: <sip:919@127.0.0.1>\r\nCall-ID: garbage-sdp\r\n"
     b"CSeq: 1 INVITE\r\nContact: <sip:a@127.0.0.1:9>\r\nContent-Type: application/sdp\r\n"
     b"Content-Length: 30\r\n\r\nv=0\r\nm=audio notaport RTP/AVP\r\n"),
]


def test_wrong_number_and_garbage(bot: Bot) -> None:
    """A call to another number gets 404 (the scenario expects it); malformed SIP over UDP
    does not crash the bot: it still answers OPTIONS and takes calls."""
    before = record_ids(bot)
    run(bot, "wrong_number.xml", service="999")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for msg in GARBAGE:
            s.sendto(msg, ("127.0.0.1", bot.port))
    assert_answers(bot)
    rec = ended(bot, run(bot, "bye_welcome.xml"), before)
    assert rec.dialled == "919"
    # Neither the 404 nor the garbage left a record behind.
    new = [r for r in bot.calls() if r.id not in before]
    assert [r.sip_call_id for r in new] == [rec.sip_call_id]
    assert bot.proc.poll() is None



def test_g722_caller_gets_g722(bot: Bot) -> None:
    """A caller offering only G.722 is answered with G.722 (16 kHz on the wire)."""
    before = record_ids(bot)
    rec = ended(bot, run(bot, "g722_dtmf.xml"), before)
    assert rec.path[:2] == ["lang.en", "main.hours"]
    assert re.search(rf"call={rec.id} .*event=media codec=G722/", bot.log())
