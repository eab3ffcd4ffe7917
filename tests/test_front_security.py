"""The front door (Kamailio in front of every `voicebot serve`): who gets in, and who is banned.

Real peers against a real `voicebot serve` with one worker behind its Kamailio, judged from
the sender's side (what came back on the wire):

- ``[sip] allow``: a sipp caller from 127.0.0.3 gets ``403 Forbidden`` while one from
  127.0.0.2 is answered and completes its call;
- flood: a source sending more than ``flood_limit`` requests in a second stops getting any
  answer (banned) while another source is still answered, and comes back after ``ban_s``;
  a source under the limit is never banned;
- scanner User-Agents: an OPTIONS from "friendly-scanner" gets no answer, and its source is
  banned afterwards even with a normal User-Agent;
- workers reachable from nothing but the front: from inside a network namespace (a veth
  pair), a call to the front is answered, an INVITE or OPTIONS straight to the worker's
  port gets nothing (the workers listen on 127.0.0.1 only).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sipbot import Bot, free_udp_port, options_request, sip_options, sipp, sipp_call_id, start_bot

NO_RTP_S = 4  # the bot hangs up a call without media after this long

pytestmark = pytest.mark.skipif(
    not os.environ.get("CI") and not (shutil.which("sipp") and shutil.which("kamailio")),
    reason="sipp or kamailio missing: run scripts/install-system-deps (sip-tester, kamailio)")


def wait_log(bot: Bot, pattern: str, timeout: float = 5.0) -> str:
    """The first bot log line matching ``pattern`` (Kamailio logs into serve.log)."""
    end = time.monotonic() + timeout
    while True:
        m = re.search(pattern, bot.log())
        if m:
            return m.group(0)
        if time.monotonic() > end:
            raise AssertionError(f"no log line matching {pattern!r}:\n{bot.log()[-3000:]}")
        time.sleep(0.1)


# --- [sip] allow ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def acl_bot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bot]:
    # Only 127.0.0.2 may call. The bot needs nothing else: its workers' own requests
    # (the bot's BYE) are recognised as the dispatcher's destinations, and the
    # dispatcher's OPTIONS pings go from Kamailio to the workers, not through the ACL.
    b = start_bot(tmp_path_factory.mktemp("aclbot"),
                  extra=f'[sip]\nallow = ["127.0.0.2/32"]\nno_rtp_timeout_s = {NO_RTP_S}\n')
    try:
        yield b
    finally:
        code = b.stop()
    assert code == 0, b.log()[-4000:]


def test_allow_refuses_others_with_403_and_serves_the_allowed(acl_bot: Bot) -> None:
    bot = acl_bot
    tag = uuid.uuid4().hex[:8]
    # The caller from outside the list: sipp's scenario demands a 403 and nothing else.
    refused = sipp("forbidden.xml", bot, source="127.0.0.3", timeout=20, call_id=f"no-{tag}")
    assert refused.returncode == 0, f"{refused.stdout[-1500:]}\n{refused.stderr[-1500:]}"
    line = wait_log(bot, r"sip: 403 for 127\.0\.0\.3:\d+ not in \[sip\] allow")
    assert line
    # ... and it reached no worker: no call record, nothing in the workers' log.
    assert not bot.calls(sipp_call_id(f"no-{tag}", 1, "127.0.0.3"))
    assert "127.0.0.3" not in "\n".join(x for x in bot.log().splitlines()
                                        if "voicebot.telephony" in x)
    assert sip_options(bot.host, bot.port, source="127.0.0.3", timeout=2.0) == 403

    # The allowed caller: answered, English, the working hours, completed.
    ok = sipp("rfc4733_dtmf_routed.xml", bot, source="127.0.0.2", timeout=60,
              call_id=f"ok-{tag}")
    assert ok.returncode == 0, f"{ok.stdout[-1500:]}\n{ok.stderr[-1500:]}\n{bot.log()[-3000:]}"
    rec = bot.wait_call(sipp_call_id(f"ok-{tag}", 1, "127.0.0.2"))
    assert rec.result == "completed" and rec.path == ["lang.en", "main.hours"], rec
    assert sip_options(bot.host, bot.port, source="127.0.0.2", timeout=2.0) == 200
    # The bot's own BYE (no media: it hangs up) passes the front although the worker's
    # address is not in the list: the caller's scenario waits for that BYE.
    hung = sipp("no_rtp_routed.xml", bot, source="127.0.0.2", timeout=30, call_id=f"bye-{tag}")
    assert hung.returncode == 0, f"{hung.stdout[-1500:]}\n{bot.log()[-3000:]}"
    rec = bot.wait_call(sipp_call_id(f"bye-{tag}", 1, "127.0.0.2"))
    assert rec.ended_by == "bot" and rec.reason == "no_rtp", rec


# --- flood and scanners ------------------------------------------------------------------

FLOOD_LIMIT = 10
BAN_S = 8  # long enough that the checks after the burst run inside the ban on a loaded machine


@pytest.fixture(scope="module")
def guard_bot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bot]:
    b = start_bot(tmp_path_factory.mktemp("guardbot"),
                  extra=f"[sip]\nflood_limit = {FLOOD_LIMIT}\nban_s = {BAN_S}\n")
    try:
        yield b
    finally:
        code = b.stop()
    assert code == 0, b.log()[-4000:]


@dataclass
class Burst:
    sent: int
    answered: int
    seconds: float


def burst(bot: Bot, source: str, n: int, rate: float, user_agent: str = "voicebot-test",
          linger: float = 1.0) -> Burst:
    """``n`` OPTIONS from ``source`` at ``rate`` per second (one socket); answers counted."""
    answers = 0
    done = threading.Event()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        s.settimeout(0.1)
        lport = s.getsockname()[1]

        def receive() -> None:
            nonlocal answers
            while not done.is_set():
                try:
                    data = s.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if data.startswith(b"SIP/2.0 "):
                    answers += 1

        rx = threading.Thread(target=receive, daemon=True)
        rx.start()
        t0 = time.monotonic()
        for i in range(n):
            time.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            s.sendto(options_request(bot.host, bot.port, source, lport, user_agent),
                     (bot.host, bot.port))
        seconds = time.monotonic() - t0
        time.sleep(linger)
        done.set()
        rx.join(2)
    return Burst(n, answers, seconds)


def test_a_flood_bans_its_source_silently_until_ban_s(guard_bot: Bot) -> None:
    bot = guard_bot
    flooder, other = "127.0.0.4", "127.0.0.2"
    assert sip_options(bot.host, bot.port, source=flooder, timeout=2.0) == 200
    time.sleep(1.1)  # that OPTIONS must not count in the burst's second
    # 60 requests in about 0.3 s: at most two wall-clock seconds, so between one and two
    # seconds' worth of the limit is answered before the ban takes hold, and nothing after.
    burst_at = time.monotonic()  # the ban takes hold during the burst: no later than this
    b = burst(bot, flooder, 60, 200.0)
    assert FLOOD_LIMIT <= b.answered <= 2 * FLOOD_LIMIT, b
    assert sip_options(bot.host, bot.port, source=flooder, timeout=1.0) is None
    # Another source is still answered, and the ban was logged once, naming the source.
    assert sip_options(bot.host, bot.port, source=other, timeout=2.0) == 200
    wait_log(bot, rf"sip: flood from {re.escape(flooder)}:\d+ \(more than {FLOOD_LIMIT} "
                  rf"requests in one second\), banned for {BAN_S} s")
    assert len(re.findall(rf"sip: flood from {re.escape(flooder)}:", bot.log())) == 1
    # Still banned while it keeps knocking (reading the ban does not extend it) ... The
    # ban began during the burst: timed from its start, so the checks above (slow on a
    # loaded machine) cannot push this loop past the ban's end.
    banned_at = burst_at
    while time.monotonic() - banned_at < BAN_S - 1.5:
        assert sip_options(bot.host, bot.port, source=flooder, timeout=0.5) is None
    # ... and answered again once ban_s is over (the ban table is swept every second).
    back = None
    while time.monotonic() - banned_at < BAN_S + 4 and back is None:
        back = sip_options(bot.host, bot.port, source=flooder, timeout=0.5)
    assert back == 200, f"{flooder} still banned {BAN_S + 4} s after its ban:\n{bot.log()[-2000:]}"


def test_a_source_under_the_limit_is_never_banned(guard_bot: Bot) -> None:
    """Half the limit for three seconds: every request answered."""
    b = burst(guard_bot, "127.0.0.6", 3 * FLOOD_LIMIT // 2, FLOOD_LIMIT / 2)
    assert b.answered == b.sent, b
    assert "sip: flood from 127.0.0.6:" not in guard_bot.log()


def test_a_scanner_user_agent_is_dropped_and_its_source_banned(guard_bot: Bot) -> None:
    bot = guard_bot
    scanner, other = "127.0.0.5", "127.0.0.2"
    assert sip_options(bot.host, bot.port, source=scanner, user_agent="friendly-scanner",
                       timeout=2.0) is None
    wait_log(bot, rf"sip: scanner User-Agent from {re.escape(scanner)}:\d+ banned for "
                  rf"{BAN_S} s")
    # Banned now, whatever it calls itself.
    assert sip_options(bot.host, bot.port, source=scanner, timeout=1.0) is None
    assert sip_options(bot.host, bot.port, source=other, timeout=2.0) == 200
    # The match ignores case and finds the name anywhere in the header.
    assert sip_options(bot.host, bot.port, source="127.0.0.9",
                       user_agent="Some SIPVicious/0.3.4 build", timeout=2.0) is None
    assert sip_options(bot.host, bot.port, source="127.0.0.9", timeout=1.0) is None
    assert sip_options(bot.host, bot.port, source="127.0.0.10", user_agent="Linphone/5.2",
                       timeout=2.0) == 200


# --- workers reachable only through the front ---------------------------------------------

def need_root_netns() -> None:
    """ip netns needs root: CI runs as root, so there a missing right fails the test."""
    why = None
    if os.geteuid() != 0:
        why = "network namespaces (ip netns) need root"
    elif not shutil.which("ip"):
        why = "the ip command (iproute2) is missing"
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"{why}; CI runs as root with iproute2")
        pytest.skip(why)


@dataclass
class Netns:
    name: str
    host_ip: str  # our end of the veth pair, in the root namespace
    ns_ip: str  # the far end, inside the namespace


@pytest.fixture
def netns() -> Iterator[Netns]:
    need_root_netns()
    x = random.randrange(1, 250)
    name, a, b = f"vbfront{x}", f"vbf{x}a", f"vbf{x}b"
    ns = Netns(name, f"10.77.{x}.1", f"10.77.{x}.2")

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    try:
        ip("netns", "add", name)
        ip("link", "add", a, "type", "veth", "peer", "name", b)
        ip("link", "set", b, "netns", name)
        ip("addr", "add", f"{ns.host_ip}/24", "dev", a)
        ip("link", "set", a, "up")
        ip("netns", "exec", name, "ip", "addr", "add", f"{ns.ns_ip}/24", "dev", b)
        ip("netns", "exec", name, "ip", "link", "set", b, "up")
        ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield ns
    finally:
        subprocess.run(["ip", "link", "del", a], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


# Run inside the namespace: one SIP request over UDP, the status line that came back.
PROBE = textwrap.dedent("""
    import socket, sys, uuid
    method, host, port, src = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src, 0))
    lp, cid = s.getsockname()[1], uuid.uuid4().hex
    sdp = ("v=0\\r\\no=- 1 1 IN IP4 %s\\r\\ns=-\\r\\nc=IN IP4 %s\\r\\nt=0 0\\r\\n"
           "m=audio 9 RTP/AVP 8\\r\\na=rtpmap:8 PCMA/8000\\r\\n" % (src, src)) \\
        if method == "INVITE" else ""
    user = "919@" if method == "INVITE" else ""  # an OPTIONS to the host itself
    msg = (f"{method} sip:{user}{host}:{port} SIP/2.0\\r\\n"
           f"Via: SIP/2.0/UDP {src}:{lp};branch=z9hG4bK{cid[:12]};rport\\r\\n"
           f"From: <sip:probe@{src}:{lp}>;tag={cid[:6]}\\r\\nTo: <sip:919@{host}:{port}>\\r\\n"
           f"Call-ID: {cid}\\r\\nCSeq: 1 {method}\\r\\nContact: <sip:probe@{src}:{lp}>\\r\\n"
           f"Max-Forwards: 70\\r\\n" + ("Content-Type: application/sdp\\r\\n" if sdp else "")
           + f"Content-Length: {len(sdp)}\\r\\n\\r\\n{sdp}")
    s.settimeout(3.0)
    s.sendto(msg.encode(), (host, port))
    try:
        print(s.recv(4096).split(b"\\r\\n", 1)[0].decode())
    except (TimeoutError, ConnectionRefusedError) as exc:
        print("nothing:", type(exc).__name__)
