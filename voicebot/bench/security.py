"""`voicebot bench --security`: the front's flood and scanner limits, measured on the wire.

The bot is the real ``voicebot serve`` (Kamailio in front of one worker) with the shipped
defaults of ``[sip] flood_limit`` and ``ban_s``. Three measurements, one run:

- **Flood ramp**: from a fresh loopback source per step (127.0.1.N), SIP OPTIONS at a
  fixed rate for a few seconds; the answers counted per step. A step is *banned* when
  the answers stop while the source keeps sending. The result is the highest rate one
  source can keep up without a ban, and, for a burst, how many requests were answered
  before the ban took hold.
- **Turn latency without and during a scan**: probe calls (a pjsua2 softphone from
  127.0.0.1, :mod:`voicebot.bench.probe`) measure spoken turns as the caller hears
  them, once on a quiet line and once while sipvicious (svmap, svwar, svcrack) scans
  from 127.0.0.7 in a loop. The allowed caller must keep its turn latency.
- **After the scan**: the scanner's source is banned (a plain OPTIONS from it, normal
  User-Agent, gets no answer) while another allowed source is still answered.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from ..config import Config
from .common import machine_info, summary
from .sip import BotServer, run_probe

FLOOD_RATES = (5, 10, 15, 18, 22, 30, 50, 100)  # requests per second, one source each
FLOOD_STEP_S = 3.0
SCANNER_IP = "127.0.0.7"
ALLOWED_IP = "127.0.0.8"
PROBE_CALLS = 2
PROBE_TURNS = 6
# The caller's turn may get at most this much slower (p95) while a scan runs.
SCAN_SLOWDOWN_MS = 50.0


# sipvicious 0.3.3's svwar and svcrack take -b (binding address) but never pass it on to
# their socket, which binds to every address: their packets to 127.0.0.1 leave from
# 127.0.0.1, not from the scanner's address. This runs the tool with its scanner class
# given the binding address, as -b means.
BIND_SHIM = """
import importlib, os, sys
tool, ip = sys.argv[1], sys.argv[2]
sys.path.insert(0, os.path.dirname(os.path.realpath(sys.argv[3])))
mod = importlib.import_module("sipvicious." + tool)
cls = getattr(mod, {"svwar": "TakeASip", "svcrack": "ASipOfRedWine"}[tool])
init = cls.__init__
def bound_init(self, *a, **k):
    k["bindingip"] = ip
    init(self, *a, **k)
cls.__init__ = bound_init
sys.argv = [tool] + sys.argv[4:]
sys.exit(mod.main())
"""


def sipvicious_cmd(args: list[str]) -> list[str]:
    """The command line for one sipvicious tool; with ``-b IP`` it really sends from IP."""
    cmd = list(args)
    if cmd[0] in ("svwar", "svcrack") and "-b" in cmd:
        path = shutil.which(cmd[0])
        if path is None:
            raise FileNotFoundError(f"{cmd[0]} is not installed (apt-get install sipvicious)")
        interpreter = Path(path).read_text(errors="replace").splitlines()[0][2:].strip()
        ip = cmd[cmd.index("-b") + 1]
        cmd = [interpreter, "-c", BIND_SHIM, cmd[0], ip, path, *cmd[1:]]
    return cmd


class SecurityBot(BotServer):
    """The benchmark bot with the shipped flood limits (the load benches raise them)."""

    def write_config(self) -> Path:
        path = super().write_config()
        text = path.read_text(encoding="utf-8")
        text = re.sub(r"(?m)^(flood_limit|ban_s)\s*=.*\n", "", text)
        d = Config().sip
        limit = self.cfg.sip.flood_limit or d.flood_limit
        text = text.replace("[sip]\n", f"[sip]\nflood_limit = {limit}\n"
                            f"ban_s = {self.cfg.sip.ban_s or d.ban_s}\n", 1)
        path.write_text(text, encoding="utf-8")
        return path


def options(src: str, dst: tuple[str, int], user_agent: str = "voicebot-bench") -> bytes:
    call_id = uuid.uuid4().hex
    host, port = dst
    return (f"OPTIONS sip:{host}:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {src};branch=z9hG4bK{call_id[:16]};rport\r\n"
            f"From: <sip:bench@{src}>;tag={call_id[:8]}\r\nTo: <sip:{host}:{port}>\r\n"
            f"Call-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n"
            f"User-Agent: {user_agent}\r\nContent-Length: 0\r\n\r\n").encode()


def answered(src_ip: str, dst: tuple[str, int], timeout: float = 1.0) -> bool:
    """One OPTIONS from ``src_ip``: was it answered at all?"""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((src_ip, 0))
        s.settimeout(timeout)
        s.sendto(options(f"{src_ip}:{s.getsockname()[1]}", dst), dst)
        try:
            s.recvfrom(4096)
            return True
        except TimeoutError:
            return False


def flood_step(src_ip: str, dst: tuple[str, int], rate: float, seconds: float) -> dict[str, Any]:
    """OPTIONS at ``rate`` per second for ``seconds`` from ``src_ip``; what came back."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((src_ip, 0))
    sock.settimeout(0.2)
    src = f"{src_ip}:{sock.getsockname()[1]}"
    answers: list[float] = []
    done = threading.Event()

    def receive() -> None:
        while not done.is_set():
            try:
                data, _ = sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            if data.startswith(b"SIP/2.0 "):
                answers.append(time.monotonic())

    rx = threading.Thread(target=receive, daemon=True)
    rx.start()
    t0 = time.monotonic()
    n = int(rate * seconds)
    for i in range(n):
        wait = t0 + i / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        sock.sendto(options(src, dst), dst)
    t_end = time.monotonic()
    time.sleep(1.0)  # the last answers
    done.set()
    rx.join(timeout=2.0)
    sock.close()
    last = max(answers) - t0 if answers else None
    # Banned: the answers stopped while the source went on sending (more than a second
    # before its last request).
    banned = len(answers) < n and (last is None or last < (t_end - t0) - 1.0)
    return {"rate": rate, "sent": n, "answered": len(answers), "banned": banned,
            "last_answer_s": round(last, 2) if last is not None else None}


