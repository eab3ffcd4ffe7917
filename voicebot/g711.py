"""G.711 A-law and µ-law (ITU-T G.711) in numpy: the telephone codecs, as a caller's line has.

``audioop`` is gone in Python 3.13, so tests that need the codec's real quantisation (a
prompt as a caller hears it after PCMA/PCMU) use this. Both directions follow the
reference algorithm (the segment search of ITU-T G.711 / Sun's g711.c); encoding goes
through a 65,536-entry table built once, so a minute of audio codes in a few ms.
"""

from __future__ import annotations

from functools import cache

import numpy as np

_A_SEG_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])
_U_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
_U_BIAS = 0x84
_U_CLIP = 8159


def _alaw_encode_all() -> np.ndarray:
    pcm = np.arange(-32768, 32768, dtype=np.int32) >> 3  # A-law codes 13 bits
    mask = np.where(pcm >= 0, 0xD5, 0x55)
    mag = np.where(pcm >= 0, pcm, -pcm - 1)
    seg = np.searchsorted(_A_SEG_END, mag)  # first segment whose end is >= mag
    shift = np.where(seg < 2, 1, seg)
    aval = (np.minimum(seg, 7) << 4) | ((mag >> shift) & 0xF)
    aval = np.where(seg >= 8, 0x7F, aval)
    return (aval ^ mask).astype(np.uint8)


def _ulaw_encode_all() -> np.ndarray:
    pcm = np.arange(-32768, 32768, dtype=np.int32) >> 2  # µ-law codes 14 bits
    mask = np.where(pcm < 0, 0x7F, 0xFF)
    mag = np.minimum(np.abs(pcm), _U_CLIP) + (_U_BIAS >> 2)
    seg = np.searchsorted(_U_SEG_END, mag)
    uval = (np.minimum(seg, 7) << 4) | ((mag >> (np.minimum(seg, 7) + 1)) & 0xF)
    uval = np.where(seg >= 8, 0x7F, uval)
    return (uval ^ mask).astype(np.uint8)


def _alaw_decode_all() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    t = (a & 0xF) << 4
    seg = (a & 0x70) >> 4
    t = np.where(seg == 0, t + 8, t + 0x108)
    t = np.where(seg > 1, t << np.maximum(seg - 1, 0), t)
    return np.where(a & 0x80, t, -t).astype(np.int16)


def _ulaw_decode_all() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0xF) << 3) + _U_BIAS) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, _U_BIAS - t, t - _U_BIAS).astype(np.int16)


@cache
def _tables(law: str) -> tuple[np.ndarray, np.ndarray]:
    if law == "alaw":
        return _alaw_encode_all(), _alaw_decode_all()
    if law == "ulaw":
        return _ulaw_encode_all(), _ulaw_decode_all()
    raise ValueError(f"G.711 law must be 'alaw' (PCMA) or 'ulaw' (PCMU), not {law!r}")


def encode(samples: np.ndarray, law: str = "alaw") -> np.ndarray:
    """int16 PCM -> G.711 bytes (uint8), one per sample."""
    enc, _ = _tables(law)
    return enc[np.asarray(samples, dtype=np.int16).astype(np.int32) + 32768]


def decode(codes: np.ndarray, law: str = "alaw") -> np.ndarray:
    """G.711 bytes (uint8) -> int16 PCM."""
    _, dec = _tables(law)
    return dec[np.asarray(codes, dtype=np.uint8)]


def round_trip(samples: np.ndarray, law: str = "alaw") -> np.ndarray:
    """What a G.711 line makes of int16 audio: encoded and decoded again."""
    return decode(encode(samples, law), law)
