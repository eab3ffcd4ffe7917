"""`voicebot bench --soak MINUTES`: speaking calls through the workers for a long time.

The bot is the real ``voicebot serve --workers N`` behind Kamailio (a child process with
its own config, store and ports, as in the capacity ramp). The load is the capacity
ramp's: sipp callers that pick Korean with an RFC 4733 key and then speak "운영 시간"
into every reply; each call hangs up after ``hold_s`` and sipp places a new one, so
calls keep turning over and every one of them must end up recorded. One of the calls
is always the pjsua2 probe (:mod:`voicebot.bench.probe`), one probe call after another,
measuring turn latency as the caller hears it.

Each minute: PSS summed over every voicebot and Kamailio process, their open file
descriptors (/proc/PID/fd), and the turn latency of that minute (the probe's caller-side
turns, and every speech turn the bot stored). At the end sipp is asked to stop (SIGUSR1:
no new calls, the running ones finish), and the calls sipp and the probe started are
compared with the bot's own records (`voicebot calls --json`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ..config import Config
from .common import machine_info, pss_mb, summary
from .sip import SCENARIO, SIPP_DTMF, BotServer, load_wav, run_probe

CALLS_PER_WORKER = 4  # pjsua2 is built with PJSUA_MAX_CALLS = 4
# Spoken turns per probe call: each call first sits through the ~27 s welcome and
# language menu, so a long soak makes longer probe calls (more latency samples a minute).
PROBE_TURNS_SHORT = 6
PROBE_TURNS_LONG = 12
CALL_ID_PREFIX = "soak"
# "No growth after the first minute": the last minute may be at most this much above the
# first (calls turn over, so the number open at a sample, with their sockets and buffers,
# moves a little from one sample to the next).
PSS_GROWTH_PCT = 5.0
FD_GROWTH_PCT = 5.0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, PermissionError, ProcessLookupError):
        return 0


def sample(server: BotServer) -> dict[str, Any]:
    """PSS and open descriptors summed over the bot's processes (voicebot and Kamailio)."""
    pids = server.all_pids()
    return {"pss_mb": round(sum(pss_mb(p) for p in pids), 1),
            "open_fds": sum(open_fds(p) for p in pids), "processes": len(pids)}


def _sipp_stat(stat: Path) -> dict[str, int]:
    """The last row of sipp's statistics file: cumulative counters."""
    try:
        lines = stat.read_text(encoding="latin-1").strip().splitlines()
    except OSError:
        return {}
    if len(lines) < 2:
        return {}
    head, last = lines[0].split(";"), lines[-1].split(";")
    out = {}
    for key in ("OutgoingCall(C)", "SuccessfulCall(C)", "FailedCall(C)", "CurrentCall"):
        if key in head:
            with contextlib.suppress(ValueError, IndexError):
                out[key] = int(last[head.index(key)])
    return out