def _free_port(ip: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def _scan_loop(bot_port: int, stop: threading.Event, log: list[str]) -> None:
    """sipvicious from SCANNER_IP, one tool after another, until ``stop``."""
    target = ["-p", str(bot_port), "127.0.0.1"]
    while not stop.is_set():
        for tool, *args in (["svmap", "-t", "0.05"], ["svmap", "-m", "INVITE", "-t", "0.05"],
                            ["svwar", "-e", "100-999", "-m", "INVITE", "--maximumtime", "10"],
                            ["svcrack", "-u", "919", "-r", "1000-9999", "--maximumtime", "10"]):
            if stop.is_set():
                return
            cmd = sipvicious_cmd([tool, "-b", SCANNER_IP, "-x", SCANNER_IP, "-P",
                                  str(_free_port(SCANNER_IP)), *args, *target])
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
                what = " INVITE" if "INVITE" in args and tool == "svmap" else ""
                log.append(f"{tool}{what}: exit {out.returncode}")
            except subprocess.TimeoutExpired:
                log.append(f"{tool}: stopped after 30 s")


def _probe_turns(server: BotServer, calls: int, seed: int) -> tuple[list[float], list[str]]:
    lat: list[float] = []
    errors: list[str] = []
    for i in range(calls):
        res = run_probe(server, PROBE_TURNS, 300, 60 + 8 * PROBE_TURNS, seed + i)
        if res.get("error"):
            errors.append(res["error"][-300:])
        for r in res.get("turns", []):
            if (r.get("input") == "speech" and r.get("menu_turn") and not r.get("warmup")
                    and r.get("caller_latency_ms") is not None):
                lat.append(float(r["caller_latency_ms"]))
    return lat, errors


def security(cfg: Config, folder: Path, port: int) -> dict[str, Any]:
    missing = [t for t in ("svmap", "svwar", "svcrack") if shutil.which(t) is None]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} not installed (apt-get install "
                                "sipvicious; scripts/install-system-deps does it)")
    out: dict[str, Any] = {"flood_limit": cfg.sip.flood_limit, "ban_s": cfg.sip.ban_s}
    with SecurityBot(cfg, folder, port, 1) as server:
        dst = ("127.0.0.1", server.port)
        # 1. Turn latency on a quiet line, then during a scan.
        quiet, q_err = _probe_turns(server, PROBE_CALLS, 0)
        stop = threading.Event()
        scan_log: list[str] = []
        scanner = threading.Thread(target=_scan_loop, args=(server.port, stop, scan_log),
                                   daemon=True)
        scanner.start()
        time.sleep(2.0)  # the scan has begun (and, if the front works, been banned)
        scanned, s_err = _probe_turns(server, PROBE_CALLS, 100)
        stop.set()
        scanner.join(timeout=60)
        out["latency"] = {"quiet_ms": summary(quiet), "during_scan_ms": summary(scanned),
                          "errors": q_err + s_err, "scan_log": scan_log}
        # 2. After the scan: the scanner's source is banned, another source is answered.
        out["after_scan"] = {"scanner_answered": answered(SCANNER_IP, dst),
                             "allowed_answered": answered(ALLOWED_IP, dst)}
        # 3. The flood ramp, a fresh source per step.
        steps = []
        for i, rate in enumerate(FLOOD_RATES):
            src = f"127.0.1.{10 + i}"
            if not answered(src, dst):
                steps.append({"rate": rate, "error": f"{src} not answered before the step"})
                continue
            steps.append({"source": src, **flood_step(src, dst, rate, FLOOD_STEP_S)})
        out["flood"] = steps
        kept = [s["rate"] for s in steps if "banned" in s and not s["banned"]]
        banned = [s for s in steps if s.get("banned")]
        out["max_rate_unbanned"] = max(kept) if kept else None
        out["min_rate_banned"] = min(s["rate"] for s in banned) if banned else None
        out["answered_before_ban"] = {str(s["rate"]): s["answered"] for s in banned}
        out["bot_alive"] = server.proc is not None and server.proc.poll() is None
    return out


