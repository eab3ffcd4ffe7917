"""Capacity by processes: `voicebot serve --workers 3` behind a real Kamailio.

Ten calls at once spread over three pjsua2 workers (4 calls each), every one with a
complete record and a recording; then a worker is killed and the calls routed after
that still complete (Kamailio's health checks and failover, the supervisor's restart).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sipbot import Bot, start_bot

pytestmark = pytest.mark.slow


def dial(bot: Bot) -> subprocess.CompletedProcess[str]:
    return bot.call("--press", "3", "--press", "2", "--barge-in", "--json", timeout=240)


def call_ids(outs: list[subprocess.CompletedProcess[str]]) -> list[str]:
    ids = []
    for out in outs:
        assert out.returncode == 0, out.stderr[-2000:]
        rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        assert len(rows) == len(out.stdout.splitlines()), f"stray output: {out.stdout}"
        assert [r["option"] for r in rows] == ["lang.en", "main.hours"], out.stdout
        ids.append(rows[0]["sip_call_id"])
    return ids


def worker_pids(bot: Bot) -> dict[int, int]:
    """worker index -> pid of the newest process for it, from the supervisor's log."""
    found: dict[int, int] = {}
    for m in re.finditer(r"worker (\d+) started \(pid (\d+)\)", bot.log()):
        found[int(m.group(1))] = int(m.group(2))
    return found


def test_ten_concurrent_calls_through_kamailio_survive_a_killed_worker(tmp_path: Path):
    bot = start_bot(tmp_path, workers=3)
    try:
        with ThreadPoolExecutor(10) as pool:
            first = list(pool.map(lambda _: dial(bot), range(10)))
        ids = call_ids(first)
        records = [bot.wait_call(i) for i in ids]
        assert {r.worker for r in records} == {0, 1, 2}  # the load was spread
        for rec in records:
            assert rec.result == "completed" and rec.language == "en"
            assert rec.path == ["lang.en", "main.hours"]
            assert rec.recording and Path(rec.recording).stat().st_size > 1000

        victim = worker_pids(bot)[1]
        os.kill(victim, signal.SIGKILL)
        with ThreadPoolExecutor(4) as pool:
            after = list(pool.map(lambda _: dial(bot), range(4)))
        for rec in (bot.wait_call(i) for i in call_ids(after)):
            assert rec.result == "completed" and rec.path == ["lang.en", "main.hours"]
        deadline = time.monotonic() + 20
        while worker_pids(bot)[1] == victim and time.monotonic() < deadline:
            time.sleep(0.2)
        assert worker_pids(bot)[1] != victim, "the dead worker was not restarted"
        assert "kamailio" in bot.log() and "memory:" in bot.log()
    finally:
        assert bot.stop() == 0, bot.log()[-3000:]
