"""The SIP edge: a pjsua2 endpoint that answers calls and runs the voice core on them.

A thin adapter. It owns the pjsua2 objects and nothing else: every call gets a
:class:`~voicebot.session.CallSession`, whose worker thread does the listening and
deciding; this module moves audio, keys and hang-ups between PJSIP and the session
and carries out the session's transfer and hang-up actions.

Threads, as pjsua2 wants them: the endpoint runs with no worker threads of its own
(``threadCnt = 0``, ``mainThreadOnly``), so every SIP callback and every pjsua2 call
happens on the thread that runs :meth:`Telephony.run`. Media callbacks run on PJSIP's
clock thread and only copy a frame into or out of the session. Session workers ask for
pjsua2 work (transfer, hang-up) through a queue the main loop drains.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import ipaddress
import logging
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import pjsua2 as pj

from . import tls, wavfile
from .config import Config, parse_hostport
from .dialog import (
    Action,
    CallerHungUp,
    EndCall,
    HangUp,
    StoreFailed,
    Transfer,
    TransferFailed,
    Turn,
)
from .frames import AudioFrame
from .libc import malloc_trim
from .session import CallSession, VoiceCore
from .store import Store

log = logging.getLogger("voicebot.telephony")

DTMF_METHODS = {0: "rfc4733", 1: "info"}
PORT_GRACE_S = 2.0  # how long an ended call's media port is kept alive (s)
GC_INTERVAL_S = 2.0  # cyclic garbage collection period on the pjsua2 thread (s)
REC_STALL_S = 2.0  # a call recording that has not grown for this long is stopped (disk full)
MAX_CALL_GRACE_S = 30.0  # past max_call_s by this much, a call is cut without the goodbye (s)
SESSION_END_WAIT_S = 5.0  # how long a finisher waits for a hung-up call's session to end (s)
CODEC_IDS = {"PCMU": "PCMU/8000/1", "PCMA": "PCMA/8000/1", "G722": "G722/16000/1"}


# --- fast access to SWIG's ByteVector ------------------------------------------------------
# pjsua2's MediaFrame.buf is a SWIG std::vector<unsigned char>; SWIG converts it element by
# element (about 1 ms per 20 ms frame), too slow for the media clock. libstdc++ lays a vector
# out as three pointers (begin, end, end of storage), so its bytes can be read and written
# in place. The layout is checked once at import; if it ever differs, the slow path is used.

def _vector_bounds(vec: Any) -> tuple[int, int]:
    addr = int(vec.this)
    begin = ctypes.c_void_p.from_address(addr).value or 0
    end = ctypes.c_void_p.from_address(addr + ctypes.sizeof(ctypes.c_void_p)).value or 0
    return begin, end


def _layout_ok() -> bool:
    probe = bytes(range(256)) * 2
    try:
        vec = pj.ByteVector(probe)
        begin, end = _vector_bounds(vec)
        return end - begin == len(probe) and ctypes.string_at(begin, end - begin) == probe
    except Exception:  # any surprise: stay on SWIG's own conversion
        return False


FAST_VECTORS = _layout_ok()


def vector_bytes(vec: Any) -> bytes:
    """The bytes of a ByteVector (fast path when the layout check passed)."""
    if FAST_VECTORS:
        begin, end = _vector_bounds(vec)
        return ctypes.string_at(begin, end - begin) if end > begin else b""
    return bytes(bytearray(vec))


class _OutBuffer:
    """A reusable ByteVector for outgoing frames, filled in place."""

    def __init__(self, nbytes: int) -> None:
        self.vec = pj.ByteVector(bytes(nbytes))
        self.nbytes = nbytes
        self._ptr = _vector_bounds(self.vec)[0] if FAST_VECTORS else 0

    def fill(self, samples: np.ndarray) -> Any:
        data = np.ascontiguousarray(samples, dtype="<i2")
        if FAST_VECTORS:
            ctypes.memmove(self._ptr, data.ctypes.data, self.nbytes)
            return self.vec
        return pj.ByteVector(data.tobytes())


def _drop(frame: AudioFrame) -> None:
    """The sink of a port between calls."""


class MediaPort(pj.AudioMediaPort):
    """One call's audio in and out of Python. Runs on PJSIP's clock thread: never blocks.

    sink(frame): receives each 20 ms frame from the far end (an AudioFrame, media time
    counted from the first frame). source(n): returns the next n samples to send.

    A port lives as long as the endpoint and serves one call after another (see
    :meth:`Telephony.take_port`): the bridge keeps calling a registered port even with
    nothing connected to it, and PJSIP 2.15 removes a destroyed port on its clock thread a
    tick later, so a port destroyed at a call's end was still called half-deleted now and
    then (an AttributeError, then a segfault in the soak after ~400 call ends).
    """

    def __init__(self, sample_rate: int, label: str) -> None:
        super().__init__()
        self.sink: Callable[[AudioFrame], None] = _drop
        self.source: Callable[[int], np.ndarray] = self._silence
        self.sample_rate = sample_rate
        self.label = label
        self.n = sample_rate // 50  # 20 ms
        self._out = _OutBuffer(self.n * 2)
        self._rx_ms = 0.0
        self.rx_frames = 0
        self.errors = 0

    def _silence(self, n: int) -> np.ndarray:
        return np.zeros(n, dtype=np.int16)

    def bind(self, sink: Callable[[AudioFrame], None],
             source: Callable[[int], np.ndarray]) -> None:
        """Serve a new call: media time starts again at 0 (pjsua2 thread)."""
        self._rx_ms = 0.0
        self.rx_frames = 0
        self.errors = 0
        self.source = source
        self.sink = sink

    def unbind(self) -> None:
        """The call is over: frames go nowhere, silence goes out, until the next call."""
        self.sink = _drop
        self.source = self._silence

    def create(self) -> None:
        fmt = pj.MediaFormatAudio()
        fmt.type = pj.PJMEDIA_TYPE_AUDIO
        fmt.id = pj.PJMEDIA_FORMAT_L16
        fmt.clockRate = self.sample_rate
        fmt.channelCount = 1
        fmt.bitsPerSample = 16
        fmt.frameTimeUsec = 20000
        self.createPort(self.label, fmt)

    def onFrameReceived(self, frame: Any) -> None:
        try:
            if frame.type == pj.PJMEDIA_FRAME_TYPE_AUDIO and frame.size > 0:
                data = vector_bytes(frame.buf)
                samples = np.frombuffer(data, dtype="<i2").astype(np.int16)
            else:
                samples = np.zeros(self.n, dtype=np.int16)
            self.sink(AudioFrame(samples, self.sample_rate, self._rx_ms))
            self._rx_ms += 1000.0 * len(samples) / self.sample_rate
            self.rx_frames += 1
        except Exception:  # an exception must not unwind into PJSIP's clock thread
            self.errors += 1
            if self.errors < 5:
                log.exception("%s: media rx error", self.label)

    def onFrameRequested(self, frame: Any) -> None:
        try:
            samples = self.source(self.n)
            frame.type = pj.PJMEDIA_FRAME_TYPE_AUDIO
            frame.buf = self._out.fill(samples)
            frame.size = self.n * 2
        except Exception:
            self.errors += 1
            if self.errors < 5:
                log.exception("%s: media tx error", self.label)


_libc = ctypes.CDLL(None)


def create_endpoint() -> pj.Endpoint:
    """``Endpoint.libCreate`` without pjlib's start-up banner on stdout.

    pjlib logs a few lines to stdout before any log configuration can apply; ``voicebot
    call --json`` and ``voicebot serve`` promise clean stdout, so fd 1 points at /dev/null
    for the duration (C stdio is flushed on both sides so nothing leaks either way).
    """
    ep = pj.Endpoint()
    _libc.fflush(None)
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        ep.libCreate()
        _libc.fflush(None)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
    return ep


class _PjLog(pj.LogWriter):
    """PJSIP's log lines into Python logging (stderr): stdout belongs to --json output."""

    def write(self, entry: Any) -> None:
        level = logging.WARNING if int(entry.level) <= 1 else logging.DEBUG
        logging.getLogger("voicebot.pjsip").log(level, "%s", str(entry.msg).rstrip())


