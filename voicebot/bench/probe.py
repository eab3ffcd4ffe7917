"""One probe call over SIP that measures turn latency as the caller hears it.

Run as ``python -m voicebot.bench.probe --uri sip:919@HOST:PORT --turns N``: a pjsua2
softphone (its own process, since pjsua2 wants the thread that created its endpoint)
picks Korean with an RFC 4733 key, then speaks N times into the bot's prompts (barge-in),
alternating espeak-ng Korean ("운영 시간", which the main menu accepts) with real English
recordings from ../shared/data (out of grammar for the Korean model: a no-match reply,
still a full decode). Prints one JSON object: per turn the caller-side latency, from the
last speech sample sent to the first non-silent frame of the reply received, and the
bot's own record of the turn.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..config import load_config
from ..simulator import CallerInput
from ..softphone import Softphone
from .common import shared_speech_files

VOICE_DBFS = -50.0  # a 5 ms block louder than this is caller speech
BLOCK_MS = 5


def last_speech_ms(samples: np.ndarray, rate: int) -> float | None:
    """Time (ms from the first sample) just after the last loud 5 ms block."""
    n = rate * BLOCK_MS // 1000
    m = len(samples) // n
    if m == 0:
        return None
    b = samples[: m * n].astype(np.float64).reshape(m, n)
    db = 10 * np.log10(np.mean(b * b, axis=1) + 1e-9) - 20 * np.log10(32768.0)
    loud = np.nonzero(db > VOICE_DBFS)[0]
    return None if loud.size == 0 else float((loud[-1] + 1) * BLOCK_MS)


class ProbePhone(Softphone):
    """The softphone, remembering when and what it sent for each input."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sends: list[tuple[float, float | None]] = []  # (rx clock at send, speech end)

    def _send(self, call: Any, audio: Any, inp: CallerInput, lang: str | None) -> None:
        if inp.kind in ("say", "say_wav"):
            samples = self._speech(inp, audio.rate, lang)
            t = audio.t_ms
            audio.send(samples)
            end = last_speech_ms(samples, audio.rate)
            self.sends.append((t, None if end is None else t + end))
        else:
            self.sends.append((audio.t_ms, None))
            super()._send(call, audio, inp, lang)


def inputs(turns: int, seed: int) -> list[CallerInput]:
    rng = np.random.default_rng(seed)
    wavs = shared_speech_files(30)
    out = [CallerInput("press", "4")]
    for i in range(turns):
        if wavs and i % 4 == 3:
            out.append(CallerInput("say_wav", str(wavs[int(rng.integers(len(wavs)))])))
        else:
            out.append(CallerInput("say", "운영 시간"))
    return out


def _matching_record(records: list[dict[str, Any]], kind: str, end_ms: float
                     ) -> dict[str, Any] | None:
    """The bot's record of the turn whose decision came just after ``end_ms``.

    Both clocks start with the call's media (within a frame or two of each other); the bot
    decides an endpointing wait (~150 ms) after the speech ended.
    """
    best = None
    for r in records:
        if r.get("input") != kind:
            continue
        d = float(r["t_ms"]) - end_ms
        if -100.0 <= d <= 1500.0 and (best is None or abs(d) < abs(float(best["t_ms"]) - end_ms)):
            best = r
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m voicebot.bench.probe")
    ap.add_argument("--config")
    ap.add_argument("--uri", required=True)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--barge-in", type=int, default=300)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    cfg = load_config(a.config)
    ins = inputs(a.turns, a.seed)
    phone = ProbePhone(cfg, a.uri, ins, language="ko", barge_in_ms=a.barge_in,
                       timeout_s=a.timeout)
    res = phone.run()
    rows: list[dict[str, Any]] = []
    records = [r for r in res.records if r.get("t_ms") is not None]
    for i, obs in enumerate(res.observed):
        sent, end = phone.sends[i] if i < len(phone.sends) else (obs.sent_ms, None)
        kind = {"press": "dtmf", "say": "speech", "say_wav": "speech"}.get(obs.input.kind, "none")
        row: dict[str, Any] = {
            "input": kind, "value": Path(obs.input.value).name if obs.input.kind == "say_wav"
            else obs.input.value, "sent_ms": sent, "speech_end_ms": end,
            "reply_ms": obs.reply_start_ms,
            "caller_latency_ms": (round(obs.reply_start_ms - end, 1)
                                  if obs.reply_start_ms is not None and end is not None else None),
        }
        # The first utterance goes into the welcome notice, which cannot be interrupted:
        # its reply waits for the notice to end, so it is no sample of turn latency.
        row["warmup"] = i <= 1
        rec = _matching_record(records, kind, end if end is not None else sent)
        if rec is not None:
            row.update({"bot_latency_ms": rec.get("latency_ms"), "heard": rec.get("heard"),
                        "result": rec.get("result"), "node": rec.get("node")})
        # An utterance the bot took as part of a recorded message (a misrecognition can lead
        # the call into a message-recording node) gets no menu reply: no latency sample.
        row["menu_turn"] = rec is not None and rec.get("result") != "recorded"
        rows.append(row)
    print(json.dumps({"connected": res.connected, "status": res.status,
                      "sip_call_id": res.sip_call_id, "turns": rows,
                      "error": None if res.connected else f"{res.status} {res.reason}"},
                     ensure_ascii=False))
    return 0 if res.connected else 1


if __name__ == "__main__":
    sys.exit(main())
