"""baresip (Debian, 1.0.0) as a second, independent SIP client of a real `voicebot serve`.

baresip runs headless from a generated config folder (`baresip -f DIR`): its caller audio is
a WAV of silence (aufile), what it hears goes to an aubridge device nobody reads (baresip has
no null player and refuses a call without one), and the test drives it through ctrl_tcp
(netstring JSON): `dial`, `sndcode` (RFC 4733 telephone-event, what baresip's keypad sends),
`hangup`, `quit`. Call events come back on the same connection.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sipbot import Bot, free_udp_port, record_ids, start_bot

MODULES = Path("/usr/lib/baresip/modules")


@pytest.fixture(scope="module")
def bot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bot]:
    b = start_bot(tmp_path_factory.mktemp("baresipbot"))
    try:
        yield b
    finally:
        code = b.stop()
    assert code == 0, f"voicebot serve exited with {code}:\n{b.log()[-4000:]}"


class Baresip:
    """One baresip process and its ctrl_tcp connection."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        silence = folder / "silence.wav"
        # A minute of caller audio: the bot hangs up on a call that stops sending RTP.
        with wave.open(str(silence), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(8000)
            w.writeframes(b"\0\0" * 8000 * 60)
        self.ctrl_port = free_udp_port(46000, 47000)
        sip_port = free_udp_port(47000, 48000)
        rtp = free_udp_port(48000, 49000)
        (folder / "config").write_text(f"""poll_method epoll
sip_listen 127.0.0.1:{sip_port}
sip_transports udp
audio_source aufile,{silence}
audio_player aubridge,nobody
audio_srate 8000
audio_channels 1
rtp_ports {rtp}-{rtp + 9}
module_path {MODULES}
module g711.so
module aufile.so
module aubridge.so
module_app account.so
module_app menu.so
module_app ctrl_tcp.so
ctrl_tcp_listen 127.0.0.1:{self.ctrl_port}
""", encoding="utf-8")
        # regint=0: no registration, the account only places calls.
        (folder / "accounts").write_text("<sip:baresip@127.0.0.1>;regint=0;audio_codecs=PCMA\n",
                                         encoding="utf-8")
        self.log_path = folder / "baresip.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(["baresip", "-f", str(folder)], stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.sock = self._connect()
        self.buf = b""
        self.events: list[dict[str, Any]] = []

    def _connect(self) -> socket.socket:
        end = time.monotonic() + 15
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"baresip exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return socket.create_connection(("127.0.0.1", self.ctrl_port), timeout=1)
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"baresip ctrl_tcp not listening:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def command(self, cmd: str, params: str = "") -> dict[str, Any]:
        """Send one command; its response (events that arrive meanwhile are kept)."""
        msg = json.dumps({"command": cmd, "params": params, "token": cmd}).encode()
        self.sock.sendall(b"%d:%s," % (len(msg), msg))
        while True:
            m = self._next(10.0)
            if m is None:
                raise AssertionError(f"no response to {cmd}:\n{self.log()}")
            if m.get("response") and m.get("token") == cmd:
                return m
            self.events.append(m)

    def wait_event(self, kind: str, timeout: float = 15.0) -> dict[str, Any]:
        for ev in self.events:
            if ev.get("type") == kind:
                return ev
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = self._next(end - time.monotonic())
            if m is None:
                break
            self.events.append(m)
            if m.get("type") == kind:
                return m
        raise AssertionError(f"no {kind} from baresip; events: {self.events}\n{self.log()}")

    def _next(self, timeout: float) -> dict[str, Any] | None:
        """The next netstring message ("LEN:JSON,") or None after ``timeout``."""
        end = time.monotonic() + timeout
        while True:
            head, sep, rest = self.buf.partition(b":")
            if sep and len(rest) > int(head):
                self.buf = rest[int(head) + 1:]
                return json.loads(rest[:int(head)])
            left = end - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return None
            if not chunk:
                return None
            self.buf += chunk

    def close(self) -> None:
        # baresip may already be gone (a failed test); quitting is best effort.
        with contextlib.suppress(OSError, AssertionError):
            self.command("quit")
        self.sock.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()


@pytest.fixture
def baresip(tmp_path: Path) -> Iterator[Baresip]:
    b = Baresip(tmp_path / "baresip")
    try:
        yield b
    finally:
        b.close()


def test_baresip_dtmf_navigation(bot: Bot, baresip: Baresip) -> None:
    """3 during the welcome (kept as type-ahead), 2 into the English main menu: the record
    shows English, working hours, completed, with a valid recording."""
    before = record_ids(bot)
    assert baresip.command("dial", bot.uri)["ok"]
    call_id = baresip.wait_event("CALL_ESTABLISHED")["id"]
    time.sleep(1.0)
    assert baresip.command("sndcode", "3")["ok"]
    # The welcome takes about 10 s; the second key barges into the main menu.
    time.sleep(12.0)
    assert baresip.command("sndcode", "2")["ok"]
    time.sleep(5.0)  # hear some of the working hours
    assert baresip.command("hangup")["ok"]
    baresip.wait_event("CALL_CLOSED")

    rec = bot.wait_call(call_id)
    assert rec.id not in before
    assert "baresip@127.0.0.1" in (rec.caller_from or "")
    assert rec.language == "en"
    assert rec.path == ["lang.en", "main.hours"]
    got = [(t["node"], t["input"], t["option"]) for t in rec.turns]
    assert got[:2] == [("language", "dtmf", "lang.en"), ("main", "dtmf", "main.hours")]
    assert rec.turns[1]["barge_in"] is True  # 2 stopped the main menu prompt
    assert rec.result == "completed" and rec.ended_by == "caller"
    assert rec.recording and Path(rec.recording).is_file()
    with wave.open(rec.recording, "rb") as w:
        assert w.getnchannels() == 1 and w.getnframes() > w.getframerate()
