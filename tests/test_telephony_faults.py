"""The SIP edge when the store fails: a real pjsua2 endpoint (voicebot.telephony) in this
process, called by the real softphone (`voicebot call`).

The store is the real SQLite store with chosen writes made to raise (the injected fault):
- ``call_started`` fails: the INVITE is answered 503 at once, not left holding a slot;
- ``call_ended`` fails: the run loop goes on (it used to propagate out of it and hang up
  the worker's other calls), and the next call is answered and recorded.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sipbot import VOICEBOT, free_udp_port, sip_options, write_config

from voicebot.config import load_config
from voicebot.session import VoiceCore
from voicebot.store import Store
from voicebot.telephony import Telephony


class FaultyStore:
    """The real store; the writes named in ``fail`` raise OSError."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.fail: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name not in self.fail:
            return attr

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise OSError(f"injected: {name} failed")
        return broken


class Edge:
    def __init__(self, folder: Path) -> None:
        self.port = free_udp_port()
        self.config_path = write_config(folder, self.port)
        self.cfg = load_config(self.config_path)
        self.store = FaultyStore(Store.from_config(self.cfg))
        self.core = VoiceCore(self.cfg)
        self.core.load_models()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.tel = Telephony(self.core, self.store, f"127.0.0.1:{self.port}",  # type: ignore[arg-type]
                             self.cfg.sip.rtp_port, clock=lambda: dt.datetime(
                                 2026, 11, 23, 10, 30, tzinfo=self.core.hours.tz))
        # pjsua2 belongs to the thread that creates it: start, run and close on one thread.
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        end = time.monotonic() + 30
        while sip_options("127.0.0.1", self.port) is None:
            assert time.monotonic() < end and self.thread.is_alive(), self.error
            time.sleep(0.2)

    def _run(self) -> None:
        try:
            self.tel.start()
            self.tel.run(self.stop)
        except BaseException as exc:  # the test reads it
            self.error = exc
        finally:
            self.tel.close()

    def call(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([VOICEBOT, "--config", str(self.config_path), "call",
                               f"sip:919@127.0.0.1:{self.port}", *args],
                              capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    e = Edge(tmp_path_factory.mktemp("edge"))
    try:
        yield e
    finally:
        e.stop.set()
        e.thread.join(60)
        e.store._store.close()
    assert e.error is None, e.error


def test_call_started_failing_answers_503(edge: Edge) -> None:
    edge.store.fail = {"call_started"}
    try:
        out = edge.call("--press", "3", "--json", "--timeout", "20")
    finally:
        edge.store.fail = set()
    assert out.returncode == 1 and "503" in out.stderr, out.stderr[-2000:]
    assert not edge.tel.calls  # no slot held
    assert edge.thread.is_alive()


def test_call_ended_failing_keeps_the_loop_running(edge: Edge,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    edge.store.fail = {"call_ended"}
    try:
        edge.call("--timeout", "12")  # answered, then the caller hangs up
        end = time.monotonic() + 15
        while edge.tel.calls and time.monotonic() < end:
            time.sleep(0.2)
    finally:
        edge.store.fail = set()
    assert edge.thread.is_alive() and edge.error is None
    assert not edge.tel.calls
    assert "store call_ended failed: injected" in caplog.text
    # The loop is still serving: the next call is answered and gets its whole record.
    out = edge.call("--press", "3", "--press", "2", "--barge-in", "--json", "--timeout", "110")
    assert out.returncode == 0, out.stderr[-2000:]
    ids = {line.split('"sip_call_id": "')[1].split('"')[0] for line in out.stdout.splitlines()
           if '"sip_call_id"' in line}
    (sip_call_id,) = ids
    end = time.monotonic() + 20
    recs: list[Any] = []
    while time.monotonic() < end:
        recs = [r for r in edge.store.calls(sip_call_id=sip_call_id, last=5) if r.ended_at]
        if recs:
            break
        time.sleep(0.3)
    assert recs and recs[0].result == "completed", recs
