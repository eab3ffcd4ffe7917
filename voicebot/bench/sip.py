"""Turn latency over real SIP on loopback, and capacity through workers behind Kamailio.

The bot is the real ``voicebot serve`` in a child process with a private config (its own
var/ folder, store and ports). Callers are real SIP user agents:

- the probe (:mod:`voicebot.bench.probe`, a pjsua2 softphone in its own process) measures
  turn latency as the caller hears it: from the last speech sample it sends to the first
  non-silent frame of the reply it receives (RTP, jitter buffer and all);
- sipp (Debian ``sip-tester``) generates load: each call picks Korean with an RFC 4733
  key, then speaks Korean "운영 시간" (working hours) every few seconds, as RTP from an A-law
  WAV, barging into every reply, until it hangs up.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..frames import silence
from .common import IN_HOURS, CallerVoice, cpu_seconds, descendants, process_name, pss_mb, summary

SIPP_DTMF = Path("/usr/share/sip-tester")


class BotServer:
    """``voicebot serve`` in a child process, on its own ports and var/ folder."""

    def __init__(self, cfg: Config, folder: Path, port: int, workers: int = 1,
                 rtp_port: int | None = None, env: dict[str, str] | None = None) -> None:
        self.cfg = cfg
        self.folder = folder
        self.port = port
        self.workers = workers
        # RTP ports follow the SIP port, so two benchmark runs on other ports never collide.
        self.rtp_port = rtp_port or 30000 + (port % 1000) * 20
        self.proc: subprocess.Popen[str] | None = None
        self.config_file = folder / "voicebot.toml"
        self.log_file = folder / "serve.log"
        self.env = env or {}

    @property
    def uri(self) -> str:
        return f"sip:919@127.0.0.1:{self.port}"

    @property
    def store_path(self) -> Path:
        return self.folder / "var" / "voicebot.sqlite"

    def write_config(self) -> Path:
        var = self.folder / "var"
        var.mkdir(parents=True, exist_ok=True)
        c = self.cfg
        text = f"""# written by voicebot bench
