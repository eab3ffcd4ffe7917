"""The live call report's security (issue 11), against a real `voicebot serve` over real HTTP.

- ``serve`` refuses a report on a non-loopback address without ``[web] password``, before
  it loads any model, naming the key;
- with a password (here on loopback, where it is optional) every file needs HTTP Basic,
  user ``voicebot``: 401 without or with wrong credentials, nothing about callers in it;
- a sipp caller whose From display name carries markup queues a callback, and the page
  shows that From escaped, never as markup;
- 50 clients hammering the page for a few seconds cause at most one build per
  ``[web] max_age_s`` (counted from the bot's own build log lines and its build counter);
- a rebuild that fails (the SQLite store replaced by a folder) keeps serving the last good
  page with a notice, never an error page (in-process: real Store, real HTTP server).

One bot serves the module (a start costs ~15 s).
"""

from __future__ import annotations

import base64
import math
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from sipbot import VOICEBOT, Bot, free_udp_port, sipp, sipp_call_id, start_bot, write_config

from voicebot.report import AUTH_FAILURES_PER_MIN, LiveReport, is_loopback, serve_web
from voicebot.store import Store

PASSWORD = "correct horse battery staple"
MAX_AGE_S = 1.0
MARKUP = "<script>alert(1)</script><b>x</b>"  # the display name of callback_markup_from.xml


def free_tcp_port(lo: int = 46000, hi: int = 47000) -> int:
    for port in range(lo + (uuid.uuid4().int % (hi - lo)), hi):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port")


@dataclass
class Reply:
    code: int
    headers: dict[str, str]
    body: bytes
    seconds: float = 0.0

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


def get(url: str, auth: tuple[str, str] | None = None, timeout: float = 60.0) -> Reply:
    req = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Reply(r.status, dict(r.headers), r.read(), time.monotonic() - t0)
    except urllib.error.HTTPError as e:
        return Reply(e.code, dict(e.headers), e.read(), time.monotonic() - t0)


GOOD = ("voicebot", PASSWORD)


@pytest.fixture(scope="module")
def bot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bot]:
    web_port = free_tcp_port()
    # The clock after working hours is not needed: the callback is "hung up waiting".
    extra = (f"[sip]\nno_rtp_timeout_s = 3\n[web]\nlisten = \"127.0.0.1:{web_port}\"\n"
             f"password = \"{PASSWORD}\"\nmax_age_s = {MAX_AGE_S}\n")
    b = start_bot(tmp_path_factory.mktemp("webbot"), extra=extra)
    b.web_url = f"http://127.0.0.1:{web_port}/"  # type: ignore[attr-defined]
    try:
        yield b
    finally:
        code = b.stop()
    assert code == 0, f"voicebot serve exited with {code}:\n{b.log()[-4000:]}"


def url(bot: Bot, name: str = "") -> str:
    return bot.web_url + name  # type: ignore[attr-defined, no-any-return]


