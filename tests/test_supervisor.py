"""The supervisor keeps the line up: real `voicebot serve` processes killed with SIGKILL.

Single-worker mode is a forked, supervised worker too: a worker that dies (a PJSIP
assertion abort, a kill) is restarted with backoff and the next call is answered. A
worker killed during calls costs only its own calls, which the restarted worker closes
as ``interrupted`` (start-up recovery); the other worker's calls go on untouched. When
the supervisor itself is killed, its workers and Kamailio go with it, and the next start
on the same ports cleans up whatever could not die (here: a frozen worker) and answers.
What callers heard is judged from the softphone's side.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sipbot import VOICEBOT, Bot, sip_options, start_bot

from voicebot.errors import VoicebotError
from voicebot.server import PID_FILE, proc_start, reclaim_stale, write_pid_file
from voicebot.store import CallRecord

pytestmark = pytest.mark.slow

AT = "2026-11-23T10:30"  # a Monday in working hours


# --- processes, from /proc ---


def live(pid: int) -> bool:
    """A process that exists and is not a zombie (a zombie holds no port)."""
    return proc_start(pid) is not None


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid and stat[0] not in "ZX":
                out.append(int(d.name))
    return out


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for c in children(todo.pop()):
            found.append(c)
            todo.append(c)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def port_free(port: int) -> bool:
    """Nobody holds 127.0.0.1:port, UDP or TCP."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as s:
            if kind == socket.SOCK_STREAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def wait_for(cond: Callable[[], Any], timeout: float, what: str, bot: Bot | None = None) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"{what} not within {timeout} s" +
                         (f":\n{bot.log()[-4000:]}" if bot else ""))


def worker_pids(bot: Bot) -> dict[int, int]:
    """worker index -> pid of the newest process for it, from the supervisor's log."""
    found: dict[int, int] = {}
    for m in re.finditer(r"worker (\d+) started \(pid (\d+)\)", bot.log()):
        found[int(m.group(1))] = int(m.group(2))
    return found


def restarted(bot: Bot, index: int, old: int, port: int) -> int:
    """The pid of worker ``index``'s next process, once it answers SIP on ``port``."""
    new = wait_for(lambda: worker_pids(bot).get(index) != old and worker_pids(bot)[index],
                   20, f"a restart of worker {index}", bot)
    assert new in children(bot.proc.pid), "the new worker is not the supervisor's child"
    wait_for(lambda: sip_options("127.0.0.1", port) is not None, 30,
             f"worker {index} answering on {port}", bot)
    return int(new)


# --- calls ---