[paths]
grammars = "{c.grammars_dir}"
models = "{c.models_dir}"
audio = "{c.audio_dir}"
var = "{var}"
[store]
path = "{self.store_path}"
[recording]
enabled = false
folder = "{var / 'rec'}"
[sip]
listen = "127.0.0.1:{self.port}"
transports = ["udp"]
rtp_port = {self.rtp_port}
worker_port = {self.port + 1}
rtp_ports_per_worker = 40
# The load steps push many calls a second from one loopback source (sipp), ACKs and BYEs
# included: the front's flood ban (20/s by default) would ban the benchmark's own caller.
flood_limit = 100000
[vad]
aggressiveness = {c.vad.aggressiveness}
hangover_ms = {c.vad.hangover_ms}
[asr]
grammar = {str(c.asr.grammar).lower()}
[dialog]
# Load callers keep talking; a no-match must re-prompt, not escalate to an operator
# transfer (REFER) that would end the measured call.
max_retries = 1000
"""
        self.config_file.write_text(text, encoding="utf-8")
        return self.config_file

    def _check_ports_free(self) -> None:
        """A stale bot on our port would answer for this one, and its calls land in another
        store: refuse to measure rather than measure the wrong server."""
        ports = [self.port] + [self.port + 1 + i for i in range(self.workers)]
        for port in ports:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError as exc:
                    raise RuntimeError(
                        f"UDP port 127.0.0.1:{port} is in use ({exc.strerror}): another "
                        "voicebot or SIP server is running there (a stale benchmark bot?). "
                        "Stop it, or pass --port to use other ports.") from exc

    def start(self, timeout: float = 180.0) -> None:
        self._check_ports_free()
        self.write_config()
        log = self.log_file.open("w", encoding="utf-8")
        args = ["serve", "--config", str(self.config_file), "--listen",
                f"127.0.0.1:{self.port}", "--workers", str(self.workers), "--at",
                IN_HOURS.isoformat(), "--log-level", "INFO"]
        # Started through -c rather than as `voicebot serve`: on a shared machine a
        # colleague's `pkill -f "voicebot serve"` must not take the benchmark's bot down.
        cmd = [sys.executable, "-c", "import sys; from voicebot.cli import main; "
               f"sys.exit(main({args!r}))"]
        # faulthandler: a worker that crashes in C (pjsua2, Vosk) leaves its Python stack in
        # serve.log, so a failed capacity step can be traced.
        # MALLOC_ARENA_MAX: what `voicebot serve` from the command line sets for itself
        # (it is started here through main(), which does not re-exec).
        env = {**os.environ, "PYTHONFAULTHANDLER": "1", "MALLOC_ARENA_MAX": "2", **self.env}
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, env=env)
        deadline = time.monotonic() + timeout
        want = self.workers
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"voicebot serve exited ({self.proc.returncode}); see "
                                   f"{self.log_file}:\n{self.log_file.read_text()[-2000:]}")
            text = self.log_file.read_text(encoding="utf-8", errors="replace")
            # Kamailio runs in front in every mode, started once the workers answer SIP.
            if text.count(" listening on ") >= want and "kamailio (pid" in text:
                time.sleep(1.5)  # Kamailio's first OPTIONS ping
                if self.proc.poll() is not None:  # e.g. it could not bind after all
                    raise RuntimeError(f"voicebot serve exited ({self.proc.returncode}); see "
                                       f"{self.log_file}:\n"
                                       f"{self.log_file.read_text()[-2000:]}")
                return
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"voicebot serve did not start within {timeout:.0f} s; see "
                           f"{self.log_file}")

    def voicebot_pids(self) -> list[int]:
        """The master and its worker processes (Python), not Kamailio."""
        if self.proc is None:
            return []
        return [p for p in descendants(self.proc.pid) if process_name(p).startswith("python")]

    def all_pids(self) -> list[int]:
        return descendants(self.proc.pid) if self.proc else []

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> BotServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_probe(server: BotServer, turns: int, barge_in_ms: int, timeout_s: float,
              seed: int = 0) -> dict[str, Any]:
    """One probe call in its own process (pjsua2 wants its own main thread); its JSON."""
    cmd = [sys.executable, "-m", "voicebot.bench.probe", "--config", str(server.config_file),
           "--uri", server.uri, "--turns", str(turns), "--barge-in", str(barge_in_ms),
           "--timeout", str(timeout_s), "--seed", str(seed)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s + 60)
    if out.returncode != 0:
        return {"error": f"probe failed ({out.returncode}): {out.stderr[-1500:]}", "turns": []}
    return json.loads(out.stdout.strip().splitlines()[-1])


def turn_latency(cfg: Config, folder: Path, port: int, calls: int, turns_per_call: int,
                 barge_in_ms: int = 300) -> dict[str, Any]:
    """Caller-side turn latency of one call at a time, plus the bot's own view of each turn."""
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    with BotServer(cfg, folder, port, 1) as server:
        for i in range(calls):
            res = run_probe(server, turns_per_call, barge_in_ms, 60 + 6 * turns_per_call, i)
            if res.get("error"):
                errors.append(res["error"])
            rows.extend(res.get("turns", []))
    rows = [r for r in rows if not r.get("warmup")]
    off_menu = [r for r in rows if r["input"] == "speech" and not r.get("menu_turn")]
    speech = [r for r in rows if r["input"] == "speech" and r.get("caller_latency_ms") is not None
              and r.get("menu_turn")]
    lat = [r["caller_latency_ms"] for r in speech]
    bot = [r["bot_latency_ms"] for r in speech if r.get("bot_latency_ms") is not None]
    transport = [r["caller_latency_ms"] - r["bot_latency_ms"] for r in speech
                 if r.get("bot_latency_ms") is not None]
    return {"calls": calls, "turns_per_call": turns_per_call, "barge_in_ms": barge_in_ms,
            "speech_turns": len(speech), "not_menu_turns": len(off_menu), "unanswered": sum(
                1 for r in rows if r["input"] == "speech" and r.get("caller_latency_ms") is None),
            "caller_ms": summary(lat), "bot_ms": summary(bot), "transport_ms": summary(transport),
            "results": {k: sum(1 for r in speech if r.get("result") == k)
                        for k in sorted({str(r.get("result")) for r in speech})},
            "errors": errors, "_raw": {"turns": rows}}


# --- capacity ---

