"""A real `voicebot serve` for SIP tests: started as a subprocess on free loopback ports.

Every test file that talks SIP uses :func:`start_bot`; the bot gets its own config,
store, recordings and ports under a temporary folder, so tests (and people running a
bot on 5060 at the same time) do not collide. Readiness is a real SIP OPTIONS ping, to
the front (Kamailio, in every mode) and to every worker behind it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voicebot.config import PROJECT_ROOT, Config, load_config
from voicebot.store import CallRecord, Store

VENV_BIN = Path(sys.executable).parent
VOICEBOT = str(VENV_BIN / "voicebot")
SIPP_SCENARIOS = Path(__file__).parent / "sipp"


def free_udp_port(lo: int = 20000, hi: int = 30000) -> int:
    """A port free for both UDP and TCP on 127.0.0.1."""
    for _ in range(200):
        port = random.randrange(lo, hi)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, \
                socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            try:
                u.bind(("127.0.0.1", port))
                t.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def options_request(host: str, port: int, src: str, lport: int,
                    user_agent: str = "voicebot-test") -> bytes:
    """One SIP OPTIONS to ``host:port`` from ``src:lport``."""
    call_id = uuid.uuid4().hex
    return (f"OPTIONS sip:{host}:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {src}:{lport};branch=z9hG4bK{call_id[:16]};rport\r\n"
            f"From: <sip:probe@{src}:{lport}>;tag={call_id[:8]}\r\n"
            f"To: <sip:{host}:{port}>\r\nCall-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\n"
            f"User-Agent: {user_agent}\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
            ).encode()


def sip_options(host: str, port: int, timeout: float = 0.5, source: str = "127.0.0.1",
                user_agent: str = "voicebot-test") -> int | None:
    """Send one SIP OPTIONS over UDP from ``source``; the status code of the answer, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        msg = options_request(host, port, source, s.getsockname()[1], user_agent)
        s.settimeout(timeout)
        s.sendto(msg, (host, port))
        try:
            data, _ = s.recvfrom(65535)
        except TimeoutError:
            return None
    parts = data.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


@dataclass
class Bot:
    """A running `voicebot serve`."""

    folder: Path
    config_path: Path
    cfg: Config
    port: int
    proc: subprocess.Popen[str]
    log_path: Path
    number: str = "919"
    stopped_code: int | None = field(default=None)

    @property
    def host(self) -> str:
        """The front's (Kamailio's) address: [sip] listen."""
        return self.cfg.sip.listen.rpartition(":")[0]

    @property
    def uri(self) -> str:
        return f"sip:{self.number}@{self.host}:{self.port}"

    def worker_ports(self, workers: int) -> list[int]:
        return [self.cfg.sip.worker_port + i for i in range(workers)]

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def calls(self, sip_call_id: str | None = None) -> list[CallRecord]:
        store = Store.from_config(self.cfg)
        try:
            return store.calls(sip_call_id=sip_call_id, last=1000)
        finally:
            store.close()

    def wait_call(self, sip_call_id: str, timeout: float = 20.0) -> CallRecord:
        """The record of a call once it has ended (the bot finalises after the BYE)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            recs = self.calls(sip_call_id)
            if recs and recs[0].ended_at:
                return recs[0]
            time.sleep(0.2)
        raise AssertionError(f"call {sip_call_id} has no complete record after {timeout} s:\n"
                             f"{self.log()[-4000:]}")

    def wait_calls(self, n: int, timeout: float = 60.0) -> list[CallRecord]:
        """At least ``n`` ended calls."""
        end = time.monotonic() + timeout
        done: list[CallRecord] = []
        while time.monotonic() < end:
            done = [r for r in self.calls() if r.ended_at]
            if len(done) >= n:
                return done
            time.sleep(0.3)
        raise AssertionError(f"{len(done)} of {n} calls ended:\n{self.log()[-4000:]}")

    def call(self, *args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
        """`voicebot call` (the softphone) against this bot, with this bot's config."""
        return subprocess.run([VOICEBOT, "--config", str(self.config_path), "call", self.uri,
                               *args], capture_output=True, text=True, timeout=timeout)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([VOICEBOT, "--config", str(self.config_path), *args],
                              capture_output=True, text=True, timeout=120)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.stopped_code is not None:
            return self.stopped_code
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.stopped_code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"voicebot serve did not stop within {timeout} s:\n"
                                 f"{self.log()[-4000:]}") from None
        return self.stopped_code


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # a sub-table such as [sip.tls], inline
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(str(v), ensure_ascii=False)


