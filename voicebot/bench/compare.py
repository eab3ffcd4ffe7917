"""Side-by-side comparisons on the same audio: VADs by frame F1, DTMF detectors by accuracy.

VAD: webrtcvad modes 0-3, a plain energy VAD, Silero VAD (optional ``bench`` extra) and our
own endpointer, on real recordings (../shared/data) plus espeak-ng Korean, separated by
pauses, with white noise at 20, 10 and 0 dB SNR. The reference label of a 20 ms frame comes
from the clean signal: inside an utterance and within 30 dB of that utterance's loudest frame.

DTMF: our Goertzel detector against multimon-ng (Debian) on generated key sequences in
noise, the shared DTMF recordings, and talk-off over all shared speech recordings.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import webrtcvad

from ..config import Config, VadConfig
from ..dtmf import DTMF_KEYS, DtmfDetector, generate
from ..frames import (
    add_noise,
    read_audio,
    read_wav_channels,
    resample,
    samples_per_frame,
    silence,
    split_frames,
)
from ..vad import Endpointer
from .common import SHARED_DATA, with_gaps

RATE = 8000
FRAME_MS = 20
SNRS = (20.0, 10.0, 0.0)
SILERO_MISSING = "skipped: install voicebot[bench] (silero-vad on onnxruntime)"


def _frame_db(x: np.ndarray, n: int) -> np.ndarray:
    m = len(x) // n
    f = x[: m * n].astype(np.float64).reshape(m, n)
    return 10 * np.log10(np.mean(f * f, axis=1) + 1e-9)


def reference_labels(audio: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Speech (True) per 20 ms frame of the clean signal."""
    n = samples_per_frame(RATE, FRAME_MS)
    db = _frame_db(audio, n)
    ref = np.zeros(len(db), dtype=bool)
    for a, b in spans:
        i0, i1 = a // n, min(len(db), math.ceil(b / n))
        if i1 <= i0:
            continue
        peak = db[i0:i1].max()
        ref[i0:i1] = db[i0:i1] > max(peak - 30.0, 10 * math.log10((32768 * 10 ** (-60 / 20)) ** 2))
    return ref


def f1(ref: np.ndarray, hyp: np.ndarray) -> dict[str, float]:
    m = min(len(ref), len(hyp))
    r, h = ref[:m], hyp[:m]
    tp = float(np.sum(r & h))
    fp = float(np.sum(~r & h))
    fn = float(np.sum(r & ~h))
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    return {"f1": round(2 * prec * rec / (prec + rec), 3) if prec + rec else 0.0,
            "precision": round(prec, 3), "recall": round(rec, 3)}