def targets(s: dict[str, Any]) -> list[dict[str, Any]]:
    limit = s["flood_limit"]
    q, d = s["latency"]["quiet_ms"].get("p95"), s["latency"]["during_scan_ms"].get("p95")
    kept, first_ban = s.get("max_rate_unbanned"), s.get("min_rate_banned")
    before = s.get("answered_before_ban") or {}
    return [
        {"what": f"a source at or under flood_limit ({limit}/s) is never banned",
         "measured": f"highest rate kept: {kept}/s", "met": kept is not None and all(
             not st.get("banned") for st in s["flood"] if st.get("rate", 0) <= limit)},
        {"what": f"a source over flood_limit ({limit}/s) is banned",
         "measured": f"lowest rate banned: {first_ban}/s", "met": first_ban is not None and all(
             st.get("banned") for st in s["flood"] if st.get("rate", 0) > limit + 1)},
        {"what": f"a burst gets at most about one second's worth ({limit}) answered",
         "measured": ", ".join(f"{r}/s: {n}" for r, n in before.items()) or "-",
         "met": bool(before) and all(n <= 2 * limit for n in before.values())},
        {"what": "the scanner's source is banned after the scan, an allowed one is answered",
         "measured": f"scanner answered: {s['after_scan']['scanner_answered']}, allowed "
                     f"answered: {s['after_scan']['allowed_answered']}",
         "met": not s["after_scan"]["scanner_answered"] and s["after_scan"]["allowed_answered"]},
        {"what": f"allowed calls keep their turn latency during a scan (p95 within "
                 f"{SCAN_SLOWDOWN_MS:.0f} ms)",
         "measured": f"p95 quiet {q} ms, during the scan {d} ms",
         "met": None if q is None or d is None else d <= q + SCAN_SLOWDOWN_MS},
        {"what": "the bot is up after it all", "measured": str(s["bot_alive"]),
         "met": bool(s["bot_alive"])},
    ]


def markdown(res: dict[str, Any]) -> str:
    s = res["security"]
    lat = s["latency"]
    out = [f"# voicebot security benchmark: {res['name']}", "",
           "The real `voicebot serve` (Kamailio in front of one worker) with the shipped "
           f"`[sip] flood_limit = {s['flood_limit']}` and `ban_s = {s['ban_s']}`, on "
           f"{res['machine'].get('cpu', '?')}. One run; latencies are percentiles of the "
           "probe's spoken turns as the caller hears them (last speech sample sent to the "
           "first reply sample received).", "", "## Targets", "",
           "| target | measured | |", "| --- | --- | --- |"]
    for t in res["targets"]:
        mark = {True: "met", False: "**MISSED**", None: "not measured"}[t["met"]]
        out.append(f"| {t['what']} | {t['measured']} | {mark} |")
    out += ["", "## Flood ramp", "",
            f"OPTIONS from one fresh loopback source per step, {FLOOD_STEP_S:.0f} s each, evenly "
            "paced. Banned: the answers stopped while the source went on sending.", "",
            "| rate /s | source | sent | answered | last answer (s) | banned |",
            "| --- | --- | --- | --- | --- | --- |"]
    for st in s["flood"]:
        if "error" in st:
            out.append(f"| {st['rate']} | - | - | - | - | {st['error']} |")
            continue
        out.append(f"| {st['rate']} | {st['source']} | {st['sent']} | {st['answered']} | "
                   f"{st['last_answer_s']} | {'yes' if st['banned'] else 'no'} |")
    q, d = lat["quiet_ms"], lat["during_scan_ms"]
    out += ["", "## Turn latency of an allowed caller", "",
            "| line | turns | p50 ms | p95 ms | max ms |", "| --- | --- | --- | --- | --- |",
            f"| quiet | {q.get('n')} | {q.get('p50')} | {q.get('p95')} | {q.get('max')} |",
            f"| during a sipvicious scan from {SCANNER_IP} | {d.get('n')} | {d.get('p50')} | "
            f"{d.get('p95')} | {d.get('max')} |", "",
            "Scanner runs: " + (", ".join(lat["scan_log"]) or "none"), ""]
    if lat["errors"]:
        out += ["Probe errors:", ""] + [f"- `{e}`" for e in lat["errors"]] + [""]
    out += [f"Run in {res['wall_s']} s.", ""]
    return "\n".join(out)


def run_security(cfg: Config, name: str | None = None, out_dir: Path | None = None,
                 port: int = 5400) -> tuple[Path, Path]:
    """Run the security benchmark; write <out_dir>/<name>.json and .md."""
    from .runner import RESULTS

    t0 = time.perf_counter()
    name = name or "security"
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="voicebot-security-"))
    res: dict[str, Any] = {"name": name, "kind": "security", "machine": machine_info()}
    s = security(cfg, work, port)
    res["security"] = s
    res["targets"] = targets(s)
    res["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    jpath, mpath = out_dir / f"{name}.json", out_dir / f"{name}.md"
    jpath.write_text(json.dumps(res, indent=1, ensure_ascii=False, default=str) + "\n",
                     encoding="utf-8")
    mpath.write_text(markdown(res), encoding="utf-8")
    return jpath, mpath
