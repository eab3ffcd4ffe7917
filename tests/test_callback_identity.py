"""Callbacks go to a trusted identity (issue 11).

A P-Asserted-Identity counts only from a trusted peer (``[sip] allow`` or the Kamailio front);
otherwise the callback goes to From's number, marked ``unverified`` in ``voicebot callbacks
list``. The parser and the trust rule are pure functions, tested on real header forms; the
whole path is tested with sipp calls through a real ``voicebot serve`` that ask for a callback
by DTMF (English, operator, hang up while waiting); the store's migration on an old SQLite
file and an old PostgreSQL database, and an old journal replayed.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sipbot import Bot, sipp, sipp_call_id, start_bot
from test_store import Cluster, postgres  # noqa: F401  (the PostgreSQL fixture)

from voicebot.store import Store
from voicebot.telephony import (
    CallerIdentity,
    asserted_number,
    caller_identity,
    source_host,
    trusted_peer,
    uri_number,
)

ALLOW = ["127.0.0.0/8", "::1/128"]


def invite(*headers: str) -> str:
    """A SIP INVITE as it reaches the worker (CRLF line ends, an SDP body)."""
    return "\r\n".join([
        "INVITE sip:919@127.0.0.1:5070 SIP/2.0",
        "Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-1",
        'From: "Forger" <sip:+15550000000@evil.example>;tag=1',
        "To: <sip:919@127.0.0.1>",
        "Call-ID: abc@127.0.0.1",
        "CSeq: 1 INVITE",
        *headers,
        "Content-Type: application/sdp",
        "Content-Length: 4",
        "",
        "v=0\r\n"])


# --- the parser ---------------------------------------------------------------------------

@pytest.mark.parametrize(("headers", "number"), [
    # RFC 3325 section 9.1's example: a sip and a tel URI, in two headers.
    (['P-Asserted-Identity: "Cullen Jennings" <sip:fluffy@cisco.com>',
      "P-Asserted-Identity: tel:+14085264000"], "fluffy"),
    # A trunk's usual form: user=phone, visual separators in the number.
    (['P-Asserted-Identity: "Caller" <sip:+994-12-555-0101@trunk.example;user=phone>'],
     "+994125550101"),
    # Both values in one header, comma-separated; the first one wins.
    (["P-Asserted-Identity: <tel:+1-408-526-4000>, <sip:+14085264000@example.com>"],
     "+14085264000"),
    # A comma inside the quoted display name does not split the value.
    (['P-Asserted-Identity: "Doe, John" <tel:+44 (20) 7946.0018;phone-context=+44>'],
     "+442079460018"),
    # Header names are case-insensitive; a bare tel: URI without <>.
    (["p-asserted-identity: tel:+99450123"], "+99450123"),
    # A folded header (continuation line).
    (["P-Asserted-Identity:", "  <sip:5551234@pbx.example>"], "5551234"),
    # A sips: URI, user parameters and a port.
    (["P-Asserted-Identity: <sips:+4930123;npdi@pbx.example:5061>"], "+4930123"),
    # An unusable first value (no user, other scheme): the next one counts.
    (["P-Asserted-Identity: <sip:pbx.example>, <mailto:a@b.example>, <tel:112>"], "112"),
    # Percent-encoded user part.
    (["P-Asserted-Identity: <sip:%2B99455@pbx.example>"], "+99455"),
    # None at all, or nothing usable.
    ([], ""),
    (["P-Asserted-Identity: <sip:pbx.example>"], ""),
    # A header whose name merely starts like it is not it.
    (["P-Asserted-Identity-X: <tel:+1>"], ""),
])
def test_asserted_number(headers: list[str], number: str) -> None:
    assert asserted_number(invite(*headers)) == number


def test_asserted_number_ignores_the_body() -> None:
    """A P-Asserted-Identity line in the body (SDP, or a SIPfrag) is not a header."""
    msg = invite() + "P-Asserted-Identity: <tel:+1999>\r\n"
    assert asserted_number(msg) == ""


@pytest.mark.parametrize(("uri", "number"), [
    ('"sipp" <sip:caller@127.0.0.1:5061>', "caller"),
    ("<sip:+994 55 123-45-67@10.0.0.1>", "+994551234567"),
    ("sip:john.doe@example.com", "john.doe"),  # a name, not a number: left as it is
    ("<tel:+99412(555)0101>", "+994125550101"),
    ("<sip:10.0.0.1>", ""),
    ("", ""),
])
def test_uri_number(uri: str, number: str) -> None:
    assert uri_number(uri) == number


@pytest.mark.parametrize(("address", "host"), [
    ("127.0.0.2:5060", "127.0.0.2"), ("[::1]:5060", "::1"), ("10.1.2.3", "10.1.2.3"),
    ("::1", "::1"),
])
def test_source_host(address: str, host: str) -> None:
    assert source_host(address) == host


def test_trust() -> None:
    """An allowed network or the front asserts; anyone else does not (the front answers such a
    peer 403, so this case cannot arrive through it: the rule is tested here directly)."""
    front = ("192.0.2.10", "127.0.0.1")
    assert trusted_peer("127.0.0.3", ALLOW, front)
    assert trusted_peer("::1", ALLOW, front)
    assert trusted_peer("203.0.113.7", ["203.0.113.0/24"], front)
    assert trusted_peer("192.0.2.10", ["203.0.113.0/24"], front)  # Kamailio relaying
    assert not trusted_peer("198.51.100.9", ALLOW, front)
    assert not trusted_peer("198.51.100.9", ["203.0.113.0/24"], ("0.0.0.0", "127.0.0.1"))
    assert not trusted_peer("not an address", ALLOW, front)
    assert not trusted_peer("203.0.113.7", ["garbage", "203.0.113.8/32"], front)


def test_caller_identity() -> None:
    frm = '"Forger" <sip:+1-555-000-0000@evil.example>'
    pai = invite("P-Asserted-Identity: <tel:+994-12-555-0101>")
    front = ("127.0.0.1", "127.0.0.1")
    assert caller_identity(pai, frm, "127.0.0.1", ALLOW, front) == CallerIdentity(
        "+994125550101", True, frm)
    # The same PAI from a peer that is neither allowed nor the front: From, unverified.
    assert caller_identity(pai, frm, "198.51.100.9", ALLOW, front) == CallerIdentity(
        "+15550000000", False, frm)
    # A trusted peer without a PAI: From, unverified.
    assert caller_identity(invite(), frm, "127.0.0.1", ALLOW, front) == CallerIdentity(
        "+15550000000", False, frm)


# --- real calls through `voicebot serve` ---------------------------------------------------

@pytest.fixture(scope="module")
def bot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bot]:
    b = start_bot(tmp_path_factory.mktemp("identitybot"), extra="[sip]\nno_rtp_timeout_s = 3\n")
    try:
        yield b
    finally:
        code = b.stop()
    assert code == 0, f"voicebot serve exited with {code}:\n{b.log()[-4000:]}"


def callback_call(bot: Bot, scenario: str, from_user: str) -> dict[str, Any]:
    """One sipp call of ``scenario`` (English, operator, hang up while waiting) and the
    callback it queued, as `voicebot callbacks list --json` shows it."""
    tag = f"{Path(scenario).stem}-{uuid.uuid4().hex[:8]}"
    proc = sipp(scenario, bot, call_id=tag, timeout=60, extra=["-key", "from_user", from_user])
    errors = "\n".join(p.read_text(errors="replace")[-3000:]
                       for p in bot.folder.glob(f"sipp-{scenario}-*-errors.log"))
    assert proc.returncode == 0, (f"sipp {scenario}: {proc.stdout[-2000:]}\n{errors}\n"
                                  f"{bot.log()[-4000:]}")
    rec = bot.wait_call(sipp_call_id(tag))
    assert rec.path == ["lang.en", "main.operator"] and rec.ended_by == "caller", rec
    out = bot.cli("callbacks", "list", "--json")
    assert out.returncode == 0, out.stderr
    queued = [r for r in map(json.loads, out.stdout.splitlines()) if r["call_id"] == rec.id]
    assert len(queued) == 1, (out.stdout, bot.log()[-4000:])
    assert queued[0]["reason"] == "hung_up_waiting"
    text = bot.cli("callbacks", "list")
    line = next(ln for ln in text.stdout.splitlines() if ln.split()[0] == str(queued[0]["id"]))
    return {**queued[0], "line": line, "record": rec}


def test_pai_from_an_allowed_peer_is_the_callback_number(bot: Bot) -> None:
    """sipp from 127.0.0.1 (allowed) with a PAI and a different From: the asserted number."""
    cb = callback_call(bot, "callback_pai.xml", "+994559990000")
    assert cb["caller"] == "+994125550101" and cb["verified"] is True
    assert cb["identity"] == "verified"
    assert "+994125550101" in cb["line"] and "unverified" not in cb["line"]
    rec = cb["record"]
    assert rec.caller == "+994125550101" and rec.caller_verified
    assert rec.caller_from and "+994559990000@" in rec.caller_from


def test_forged_from_without_pai_is_unverified(bot: Bot) -> None:
    cb = callback_call(bot, "callback_forged_from.xml", "+994559990001")
    assert cb["caller"] == "+994559990001" and cb["verified"] is False
    assert cb["identity"] == "unverified"
    assert "+994559990001" in cb["line"] and "unverified" in cb["line"]
    assert cb["record"].caller == "+994559990001" and not cb["record"].caller_verified
    # The CSV export carries it too.
    path = bot.folder / f"cb-{uuid.uuid4().hex[:6]}.csv"
    assert bot.cli("callbacks", "export", str(path)).returncode == 0
    rows = path.read_text(encoding="utf-8").splitlines()
    assert rows[0].split(",")[:3] == ["id", "caller", "identity"]
    assert any(r.startswith(f"{cb['id']},+994559990001,unverified,") for r in rows[1:]), rows


# --- the store: migration of an old database, old journals ---------------------------------

OLD_CALLS = """CREATE TABLE calls (id TEXT PRIMARY KEY, sip_call_id TEXT, worker INTEGER,
    caller TEXT, dialled TEXT, started_at TEXT, answered_at TEXT, ended_at TEXT, language TEXT,
    path TEXT, result TEXT, recording TEXT, ended_by TEXT, reason TEXT, host TEXT)"""
OLD_CALLBACKS = """CREATE TABLE callbacks (id {key}, call_id TEXT, caller TEXT, language TEXT,
    reason TEXT, created_at TEXT, done_at TEXT)"""
OLD_ROWS = [
    "INSERT INTO calls (id, caller, dialled, started_at, path) VALUES "
    "('old-call', '<sip:+99450@127.0.0.1>', '919', '2026-11-20T08:00:00.000+00:00', '[]')",
    "INSERT INTO callbacks (id, call_id, caller, language, reason, created_at) VALUES "
    "(7, 'old-call', '<sip:+99450@127.0.0.1>', 'en', 'after_hours', "
    "'2026-11-20T08:01:00.000+00:00')",
]


def check_migrated(store: Store) -> None:
    old = [c for c in store.callbacks() if c["id"] == 7]
    assert old and old[0]["verified"] is False  # a row from before the column: unverified
    rec = store.calls(call_id="old-call")[0]
    assert not rec.caller_verified and rec.caller_from is None
    # New rows are written with the flag, either way.
    store.call_started("new-call", None, "+99451", "919", verified=True,
                       caller_from="<sip:x@127.0.0.1>")
    cb = store.add_callback("new-call", "+99451", "en", "hung_up_waiting", verified=True)
    got = {c["id"]: c["verified"] for c in store.callbacks()}
    assert got[cb] is True and got[7] is False
    rec = store.calls(call_id="new-call")[0]
    assert rec.caller_verified and rec.caller_from == "<sip:x@127.0.0.1>"


def test_old_sqlite_file_is_migrated(tmp_path: Path) -> None:
    db = tmp_path / "old.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute(OLD_CALLS)
        conn.execute(OLD_CALLBACKS.format(key="INTEGER PRIMARY KEY AUTOINCREMENT"))
        for sql in OLD_ROWS:
            conn.execute(sql)
    store = Store(db)
    try:
        check_migrated(store)
    finally:
        store.close()
    with sqlite3.connect(db) as conn:
        cols = {r[1] for r in conn.execute("PRAGMA table_info(callbacks)")}
    assert "verified" in cols


def test_old_postgresql_database_is_migrated(postgres: Cluster) -> None:  # noqa: F811
    import psycopg

    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        for t in ("calls", "turns", "tickets", "callbacks", "applications", "meta",
                  "number_blocks"):
            conn.execute(f"DROP TABLE IF EXISTS {t}")
        conn.execute(OLD_CALLS)
        conn.execute(OLD_CALLBACKS.format(key="SERIAL PRIMARY KEY"))
        for sql in OLD_ROWS:
            conn.execute(sql)
    store = Store(dsn=postgres.dsn, spool=None)
    try:
        check_migrated(store)
    finally:
        store.close()


def test_old_journal_replays_as_unverified(tmp_path: Path) -> None:
    """A journal a dead process of the previous release left (no ``verified`` fields) is
    replayed, its callback unverified; a new one carries the flag through the spool."""
    spool = tmp_path / "spool"
    spool.mkdir()
    ops = [{"op": "call_started", "id": "j-old", "sip_call_id": None, "worker": 0,
            "caller": "+99452", "dialled": "919",
            "started_at": "2026-11-20T08:00:00.000+00:00", "host": "h"},
           {"op": "add_callback", "id": 1_000_000_001, "call_id": "j-old", "caller": "+99452",
            "language": "en", "reason": "after_hours",
            "created_at": "2026-11-20T08:01:00.000+00:00"},
           {"op": "add_callback", "id": 1_000_000_002, "call_id": "j-old", "caller": "+99453",
            "language": "en", "reason": "after_hours", "verified": True,
            "created_at": "2026-11-20T08:02:00.000+00:00"}]
    (spool / "deadhost-1-1.jsonl").write_text("".join(json.dumps(o) + "\n" for o in ops))
    store = Store(tmp_path / "s.sqlite", spool=spool)
    try:
        got = {c["id"]: (c["caller"], c["verified"]) for c in store.callbacks()}
        assert got == {1_000_000_001: ("+99452", False), 1_000_000_002: ("+99453", True)}
        assert not store.calls(call_id="j-old")[0].caller_verified
    finally:
        store.close()