_PJ_LOG = _PjLog()  # one for the process: PJSIP keeps a pointer to it


def log_config(ec: Any, level: int = 1) -> None:
    """Route PJSIP's logging through :class:`_PjLog` at ``level`` (errors only by default)."""
    ec.logConfig.level = level
    ec.logConfig.consoleLevel = level
    ec.logConfig.writer = _PJ_LOG
    ec.logConfig.decor = 0


def stream_rate(call: pj.Call, media_index: int, bridge_rate: int = 16000) -> tuple[int, str]:
    """(sample rate for our port, codec name) of a call's audio stream.

    Never above the bridge's rate: audio the bridge has brought down to 8 kHz gains nothing
    from being brought back up."""
    stream = call.getStreamInfo(media_index)
    rate = 16000 if stream.codecClockRate >= 16000 else 8000
    return min(rate, bridge_rate), str(stream.codecName)


def _wait_wav_header(path: Path, timeout: float = 2.0) -> bool:
    """Wait until PJSIP's WAV writer has filled in the RIFF size (0 while recording)."""
    end = time.monotonic() + timeout
    while True:
        try:
            with path.open("rb") as f:
                head = f.read(8)
        except OSError:
            return False
        if len(head) == 8 and head[:4] == b"RIFF" and int.from_bytes(head[4:], "little"):
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.005)


def _user_of(uri: str) -> str:
    m = re.search(r"sips?:([^@;>\s]+)@", uri)
    return m.group(1) if m else ""


# --- who is calling (issue 11): callbacks go to a trusted identity --------------------------
# A From header says whatever the caller likes; a P-Asserted-Identity (RFC 3325) is only worth
# something when a peer we trust (the trunk or PBX in [sip] allow, or our own Kamailio front,
# which answers 403 to anyone else) put it there. Pure functions, run on the SIP thread.

_PHONE = re.compile(r"\+?[0-9*#\-.() ]*[0-9][0-9*#\-.() ]*")
_VISUAL = re.compile(r"[\-.() ]")  # RFC 3966 visual separators (and spaces people type)


@dataclass(frozen=True)
class CallerIdentity:
    """The number callbacks go to. verified: a trusted peer asserted it (PAI); from_uri:
    the From URI as the caller sent it."""

    number: str
    verified: bool
    from_uri: str


def uri_number(uri: str) -> str:
    """The user part of a ``sip:``/``sips:``/``tel:`` URI (name-addr or bare), visual
    separators stripped when it is a telephone number; "" when there is none."""
    m = re.search(r"<([^>]*)>", uri)
    u = (m.group(1) if m else uri).strip()
    scheme, sep, rest = u.partition(":")
    if not sep:
        return ""
    scheme = scheme.strip().lower()
    if scheme == "tel":
        user = rest.split(";", 1)[0]
    elif scheme in ("sip", "sips"):
        if "@" not in rest:
            return ""  # sip:host names no one
        user = rest.split("@", 1)[0].split(";", 1)[0].split(":", 1)[0]
    else:
        return ""
    user = unquote(user).strip()
    if _PHONE.fullmatch(user):
        user = _VISUAL.sub("", user)
    return user


def _header_values(msg: str, name: str) -> list[str]:
    """The comma-separated values of every ``name`` header in a SIP message, in order
    (folded lines joined; commas inside quotes or <> do not split)."""
    head = re.split(r"\r?\n\r?\n", msg, maxsplit=1)[0]
    lines: list[str] = []
    for line in re.split(r"\r?\n", head)[1:]:  # [0] is the request line
        if line[:1] in (" ", "\t") and lines:
            lines[-1] += " " + line.strip()
        else:
            lines.append(line)
    out: list[str] = []
    for line in lines:
        hname, sep, value = line.partition(":")
        if not sep or hname.strip().lower() != name.lower():
            continue
        cur, quoted, angle = "", False, False
        for ch in value:
            if ch == '"' and not angle:
                quoted = not quoted
            elif ch == "<" and not quoted:
                angle = True
            elif ch == ">" and not quoted:
                angle = False
            if ch == "," and not quoted and not angle:
                out.append(cur.strip())
                cur = ""
            else:
                cur += ch
        out.append(cur.strip())
    return [v for v in out if v]