def bot_records(server: BotServer) -> list[dict[str, Any]]:
    """Every call in the bot's store, as `voicebot calls --json` shows it."""
    cmd = [sys.executable, "-m", "voicebot", "--config", str(server.config_file), "calls",
           "--json", "--last", "1000000"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"voicebot calls failed ({out.returncode}): {out.stderr[-1000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _epoch(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return dt.datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


class _Prober(threading.Thread):
    """Probe calls one after another until told to stop; every call's turns, timed."""

    def __init__(self, server: BotServer, turns: int) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.turns = turns
        self.stop = threading.Event()
        self.calls: list[dict[str, Any]] = []

    def run(self) -> None:
        seed = 0
        while not self.stop.is_set():
            t0 = time.time()
            res = run_probe(self.server, self.turns, 300, 60 + 8 * self.turns, seed)
            self.calls.append({"wall_start": t0, "wall_end": time.time(), **res})
            seed += 1
            if res.get("error"):
                self.stop.wait(2.0)  # a failed probe: do not spin


def soak(cfg: Config, folder: Path, port: int, minutes: float, calls: int = 40,
         workers: int | None = None, hold_s: float | None = None) -> dict[str, Any]:
    """``calls`` concurrent speaking calls (sipp + the probe) for ``minutes``."""
    sipp = shutil.which("sipp")
    if sipp is None:
        raise FileNotFoundError("sipp is not installed (apt-get install sip-tester)")
    if calls < 2:
        raise ValueError("--soak-calls must be at least 2 (the probe and one sipp caller)")
    # Always behind Kamailio (at least 2 workers), every call with a slot of its own.
    workers = workers or max(2, math.ceil(calls / CALLS_PER_WORKER))
    duration = minutes * 60.0
    # Calls turn over a few times a minute in a short soak, once a minute in a long one.
    hold = hold_s or min(60.0, max(20.0, duration / 3))
    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="soak-", dir=folder))
    wav = load_wav(cfg, work / "load.wav")
    scen = work / "soak_uac.xml"
    scen.write_text(SCENARIO.format(dtmf=SIPP_DTMF / "dtmf_2833_4.pcap", wav=wav,
                                    hold_ms=int(hold * 1000)), encoding="utf-8")
    stat = work / "sipp_soak.csv"
    n_sipp = calls - 1
    probe_turns = PROBE_TURNS_SHORT if minutes < 3 else PROBE_TURNS_LONG
    out: dict[str, Any] = {"minutes": minutes, "calls": calls, "workers": workers,
                           "hold_s": hold, "sipp_callers": n_sipp, "probe_turns": probe_turns}
    server = BotServer(cfg, folder / f"serve-w{workers}", port, workers)
    server.start()
    try:
        time.sleep(2.0)
        out["idle"] = sample(server)
        cmd = [sipp, f"127.0.0.1:{server.port}", "-sf", str(scen), "-l", str(n_sipp),
               "-r", "10", "-i", "127.0.0.1", "-p", str(server.port + 900),
               "-mi", "127.0.0.1", "-mp", str(20000 + (server.port % 1000) * 10),
               "-cid_str", f"{CALL_ID_PREFIX}-%u-%p@%s",
               "-nostdin", "-trace_stat", "-stf", str(stat), "-fd", "5", "-trace_err",
               "-error_file", str(work / "sipp_errors.log"),
               # A safety net only: sipp is stopped by SIGUSR1 at the end of the soak.
               "-timeout", str(int(duration + hold + 180)), "-timeout_error"]
        t_start = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, cwd=work)
        prober = _Prober(server, probe_turns)
        time.sleep(calls / 10.0)  # sipp's ramp-up at 10 calls/s
        prober.start()
        per_minute: list[dict[str, Any]] = []
        n_minutes = max(1, math.ceil(minutes))
        for m in range(1, n_minutes + 1):
            end = t_start + min(duration, m * 60.0)
            while time.time() < end and proc.poll() is None:
                time.sleep(min(1.0, max(0.0, end - time.time())))
            s = sample(server)
            st = _sipp_stat(stat)
            s.update({"minute": m, "t_s": round(time.time() - t_start, 1),
                      "sipp_open_calls": st.get("CurrentCall"),
                      "sipp_calls_started": st.get("OutgoingCall(C)"),
                      "sipp_failed": st.get("FailedCall(C)")})
            per_minute.append(s)
            print(f"soak: minute {m}: PSS {s['pss_mb']} MB, {s['open_fds']} fds, "
                  f"{s['sipp_open_calls']} sipp calls open, {s['sipp_failed']} failed",
                  flush=True)
            if proc.poll() is not None:
                break
        t_load_end = time.time()
        # Stop: no new calls; sipp's running calls and the probe's last call finish.
        prober.stop.set()
        if proc.poll() is None:
            proc.send_signal(signal.SIGUSR1)
        try:
            _, err = proc.communicate(timeout=hold + 120)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        prober.join(timeout=60 + 8 * probe_turns + 60)
        out["sipp_exit"] = proc.returncode
        out["sipp_stderr"] = (err or "")[-500:]
        time.sleep(5.0)  # the last BYEs: records are finalised after the call ends
        t_wait = time.monotonic()
        live = _wait_records(server, stat, prober)
        out["records_wait_s"] = round(time.monotonic() - t_wait, 1)
    finally:
        server.stop()
    # What a running bot shows (its store may still be writing the last ends), and what its
    # store holds once it has stopped: the target is every call in the latter, and the
    # former shows how far behind the store's writer is.
    final = bot_records(server)
    out.update(_summarise(per_minute, final, stat, prober, t_start, t_load_end, proc.pid))
    live_ids = {r.get("sip_call_id") for r in live if r.get("ended_at")}
    missing_live = [i for i in out["expected_call_ids"] if i not in live_ids]
    out["missing_while_running"] = missing_live[:20]
    out["calls_recorded_while_running"] = out["calls_started"] - len(missing_live)
    del out["expected_call_ids"]
    return out


