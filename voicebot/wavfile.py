"""The RIFF/WAVE header, written by us and repaired after a crash or a full disk.

A WAV file's header carries two sizes (of the RIFF chunk and of the data chunk) that a
streaming writer knows only at the end: PJSIP's WAV writer leaves them 0 until the file
is closed, and a process killed while recording never closes it. :func:`repair` sets
them from the file's length so what was recorded plays.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

HEADER_BYTES = 44  # RIFF + WAVE + a 16-byte fmt chunk + the data chunk's header


def header(rate: int, data_bytes: int, channels: int = 1, sampwidth: int = 2) -> bytes:
    """A canonical 44-byte PCM header for ``data_bytes`` of samples."""
    block = channels * sampwidth
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block, block,
                                    sampwidth * 8)
            + b"data" + struct.pack("<I", data_bytes))


@dataclass(frozen=True)
class WavInfo:
    rate: int
    channels: int
    sampwidth: int
    frames: int

    @property
    def duration_ms(self) -> float:
        return self.frames * 1000.0 / self.rate if self.rate else 0.0


def repair(path: Path) -> WavInfo | None:
    """Set the RIFF and data sizes of ``path`` from its length (a torn last sample frame is
    cut off); None when the file has no complete fmt and data chunk header, so it holds
    no audio to save. Safe on a complete file: it is left as it is."""
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(min(size, 4096))
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        pos, fmt, data_off = 12, None, None
        while pos + 8 <= len(head):
            cid, csize = head[pos:pos + 4], struct.unpack("<I", head[pos + 4:pos + 8])[0]
            if cid == b"fmt ":
                if pos + 8 + 16 > len(head):
                    return None
                _tag, channels, rate, _bps, block, bits = struct.unpack(
                    "<HHIIHH", head[pos + 8:pos + 24])
                fmt = (channels, rate, block, bits)
            elif cid == b"data":
                data_off = pos + 8
                break
            pos += 8 + csize + (csize & 1)
        if fmt is None or data_off is None or not fmt[2]:
            return None
        channels, rate, block, bits = fmt
        data_bytes = (size - data_off) // block * block
        if data_off + data_bytes != size:
            f.truncate(data_off + data_bytes)
        f.seek(4)
        f.write(struct.pack("<I", data_off - 8 + data_bytes))
        f.seek(data_off - 4)
        f.write(struct.pack("<I", data_bytes))
        f.flush()
        os.fsync(f.fileno())
    return WavInfo(rate, channels, bits // 8, data_bytes // block)