def asserted_number(msg: str) -> str:
    """The first ``tel:`` or ``sip:`` user of the P-Asserted-Identity headers of ``msg``
    (a whole SIP message), separators stripped; "" without one."""
    for value in _header_values(msg, "P-Asserted-Identity"):
        number = uri_number(value)
        if number:
            return number
    return ""


def source_host(address: str) -> str:
    """'127.0.0.2:5060' -> '127.0.0.2'; '[::1]:5060' -> '::1' (pjsua2's srcAddress)."""
    a = address.strip()
    if a.startswith("["):
        return a[1:].split("]", 1)[0]
    if a.count(":") == 1:
        return a.split(":", 1)[0]
    return a  # a bare address, IPv6 without a port included


def trusted_peer(source: str, allow: Sequence[str], front: Sequence[str]) -> bool:
    """Whether a request from ``source`` (an IP address) may assert an identity: it is in
    one of the ``allow`` networks, or it is the front (Kamailio relays from its own
    address). An unspecified front address (0.0.0.0) is never a source and matches none."""
    try:
        ip = ipaddress.ip_address(source)
    except ValueError:
        return False
    for net in allow:
        with contextlib.suppress(ValueError):
            if ip in ipaddress.ip_network(net, strict=False):
                return True
    for host in front:
        with contextlib.suppress(ValueError):
            f = ipaddress.ip_address(host)
            if not f.is_unspecified and f == ip:
                return True
    return False


def caller_identity(msg: str, from_uri: str, source: str, allow: Sequence[str],
                    front: Sequence[str]) -> CallerIdentity:
    """A trusted peer's P-Asserted-Identity, else From's user part, unverified."""
    if trusted_peer(source, allow, front):
        pai = asserted_number(msg)
        if pai:
            return CallerIdentity(pai, True, from_uri)
    return CallerIdentity(uri_number(from_uri), False, from_uri)


@dataclass
class _Cmd:
    kind: str  # xfer, hangup
    call: BotCall
    arg: Any = None


@dataclass
class _Ending:
    """What the finisher thread needs to complete an ended call's record (no pjsua2 in it)."""

    call_id: str
    session: CallSession | None
    started: bool  # store.call_started went through: there is a record to complete
    ended_by: str
    reason: str
    rec_part: Path | None
    rec_path: Path | None
    header_wait_s: float
    rx_frames: int