""")


def probe_from(ns: Netns, method: str, host: str, port: int) -> str:
    out = subprocess.run(["ip", "netns", "exec", ns.name, sys.executable, "-c", PROBE, method,
                          host, str(port), ns.ns_ip], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_workers_are_reachable_only_through_the_front(netns: Netns,
                                                      tmp_path_factory: pytest.TempPathFactory,
                                                      ) -> None:
    folder = tmp_path_factory.mktemp("nsbot")
    port = free_udp_port()
    bot = start_bot(folder, extra=(
        f'[sip]\nlisten = "{netns.host_ip}:{port}"\n'
        f'allow = ["{netns.ns_ip}/32", "127.0.0.0/8"]\nno_rtp_timeout_s = {NO_RTP_S}\n'))
    try:
        assert bot.host == netns.host_ip and bot.port == port
        worker = bot.cfg.sip.worker_port
        # The front, from the other side of the link: answered.
        assert probe_from(netns, "OPTIONS", netns.host_ip, port) == "SIP/2.0 200 OK"
        # The worker's port, from the same allowed peer: nothing, for OPTIONS and INVITE
        # alike (the worker listens on 127.0.0.1 only).
        for method in ("OPTIONS", "INVITE"):
            got = probe_from(netns, method, netns.host_ip, worker)
            assert got.startswith("nothing"), f"{method} to the worker's port: {got}"
        # sipp, too: an INVITE straight to the worker gets no answer at all ...
        tag = uuid.uuid4().hex[:8]
        direct = sipp("no_rtp_routed.xml", bot, source=netns.ns_ip, netns=netns.name,
                      target=f"{netns.host_ip}:{worker}", timeout=8, call_id=f"direct-{tag}")
        assert direct.returncode != 0, direct.stdout[-1500:]
        # sipp's screen: "100 <----------  0 ..." counts each answer received (none).
        received = re.findall(r"^\s*(\d{3}) <-+\s+(?:E-RTD1 )?(\d+)", direct.stdout, re.M)
        assert received and all(n == "0" for _, n in received), direct.stdout[-2000:]
        assert re.search(r"INVITE -+>\s+1\b", direct.stdout), direct.stdout[-2000:]  # sent
        # ... while a call through the front is answered and served: the bot answers, and
        # hangs up itself for want of media (BYE), which the caller answers.
        front = sipp("no_rtp_routed.xml", bot, source=netns.ns_ip, netns=netns.name,
                     timeout=30, call_id=f"front-{tag}")
        assert front.returncode == 0, f"{front.stdout[-1500:]}\n{bot.log()[-3000:]}"
        rec = bot.wait_call(sipp_call_id(f"front-{tag}", 1, netns.ns_ip))
        assert rec.answered_at and rec.ended_by == "bot", rec
        assert not bot.calls(sipp_call_id(f"direct-{tag}", 1, netns.ns_ip))
        # Nothing of the bot's listens on the public address but the front.
        ss = subprocess.run(["ss", "-lnuptH"], capture_output=True, text=True).stdout
        public = [line for line in ss.splitlines() if f"{netns.host_ip}:" in line]
        assert public and all(f"{netns.host_ip}:{port} " in line for line in public), public
    finally:
        code = bot.stop()
    assert code == 0, bot.log()[-4000:]
