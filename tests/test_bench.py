"""`voicebot bench --quick`: the CI smoke of the benchmark suite (behaviour, never timing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from voicebot.config import PROJECT_ROOT


@pytest.mark.slow
def test_bench_quick_writes_results_and_report(tmp_path: Path) -> None:
    out = tmp_path / "results"
    # Ports of its own (5400 is the default; others test SIP on 5060/5070/5200 meanwhile).
    proc = subprocess.run(
        [sys.executable, "-m", "voicebot", "bench", "--quick", "--name", "smoke", "--out",
         str(out), "--port", "5460"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "smoke.json").read_text(encoding="utf-8"))
    for key, sub in (("turn_latency_ms", ("p50", "p95", "p99")),
                     ("frame_cost_us", ("median", "p99")),
                     ("capacity", ("max_calls_p95_800ms",)),
                     ("rss_mb", ("models_loaded", "at_max_calls"))):
        assert key in data, key
        for k in sub:
            assert k in data[key], f"{key}.{k}"
    # Every section ran on the real components and produced numbers, not errors.
    assert not data.get("errors"), data.get("errors")
    assert data["turn_latency_ms"]["p50"] > 0
    assert data["frame_cost_us"]["median"] > 0
    assert data["rss_mb"]["models_loaded"] > 100  # the Korean model is ~500 MB resident
    assert data["capacity"]["steps"] and data["capacity"]["steps"][0]["speech_turns"] > 0
    assert data["machine"]["versions"]["vosk"]
    vad = data["vad"]["results"]
    assert {"webrtcvad-0", "webrtcvad-3", "energy", "silero"} <= set(vad)
    assert "f1" in vad["webrtcvad-2"]["10dB"]
    assert "accuracy" in data["dtmf"]["summary"]["voicebot"]
    ko = data["suites"]["ko-espeak.csv"]["languages"]["ko"]
    assert ko["cases"] > 0 and "confusion" in ko
    # Suites for models that are not installed say so instead of failing.
    en = data["suites"]["en-fsdd-digits.csv"]
    assert "en" in en.get("skipped", {}) or en["languages"]
    report = (out / "smoke.md").read_text(encoding="utf-8")
    assert "## Targets" in report and "turn latency" in report
    for png in ("latency-cdf", "latency-vs-calls", "cpu-per-call", "vad", "dtmf"):
        f = out / f"smoke-{png}.png"
        assert f.is_file() and f.stat().st_size > 1000, png
        assert f.name in report


@pytest.mark.slow
def test_bench_soak_records_every_call(tmp_path: Path) -> None:
    """`voicebot bench --soak 1 --soak-calls 2`: the soak path end to end, in about 90 s."""
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "voicebot", "bench", "--soak", "1", "--soak-calls", "2",
         "--name", "soak-smoke", "--out", str(out), "--port", "5490"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "soak-smoke.json").read_text(encoding="utf-8"))
    s = data["soak"]
    for key in ("failures", "calls_started", "calls_recorded", "calls_missing", "per_minute",
                "pss_growth_pct", "fd_growth_pct", "probe_latency_ms", "bot_latency_ms"):
        assert key in s, key
    # One sipp caller and the probe, through 2 workers behind Kamailio.
    assert s["calls"] == 2 and s["workers"] == 2 and s["sipp_calls_started"] >= 2
    assert s["probe_calls_started"] >= 1
    # Every call the load generator and the probe started is in the bot's store, ended.
    assert s["calls_missing"] == 0 and s["calls_recorded"] == s["calls_started"], s
    assert s["failures"] == 0, s
    (minute,) = s["per_minute"]
    assert minute["pss_mb"] > 100 and minute["open_fds"] > 0 and minute["processes"] >= 3
    assert minute["probe_latency_ms"]["n"] > 0 and minute["probe_latency_ms"]["p50"] > 0
    assert minute["bot_latency_ms"]["n"] > 0
    assert [t["met"] for t in data["targets"]][:2] == [True, True]
    report = (out / "soak-smoke.md").read_text(encoding="utf-8")
    assert "## Targets" in report and "## Per minute" in report
    png = out / "soak-smoke-soak.png"
    assert png.is_file() and png.stat().st_size > 1000 and png.name in report