# --- loopback or a password ------------------------------------------------------------------


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("::ffff:127.0.0.1", True),
    ("0.0.0.0", False), ("::", False), ("[::]", False), ("192.168.1.20", False),
    ("10.0.0.5", False), ("fe80::1%eth0", False), ("report.example.org", False),
])
def test_loopback_rule(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("how, where", [
    ("--web", "0.0.0.0"), ("--web", "[::]"), ("listen", "0.0.0.0"), ("listen", "192.168.1.20"),
    ("listen", "report.example.org"),
])
def test_public_address_without_password_refuses_to_start(tmp_path: Path, how: str,
                                                          where: str) -> None:
    web = f"{where}:{free_tcp_port()}"
    extra = f'[web]\nlisten = "{web}"\n' if how == "listen" else ""
    config = write_config(tmp_path, free_udp_port(), extra)
    cmd = [VOICEBOT, "serve", "--config", str(config)] + (["--web", web] if how == "--web"
                                                          else [])
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "[web] password" in proc.stderr and str(config) in proc.stderr, proc.stderr
    assert "not loopback" in proc.stderr and where in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    # Refused before anything slow: no model was loaded, no SIP port was opened.
    assert "listening on" not in proc.stdout and took < 15, (took, proc.stdout)


def test_loopback_without_password_needs_none(tmp_path: Path) -> None:
    """The check lets loopback through: the start gets past it to the SIP port check (an
    occupied port stops it there, a second later, without loading the models)."""
    port = free_udp_port()
    config = write_config(tmp_path, port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("127.0.0.1", port))
        proc = subprocess.run([VOICEBOT, "serve", "--config", str(config), "--web",
                               f"127.0.0.1:{free_tcp_port()}"],
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "[web] password" not in proc.stderr, proc.stderr


# --- HTTP Basic ------------------------------------------------------------------------------


def test_every_file_needs_the_password(bot: Bot) -> None:
    wrong = [("voicebot", "wrong"), ("admin", PASSWORD), ("voicebot", ""),
             ("voicebot", PASSWORD + "x")]
    for name in ("", "index.html", "report.md", "callbacks_outstanding.csv", "exits.png",
                 "nothing-here"):
        # Wrong passwords on two files only: more than 20 a minute would throttle us.
        for auth in [None, *(wrong if name in ("", "callbacks_outstanding.csv") else [])]:
            r = get(url(bot, name), auth)
            assert r.code == 401, (name, auth, r.code)
            assert r.headers.get("WWW-Authenticate", "").startswith('Basic realm="voicebot"')
            # Nothing of the report (or of any caller) in a refusal.
            assert r.text == "authentication required\n"
            assert "X-Report-Builds" not in r.headers
            assert r.headers.get("Cache-Control") == "no-store"
    # A malformed Authorization header is a refusal too, not an error.
    req = urllib.request.Request(url(bot), headers={"Authorization": "Basic %%%not-base64"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 401


def test_right_password_gets_the_page_with_strict_headers(bot: Bot) -> None:
    r = get(url(bot), GOOD)
    assert r.code == 200 and "voicebot call report" in r.text
    assert r.headers["Content-Type"] == "text/html; charset=utf-8"
    assert r.headers["Cache-Control"] == "no-store"
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    csp = r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "script-src" not in csp  # no script can run
    assert "Python" not in r.headers.get("Server", "")
    png = get(url(bot, "calls_per_day.png"), GOOD)
    assert png.code == 200 and png.body[:4] == b"\x89PNG"
    assert png.headers["Content-Type"] == "image/png"
    # Only the report's own files: no listing, no way out of its folder.
    for name in ("voicebot.toml", "../voicebot.toml", "%2e%2e/voicebot.toml", ".build/",
                 "index.html/..", "?x=/etc/passwd"):
        got = get(url(bot, name), GOOD)
        assert got.code in (200, 404), (name, got.code)
        assert got.code == 404 or "voicebot call report" in got.text, name
    post = urllib.request.Request(url(bot), data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError):  # read-only
        urllib.request.urlopen(post, timeout=10)


# --- caller data escaped ---------------------------------------------------------------------


def test_from_display_name_markup_is_escaped_on_the_page(bot: Bot) -> None:
    number = f"55512{uuid.uuid4().int % 100:02d}"
    tag = f"markup-{uuid.uuid4().hex[:8]}"
    proc = sipp("callback_markup_from.xml", bot, call_id=tag, timeout=60,
                extra=["-key", "from_user", number])
    errors = "\n".join(p.read_text(errors="replace")[-3000:]
                       for p in bot.folder.glob("sipp-callback_markup_from.xml-*-errors.log"))
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{errors}\n{bot.log()[-4000:]}"
    rec = bot.wait_call(sipp_call_id(tag))
    assert rec.path == ["lang.en", "main.operator"], rec
    # The markup reached the bot as sent: what the page must not pass on.
    assert rec.caller_from and MARKUP in rec.caller_from, rec.caller_from
    end = time.monotonic() + 30
    page = ""
    while time.monotonic() < end:
        page = get(url(bot), GOOD).text
        if number in page:
            break
        time.sleep(0.3)
    assert number in page, page[-3000:]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&lt;b&gt;x&lt;/b&gt;" in page
    assert "<script" not in page.lower() and "<b>x" not in page
    # The row: the callback's number, unverified, and the From as sent, escaped.
    row = next(r for r in re.findall(r"<tr>.*?</tr>", page) if number in r)
    assert "unverified" in row and "&lt;sip:" in row, row
    # report.md is read in Markdown viewers, which render raw HTML: escaped there too.
    md = get(url(bot, "report.md"), GOOD)
    assert md.code == 200 and number in md.text
    assert "<script" not in md.text and "&lt;script&gt;" in md.text
    assert md.headers["Content-Type"].startswith("text/markdown")


# --- at most one build per max_age_s ---------------------------------------------------------


def build_lines(bot: Bot) -> int:
    return len(re.findall(r"web: report built in|web: the report could not be rebuilt",
                          bot.log()))


def test_fifty_clients_cause_at_most_one_build_per_max_age(bot: Bot) -> None:
    get(url(bot), GOOD)  # the page exists: every later request can be served from it
    time.sleep(MAX_AGE_S + 0.2)  # and is stale: the burst starts with a rebuild
    before_log = build_lines(bot)
    before = int(get(url(bot, "nothing-here"), GOOD).headers["X-Report-Builds"])
    replies: list[Reply] = []
    lock = threading.Lock()
    t0 = time.monotonic()
    stop_at = t0 + 4.0

    def client(_: int) -> None:
        while time.monotonic() < stop_at:
            r = get(url(bot), GOOD)
            with lock:
                replies.append(r)

    with ThreadPoolExecutor(50) as pool:
        list(pool.map(client, range(50)))
    elapsed = time.monotonic() - t0
    time.sleep(0.5)  # a build that started at the end logs its line when done
    after = int(get(url(bot, "nothing-here"), GOOD).headers["X-Report-Builds"])
    builds = build_lines(bot) - before_log
    bound = math.ceil(elapsed / MAX_AGE_S) + 1
    codes = {r.code for r in replies}
    lat = sorted(r.seconds for r in replies)
    print(f"{len(replies)} requests from 50 clients in {elapsed:.1f} s: {builds} builds "
          f"(bound {bound}), latency p50 {lat[len(lat) // 2] * 1000:.0f} ms, "
          f"max {lat[-1] * 1000:.0f} ms")
    assert codes == {200}, codes
    assert len(replies) >= 50
    assert after - before == builds, (before, after, builds)
    assert 1 <= builds <= bound, (builds, bound, elapsed)
    # Distinct pages served: none newer than a build that happened.
    stamps = {m.group(1) for r in replies if (m := re.search(r"built ([^<]+?)\.</p>", r.text))}
    assert 1 <= len(stamps) <= builds + 1, stamps


# --- a failed rebuild: the last page and a notice --------------------------------------------


@pytest.fixture()
def live_store(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A real SQLite store with one callback, and its report on a loopback HTTP port."""
    db = tmp_path / "voicebot.sqlite"
    store = Store(path=db, spool=tmp_path / "spool")
    store.call_started("c1", "sip-c1", "5557001", "919", 0,
                       caller_from=f'"{MARKUP}" <sip:5557001@127.0.0.1>')
    store.add_callback("c1", "5557001", "en", "after_hours")
    store.close()
    live = LiveReport(lambda: Store(path=db, spool=tmp_path / "spool-live"),
                      tmp_path / "live", max_age_s=0.3)
    port = free_tcp_port()
    httpd = serve_web(live, "127.0.0.1", port, password=PASSWORD)
    try:
        yield db, f"http://127.0.0.1:{port}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_failed_rebuild_serves_the_last_page_with_a_notice(live_store: tuple[Path, str]) -> None:
    db, base = live_store
    first = get(base, GOOD)
    assert first.code == 200 and "5557001" in first.text and "could not be rebuilt" not in \
        first.text
    # The store goes away: its file replaced by a folder, which SQLite cannot open.
    aside = db.with_name("aside.sqlite")
    db.rename(aside)
    db.mkdir()
    try:
        time.sleep(0.4)
        down = get(base, GOOD)
        assert down.code == 200, (down.code, down.text)
        assert "could not be rebuilt" in down.text and "5557001" in down.text
        assert "Traceback" not in down.text and str(db) not in down.text
        assert "&lt;script&gt;" in down.text and "<script" not in down.text
        # The notice is inside the page the CSP allows (no style attribute, no script).
        assert '<p class="notice" role="alert">' in down.text
    finally:
        db.rmdir()
        aside.rename(db)
    time.sleep(0.4)
    back = get(base, GOOD)
    assert back.code == 200 and "could not be rebuilt" not in back.text and "5557001" in back.text


def test_first_build_failing_is_a_plain_503(tmp_path: Path) -> None:
    db = tmp_path / "voicebot.sqlite"
    db.mkdir()
    live = LiveReport(lambda: Store(path=db, spool=tmp_path / "spool"), tmp_path / "live", 0.3)
    port = free_tcp_port()
    httpd = serve_web(live, "127.0.0.1", port)
    try:
        r = get(f"http://127.0.0.1:{port}/")
        assert r.code == 503 and "could not be rebuilt" in r.text and "Traceback" not in r.text
        assert r.headers["Retry-After"]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_wrong_passwords_are_throttled_per_source(live_store: tuple[Path, str]) -> None:
    _, base = live_store
    codes = [get(base, ("voicebot", f"guess{i}")).code for i in range(AUTH_FAILURES_PER_MIN)]
    assert set(codes) == {401}
    # The next guess, and even the right password, from that address wait a minute.
    assert get(base, ("voicebot", "one more")).code == 429
    assert get(base, GOOD).code == 429