class BotCall(pj.Call):
    """One call as pjsua2 sees it.

    Every callback catches and logs its own exceptions: SWIG prints and swallows a Python
    exception raised in a callback, which leaves what the callback had to do half done (a
    call never reported ended, an INVITE never answered) without a word in our log."""

    def __init__(self, tel: Telephony, acc: pj.Account, call_pj_id: int) -> None:
        super().__init__(acc, call_pj_id)
        self.tel = tel
        self.id = uuid.uuid4().hex[:12]
        self.sip_call_id = ""
        self.caller = ""  # the number callbacks go to (see caller_identity)
        self.caller_verified = False
        self.caller_from = ""  # the From URI as sent
        self.dialled = ""
        self.session: CallSession | None = None
        self.port: MediaPort | None = None
        self.audio: pj.AudioMedia | None = None
        self.media_index = -1
        self.recorder: pj.AudioMediaRecorder | None = None
        self.recording_tried = False
        self.rec_part: Path | None = None
        self.rec_path: Path | None = None
        self.rec_size = -1  # size of rec_part at the last look (bytes)
        self.rec_grew_at = 0.0  # when rec_part last grew (monotonic s)
        self.rec_stopped_at = 0.0  # recording stopped before the call ended (disk full)
        self.accepted = False
        self.started = False  # the store has this call's start
        self.answered_at = 0.0
        self.last_rx_pkts = -1
        self.last_rx_change = time.monotonic()
        self.ended_by = "caller"
        self.reason = ""
        self.disconnected = False
        self.finalized = False
        self.ending = False

    # --- pjsua2 callbacks (main thread) ---

    def onCallState(self, prm: Any) -> None:
        try:
            info = self.getInfo()
            state, code, why = info.state, int(info.lastStatusCode), str(info.lastReason)
        except Exception as exc:
            if self.isActive():
                log.warning("call=%s call state unreadable: %s", self.id, exc)
                return
            state, code, why = pj.PJSIP_INV_STATE_DISCONNECTED, 0, ""
        try:
            if state == pj.PJSIP_INV_STATE_DISCONNECTED:
                self._disconnected(code, why)
            elif state == pj.PJSIP_INV_STATE_CONFIRMED and self.accepted and not self.answered_at:
                self.answered_at = time.monotonic()
                self.last_rx_change = self.answered_at
                self.tel.log_event(self, "answered")
                self.tel.store_write(self, "call_answered", self.tel.store.call_answered, self.id)
        except Exception:
            log.exception("call=%s onCallState failed", self.id)

    def _disconnected(self, code: int, why: str) -> None:
        if self.disconnected:
            return
        # First of all: the run loop must learn that the call is over, whatever fails next.
        self.disconnected = True
        self.tel.finished.put(self)
        if self.accepted and not self.answered_at and not self.reason and code == 408:
            # Our 200 OK was never ACKed: PJSIP gave up (64*T1) and sent BYE itself.
            self.reason = "no_ack"
            self.ended_by = "bot"
        self.tel.log_event(self, "disconnected", f"code={code} reason={why!r}")

    def onCallMediaState(self, prm: Any) -> None:
        if not self.accepted or self.disconnected:
            return
        try:
            self._media_state()
        except Exception as exc:
            log.exception("call=%s media setup failed", self.id)
            if self.session is None:
                # Nothing will ever speak to this caller: hang up rather than leave them in
                # silence until max_call_s.
                self.ended_by = "bot"
                self.reason = self.reason or f"media_error: {exc}"[:120]
                self.tel.commands.put(_Cmd("hangup", self, 200))

    def _media_state(self) -> None:
        info = self.getInfo()  # SWIG returns views: keep the info object, then read media
        for mi in info.media:
            if mi.type != pj.PJMEDIA_TYPE_AUDIO or mi.status not in (
                    pj.PJSUA_CALL_MEDIA_ACTIVE, pj.PJSUA_CALL_MEDIA_REMOTE_HOLD):
                continue
            audio = self.getAudioMedia(mi.index)
            self.media_index = mi.index
            if self.session is None:
                rate, codec = stream_rate(self, mi.index, self.tel.cfg.sip.clock_rate)
                self.tel.log_event(self, "media", f"codec={codec}/{rate}")
                session = self.tel.core.session(self.id, rate, on_action=self._on_action,
                                                on_turn=self._on_turn, store=self.tel.store,
                                                caller=self.caller,
                                                caller_verified=self.caller_verified)
                try:
                    port = self.tel.take_port(rate)
                except BaseException:
                    session.close()
                    raise
                port.bind(session.push_audio, session.pull_audio)
                self.session, self.port = session, port
                session.start(self.tel.clock(), None)
            # A re-INVITE may bring new media: (re)connect both directions.
            assert self.port is not None
            audio.startTransmit(self.port)
            self.port.startTransmit(audio)
            if self.recorder is not None:
                audio.startTransmit(self.recorder)
            self.audio = audio

    def onDtmfDigit(self, prm: Any) -> None:
        try:
            if self.session is not None:
                method = DTMF_METHODS.get(int(prm.method), "rfc4733")
                self.tel.log_event(self, "dtmf", f"digit={prm.digit} method={method}")
                self.session.post_digit(str(prm.digit).upper(), method)
        except Exception:
            log.exception("call=%s onDtmfDigit failed", self.id)

    def onCallTransferStatus(self, prm: Any) -> None:
        try:
            code = int(prm.statusCode)
            if not prm.finalNotify and code < 300:
                # REFER accepted (100) or the new call is ringing: the caller hears that
                # call now, so the session's silence watchdog must not cut in.
                if self.session is not None:
                    self.session.transfer_progress()
                return
            if 200 <= code < 300:
                self.tel.log_event(self, "transferred", f"code={code}")
                self.ended_by = "transfer"
                self.tel.commands.put(_Cmd("hangup", self, 200))
            elif self.session is not None:
                self.tel.log_event(self, "transfer_failed", f"code={code} reason={prm.reason!r}")
                self.session.post(TransferFailed(self.session.player.tx_ms,
                                                 f"{code} {prm.reason}"))
            prm.cont = False
        except Exception:
            log.exception("call=%s onCallTransferStatus failed", self.id)

    # --- session callbacks (call worker thread): only enqueue or store ---

    def _on_action(self, action: Action) -> None:
        if isinstance(action, Transfer):
            self.tel.commands.put(_Cmd("xfer", self, action.target))
        elif isinstance(action, HangUp):
            self.ended_by = "bot"
            self.tel.commands.put(_Cmd("hangup", self, 200))

    def _on_turn(self, turn: Turn) -> None:
        self.tel.log_event(self, "turn", f"node={turn.node} input={turn.input} "
                                         f"heard={turn.heard!r} option={turn.option} "
                                         f"result={turn.result} latency_ms={turn.latency_ms}")
        self.tel.store.add_turn(self.id, turn)  # a failure goes back to the session


class _Account(pj.Account):
    def __init__(self, tel: Telephony) -> None:
        super().__init__()
        self.tel = tel

    def onIncomingCall(self, prm: Any) -> None:
        try:
            self.tel.incoming(self, prm)
        except Exception:
            # No BotCall was made (else incoming() has queued its answer): pjsua2 answers
            # an INVITE no Call object took with 500 itself.
            log.exception("worker=%d incoming INVITE failed", self.tel.worker)

    def onRegState(self, prm: Any) -> None:
        try:
            log.info("registration: code=%s reason=%s expiration=%s", prm.code, prm.reason,
                     prm.expiration)
        except Exception:
            log.exception("onRegState failed")