def write_config(folder: Path, port: int, extra: str = "") -> Path:
    """A config for a test bot: the project's packs and models, private var/ and ports.

    ``extra`` is TOML whose keys override these (e.g. ``[sip]\nmax_calls = 1``)."""
    folder.mkdir(parents=True, exist_ok=True)
    var = folder / "var"
    tables: dict[str, dict[str, Any]] = {
        "paths": {"grammars": str(PROJECT_ROOT / "grammars"),
                  "models": str(PROJECT_ROOT / "models"),
                  "audio": str(PROJECT_ROOT / "audio"), "var": str(var)},
        "store": {"path": str(var / "voicebot.sqlite")},
        "recording": {"folder": str(var / "recordings")},
        "sip": {"listen": f"127.0.0.1:{port}", "rtp_port": random.randrange(30000, 44000, 1000),
                "rtp_ports_per_worker": 100,
                "worker_port": free_udp_port(31000, 39000) // 10 * 10,
                "shutdown_grace_s": 8.0,
                # Load tests push many calls a second from one loopback source (sipp, the
                # softphones), ACKs and BYEs included: the front's flood ban (20/s by
                # default) would ban the test's own caller. Tests of the ban set it low.
                "flood_limit": 100000},
    }
    for name, values in tomllib.loads(extra).items():
        tables.setdefault(name, {}).update(values)
    lines = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
        lines.append("")
    path = folder / "voicebot.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def start_bot(folder: Path, *, workers: int = 1, at: str | None = "2026-11-23T10:30",
              extra: str = "", ready_timeout: float = 90.0) -> Bot:
    """Start `voicebot serve` and wait until it answers SIP OPTIONS."""
    config_path = write_config(folder, free_udp_port(), extra)
    cfg = load_config(config_path)
    port = int(cfg.sip.listen.rpartition(":")[2])  # ``extra`` may name its own listen
    log_path = folder / "serve.log"
    cmd = [VOICEBOT, "serve", "--config", str(config_path), "--workers", str(workers)]
    if at:
        cmd += ["--at", at]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    logf = log_path.open("w", encoding="utf-8")
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, text=True, env=env)
    bot = Bot(folder, config_path, cfg, port, proc, log_path)
    end = time.monotonic() + ready_timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"voicebot serve exited with {proc.returncode}:\n{bot.log()}")
        # The front answers (itself: an OPTIONS without a user), and every worker behind
        # it is up (asked directly, on its private address).
        if sip_options(bot.host, port) is not None and all(
                sip_options(cfg.sip.worker_address, p) is not None
                for p in bot.worker_ports(workers)):
            return bot
        time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"voicebot serve not ready after {ready_timeout} s:\n{bot.log()}")


def sipp(scenario: str, bot: Bot, *, calls: int = 1, rate: float = 1.0, limit: int | None = None,
         service: str | None = None, timeout: float = 120.0, extra: list[str] | None = None,
         folder: Path | None = None, call_id: str | None = None, source: str = "127.0.0.1",
         netns: str | None = None, target: str | None = None,
         ) -> subprocess.CompletedProcess[str]:
    """Run a sipp scenario from tests/sipp against the bot; sipp's own pass/fail is the code.

    ``call_id``: a unique prefix for sipp's Call-IDs, so a test finds its own records: call n
    gets ``sipp_call_id(call_id, n, source)``. ``source``: sipp's own address (signalling
    and media); ``netns``: run sipp inside that network namespace (``ip netns exec``);
    ``target``: HOST:PORT to call instead of the bot's front.
    """
    folder = folder or bot.folder
    sport = free_udp_port(45000, 50000)
    mport = random.randrange(50000, 60000, 10)
    cmd = ["sipp", target or f"{bot.host}:{bot.port}", "-sf", str(SIPP_SCENARIOS / scenario),
           "-s", service or bot.number, "-i", source, "-p", str(sport),
           "-mi", source, "-mp", str(mport), "-m", str(calls), "-l", str(limit or calls),
           "-r", str(rate), "-nostdin", "-trace_err",
           "-error_file", str(folder / f"sipp-{scenario}-{sport}-errors.log"),
           "-timeout", f"{int(timeout)}s", "-timeout_error", *(extra or [])]
    if call_id:
        cmd += ["-cid_str", f"{call_id}-%u@%s"]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30,
                          cwd=str(SIPP_SCENARIOS))


def sipp_call_id(call_id: str, n: int = 1, source: str = "127.0.0.1") -> str:
    """The Call-ID of sipp's call ``n`` when it ran with ``call_id`` from ``source``."""
    return f"{call_id}-{n}@{source}"


def sipp_call_ids(bot: Bot, before: set[str]) -> list[CallRecord]:
    """Calls the bot recorded that were not there before (sipp does not print Call-IDs)."""
    return [r for r in bot.calls() if r.id not in before]


def record_ids(bot: Bot) -> set[str]:
    return {r.id for r in bot.calls()}


def turns_of(rec: CallRecord) -> list[dict[str, Any]]:
    return list(rec.turns)
