"""A database outage during real calls loses nothing and drops no call.

`voicebot serve` writes to a real PostgreSQL cluster; while calls run it is stopped for
20 s (one call even starts during the outage) and started again. Every call completes
for its caller, and once the database is back `voicebot calls` shows every call with
its turns, in order: the bot's writers spooled them and flushed them when it answered.
"""

from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sipbot import start_bot
from test_store import Cluster, postgres  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow

OUTAGE_S = 20.0


def turns(out: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines()
            if line.startswith("{") and "sip_call_id" in line]


def test_postgresql_stopped_for_20_s_during_calls(postgres: Cluster, tmp_path: Path) -> None:  # noqa: F811
    bot = start_bot(tmp_path, extra=f'[store]\ndsn = "{postgres.dsn}"\n')
    try:
        with ThreadPoolExecutor(3) as pool:
            first = [pool.submit(bot.call, "--barge-in", "--press", k, "--press", "2",
                                 "--json") for k in ("3", "1")]
            time.sleep(3.0)
            postgres.stop()
            stopped = time.monotonic()
            time.sleep(2.0)
            during = pool.submit(bot.call, "--barge-in", "--press", "2", "--press", "2",
                                 "--json")
            time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped)))
            postgres.start()
            outs = [f.result(timeout=240) for f in (*first, during)]
        # Every caller got their answers: no call was dropped by the outage.
        paths = [[t["option"] for t in turns(o)] for o in outs]
        assert paths == [["lang.en", "main.hours"], ["lang.az", "main.hours"],
                         ["lang.ru", "main.hours"]], paths
        ids = [turns(o)[0]["sip_call_id"] for o in outs]
        # Once the database is back, the records arrive: all calls, all turns, in order.
        deadline = time.monotonic() + 60
        recs: dict[str, Any] = {}
        while time.monotonic() < deadline:
            listed = bot.cli("calls", "--json", "--last", "50")
            assert listed.returncode == 0, listed.stderr
            recs = {r["sip_call_id"]: r for r in map(json.loads, listed.stdout.splitlines())
                    if r.get("ended_at")}
            if all(i in recs for i in ids):
                break
            time.sleep(1.0)
        assert all(i in recs for i in ids), (recs.keys(), bot.log()[-4000:])
        for sip_id, path in zip(ids, paths, strict=True):
            rec = recs[sip_id]
            assert rec["result"] == "completed" and rec["path"] == path, rec
            assert [t["option"] for t in rec["turns"]] == path
            assert rec["recording"] and Path(rec["recording"]).exists()
        assert bot.proc.poll() is None
        log = bot.log()
        # The outage was real, and the bot said so and when it was over.
        assert "the database does not answer" in log and "answers again" in log, log[-3000:]
    finally:
        assert bot.stop() == 0, bot.log()[-3000:]