class Telephony:
    """One pjsua2 endpoint holding up to ``sip.max_calls`` calls.

    The run loop never blocks on anything but PJSIP: a call's end is done in two steps,
    the pjsua2 part on this thread (:meth:`_finalize`) and the waiting part (the session's
    end, the WAV header, the store) on a finisher thread that touches no pjsua2 object."""

    def __init__(self, core: VoiceCore, store: Store, listen: str, rtp_port: int,
                 worker: int = 0, clock: Any = None, media_host: str | None = None) -> None:
        self.core = core
        self.cfg: Config = core.cfg
        self.store = store
        self.host, self.port = parse_hostport(listen)
        # RTP is not relayed by the front (Kamailio passes the SDP through): media binds
        # to the public address callers can reach, while SIP stays on the worker address.
        self.media_host = media_host or self.host
        self.rtp_port = rtp_port
        self.worker = worker
        self.clock = clock or (lambda: __import__("datetime").datetime.now(core.hours.tz))
        self.commands: queue.Queue[_Cmd] = queue.Queue()
        self.finished: queue.Queue[BotCall] = queue.Queue()
        self.calls: dict[str, BotCall] = {}
        # INVITEs taken in onIncomingCall, answered by the run loop once the callback is over
        # (see incoming()): (call, status code, reason).
        self.answering: list[tuple[BotCall, int, str]] = []
        self.rejected: list[BotCall] = []
        # Ended calls whose pjsua slot was taken by a new call before they could be deleted.
        self.dead: list[BotCall] = []
        # Media ports of ended calls, resting before the next call takes them (s, port).
        self.graveyard: list[tuple[float, MediaPort]] = []
        self.free_ports: dict[int, list[MediaPort]] = {}  # sample rate -> ports ready
        self.ports: list[MediaPort] = []  # every port made: they live as long as the endpoint
        self._trim_due = False  # a call ended since the last malloc_trim
        self._finisher = ThreadPoolExecutor(max_workers=max(2, self.cfg.sip.max_calls),
                                            thread_name_prefix=f"finish-w{worker}")
        self._gc_at = 0.0
        self.stopping = False
        self.ep: pj.Endpoint | None = None
        self.acc: _Account | None = None
        rec = Path(self.cfg.recording.folder)
        self.recordings = rec if rec.is_absolute() else self.cfg.base / rec

    def log_event(self, call: BotCall, event: str, detail: str = "") -> None:
        log.info("call=%s worker=%d event=%s %s", call.id, self.worker, event, detail)

    def store_write(self, call: BotCall, what: str, fn: Callable[..., Any], *args: Any) -> bool:
        """A store write on the SIP thread: a failure is logged and told to the session
        (StoreFailed), never raised into PJSIP or the run loop."""
        try:
            fn(*args)
            return True
        except Exception as exc:
            log.error("call=%s worker=%d store %s failed: %s", call.id, self.worker, what, exc)
            if call.session is not None and not call.session.ended.is_set():
                call.session.post(StoreFailed(call.session.player.tx_ms, f"{what}: {exc}"))
            return False

    # --- start and stop ---

    def start(self) -> None:
        sip = self.cfg.sip
        ep = create_endpoint()
        ec = pj.EpConfig()
        ec.uaConfig.threadCnt = 0
        ec.uaConfig.mainThreadOnly = True
        ec.uaConfig.maxCalls = sip.max_calls
        ec.uaConfig.userAgent = sip.user_agent
        log_config(ec)
        ec.medConfig.clockRate = sip.clock_rate
        ec.medConfig.sndClockRate = sip.clock_rate
        ec.medConfig.ecTailLen = 0  # no echo canceller: there is no loudspeaker
        ec.medConfig.noVad = True
        ep.libInit(ec)
        for transport in sip.transports:
            tc = pj.TransportConfig()
            tc.port = self.port
            tc.boundAddress = self.host
            kind = pj.PJSIP_TRANSPORT_UDP if transport == "udp" else pj.PJSIP_TRANSPORT_TCP
            try:
                ep.transportCreate(kind, tc)
            except pj.Error as exc:
                raise OSError(f"cannot listen on {transport} {self.host}:{self.port}: "
                              f"{exc.info()}; is another voicebot or PBX running there? "
                              "Change [sip] listen or pass --listen") from None
        self.tls_port = 0
        if sip.tls.enabled:
            # Only the front reaches this (the worker's address), over TLS: see voicebot.tls.
            tc = pj.TransportConfig()
            tc.port = self.tls_port = tls.worker_tls_port(self.cfg, self.worker)
            tc.boundAddress = self.host
            tls.pj_tls_config(self.cfg, tc.tlsConfig)
            try:
                ep.transportCreate(pj.PJSIP_TRANSPORT_TLS, tc)
            except pj.Error as exc:
                raise OSError(f"cannot listen on tls {self.host}:{tc.port} with "
                              f"[sip.tls] certificate {sip.tls.certificate}: {exc.info()}"
                              ) from None
        ep.audDevManager().setNullDev()
        wanted = {CODEC_IDS[c.upper()]: 255 - i for i, c in enumerate(sip.codecs)}
        for ci in ep.codecEnum2():
            ep.codecSetPriority(ci.codecId, wanted.get(ci.codecId, 0))
        ep.libStart()
        acfg = pj.AccountConfig()
        reg = sip.registration
        acfg.idUri = reg.id_uri or f"sip:{sip.numbers[0]}@{self.host}:{self.port}"
        if reg.registrar:
            acfg.regConfig.registrarUri = reg.registrar
            acfg.regConfig.timeoutSec = reg.expires_s
            acfg.sipConfig.authCreds.append(
                pj.AuthCredInfo("digest", reg.realm, reg.username, 0, reg.password))
        else:
            acfg.regConfig.registerOnAdd = False
        mt = acfg.mediaConfig.transportConfig
        mt.port = self.rtp_port
        mt.portRange = sip.rtp_ports_per_worker
        mt.boundAddress = self.media_host
        tls.pj_srtp(self.cfg, acfg.mediaConfig)
        acc = _Account(self)
        acc.create(acfg, True)
        self.ep, self.acc = ep, acc
        log.info("worker=%d listening on %s %s:%d%s, RTP %s:%d-%d, srtp %s", self.worker,
                 "+".join(sip.transports), self.host, self.port,
                 f", tls {self.host}:{self.tls_port}" if self.tls_port else "",
                 self.media_host, self.rtp_port,
                 self.rtp_port + sip.rtp_ports_per_worker - 1, sip.srtp)

    def run(self, stop: threading.Event) -> None:
        """Serve calls until ``stop`` is set, then end calls politely and return.

        No exception from one call's work leaves this loop: each step catches and logs per
        call, so one bad call (or store) never hangs up the others."""
        assert self.ep is not None
        # Python's cyclic GC runs on whichever thread allocates when it is due, including
        # PJSIP's clock thread inside onFrameRequested; collecting a cycle that holds a
        # pjsua2 object there destroyed it under the bridge's feet (segfault at 30+ calls).
        gc.disable()
        last_check = 0.0
        deadline: float | None = None
        give_up: float | None = None
        while True:
            self._events(10)
            t = time.monotonic()
            if t - last_check >= 0.25:
                last_check = t
                try:
                    self._housekeeping(t)
                except Exception:
                    log.exception("worker=%d housekeeping failed", self.worker)
            if stop.is_set() and not self.stopping:
                self.stopping = True
                deadline = t + self.cfg.sip.shutdown_grace_s
                give_up = deadline + 5.0
                log.info("worker=%d stopping: %d call(s) to end", self.worker, len(self.calls))
                for call in list(self.calls.values()):
                    self._end_politely(call, "shutdown")
            if self.stopping:
                if not self.calls:
                    break
                if deadline is not None and t > deadline:
                    for call in list(self.calls.values()):
                        self._hangup(call, 503, "shutdown")
                    deadline = None
                if give_up is not None and t > give_up:
                    log.error("worker=%d %d call(s) never reported their end; stopping anyway",
                              self.worker, len(self.calls))
                    break
        for _ in range(50):  # let the BYEs and their answers go out
            self._events(10)

    def _events(self, ms: int) -> None:
        """One turn of PJSIP's event loop, then the work it queued."""
        assert self.ep is not None
        try:
            self.ep.libHandleEvents(ms)
        except Exception:
            log.exception("worker=%d PJSIP event handling failed", self.worker)
        try:
            self._drain()
        except Exception:
            log.exception("worker=%d run loop step failed", self.worker)

    def close(self) -> None:
        if self.ep is not None:
            try:
                self.ep.hangupAllCalls()
            except Exception:
                log.exception("worker=%d hangupAllCalls failed", self.worker)
            for _ in range(20):
                self._events(10)
            # Records first: the finishers wait for sessions and write the store, which the
            # caller closes after this returns.
            self._finisher.shutdown(wait=True)
            # Every pjsua2 object goes before the library does (see softphone.run).
            self.calls.clear()
            self.answering.clear()
            self.rejected.clear()
            self.dead.clear()
            self.graveyard.clear()
            self.free_ports.clear()
            self.ports.clear()
            self.acc = None
            gc.collect()
            self.ep.libDestroy()
            self.ep = None

    # --- calls ---

    def incoming(self, acc: pj.Account, prm: Any) -> None:
        """onIncomingCall: take the INVITE and decide; the run loop sends the answer.

        Never answer inside this callback. pjsua2's Endpoint::on_incoming_call frees the
        cloned INVITE after onIncomingCall returns, unconditionally; a final answer given in
        the callback to an INVITE without SDP (the answer is not deferred then) ends the
        call at once, and pjsua's reset_call() has already freed that clone and set it to
        NULL: pjsip_rx_data_free_cloned(NULL) asserts and aborts the process. Every SIP
        scanner sends such INVITEs. The BotCall made here sets the call's user data, so
        pjsua2 leaves the unanswered INVITE to us (it sends 100 Trying itself)."""
        call = BotCall(self, acc, prm.callId)
        code, reason = 500, "Server Internal Error"
        try:
            msg = prm.rdata.wholeMsg
            request_line = msg.split("\r\n", 1)[0] if "\r\n" in msg else msg.split("\n", 1)[0]
            parts = request_line.split()
            call.dialled = _user_of(parts[1]) if len(parts) > 1 else ""
            info = call.getInfo()
            sip = self.cfg.sip
            who = caller_identity(msg, info.remoteUri, source_host(prm.rdata.srcAddress),
                                  sip.allow, (parse_hostport(sip.listen)[0], sip.worker_address))
            call.caller, call.caller_verified, call.caller_from = (who.number, who.verified,
                                                                   who.from_uri)
            call.sip_call_id = info.callIdString
            if self.stopping:
                code, reason = 503, "Service Unavailable"
            elif call.dialled not in self.cfg.sip.numbers:
                code, reason = 404, "Not Found"
            elif len(self.calls) >= self.cfg.sip.max_calls:
                code, reason = 486, "Busy Here"
            else:
                code, reason = 200, ""
        except Exception:
            log.exception("call=%s worker=%d incoming INVITE not understood; answering 500",
                          call.id, self.worker)
        finally:
            # Whatever happened above, the call is kept and answered.
            if code == 200:
                call.accepted = True
                self.calls[call.id] = call
            else:
                self.rejected.append(call)
            self.answering.append((call, code, reason))

    def _answer_pending(self) -> None:
        while self.answering:
            call, code, reason = self.answering.pop(0)
            try:
                self._answer(call, code, reason)
            except Exception:
                log.exception("call=%s answering %d failed", call.id, code)

    def _answer(self, call: BotCall, code: int, reason: str) -> None:
        if call.accepted:
            try:
                self.store.call_started(call.id, call.sip_call_id, call.caller, call.dialled,
                                        self.worker, verified=call.caller_verified,
                                        caller_from=call.caller_from)
                call.started = True
            except Exception as exc:
                # No record could be opened: turn the caller away now rather than hold
                # the slot with a call nobody can account for.
                log.error("call=%s worker=%d store call_started failed: %s; answering 503",
                          call.id, self.worker, exc)
                call.accepted = False
                self.calls.pop(call.id, None)
                self.rejected.append(call)
                code, reason = 503, "Service Unavailable"
            else:
                self.log_event(call, "incoming", f"dialled={call.dialled} caller={call.caller} "
                                                 f"verified={int(call.caller_verified)} "
                                                 f"sip_call_id={call.sip_call_id}")
        if not call.accepted:
            log.info("call=%s worker=%d event=rejected code=%d dialled=%s caller=%s", call.id,
                     self.worker, code, call.dialled, call.caller)
        if call.disconnected:  # the caller gave up (CANCEL) before the answer went out
            return
        op = pj.CallOpParam()
        op.statusCode = code
        if reason:
            op.reason = reason
        try:
            call.answer(op)
        except pj.Error as exc:
            log.warning("call=%s answer %d failed: %s", call.id, code, exc.info())
            if not call.disconnected:
                self._hangup(call, 500, "answer_failed")

    def _drain(self) -> None:
        # Answers first: a call the caller gave up on in the same turn must not be deleted
        # (below) before its answer is sent.
        self._answer_pending()
        while True:
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                break
            call = cmd.call
            if call.disconnected:
                continue
            try:
                if cmd.kind == "xfer":
                    self.log_event(call, "transfer", f"to={cmd.arg}")
                    call.xfer(cmd.arg, pj.CallOpParam(True))
                elif cmd.kind == "hangup":
                    self._hangup(call, int(cmd.arg or 200), call.reason or "")
            except pj.Error as exc:
                log.warning("call=%s %s failed: %s", call.id, cmd.kind, exc.info())
                if cmd.kind == "xfer" and call.session is not None:
                    call.session.post(TransferFailed(call.session.player.tx_ms, exc.reason))
            except Exception:
                log.exception("call=%s %s failed", call.id, cmd.kind)
        while True:
            try:
                call = self.finished.get_nowait()
            except queue.Empty:
                break
            try:
                self._finalize(call)
            except Exception:
                log.exception("call=%s finalising failed", call.id)

    def _hangup(self, call: BotCall, code: int, reason: str) -> None:
        if call.disconnected:
            return
        if reason:
            call.reason = reason
        op = pj.CallOpParam(True)
        op.statusCode = code
        try:
            call.hangup(op)
        except pj.Error as exc:
            log.warning("call=%s hangup failed: %s", call.id, exc.info())

    def _end_politely(self, call: BotCall, reason: str) -> None:
        if call.ending or call.disconnected:
            return
        call.ending = True
        call.reason = reason
        call.ended_by = "bot"
        if call.session is not None and not call.session.ended.is_set():
            call.session.post(EndCall(call.session.player.tx_ms, reason))
        else:
            self._hangup(call, 200, reason)

    def take_port(self, rate: int) -> MediaPort:
        """A media port for a new call at ``rate``: a rested one, or a new one (pjsua2
        thread). At most about twice max_calls are ever made per rate."""
        free = self.free_ports.get(rate)
        if free:
            return free.pop()
        port = MediaPort(rate, f"vb-w{self.worker}-{len(self.ports)}")
        port.create()
        self.ports.append(port)
        return port

    def _housekeeping(self, t: float) -> None:
        for dead in list(self.dead):
            try:
                self._release(dead)
            except Exception:
                log.exception("call=%s release failed", dead.id)
                self.dead.remove(dead)
        resting = []
        for until, port in self.graveyard:
            if until > t:
                resting.append((until, port))
            else:
                self.free_ports.setdefault(port.sample_rate, []).append(port)
        self.graveyard = resting
        if t >= self._gc_at:
            # The cyclic collector is off in this process (see run): collect here, on the
            # thread that owns pjsua2, so no pjsua2 object is ever destroyed on the media
            # clock thread in the middle of a frame callback.
            self._gc_at = t + GC_INTERVAL_S
            gc.collect()
            if self._trim_due:
                # Calls ended: hand their freed heap back (glibc keeps the peak of a
                # turnover, four calls ending while four start, resident for good). On a
                # finisher, not here: the trim walks the whole heap.
                self._trim_due = False
                self._finisher.submit(malloc_trim)
        for call in list(self.calls.values()):
            try:
                self._check_call(call, t)
            except Exception:
                log.exception("call=%s housekeeping failed", call.id)

    def _check_call(self, call: BotCall, t: float) -> None:
        if call.disconnected:
            return
        limit = self.cfg.dialog.max_call_s
        if call.answered_at and t - call.answered_at > limit:
            if t - call.answered_at > limit + MAX_CALL_GRACE_S:
                # The goodbye did not end it (a session that is stuck or gone): cut it.
                if not call.reason.startswith("max_duration"):
                    self.log_event(call, "max_duration", "hung up without the goodbye")
                call.ended_by = "bot"
                self._hangup(call, 200, "max_duration")
                return
            # Also for an answered call that never got a session (no media): nobody else
            # would ever end it.
            self._end_politely(call, "max_duration")
        if call.session is None:
            # Answered, and still no media: the caller's ACK brought no SDP answer (a scanner's
            # INVITE without an offer) or the media failed. Nothing can be said on this call.
            if call.answered_at and t - call.answered_at > self.cfg.sip.no_rtp_timeout_s:
                self.log_event(call, "no_media", f"for {self.cfg.sip.no_rtp_timeout_s:.0f} s")
                call.ended_by = "bot"
                self._hangup(call, 200, "no_media")
            return
        # Recording starts once the caller has heard that the call is recorded.
        if (self.cfg.recording.enabled and not call.recording_tried
                and call.session.notice_done.is_set() and call.audio is not None):
            self._start_recording(call, t)
        if call.recorder is not None:
            self._check_recording(call, t)
        if call.media_index >= 0:
            try:
                stat = call.getStreamStat(call.media_index)
                pkts = int(stat.rtcp.rxStat.pkt)
            except pj.Error:
                pkts = call.last_rx_pkts
            if pkts != call.last_rx_pkts:
                call.last_rx_pkts = pkts
                call.last_rx_change = t
            elif t - call.last_rx_change > self.cfg.sip.no_rtp_timeout_s:
                self.log_event(call, "no_rtp", f"for {self.cfg.sip.no_rtp_timeout_s:.0f} s")
                call.ended_by = "bot"
                call.last_rx_change = t
                self._hangup(call, 200, "no_rtp")

    def _start_recording(self, call: BotCall, t: float) -> None:
        call.recording_tried = True
        day = time.strftime("%Y-%m-%d")
        folder = self.recordings / day
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.error("call=%s cannot record: %s; the call goes on unrecorded", call.id, exc)
            return
        call.rec_path = folder / f"{call.id}.wav"
        # PJSIP picks the file format from the extension, so the partial file ends in .wav too.
        call.rec_part = folder / f".{call.id}.part.wav"
        rec = pj.AudioMediaRecorder()
        try:
            rec.createRecorder(str(call.rec_part))
            assert call.audio is not None and call.port is not None
            call.audio.startTransmit(rec)  # the caller
            call.port.startTransmit(rec)  # the bot: the bridge mixes both into one track
        except pj.Error as exc:
            log.error("call=%s cannot record to %s: %s; the call goes on unrecorded", call.id,
                      call.rec_part, exc.info())
            del rec
            if call.rec_part.exists():
                with contextlib.suppress(OSError):
                    call.rec_part.unlink()
            call.rec_path = call.rec_part = None
            return
        call.recorder = rec
        call.rec_grew_at = t
        self.log_event(call, "recording", str(call.rec_path))

    def _check_recording(self, call: BotCall, t: float) -> None:
        """Stop a call's recording that no longer grows: the disk is full (or failing).

        PJSIP's WAV writer says nothing then: each block it cannot write is dropped (its
        put_frame error is ignored by the bridge) and the call goes on. The recording is
        stopped with one log line; what reached the disk is kept and made playable at the
        call's end."""
        assert call.rec_part is not None
        try:
            size = call.rec_part.stat().st_size
        except OSError:
            size = -2
        if size != call.rec_size:
            call.rec_size, call.rec_grew_at = size, t
            return
        if t - call.rec_grew_at < REC_STALL_S:
            return
        try:
            st = os.statvfs(call.rec_part.parent)
            free = f"{st.f_bavail * st.f_frsize // 1024} KB free"
        except OSError as exc:
            free = str(exc)
        self.log_event(call, "recording_stopped",
                       f"{call.rec_part} has not grown for {t - call.rec_grew_at:.1f} s "
                       f"({free} on its disk): recording stops, the call goes on; "
                       f"{max(size, 0)} bytes kept")
        call.recorder = None  # destroying it closes the file (the header may fail too)
        call.rec_stopped_at = t

    def _finalize(self, call: BotCall) -> None:
        """After DISCONNECTED, on the SIP thread, without blocking: let go of the call's
        pjsua2 objects and hand the rest of its end to a finisher thread."""
        if call in self.rejected:
            if any(c is call for c, _, _ in self.answering):
                self.finished.put(call)  # answered first (see _drain), deleted next turn
                return
            self.rejected.remove(call)
            self._release(call)
            return
        if call.finalized:
            return
        call.finalized = True
        self.calls.pop(call.id, None)
        session = call.session
        if session is not None and not session.ended.is_set():
            session.post(CallerHungUp(session.player.tx_ms))
        now = time.monotonic()
        rec_part = call.rec_part if (call.recorder is not None or call.rec_stopped_at) else None
        # Destroying the recorder writes the WAV header... but PJSIP 2.15 removes conference
        # ports on its clock thread, so the header lands a tick or two later: the finisher
        # publishes the file once it is a complete WAV.
        call.recorder = None
        wait = 0.0 if call.rec_stopped_at and now - call.rec_stopped_at > 2.0 else 2.0
        rx = call.port.rx_frames if call.port is not None else 0
        if call.port is not None:
            # No stopTransmit here: PJSIP removed the call's stream from the bridge before it
            # reported DISCONNECTED (pjsua_media_channel_deinit runs first), and its
            # connections with it; disconnecting the stale slot only fails (PJ_EINVAL).
            # The port is never destroyed while the endpoint runs (see MediaPort): it rests
            # a moment, so a frame of this call still in flight cannot reach the next one.
            call.port.unbind()
            self.graveyard.append((now + PORT_GRACE_S, call.port))
            call.port = None
        call.audio = None
        call.session = None
        job = _Ending(call.id, session, call.started, call.ended_by, call.reason, rec_part,
                      call.rec_path, wait, rx)
        self._release(call)
        self._finisher.submit(self._finish, job)
        self._trim_due = True

    def _finish(self, job: _Ending) -> None:
        """The waiting part of a call's end (finisher thread; no pjsua2 here)."""
        try:
            result, language, language_by = "abandoned", None, None
            session = job.session
            barge: list[int] = []
            if session is not None:
                if not session.ended.wait(SESSION_END_WAIT_S):
                    log.warning("call=%s session did not end within %.0f s of the hang-up",
                                job.call_id, SESSION_END_WAIT_S)
                session.close()
                result = session.result or session.engine.outcome
                language = session.engine.language
                language_by = session.engine.language_by or None
                barge = [round(ms) for ms in session.stats.barge_in_ms]
            if job.ended_by == "transfer":
                result = "transferred"
            recording = self._save_recording(job)
            if job.started:
                try:
                    self.store.call_ended(job.call_id, result, language, recording,
                                          job.ended_by, job.reason, language_by)
                except Exception as exc:
                    log.error("call=%s worker=%d store call_ended failed: %s", job.call_id,
                              self.worker, exc)
            log.info("call=%s worker=%d event=ended result=%s by=%s reason=%s recording=%s "
                     "rx_frames=%d barge_in_ms=%s", job.call_id, self.worker, result,
                     job.ended_by, job.reason or "-", recording, job.rx_frames, barge)
        except Exception:
            log.exception("call=%s finishing the call failed", job.call_id)

    def _save_recording(self, job: _Ending) -> str | None:
        part, final = job.rec_part, job.rec_path
        if part is None or final is None:
            return None
        try:
            if not _wait_wav_header(part, job.header_wait_s):
                # PJSIP could not finish the file: with the disk full its last buffered write
                # fails and the header update with it (RIFF sizes stay 0). Set the sizes from
                # the data on disk, in place (no new blocks needed).
                info = wavfile.repair(part)
                if info is None:
                    log.warning("call=%s recording %s holds no audio; removed", job.call_id,
                                part)
                    part.unlink(missing_ok=True)
                    return None
                log.info("call=%s recording header set from the data on disk (%d frames)",
                         job.call_id, info.frames)
            os.replace(part, final)
            return str(final)
        except OSError as exc:
            log.error("call=%s recording not saved: %s", job.call_id, exc)
            return None

    def _release(self, call: BotCall) -> None:
        """Delete an ended call's pjsua2 object now, while no other call holds its slot.

        pjsua2's ~Call never forgets its slot number: deleting it detaches and hangs up
        whatever call holds that slot by then. Left to Python's garbage collector (the
        session's callbacks form a reference cycle with the call), it ran seconds later and
        killed a new call in the reused slot, which then never reported DISCONNECTED: a 603
        or BYE to a fresh caller and a record that never ended.
        """
        if call.isActive():  # the slot already holds a new call: wait until it is free
            if call not in self.dead:
                self.dead.append(call)
            return
        if call in self.dead:
            self.dead.remove(call)
        pj.Call.__swig_destroy__(call)  # deletes the C++ object and disowns the proxy