def _wait_records(server: BotServer, stat: Path, prober: _Prober,
                  timeout: float = 30.0) -> list[dict[str, Any]]:
    """The bot's records once every call started has an ended record (or ``timeout``)."""
    started = (_sipp_stat(stat).get("OutgoingCall(C)") or 0) + sum(
        1 for c in prober.calls if c.get("sip_call_id"))
    end = time.monotonic() + timeout
    while True:
        recs = bot_records(server)
        if sum(1 for r in recs if r.get("ended_at")) >= started or time.monotonic() > end:
            return recs
        time.sleep(2.0)


def _summarise(per_minute: list[dict[str, Any]], records: list[dict[str, Any]], stat: Path,
               prober: _Prober, t_start: float, t_load_end: float, sipp_pid: int
               ) -> dict[str, Any]:
    st = _sipp_stat(stat)
    by_id = {r.get("sip_call_id"): r for r in records}
    probe_ids = [c["sip_call_id"] for c in prober.calls if c.get("sip_call_id")]
    probe_failed = sum(1 for c in prober.calls if c.get("error"))
    sipp_started = st.get("OutgoingCall(C)") or 0
    sipp_failed = st.get("FailedCall(C)") or 0
    # sipp numbers its calls 1..N: with -cid_str every Call-ID is known in advance.
    expected = [f"{CALL_ID_PREFIX}-{n}-{sipp_pid}@127.0.0.1" for n in
                range(1, sipp_started + 1)] + probe_ids
    started = len(expected)
    ended = [by_id[i] for i in expected if i in by_id and by_id[i].get("ended_at")]
    missing = [i for i in expected if not (i in by_id and by_id[i].get("ended_at"))]
    results: dict[str, int] = {}
    for r in ended:
        key = f"{r.get('result')}/{r.get('ended_by')}"
        results[key] = results.get(key, 0) + 1
    # Turn latency per minute: the probe's (caller side) by when each turn was spoken; the
    # bot's (every speech turn of every call) by the call's start plus the turn's time.
    n = len(per_minute)
    probe_lat: list[list[float]] = [[] for _ in range(n)]
    for c in prober.calls:
        for row in c.get("turns", []):
            if (row.get("input") != "speech" or row.get("caller_latency_ms") is None
                    or row.get("warmup") or not row.get("menu_turn")):
                continue
            m = int((c["wall_start"] + row["sent_ms"] / 1000.0 - t_start) // 60)
            if 0 <= m < n:
                probe_lat[m].append(float(row["caller_latency_ms"]))
    bot_lat: list[list[float]] = [[] for _ in range(n)]
    for r in records:
        t0 = _epoch(r.get("answered_at") or r.get("started_at"))
        if t0 is None:
            continue
        for turn in r.get("turns") or []:
            if turn.get("input") != "speech" or turn.get("latency_ms") is None:
                continue
            m = int((t0 + float(turn.get("t_ms") or 0.0) / 1000.0 - t_start) // 60)
            if 0 <= m < n:
                bot_lat[m].append(float(turn["latency_ms"]))
    for i, row in enumerate(per_minute):
        p, b = summary(probe_lat[i]), summary(bot_lat[i])
        row["probe_latency_ms"] = {k: p.get(k) for k in ("p50", "p95", "n")}
        row["bot_latency_ms"] = {k: b.get(k) for k in ("p50", "p95", "n")}
    first = per_minute[0] if per_minute else {}
    last = per_minute[-1] if per_minute else {}

    def growth(key: str) -> float | None:
        if not first or not first.get(key):
            return None
        return round(100.0 * (max(r[key] for r in per_minute) - first[key]) / first[key], 1)

    return {
        "per_minute": per_minute,
        "load_s": round(t_load_end - t_start, 1),
        "calls_started": started, "sipp_calls_started": sipp_started,
        "probe_calls_started": len(probe_ids),
        "calls_recorded": len(ended),
        "calls_missing": len(missing), "missing_call_ids": missing[:20],
        "probe_call_ids": probe_ids, "expected_call_ids": expected,
        "call_results": results,
        "failures": sipp_failed + probe_failed,
        "sipp_failed": sipp_failed, "probe_failed": probe_failed,
        "probe_errors": [c["error"][-300:] for c in prober.calls if c.get("error")][:5],
        "pss_growth_pct": growth("pss_mb"), "fd_growth_pct": growth("open_fds"),
        "pss_mb_first_last": [first.get("pss_mb"), last.get("pss_mb")],
        "open_fds_first_last": [first.get("open_fds"), last.get("open_fds")],
        "probe_latency_ms": summary([x for m in probe_lat for x in m]),
        "bot_latency_ms": summary([x for m in bot_lat for x in m]),
    }


def targets(s: dict[str, Any]) -> list[dict[str, Any]]:
    def row(what: str, value: float | None, ok: bool | None, shown: str) -> dict[str, Any]:
        return {"what": what, "measured": "not measured" if value is None else shown,
                "met": None if value is None else ok, "value": value}

    pss, fds = s.get("pss_growth_pct"), s.get("fd_growth_pct")
    p95 = (s.get("probe_latency_ms") or {}).get("p95")
    return [
        row("failed calls = 0", s.get("failures"), s.get("failures") == 0,
            f"{s.get('failures')} ({s.get('sipp_failed')} sipp, {s.get('probe_failed')} probe)"),
        row("every call started is recorded", s.get("calls_recorded"),
            s.get("calls_missing") == 0,
            f"{s.get('calls_recorded')} of {s.get('calls_started')} recorded"),
        row(f"PSS: no growth after the first minute (<= {PSS_GROWTH_PCT:.0f}%)", pss,
            pss is not None and pss <= PSS_GROWTH_PCT, f"{pss}% (peak above minute 1)"),
        row(f"open fds: no growth after the first minute (<= {FD_GROWTH_PCT:.0f}%)", fds,
            fds is not None and fds <= FD_GROWTH_PCT, f"{fds}% (peak above minute 1)"),
        row("probe turn latency p95 <= 800 ms (caller side, under load)", p95,
            p95 is not None and p95 <= 800, f"{p95} ms"),
    ]


def plot(s: dict[str, Any], folder: Path, name: str) -> str:
    """PSS and turn latency per minute, one PNG; returns its file name."""
    from .report import _plt

    plt = _plt()
    rows = s.get("per_minute") or []
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(6.5, 5.5), sharex=True)
    x = [r["minute"] for r in rows]
    # Minute 0 is the idle bot before the load: what the calls add on top of it.
    idle = s.get("idle") or {}
    x0 = [0, *x] if idle else x
    ax1.plot(x0, ([idle["pss_mb"]] if idle else []) + [r["pss_mb"] for r in rows], marker="o",
             label="PSS, all processes (MB)")
    ax1.set_ylabel("PSS (MB)")
    ax1b = ax1.twinx()
    ax1b.plot(x0, ([idle["open_fds"]] if idle else []) + [r["open_fds"] for r in rows],
              marker="s", color="tab:green", label="open fds")
    ax2.set_xticks(x0)
    ax1b.set_ylabel("open file descriptors")
    ax1.set_title(f"Soak: {s.get('calls')} speaking calls, {s.get('workers')} workers + "
                  "Kamailio")
    lines = ax1.get_legend_handles_labels()[0] + ax1b.get_legend_handles_labels()[0]
    ax1.legend(lines, ["PSS (MB)", "open fds"], loc="lower right", fontsize=8)
    for key, who, style in (("probe_latency_ms", "probe (caller side)", "-"),
                            ("bot_latency_ms", "bot (all calls)", "--")):
        for q in ("p50", "p95"):
            ax2.plot(x, [r[key][q] for r in rows], marker="o", linestyle=style,
                     label=f"{who} {q}")
    ax2.axhline(800, color="red", linestyle=":", linewidth=1)
    ax2.set_xlabel("minute of the soak (0: idle, before the load)")
    ax2.set_ylabel("turn latency (ms)")
    ax2.legend(fontsize=7)
    fn = f"{name}-soak.png"
    fig.tight_layout()
    fig.savefig(folder / fn, dpi=90)
    plt.close(fig)
    return fn


def markdown(res: dict[str, Any], png: str) -> str:
    s = res["soak"]
    m = res.get("machine") or {}
    out = [f"# voicebot soak: {res['name']}", "",
           f"{s['calls']} concurrent speaking calls ({s['sipp_callers']} sipp callers speaking "
           f"Korean into every reply, each hanging up after {s['hold_s']:.0f} s and replaced, "
           f"plus one pjsua2 probe call after another) through `voicebot serve --workers "
           f"{s['workers']}` behind Kamailio for {s['minutes']} minute(s), on "
           f"{m.get('cpu') or '?'} ({m.get('cores') or os.cpu_count()} cores). Memory is PSS "
           "summed over every voicebot and Kamailio process; descriptors are /proc/PID/fd "
           "summed over the same processes; both sampled at the end of each minute.", "",
           "## Targets", "", "| target | measured | |", "| --- | --- | --- |"]
    for t in res["targets"]:
        mark = {True: "met", False: "**MISSED**", None: "not measured"}[t["met"]]
        out.append(f"| {t['what']} | {t['measured']} | {mark} |")
    out += ["", "## Per minute", "",
            "| minute | PSS MB | open fds | processes | sipp calls open | sipp failed | "
            "probe p50 / p95 ms (n) | bot p50 / p95 ms (n) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in s["per_minute"]:
        p, b = r["probe_latency_ms"], r["bot_latency_ms"]
        out.append(f"| {r['minute']} | {r['pss_mb']} | {r['open_fds']} | {r['processes']} | "
                   f"{r['sipp_open_calls']} | {r['sipp_failed']} | {p['p50']} / {p['p95']} "
                   f"({p['n']}) | {b['p50']} / {b['p95']} ({b['n']}) |")
    out += ["", f"![PSS, descriptors and turn latency per minute]({png})", "",
            "## Calls", "",
            f"- started: {s['calls_started']} ({s['sipp_calls_started']} by sipp, "
            f"{s['probe_calls_started']} probe calls); recorded by the bot (`voicebot calls`, "
            f"ended, after the bot stopped): {s['calls_recorded']}; missing: "
            f"{s['calls_missing']}; shown while the bot still ran "
            f"({s['records_wait_s']} s after the load): {s['calls_recorded_while_running']}",
            "- results: " + ", ".join(f"{k}: {v}" for k, v in sorted(
                s["call_results"].items())),
            f"- failures: {s['failures']} (sipp {s['sipp_failed']}, probe {s['probe_failed']})",
            f"- idle before the load: PSS {s['idle']['pss_mb']} MB, {s['idle']['open_fds']} "
            "fds",
            f"- turn latency over the whole soak: probe p50 {s['probe_latency_ms'].get('p50')}"
            f" / p95 {s['probe_latency_ms'].get('p95')} ms ({s['probe_latency_ms'].get('n')} "
            f"turns); bot p50 {s['bot_latency_ms'].get('p50')} / p95 "
            f"{s['bot_latency_ms'].get('p95')} ms ({s['bot_latency_ms'].get('n')} turns)"]
    if s.get("probe_errors"):
        out += ["", "Probe errors:", ""] + [f"- `{e}`" for e in s["probe_errors"]]
    out += ["", f"Run in {res['wall_s']} s; load average at the end "
                f"{res.get('loadavg_at_end')}.", ""]
    return "\n".join(out)


def run_soak(cfg: Config, minutes: float, calls: int = 40, name: str | None = None,
             out_dir: Path | None = None, port: int = 5400) -> tuple[Path, Path]:
    """Run the soak; write <out_dir>/<name>.json, .md and -soak.png."""
    from .runner import RESULTS

    t0 = time.perf_counter()
    name = name or "soak"
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="voicebot-soak-"))
    res: dict[str, Any] = {"name": name, "kind": "soak", "machine": machine_info()}
    s = soak(cfg, work, port, minutes, calls)
    res["soak"] = s
    res["targets"] = targets(s)
    res["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    png = plot(s, out_dir, name)
    jpath, mpath = out_dir / f"{name}.json", out_dir / f"{name}.md"
    jpath.write_text(json.dumps(res, indent=1, ensure_ascii=False, default=str) + "\n",
                     encoding="utf-8")
    mpath.write_text(markdown(res, png), encoding="utf-8")
    return jpath, mpath
