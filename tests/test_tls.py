"""SIP over TLS and SRTP through the real path: softphone --TLS--> Kamailio --TLS--> worker.

Real components only: a self-signed certificate made with the openssl CLI, `voicebot
serve` with Kamailio's tls module in front of a pjsua2 worker, and the project's
softphone (`voicebot call --tls --srtp ...`). What the call carried is judged from the
caller's side: the prompts found in the audio it received (voicebot.heard), the
transport and SDP of the answer it got, and the packets on the loopback interface.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from sipbot import VOICEBOT, Bot, free_udp_port, start_bot, write_config

from voicebot.config import load_config
from voicebot.errors import DataError
from voicebot.tls import kamailio_section, worker_tls_port


def make_cert(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate and key for 127.0.0.1 (openssl CLI)."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed; scripts/install-system-deps installs it")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def tls_extra(cert: Path, key: Path, port: int, srtp: str) -> str:
    return (f'[sip]\nsrtp = "{srtp}"\n'
            f'[sip.tls]\ncertificate = "{cert}"\nkey = "{key}"\nport = {port}\n')


class LoopbackCapture:
    """Every packet on lo while it runs (AF_PACKET, needs root): the bytes, nothing parsed."""

    def __init__(self) -> None:
        if os.geteuid() != 0:
            why = "capturing loopback packets (AF_PACKET) needs root"
            if os.environ.get("CI"):
                pytest.fail(f"{why}; CI runs as root")
            pytest.skip(why)
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
        # Room for a whole call's RTP bursts, so no packet is dropped before it is read.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.2)
        self.packets: list[bytes] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            if addr[2] != socket.PACKET_OUTGOING:  # lo shows each packet twice
                self.packets.append(data)

    def saw(self, needle: bytes, timeout: float = 3.0) -> bool:
        """Whether a packet holding ``needle`` has been captured (waiting up to timeout)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(needle in p for p in list(self.packets)):
                return True
            time.sleep(0.05)
        return False

    def close(self) -> list[bytes]:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()
        return self.packets


@pytest.fixture(scope="module")
def tls_bot(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One bot with TLS on the front and the worker, SRTP mandatory."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = make_cert(folder)
    bot = start_bot(folder / "bot", extra=tls_extra(cert, key, free_udp_port(), "mandatory"))
    yield bot
    bot.stop()


def tls_call(bot: Bot, *args: str) -> subprocess.CompletedProcess[str]:
    uri = f"sip:919@127.0.0.1:{bot.cfg.sip.tls.port}"
    return subprocess.run([VOICEBOT, "--config", str(bot.config_path), "call", uri, "--tls",
                           "--json", *args], capture_output=True, text=True, timeout=180)


def test_tls_srtp_call_through_front(tls_bot: Bot) -> None:
    cap = LoopbackCapture()
    try:
        r = tls_call(tls_bot, "--srtp", "mandatory", "--press", "3", "--heard")
    finally:
        # The control: a marker sent over UDP on lo must show up in the capture.
        marker = os.urandom(8).hex().encode()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.sendto(marker, ("127.0.0.1", free_udp_port()))
        control = cap.saw(marker)
        packets = cap.close()
    assert r.returncode == 0, r.stderr + tls_bot.log()[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    secure = next(x["security"] for x in rows if "security" in x)
    heard = next(x["heard"] for x in rows if isinstance(x.get("heard"), list))
    call_id = rows[0]["sip_call_id"]
    # Our INVITE went out on TLS, and the worker that answered did so on its TLS port:
    # the front relayed over TLS (a worker answering on UDP gives a UDP Contact).
    assert secure["transport"] == "TLS", secure
    wport = worker_tls_port(tls_bot.cfg, 0)
    assert f":{wport};transport=tls" in secure["contact"].lower(), secure
    # The answer's SDP is SRTP (RTP/SAVP with an SDES key), and over it the caller heard
    # the language menu whole, then the English main menu after pressing 3.
    assert secure["srtp"] is True, secure
    whole = {(h["key"], h["language"]) for h in heard if h["whole"]}
    assert {("language_item", "az"), ("language_item", "ru"),
            ("language_item", "en")} <= whole, heard
    assert ("main_menu", "en") in whole, heard
    rec = tls_bot.wait_call(call_id)
    assert rec.path[:1] == ["lang.en"], rec.path  # the bot took the key sent over SRTP
    # Nothing of the call's signalling crossed loopback in clear, on either leg
    # (caller-Kamailio, Kamailio-worker): its Call-ID is in no packet.
    assert control, "the capture missed a clear UDP datagram: it proves nothing"
    assert not [p for p in packets if call_id.encode() in p], \
        "the call's SIP crossed loopback in clear"


def test_plain_rtp_caller_gets_488_when_srtp_mandatory(tls_bot: Bot) -> None:
    r = tls_call(tls_bot, "--press", "3", "--timeout", "20")
    assert r.returncode == 1
    assert "488" in r.stderr, r.stderr


def test_missing_certificate_fails_serve_naming_the_key(tmp_path: Path) -> None:
    _, key = make_cert(tmp_path)
    config = write_config(tmp_path / "bot", free_udp_port(),
                          tls_extra(tmp_path / "nope.pem", key, free_udp_port(), "optional"))
    r = subprocess.run([VOICEBOT, "serve", "--config", str(config)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0
    assert "sip.tls.certificate" in r.stderr and "nope.pem" in r.stderr, r.stderr


def test_a_key_not_matching_the_certificate_is_named(tmp_path: Path) -> None:
    cert, _ = make_cert(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, wrong_key = make_cert(other)
    config = write_config(tmp_path / "bot", free_udp_port(),
                          tls_extra(cert, wrong_key, free_udp_port(), "optional"))
    cfg = load_config(config)
    with pytest.raises(DataError, match=r"sip\.tls\.certificate: .* does not load"):
        kamailio_section(cfg, tmp_path / "kam")
    assert kamailio_section(load_config(write_config(tmp_path / "plain", free_udp_port())),
                            tmp_path / "kam2") == ""


def test_verify_peer_and_srtp_optional(tmp_path: Path) -> None:
    """verify_peer refuses a TLS caller without a certificate and answers one whose
    certificate ca_list signed; with srtp optional a plain UDP/RTP caller (a trunk) is
    answered too."""
    cert, key = make_cert(tmp_path)
    callers = tmp_path / "callers"
    callers.mkdir()
    ccert, ckey = make_cert(callers)  # self-signed: it is its own CA
    bot = start_bot(tmp_path / "bot", extra=tls_extra(cert, key, free_udp_port(), "optional")
                    + f'verify_peer = true\nca_list = "{ccert}"\n')
    try:
        r = tls_call(bot, "--timeout", "20")
        assert r.returncode == 1, r.stdout
        r = tls_call(bot, "--cert", str(ccert), str(ckey), "--srtp", "optional",
                     "--press", "3", "--timeout", "60")
        assert r.returncode == 0, r.stderr + bot.log()[-3000:]
        rows = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
        secure = next(x["security"] for x in rows if "security" in x)
        assert secure["transport"] == "TLS" and secure["srtp"] is True, secure
        r = bot.call("--press", "3", "--json", "--heard", "--timeout", "60")
        assert r.returncode == 0, r.stderr + bot.log()[-3000:]
        heard = next(json.loads(x)["heard"] for x in r.stdout.splitlines()
                     if isinstance(json.loads(x).get("heard"), list))
        assert ("main_menu", "en") in {(h["key"], h["language"]) for h in heard}, heard
    finally:
        bot.stop()