SCENARIO = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="voicebot bench caller">
  <send retrans="500">
    <![CDATA[
      INVITE sip:919@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:919@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: sip:sipp@[local_ip]:[local_port]
      Max-Forwards: 70
      Subject: voicebot bench
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=user1 53655765 2353687637 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 8 101
      a=rtpmap:8 PCMA/8000
      a=rtpmap:101 telephone-event/8000
      a=fmtp:101 0-15
      a=sendrecv
    ]]>
  </send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="183" optional="true"/>
  <recv response="200" rtd="true" rrs="true"/>
  <send>
    <![CDATA[
      ACK [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:919@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 1 ACK
      [routes]
      Contact: sip:sipp@[local_ip]:[local_port]
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
  <nop><action><exec play_pcap_audio="{dtmf}"/></action></nop>
  <pause milliseconds="1500"/>
  <nop><action><exec rtp_stream="{wav},-1,8"/></action></nop>
  <pause milliseconds="{hold_ms}"/>
  <send retrans="500">
    <![CDATA[
      BYE [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:919@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 2 BYE
      [routes]
      Contact: sip:sipp@[local_ip]:[local_port]
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
  <recv response="200" crlf="true"/>
</scenario>
"""


def load_wav(cfg: Config, path: Path, gap_ms: int = 2200) -> Path:
    """The load callers' speech: Korean "운영 시간" then a pause, A-law WAV (sipp loops it)."""
    import soundfile

    voice = CallerVoice(cfg)
    u = voice.say("운영 시간", "ko")
    soundfile.write(str(path), np.concatenate([u.audio, silence(gap_ms)]), 8000, subtype="ALAW")
    return path


def _turns_between(store: Path, t0: float, t1: float) -> list[dict[str, Any]]:
    """Speech turns the bot stored between two wall-clock times (UTC epoch seconds)."""
    import datetime as dt

    a = dt.datetime.fromtimestamp(t0, dt.UTC).isoformat(timespec="milliseconds")
    b = dt.datetime.fromtimestamp(t1, dt.UTC).isoformat(timespec="milliseconds")
    con = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=10)
    try:
        rows = con.execute(
            "SELECT input, result, latency_ms, created_at FROM turns WHERE created_at >= ? AND "
            "created_at <= ?", (a, b)).fetchall()
    finally:
        con.close()
    return [{"input": r[0], "result": r[1], "latency_ms": r[2]} for r in rows]


def _call_results(store: Path, since: float) -> dict[str, int]:
    import datetime as dt

    a = dt.datetime.fromtimestamp(since, dt.UTC).isoformat(timespec="milliseconds")
    con = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=10)
    try:
        rows = con.execute("SELECT result, ended_by, reason FROM calls WHERE started_at >= ?",
                           (a,)).fetchall()
    finally:
        con.close()
    out: dict[str, int] = {}
    for result, by, reason in rows:
        key = f"{result}/{by}/{reason}"
        out[key] = out.get(key, 0) + 1
    return out


def _busiest_worker(server: BotServer) -> int | None:
    master = server.proc.pid if server.proc else None
    workers = [p for p in server.voicebot_pids() if p != master]
    return max(workers, key=cpu_seconds) if workers else None


def start_profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[str] | None:
    """py-spy on one worker for ``seconds`` (non-blocking: it never pauses the worker's
    threads, so it does not add to the latency it runs beside); None without py-spy."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return None
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                             "--rate", "50", "--nonblocking", "--format", "raw", "--output",
                             str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


# Where a worker's Python time goes, by the innermost frame that names a stage.
PROFILE_STAGES = (
    ("vosk decode (AcceptWaveform)", ("AcceptWaveform",)),
    ("vosk finalise (FinalResult)", ("FinalResult", "Result (vosk")),
    ("media port callbacks (PJSIP clock thread)", ("onFrameReceived", "onFrameRequested")),
    ("VAD / endpointer", ("vad.py",)),
    ("DTMF detector", ("dtmf.py",)),
    ("intent classifier", ("nlu.py", "sklearn")),
    ("dialog engine", ("dialog.py",)),
    ("prompt playback and resampling", ("playback", "resample", "soxr")),
    ("call session hand-off and queues", ("session.py", "queue.py", "threading.py")),
    ("pjsua2 event loop", ("libHandleEvents", "telephony.py")),
)


# Innermost frames that are a thread waiting, not working: with --nonblocking py-spy cannot
# tell a thread blocked in these from one running, so they are counted apart.
WAITING_LEAVES = ("Condition.wait", "Event.wait", "Thread.join", "sleep", "select (",
                  "poll (")


def summarise_profile(raw: Path, top: int = 12) -> dict[str, Any]:
    """py-spy's raw (collapsed) stacks: share of the working samples per stage and per
    innermost function; samples of threads waiting on a queue or a lock are counted apart."""
    total = 0
    waiting = 0
    stages: dict[str, int] = {}
    leaves: dict[str, int] = {}
    for line in raw.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        leaf = re.sub(r":\d+\)$", ")", frames[-1])
        if any(w in leaf for w in WAITING_LEAVES):
            waiting += n
            continue
        total += n
        leaves[leaf] = leaves.get(leaf, 0) + n
        name = "other"
        for frame in reversed(frames):
            hit = next((s for s, keys in PROFILE_STAGES if any(k in frame for k in keys)), None)
            if hit:
                name = hit
                break
        stages[name] = stages.get(name, 0) + n
    def pct(n: int) -> float:
        return round(100.0 * n / total, 1) if total else 0.0
    return {"samples": total, "waiting_samples": waiting,
            "stages_pct": {k: pct(v) for k, v in sorted(stages.items(), key=lambda kv: -kv[1])},
            "top_functions_pct": [(k, pct(v)) for k, v in
                                  sorted(leaves.items(), key=lambda kv: -kv[1])[:top]]}


def capacity_step(server: BotServer, work: Path, calls: int, hold_s: float, warm_s: float,
                  probe_turns: int, profile: bool = False) -> dict[str, Any]:
    """``calls`` concurrent sipp callers for ``hold_s``; measured over the window after warm-up.
    With ``profile`` the busiest worker is sampled by py-spy over the same window."""
    sipp = shutil.which("sipp")
    if sipp is None:
        raise FileNotFoundError("sipp is not installed (apt-get install sip-tester)")
    wav = work / "load.wav"
    if not wav.exists():
        load_wav(server.cfg, wav)
    scen = work / f"uac_{calls}.xml"
    scen.write_text(SCENARIO.format(dtmf=SIPP_DTMF / "dtmf_2833_4.pcap", wav=wav,
                                    hold_ms=int(hold_s * 1000)), encoding="utf-8")
    stat = work / f"sipp_{calls}.csv"
    errf = work / f"sipp_{calls}_errors.log"
    t_start = time.time()
    # The probe call is one of the ``calls``: sipp makes the others.
    n_sipp = calls - 1 if probe_turns else calls
    cmd = [sipp, f"127.0.0.1:{server.port}", "-sf", str(scen), "-m", str(n_sipp), "-l",
           str(n_sipp), "-r", "10", "-i", "127.0.0.1", "-p", str(server.port + 900),
           "-mi", "127.0.0.1", "-mp", str(20000 + (server.port % 1000) * 10),
           "-nostdin", "-trace_stat", "-stf", str(stat), "-fd", "5", "-trace_err",
           "-error_file", str(errf), "-timeout", str(int(hold_s + 60)), "-timeout_error"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=work)
    probe_res: dict[str, Any] = {}
    probe_thread: threading.Thread | None = None
    if probe_turns:
        def probe() -> None:
            time.sleep(max(0.0, calls / 10.0))  # after sipp's ramp-up
            probe_res.update(run_probe(server, probe_turns, 300, hold_s + 30))
        probe_thread = threading.Thread(target=probe, daemon=True)
        probe_thread.start()
    time.sleep(warm_s)
    pids = server.all_pids()
    vb = server.voicebot_pids()
    t0 = time.monotonic()
    cpu0 = {p: cpu_seconds(p) for p in pids}
    w0 = time.time()
    window = max(5.0, hold_s - warm_s - 3.0)
    pss_samples: list[float] = []
    spy = None
    spy_out = work / f"profile_{calls}.txt"
    spy_pid = _busiest_worker(server) if profile else None
    if spy_pid is not None:
        spy = start_profile(spy_pid, max(5.0, window - 2.0), spy_out)
    end = t0 + window
    while time.monotonic() < end:
        time.sleep(min(5.0, max(0.0, end - time.monotonic())))
        pss_samples.append(sum(pss_mb(p) for p in vb))
    cpu1 = {p: cpu_seconds(p) for p in pids}
    elapsed = time.monotonic() - t0
    w1 = time.time()
    cpu_vb = sum(cpu1[p] - cpu0.get(p, 0.0) for p in vb if p in cpu1)
    cpu_all = sum(cpu1[p] - cpu0.get(p, 0.0) for p in pids)
    try:
        _, err = proc.communicate(timeout=hold_s + 120)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    if probe_thread is not None:
        probe_thread.join(timeout=hold_s + 60)
    prof: dict[str, Any] | None = None
    if profile:
        prof = {"error": "py-spy is not installed (pip install -e '.[bench]')"}
        if spy is not None:
            try:
                _, spy_err = spy.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                spy.kill()
                _, spy_err = spy.communicate()
            prof = ({"pid": spy_pid, "raw": str(spy_out), **summarise_profile(spy_out)}
                    if spy_out.exists() else {"error": (spy_err or "no output")[-300:]})
    ok, failed = _sipp_counts(stat)
    turns = [t for t in _turns_between(server.store_path, w0, w1) if t["input"] == "speech"]
    lat = [t["latency_ms"] for t in turns if t["latency_ms"] is not None]
    probe_lat = [r["caller_latency_ms"] for r in probe_res.get("turns", [])
                 if r["input"] == "speech" and r.get("caller_latency_ms") is not None
                 and not r.get("warmup") and r.get("menu_turn")]
    return {
        "calls": calls, "workers": server.workers, "window_s": round(elapsed, 1),
        "sipp_exit": proc.returncode, "sipp_ok": ok, "sipp_failed": failed,
        "sipp_stderr": (err or "")[-500:],
        "call_results": _call_results(server.store_path, t_start),
        "failed": (failed or 0) + (1 if probe_turns and probe_res.get("error") else 0),
        "cpu_cores_voicebot": round(cpu_vb / elapsed, 3),
        "cpu_cores_total": round(cpu_all / elapsed, 3),
        "cpu_pct_per_call": round(100 * cpu_all / elapsed / calls, 2),
        "pss_mb": round(max(pss_samples), 1) if pss_samples else None,
        "processes": len(vb),
        "bot_turn_latency_ms": summary(lat), "speech_turns": len(turns),
        "turn_results": {k: sum(1 for t in turns if t["result"] == k)
                         for k in sorted({str(t["result"]) for t in turns})},
        "probe_latency_ms": summary(probe_lat),
        "probe_error": probe_res.get("error"),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        **({"profile": prof} if prof is not None else {}),
    }


def _sipp_counts(stat: Path) -> tuple[int | None, int | None]:
    try:
        lines = stat.read_text(encoding="latin-1").strip().splitlines()
    except OSError:
        return None, None
    if len(lines) < 2:
        return None, None
    head = lines[0].split(";")
    last = lines[-1].split(";")
    try:
        return (int(last[head.index("SuccessfulCall(C)")]), int(last[head.index("FailedCall(C)")]))
    except (ValueError, IndexError):
        return None, None


def baseline_pss(server: BotServer) -> float:
    """Sum of PSS over the idle voicebot processes: the loaded models, shared by the workers."""
    return round(sum(pss_mb(p) for p in server.voicebot_pids()), 1)


def capacity(cfg: Config, folder: Path, port: int, steps: list[int], workers: int,
             hold_s: float, warm_s: float, compare_workers: list[int] | None = None,
             probe_turns: int = 6, p95_limit: float = 800.0) -> dict[str, Any]:
    """Ramp concurrent calls through ``voicebot serve --workers N`` behind Kamailio."""
    out: dict[str, Any] = {"workers": workers, "cores": os.cpu_count(), "hold_s": hold_s,
                           "warm_s": warm_s, "steps": [], "p95_limit_ms": p95_limit}
    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sipp-", dir=folder))
    with BotServer(cfg, folder / f"serve-w{workers}", port, workers) as server:
        time.sleep(2.0)
        out["idle_pss_mb"] = baseline_pss(server)
        for n in steps:
            # The top step is profiled: where the time goes when calls queue for CPU.
            step = capacity_step(server, work, n, hold_s, warm_s, probe_turns,
                                 profile=n == steps[-1])
            step["ok"] = _step_ok(step, p95_limit)
            out["steps"].append(step)
            time.sleep(3.0)  # let the last BYEs and records settle
    good = [s for s in out["steps"] if s["ok"]]
    best = max(good, key=lambda s: s["calls"]) if good else None
    out["max_calls_p95_800ms"] = best["calls"] if best else 0
    out["pss_mb_at_max"] = best["pss_mb"] if best else None
    if compare_workers:
        # Compare at the target's 40 calls (or the best step below it): every setting holds it.
        top = min(best["calls"] if best else steps[0], 40)
        cmp_rows = []
        for w in compare_workers:
            if w * cfg.sip.max_calls < top:
                continue
            with BotServer(cfg, folder / f"serve-w{w}", port, w) as server:
                time.sleep(2.0)
                step = capacity_step(server, work, top, hold_s, warm_s, probe_turns)
                step["ok"] = _step_ok(step, p95_limit)
                step["workers_per_core"] = round(w / (os.cpu_count() or 1), 2)
                cmp_rows.append(step)
        out["workers_compare"] = cmp_rows
        okc = [r for r in cmp_rows if r["ok"]] or cmp_rows
        if okc:
            bestw = min(okc, key=lambda r: (r["bot_turn_latency_ms"]["p95"] or 1e9))
            out["best_workers_per_core"] = bestw["workers_per_core"]
    return out


def _step_ok(step: dict[str, Any], limit: float) -> bool:
    p95 = step["bot_turn_latency_ms"]["p95"]
    probe95 = step["probe_latency_ms"]["p95"]
    worst = max(x for x in (p95, probe95, 0.0) if x is not None)
    return (step["failed"] == 0 and step["sipp_exit"] == 0 and p95 is not None
            and worst <= limit and step["speech_turns"] > 0)
