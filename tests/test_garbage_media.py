"""Malformed RTP and TCP garbage at a real bot while a real call runs.

Nothing a peer sends may take the process down or lose a call: a softphone call keeps
going while every port of the bot's RTP range is sprayed with junk (random bytes,
truncated headers, wrong versions, huge packets, RTCP noise), and the SIP TCP port gets
binary garbage, half requests and lying Content-Lengths. Afterwards the call has its
record and recording, and a new call is answered.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import struct
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sipbot import Bot, sip_options, start_bot

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bot(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    b = start_bot(tmp_path_factory.mktemp("garbage"))
    yield b
    assert b.stop() == 0, b.log()[-3000:]


def turns(out: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines()
            if line.startswith("{") and "sip_call_id" in line]


def bad_rtp(rng: random.Random) -> bytes:
    """One malformed packet of a random kind."""
    kind = rng.randrange(6)
    if kind == 0:  # random bytes of any length
        return rng.randbytes(rng.randrange(1, 1400))
    if kind == 1:  # a header cut short
        return bytes([0x80, 0x00])[: rng.randrange(1, 3)] + rng.randbytes(rng.randrange(0, 10))
    if kind == 2:  # version 0/1/3, CSRC count and extension bits lying about the length
        first = (rng.choice([0, 1, 3]) << 6) | 0x1F
        return struct.pack("!BBHII", first, rng.randrange(256), rng.randrange(65536),
                           rng.randrange(2**32), rng.randrange(2**32))
    if kind == 3:  # valid-looking PCMA with a payload type nobody offered
        return struct.pack("!BBHII", 0x80, rng.choice([13, 34, 96, 127]), rng.randrange(65536),
                           rng.randrange(2**32), rng.randrange(2**32)) + rng.randbytes(160)
    if kind == 4:  # RTCP-looking junk (odd ports carry RTCP)
        return struct.pack("!BBH", 0x81, rng.choice([200, 201, 203, 204]), 0xFFFF) + \
            rng.randbytes(rng.randrange(0, 64))
    return b"\x80" + b"\xff" * 65000  # oversized datagram


def spray_rtp(first_port: int, ports: int, stop: threading.Event, sent: list[int]) -> None:
    rng = random.Random(919)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.5", 0))
    end = time.monotonic() + 60  # bounded whatever happens
    try:
        while not stop.is_set() and time.monotonic() < end:
            for port in range(first_port, first_port + ports):
                try:
                    sock.sendto(bad_rtp(rng), ("127.0.0.1", port))
                    sent[0] += 1
                except OSError:
                    pass  # EMSGSIZE for the oversized kind on some kernels: fine
            time.sleep(0.02)
    finally:
        sock.close()


TCP_GARBAGE = [
    os.urandom(4096),
    b"INVITE sip:919@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:1;branch=z9hG4bK1\r\n",
    b"OPTIONS sip:919@127.0.0.1 SIP/2.0\r\nContent-Length: 999999999\r\n\r\nshort",
    b"\r\n\r\n" * 1000,
    b"SIP/2.0 200 OK\r\n\r\n" * 50,
    b"REGISTER " + b"A" * 70000 + b" SIP/2.0\r\n\r\n",
    bytes(range(256)) * 64,
]


def tcp_garbage(port: int) -> int:
    """Send each garbage message on its own TCP connection; count those delivered."""
    delivered = 0
    for blob in TCP_GARBAGE:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
                s.sendall(blob)
                delivered += 1
                s.settimeout(0.5)
                with contextlib.suppress(OSError):
                    s.recv(4096)
        except OSError:
            pass
    # A connection opened and left hanging half-way, then dropped.
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        s.sendall(b"INVITE sip:919@127.0.0.1 SIP/2.0\r\nContent-Length: 10\r\n\r\n12")
        time.sleep(0.5)
    return delivered


def test_malformed_rtp_and_tcp_garbage_during_a_call(bot: Bot) -> None:
    stop = threading.Event()
    sent = [0]
    sprayer = threading.Thread(target=spray_rtp, args=(bot.cfg.sip.rtp_port,
                                                       bot.cfg.sip.rtp_ports_per_worker, stop,
                                                       sent))
    with ThreadPoolExecutor(2) as pool:
        call = pool.submit(bot.call, "--barge-in", "--press", "3", "--press", "1", "--press",
                           "2", "--json")
        time.sleep(1.0)  # the call is up: now the junk
        sprayer.start()
        delivered = tcp_garbage(bot.port)
        time.sleep(max(0.0, 8.0 - sent[0] / 5000))
        stop.set()
        sprayer.join(10)
        # After the junk, while the first call still runs: SIP answers and a new call goes
        # through end to end.
        assert sip_options("127.0.0.1", bot.port) == 200
        again = pool.submit(bot.call, "--barge-in", "--press", "3", "--press", "2", "--json")
        out = call.result(timeout=240)
        out2 = again.result(timeout=240)
    assert sent[0] > 1000 and delivered >= len(TCP_GARBAGE) - 1
    assert bot.proc.poll() is None, bot.log()[-4000:]
    got = turns(out)
    assert [t["option"] for t in got] == ["lang.en", "main.info", "info.temporary_residence"], got
    assert [t["option"] for t in turns(out2)] == ["lang.en", "main.hours"]
    for first in (got[0], turns(out2)[0]):
        rec = bot.wait_call(first["sip_call_id"])
        assert rec.result == "completed" and rec.ended_at, rec
        assert rec.recording and Path(rec.recording).exists()
        assert not list(Path(rec.recording).parent.glob(".*.part.wav"))