def _webrtc(mode: int) -> Callable[[np.ndarray], np.ndarray]:
    def run(x: np.ndarray) -> np.ndarray:
        v = webrtcvad.Vad(mode)
        n = samples_per_frame(RATE, FRAME_MS)
        return np.array([v.is_speech(f.samples.tobytes(), RATE) for f in split_frames(x, RATE)
                         ][: len(x) // n], dtype=bool)
    return run


def _energy(x: np.ndarray) -> np.ndarray:
    """A plain energy VAD: frame level 10 dB over a running minimum (1 s) of frame levels."""
    n = samples_per_frame(RATE, FRAME_MS)
    out = np.zeros(len(x) // n, dtype=bool)
    hist: list[float] = []
    for i, f in enumerate(split_frames(x, RATE)):
        if i >= len(out):
            break
        s = f.samples.astype(np.float64)
        db = 10 * math.log10(float(np.dot(s, s)) / n + 1e-9)
        hist.append(db)
        if len(hist) > 50:
            hist.pop(0)
        out[i] = db > min(hist) + 10.0 and db > 10 * math.log10((32768 * 10 ** (-55 / 20)) ** 2)
    return out


def _endpointer(cfg: VadConfig) -> Callable[[np.ndarray], np.ndarray]:
    def run(x: np.ndarray) -> np.ndarray:
        ep = Endpointer(cfg, RATE)
        n = samples_per_frame(RATE, FRAME_MS)
        out = np.zeros(len(x) // n, dtype=bool)
        for i, f in enumerate(split_frames(x, RATE)):
            if i >= len(out):
                break
            ep.process(f)
            out[i] = ep.in_speech
        return out
    return run


def _silero() -> Callable[[np.ndarray], np.ndarray] | None:
    try:
        import torch
        from silero_vad import load_silero_vad
    except ImportError:
        return None
    model = load_silero_vad(onnx=True)
    torch.set_num_threads(1)

    def run(x: np.ndarray) -> np.ndarray:
        # Silero takes 256-sample (32 ms) windows at 8 kHz; each 20 ms frame gets the
        # probability of the window that covers its end (what a streaming caller has then).
        model.reset_states()
        win = 256
        probs = []
        xf = x.astype(np.float32) / 32768.0
        for i in range(0, len(xf) - win + 1, win):
            probs.append(float(model(torch.from_numpy(xf[i:i + win]), RATE)))
        n = samples_per_frame(RATE, FRAME_MS)
        out = np.zeros(len(x) // n, dtype=bool)
        for k in range(len(out)):
            j = min(len(probs) - 1, ((k + 1) * n - 1) // win)
            out[k] = probs[j] >= 0.5 if j >= 0 else False
        return out
    return run


def vad_audio(cfg: Config, files: Sequence[Path], korean: Sequence[np.ndarray],
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    parts = [read_audio(p, RATE) for p in files] + list(korean)
    order = rng.permutation(len(parts))
    audio, spans = with_gaps([parts[i] for i in order], RATE, rng)
    return audio, reference_labels(audio, spans)


def vad_comparison(cfg: Config, audio: np.ndarray, ref: np.ndarray, seed: int = 0
                   ) -> dict[str, Any]:
    """Frame F1 and CPU (µs per 20 ms frame) of each VAD at each SNR."""
    vads: dict[str, Callable[[np.ndarray], np.ndarray] | None] = {
        f"webrtcvad-{m}": _webrtc(m) for m in range(4)}
    vads["energy"] = _energy
    vads["silero"] = _silero()
    vads["voicebot-endpointer"] = _endpointer(cfg.vad)
    n_frames = len(audio) // samples_per_frame(RATE, FRAME_MS)
    out: dict[str, Any] = {"audio_s": round(len(audio) / RATE, 1),
                           "speech_frames": int(ref.sum()), "frames": n_frames,
                           "snr_db": list(SNRS), "results": {}}
    noisy = {snr: add_noise(audio, snr, np.random.default_rng(seed + int(snr))) for snr in SNRS}
    for name, fn in vads.items():
        if fn is None:
            out["results"][name] = {"skipped": SILERO_MISSING}
            continue
        row: dict[str, Any] = {}
        cpu = 0.0
        for snr, x in noisy.items():
            t0 = time.process_time()
            hyp = fn(x)
            cpu += time.process_time() - t0
            row[f"{snr:g}dB"] = f1(ref, hyp)
        row["cpu_us_per_frame"] = round(cpu / (len(SNRS) * n_frames) * 1e6, 1)
        out["results"][name] = row
    return out


# --- DTMF ---

NAMES = {"One": "1", "Two": "2", "Three": "3", "Four": "4", "Five": "5", "Six": "6",
         "Seven": "7", "Eight": "8", "Nine": "9", "Zero": "0", "Star": "*", "Hash": "#"}
MULTIMON_RATE = 22050  # multimon-ng's raw input rate


def _align(expected: str, got: str) -> dict[str, int]:
    """Levenshtein alignment: hits, substitutions, deletions (missed), insertions (false)."""
    n, m = len(expected), len(got)
    d = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        d[i][0] = i
    for j in range(m + 1):
        d[0][j] = j
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1,
                          d[i - 1][j - 1] + (expected[i - 1] != got[j - 1]))
    i, j = n, m
    hits = subs = dels = ins = 0
    while i or j:
        if i and j and d[i][j] == d[i - 1][j - 1] + (expected[i - 1] != got[j - 1]):
            hits += expected[i - 1] == got[j - 1]
            subs += expected[i - 1] != got[j - 1]
            i, j = i - 1, j - 1
        elif i and d[i][j] == d[i - 1][j] + 1:
            dels += 1
            i -= 1
        else:
            ins += 1
            j -= 1
    return {"expected": n, "hits": hits, "substituted": subs, "missed": dels, "false": ins}


def ours(x: np.ndarray, cfg: Config) -> tuple[str, float]:
    det = DtmfDetector(RATE, cfg.dtmf)
    t0 = time.process_time()
    digits = "".join(d.digit for f in split_frames(x, RATE) for d in det.process(f))
    return digits, time.process_time() - t0


def dtmf_sets(rng: np.random.Generator, quick: bool) -> list[tuple[str, np.ndarray, str]]:
    """(name, 8 kHz audio, expected digits) for the accuracy part."""
    sets: list[tuple[str, np.ndarray, str]] = []
    keys = "".join(DTMF_KEYS)
    reps = 2 if quick else 6
    for on_ms in (40, 60, 100):
        seq = "".join(rng.permutation(list(keys * reps)))
        clean = np.concatenate([silence(300), generate(seq, RATE, on_ms, 60), silence(300)])
        # Level: generate() plays each tone pair at its own default; noise relative to it.
        for snr in (20.0, 10.0):
            sets.append((f"generated {on_ms} ms on, {snr:g} dB SNR", add_noise(clean, snr, rng),
                         seq))
    stereo = SHARED_DATA / "dtmf" / "stereo_dtmf_tones.wav"
    labels = SHARED_DATA / "dtmf" / "expected_dtmf_from_tests.txt"
    if stereo.is_file() and labels.is_file():
        data, rate = read_wav_channels(stereo)
        exp = _expected(labels, "stereo_dtmf_tones.wav")
        for ch in range(data.shape[1]):
            x = resample(np.clip(np.rint(data[:, ch] * 32767), -32768, 32767).astype(np.int16),
                         rate, RATE)
            sets.append((f"stereo_dtmf_tones.wav channel {ch}", x, exp.get(ch, "")))
    return sets


def _expected(path: Path, name: str) -> dict[int, str]:
    out: dict[int, str] = {}
    section = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("=="):
            section = line[2:].strip()
            continue
        parts = line.split()
        if section == name and len(parts) >= 4 and parts[0] == "Start":
            out.setdefault(int(parts[3][2:]), "")
            out[int(parts[3][2:])] += NAMES.get(parts[1], "?")
    return out


def dtmf_comparison(cfg: Config, speech_files: Sequence[Path], quick: bool,
                    seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    have_mm = shutil.which("multimon-ng") is not None
    rows = []
    totals = {"voicebot": {"expected": 0, "hits": 0, "false": 0, "missed": 0, "substituted": 0,
                           "cpu_s": 0.0, "audio_s": 0.0},
              "multimon-ng": {"expected": 0, "hits": 0, "false": 0, "missed": 0,
                              "substituted": 0, "cpu_s": 0.0, "audio_s": 0.0}}
    for name, x, expected in dtmf_sets(rng, quick):
        row: dict[str, Any] = {"set": name, "expected": expected}
        got, cpu = ours(x, cfg)
        row["voicebot"] = {"got": got, **_align(expected, got)}
        _add(totals["voicebot"], row["voicebot"], cpu, len(x) / RATE)
        if have_mm:
            mm = _run_multimon(x)
            row["multimon-ng"] = {"got": mm[0], **_align(expected, mm[0])}
            _add(totals["multimon-ng"], row["multimon-ng"], mm[1], len(x) / RATE)
        rows.append(row)
    # Talk-off: real speech must never come out as a key.
    talk: dict[str, Any] = {"files": len(speech_files)}
    if speech_files:
        speech = np.concatenate([np.concatenate([read_audio(p, RATE), silence(200)])
                                 for p in speech_files])
        talk["audio_s"] = round(len(speech) / RATE, 1)
        got, cpu = ours(speech, cfg)
        talk["voicebot"] = {"false_digits": len(got), "digits": got[:50]}
        totals["voicebot"]["cpu_s"] += cpu
        totals["voicebot"]["audio_s"] += len(speech) / RATE
        if have_mm:
            mm = _run_multimon(speech)
            talk["multimon-ng"] = {"false_digits": len(mm[0]), "digits": mm[0][:50]}
            totals["multimon-ng"]["cpu_s"] += mm[1]
            totals["multimon-ng"]["audio_s"] += len(speech) / RATE
    summary: dict[str, Any] = {}
    for det, t in totals.items():
        if det == "multimon-ng" and not have_mm:
            summary[det] = {"skipped": "multimon-ng is not installed (apt-get install "
                                       "multimon-ng)"}
            continue
        summary[det] = {
            "accuracy": round(t["hits"] / t["expected"], 3) if t["expected"] else None,
            "false_digits_in_tone_sets": t["false"], "missed": t["missed"],
            "substituted": t["substituted"],
            "false_digits_in_speech": talk.get(det, {}).get("false_digits"),
            "cpu_us_per_20ms": round(t["cpu_s"] / max(t["audio_s"], 1e-9) * 0.02 * 1e6, 1),
            "cpu_note": ("in-process, 8 kHz" if det == "voicebot" else
                         "child process CPU incl. start-up, input resampled to 22050 Hz"),
        }
    return {"summary": summary, "sets": rows, "talk_off": talk}


def _add(t: dict[str, Any], r: dict[str, Any], cpu: float, audio_s: float) -> None:
    for k in ("expected", "hits", "false", "missed", "substituted"):
        t[k] += r[k]
    t["cpu_s"] += cpu
    t["audio_s"] += audio_s


def _run_multimon(x: np.ndarray) -> tuple[str, float]:
    import os

    binary = shutil.which("multimon-ng")
    assert binary is not None
    raw = resample(x, RATE, MULTIMON_RATE).astype("<i2").tobytes()
    proc = subprocess.Popen([binary, "-q", "-c", "-a", "DTMF", "-t", "raw", "-"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    assert proc.stdin is not None and proc.stdout is not None
    # Feed and read on threads would be cleaner; multimon prints little, so write then read.
    import threading

    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()))  # type: ignore
    reader.start()
    proc.stdin.write(raw)
    proc.stdin.close()
    reader.join()
    # wait4 gives this child's own CPU time (RUSAGE_CHILDREN would mix in every child).
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    out = b"".join(chunks).decode(errors="replace")
    digits = "".join(line.split(":", 1)[1].strip() for line in out.splitlines()
                     if line.startswith("DTMF:"))
    return digits, usage.ru_utime + usage.ru_stime