def softphone(bot: Bot, *args: str, port: int | None = None) -> subprocess.Popen[str]:
    uri = f"sip:{bot.number}@127.0.0.1:{port or bot.port}"
    return subprocess.Popen([VOICEBOT, "--config", str(bot.config_path), "call", uri, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rows_of(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def finish(proc: subprocess.Popen[str], timeout: float = 150) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def served_call(code: int, out: str, err: str) -> str:
    """The SIP Call-ID of a `--press 3 --press 2` call that went as it should."""
    assert code == 0, err[-2000:]
    rows = [r for r in rows_of(out) if "option" in r]
    assert [r["option"] for r in rows] == ["lang.en", "main.hours"], out
    return str(rows[0]["sip_call_id"])


def heard(out: str) -> list[dict[str, Any]]:
    """The prompts the softphone found in the audio it received (`voicebot call --heard`)."""
    (found,) = [r["heard"] for r in rows_of(out) if isinstance(r.get("heard"), list)]
    return [h for h in found if h["key"]]


def sigterm_with_a_call_in_progress(bot: Bot, port: int | None = None) -> CallRecord:
    """SIGTERM the supervisor during a call: the caller hears the goodbye, exit code 0."""
    before = bot.log().count("option=lang.en")
    caller = softphone(bot, "--press", "3", "--silent", "--silent", "--silent", "--heard",
                       "--json", "--timeout", "120", port=port)
    wait_for(lambda: bot.log().count("option=lang.en") > before, 90, "the language turn", bot)
    time.sleep(1.0)
    assert bot.stop(signal.SIGTERM) == 0, bot.log()[-3000:]
    code, out, err = finish(caller, 60)
    assert code == 0, err[-2000:]
    got = heard(out)
    # The shutdown goodbye is the pack's call_ending prompt, heard whole.
    assert any(h["key"] == "call_ending" and h["whole"] for h in got), \
        f"the caller did not hear the goodbye: {[(h['key'], h['whole']) for h in got]}"
    (sip_id,) = {r["sip_call_id"] for r in rows_of(out)}
    (rec,) = bot.calls(sip_id)
    assert rec.ended_by == "bot" and rec.reason == "shutdown", rec
    return rec


def assert_playable(rec: CallRecord) -> None:
    assert rec.recording, rec
    with wave.open(rec.recording) as w:
        assert w.getnchannels() == 1 and w.getnframes() > 0


def no_part_files(bot: Bot) -> list[Path]:
    return [p for p in (bot.folder / "var" / "recordings").rglob("*") if ".part" in p.name]


def start_again(bot: Bot, workers: int) -> Bot:
    """The same `voicebot serve` (config, var/, ports) started anew, as a service manager
    restarts it."""
    log_path = bot.folder / "serve-again.log"
    proc = subprocess.Popen([VOICEBOT, "serve", "--config", str(bot.config_path), "--workers",
                             str(workers), "--at", AT], stdout=log_path.open("w"),
                            stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    again = Bot(bot.folder, bot.config_path, bot.cfg, bot.port, proc, log_path)
    ports = [bot.port, *bot.worker_ports(workers)]  # Kamailio in front, in every mode

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"voicebot serve exited with {proc.returncode}:\n{again.log()}")
        return all(sip_options("127.0.0.1", p) is not None for p in ports)

    wait_for(ready, 90, "the new voicebot serve answering", again)
    return again


# --- the tests ---


def test_single_worker_is_restarted_with_backoff_and_answers(tmp_path: Path):
    bot = start_bot(tmp_path, workers=1, at=AT)
    try:
        (first,) = [p for p in children(bot.proc.pid) if "voicebot" in cmdline(p)]
        assert worker_pids(bot) == {0: first}
        # Kamailio is in front of the one worker too (the front door: ACL, flood, scanners).
        assert [p for p in children(bot.proc.pid) if "kamailio" in cmdline(p)], bot.log()
        worker_port = bot.cfg.sip.worker_port
        os.kill(first, signal.SIGKILL)
        second = restarted(bot, 0, first, worker_port)
        assert re.search(rf"worker 0 \(pid {first}\) died: killed by SIGKILL after [\d.]+ s; "
                         r"restart 1 of this bot in 0\.5 s", bot.log()), bot.log()[-2000:]
        os.kill(second, signal.SIGKILL)  # dies again at once: the backoff doubles
        restarted(bot, 0, second, worker_port)
        assert re.search(rf"worker 0 \(pid {second}\) died: killed by SIGKILL after [\d.]+ s; "
                         r"restart 2 of this bot in 1\.0 s", bot.log()), bot.log()[-2000:]
        pid_file = json.loads((bot.folder / "var" / PID_FILE).read_text())
        assert pid_file["supervisor"]["pid"] == bot.proc.pid and pid_file["restarts"] == 2
        assert pid_file["workers"]["0"]["pid"] == worker_pids(bot)[0]
        # The line is back: a call is answered and served; SIGTERM still says goodbye.
        rec = sigterm_with_a_call_in_progress(bot)
        assert rec.path[:1] == ["lang.en"] and rec.worker == 0
        assert not children(bot.proc.pid) and not (bot.folder / "var" / PID_FILE).exists()
    finally:
        bot.stop(signal.SIGKILL)


def test_worker_killed_during_six_calls(tmp_path: Path):
    """kill -9 of one of two workers with 6 calls up: its calls are closed as interrupted
    (recordings repaired) after its restart; the other worker's calls complete."""
    bot = start_bot(tmp_path, workers=2, at=AT)
    try:
        # The killed worker's callers hear silence until their softphone gives up (80 s);
        # the others' calls take about 60 s on a busy 2-core machine.
        callers = [softphone(bot, "--press", "3", "--press", "2", "--barge-in", "--json",
                             "--timeout", "80") for _ in range(6)]
        answered = wait_for(lambda: (lambda rs: len(rs) == 6 and all(r.answered_at for r in rs)
                                     and rs)(bot.calls()), 90, "six answered calls", bot)
        by_worker: dict[int, list[str]] = {}
        for r in answered:
            by_worker.setdefault(int(r.worker or 0), []).append(r.id)
        assert set(by_worker) == {0, 1}, f"Kamailio did not spread the calls: {by_worker}"
        victim_index = 1
        victims = by_worker[victim_index]
        # Kill once the victim's calls are being recorded, so there are .part files to save.
        wait_for(lambda: all(f"call={c} worker=1 event=recording" in bot.log() for c in victims),
                 60, "the victim's recordings", bot)
        time.sleep(3.0)  # some audio on disk: a recording killed in its first 0.3 s is empty
        victim = worker_pids(bot)[victim_index]
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        restarted(bot, victim_index, victim, bot.cfg.sip.worker_port + victim_index)
        assert re.search(rf"worker 1 \(pid {victim}\) died: killed by SIGKILL after [\d.]+ s; "
                         r"restart 1 of this bot in 0\.5 s", bot.log()), bot.log()[-2000:]
        results = [finish(c) for c in callers]
        survivors = [served_call(*r) for r in results
                     if r[0] == 0 and len([x for x in rows_of(r[1]) if "option" in x]) == 2]
        records = {r.id: r for r in bot.wait_calls(6, timeout=60)}
        assert len(records) == 6, records  # every call has a record
        for cid in by_worker[0]:  # untouched by the other worker's death
            rec = records[cid]
            assert rec.result == "completed" and rec.path == ["lang.en", "main.hours"], rec
            assert rec.sip_call_id in survivors
            assert_playable(rec)
        interrupted = [records[c] for c in victims if records[c].result == "interrupted"]
        for cid in victims:
            rec = records[cid]
            assert rec.result in ("interrupted", "completed"), rec
            if rec.result == "interrupted":
                assert rec.ended_by == "restart" and rec.worker == victim_index, rec
                assert_playable(rec)  # the .part recording was repaired and linked
        assert interrupted, "no call of the killed worker was in progress when it died"
        assert not no_part_files(bot), no_part_files(bot)
        listed = bot.cli("calls", "--json", "--last", "20")
        assert listed.returncode == 0, listed.stderr
        shown = {r["id"]: r["result"] for r in rows_of(listed.stdout)}
        assert all(shown[c] == records[c].result for c in records), shown
        print(f"worker killed {time.monotonic() - killed_at:.1f} s before the end; "
              f"{len(interrupted)} call(s) interrupted, {len(by_worker[0])} untouched")
    finally:
        assert bot.stop() == 0, bot.log()[-3000:]


def test_killed_supervisor_takes_everything_with_it_and_next_start_recovers(tmp_path: Path):
    bot = start_bot(tmp_path, workers=2, at=AT)
    again: Bot | None = None
    frozen = 0
    try:
        sup = bot.proc.pid
        family = descendants(sup)
        workers = worker_pids(bot)
        kamailio = [p for p in family if "kamailio" in cmdline(p)]
        # The pid that was started is the supervisor: the workers and Kamailio are its own.
        assert set(workers.values()) | {kamailio[0]} <= set(children(sup))
        assert len(workers) == 2 and len(kamailio) >= 2
        # A second bot on the same var/ refuses at once and says how to stop the first.
        second = bot.cli("serve", "--workers", "2")
        assert second.returncode == 2 and f"already running as pid {sup}" in second.stderr, \
            second.stderr
        # A worker that cannot act on its supervisor's death (stopped: it ignores even its
        # parent-death signal until it runs again) is what the next start must clean up.
        frozen = workers[1]
        os.kill(frozen, signal.SIGSTOP)
        os.kill(sup, signal.SIGKILL)
        bot.proc.wait(10)
        gone = [p for p in family if p != frozen]
        wait_for(lambda: not any(live(p) for p in gone), 15,
                 f"the supervisor's processes gone: {[p for p in gone if live(p)]}")
        assert live(frozen)
        wait_for(lambda: port_free(bot.port) and port_free(bot.cfg.sip.worker_port), 5,
                 "the public and worker 0's SIP ports free")
        assert not port_free(bot.cfg.sip.worker_port + 1)  # the frozen one still holds its port
        again = start_again(bot, workers=2)
        assert f"stopping worker 1 (pid {frozen})" in again.log(), again.log()[-3000:]
        assert not live(frozen)
        # It answers: a call is served (the language chosen), and SIGTERM in worker mode
        # still gives the caller the goodbye, through Kamailio, and exits 0.
        rec = sigterm_with_a_call_in_progress(again)
        assert rec.path[:1] == ["lang.en"]
        assert not descendants(again.proc.pid)
    finally:
        if frozen and live(frozen):
            os.kill(frozen, signal.SIGKILL)
        for b in (bot, again):
            if b is not None:
                b.stop(signal.SIGKILL)


def test_stale_pid_file_orphans_are_stopped_and_a_live_bot_is_named(tmp_path: Path):
    """reclaim_stale on real processes: orphans of a dead supervisor are stopped (SIGTERM,
    SIGKILL when ignored); a live supervisor is an error naming it."""
    path = tmp_path / "var" / PID_FILE
    dead = subprocess.Popen(["true"])
    dead.wait()
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal("
                                 "signal.SIGTERM, signal.SIG_IGN); print('ok', flush=True); "
                                 "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    polite = subprocess.Popen(["sleep", "60"])
    try:
        assert stubborn.stdout is not None and stubborn.stdout.readline() == "ok\n"
        entry = {"pid": dead.pid, "start": 1}
        write_pid_file(path, {"supervisor": entry, "listen": "127.0.0.1:5060", "kamailio": None,
                              "workers": {str(i): {"pid": p.pid, "start": proc_start(p.pid)}
                                          for i, p in enumerate((polite, stubborn))}})
        t0 = time.monotonic()
        assert reclaim_stale(path, wait_s=1.0) == sorted([polite.pid, stubborn.pid])
        assert polite.wait(5) == -signal.SIGTERM and stubborn.wait(5) == -signal.SIGKILL
        assert time.monotonic() - t0 < 5 and not path.exists()
        # A pid file naming a live supervisor: refuse, say which and how to stop it.
        me = {"pid": os.getppid(), "start": proc_start(os.getppid())}
        write_pid_file(path, {"supervisor": me, "listen": "127.0.0.1:5060", "workers": {}})
        with pytest.raises(VoicebotError, match=rf"already running as pid {os.getppid()}.*kill"):
            reclaim_stale(path)
        assert path.exists()
        # A reused pid (same number, another start time) is not ours: nothing is touched.
        other = subprocess.Popen(["sleep", "60"])
        write_pid_file(path, {"supervisor": entry, "workers": {"0": {"pid": other.pid,
                                                                      "start": 1}}})
        assert reclaim_stale(path) == [] and other.poll() is None
        other.kill()
        other.wait()
    finally:
        for p in (stubborn, polite):
            if p.poll() is None:
                p.kill()
                p.wait()
