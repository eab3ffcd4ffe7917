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
import logging
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pjsua2 as pj

from .config import Config, parse_hostport
from .dialog import Action, CallerHungUp, EndCall, HangUp, Transfer, TransferFailed, Turn
from .frames import AudioFrame
from .session import CallSession, VoiceCore
from .store import Store

log = logging.getLogger("voicebot.telephony")

DTMF_METHODS = {0: "rfc4733", 1: "info"}
PORT_GRACE_S = 2.0  # how long an ended call's media port is kept alive (s)
GC_INTERVAL_S = 2.0  # cyclic garbage collection period on the pjsua2 thread (s)
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


class MediaPort(pj.AudioMediaPort):
    """One call's audio in and out of Python. Runs on PJSIP's clock thread: never blocks.

    sink(frame): receives each 20 ms frame from the far end (an AudioFrame, media time
    counted from the first frame). source(n): returns the next n samples to send.
    """

    def __init__(self, sink: Callable[[AudioFrame], None],
                 source: Callable[[int], np.ndarray], sample_rate: int, label: str) -> None:
        super().__init__()
        self.sink = sink
        self.source = source
        self.sample_rate = sample_rate
        self.label = label
        self.n = sample_rate // 50  # 20 ms
        self._out = _OutBuffer(self.n * 2)
        self._rx_ms = 0.0
        self.rx_frames = 0
        self.errors = 0

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


@dataclass
class _Cmd:
    kind: str  # xfer, hangup
    call: BotCall
    arg: Any = None


class BotCall(pj.Call):
    """One call as pjsua2 sees it."""

    def __init__(self, tel: Telephony, acc: pj.Account, call_pj_id: int) -> None:
        super().__init__(acc, call_pj_id)
        self.tel = tel
        self.id = uuid.uuid4().hex[:12]
        self.sip_call_id = ""
        self.caller = ""
        self.dialled = ""
        self.session: CallSession | None = None
        self.port: MediaPort | None = None
        self.audio: pj.AudioMedia | None = None
        self.media_index = -1
        self.recorder: pj.AudioMediaRecorder | None = None
        self.recording_tried = False
        self.rec_part: Path | None = None
        self.rec_path: Path | None = None
        self.accepted = False
        self.answered_at = 0.0
        self.last_rx_pkts = -1
        self.last_rx_change = time.monotonic()
        self.ended_by = "caller"
        self.reason = ""
        self.disconnected = False
        self.ending = False

    # --- pjsua2 callbacks (main thread) ---

    def onCallState(self, prm: Any) -> None:
        info = self.getInfo()
        if info.state == pj.PJSIP_INV_STATE_CONFIRMED and self.accepted:
            self.answered_at = time.monotonic()
            self.last_rx_change = self.answered_at
            self.tel.log_event(self, "answered")
            self.tel.store.call_answered(self.id)
        elif info.state == pj.PJSIP_INV_STATE_DISCONNECTED:
            self.disconnected = True
            if (self.accepted and not self.answered_at and not self.reason
                    and info.lastStatusCode == 408):
                # Our 200 OK was never ACKed: PJSIP gave up (64*T1) and sent BYE itself.
                self.reason = "no_ack"
                self.ended_by = "bot"
            self.tel.log_event(self, "disconnected", f"code={info.lastStatusCode} "
                                                     f"reason={info.lastReason!r}")
            self.tel.finished.put(self)

    def onCallMediaState(self, prm: Any) -> None:
        if not self.accepted:
            return
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
                                                caller=self.caller)
                self.session = session
                self.port = MediaPort(session.push_audio, session.pull_audio, rate,
                                      f"vb-{self.id}")
                self.port.create()
                session.start(self.tel.clock(), None)
            # A re-INVITE may bring new media: (re)connect both directions.
            audio.startTransmit(self.port)
            self.port.startTransmit(audio)  # type: ignore[union-attr]
            if self.recorder is not None and audio is not self.audio:
                audio.startTransmit(self.recorder)
            self.audio = audio

    def onDtmfDigit(self, prm: Any) -> None:
        if self.session is not None:
            method = DTMF_METHODS.get(int(prm.method), "rfc4733")
            self.tel.log_event(self, "dtmf", f"digit={prm.digit} method={method}")
            self.session.post_digit(str(prm.digit).upper(), method)

    def onCallTransferStatus(self, prm: Any) -> None:
        code = int(prm.statusCode)
        if not prm.finalNotify and code < 300:
            return
        if 200 <= code < 300:
            self.tel.log_event(self, "transferred", f"code={code}")
            self.ended_by = "transfer"
            self.tel.commands.put(_Cmd("hangup", self, 200))
        elif self.session is not None:
            self.tel.log_event(self, "transfer_failed", f"code={code} reason={prm.reason!r}")
            self.session.post(TransferFailed(self.session.player.tx_ms, f"{code} {prm.reason}"))
        prm.cont = False

    # --- session callbacks (call worker thread): only enqueue or store ---

    def _on_action(self, action: Action) -> None:
        if isinstance(action, Transfer):
            self.tel.commands.put(_Cmd("xfer", self, action.target))
        elif isinstance(action, HangUp):
            self.ended_by = "bot"
            self.tel.commands.put(_Cmd("hangup", self, 200))

    def _on_turn(self, turn: Turn) -> None:
        self.tel.store.add_turn(self.id, turn)
        self.tel.log_event(self, "turn", f"node={turn.node} input={turn.input} "
                                         f"heard={turn.heard!r} option={turn.option} "
                                         f"result={turn.result} latency_ms={turn.latency_ms}")


class _Account(pj.Account):
    def __init__(self, tel: Telephony) -> None:
        super().__init__()
        self.tel = tel

    def onIncomingCall(self, prm: Any) -> None:
        self.tel.incoming(self, prm)

    def onRegState(self, prm: Any) -> None:
        log.info("registration: code=%s reason=%s expiration=%s", prm.code, prm.reason,
                 prm.expiration)


class Telephony:
    """One pjsua2 endpoint holding up to ``sip.max_calls`` calls."""

    def __init__(self, core: VoiceCore, store: Store, listen: str, rtp_port: int,
                 worker: int = 0, clock: Any = None) -> None:
        self.core = core
        self.cfg: Config = core.cfg
        self.store = store
        self.host, self.port = parse_hostport(listen)
        self.rtp_port = rtp_port
        self.worker = worker
        self.clock = clock or (lambda: __import__("datetime").datetime.now(core.hours.tz))
        self.commands: queue.Queue[_Cmd] = queue.Queue()
        self.finished: queue.Queue[BotCall] = queue.Queue()
        self.calls: dict[str, BotCall] = {}
        self.rejected: list[BotCall] = []
        # Ended calls whose pjsua slot was taken by a new call before they could be deleted.
        self.dead: list[BotCall] = []
        # Media ports of ended calls, kept until PJSIP has surely stopped calling them.
        self.graveyard: list[tuple[float, MediaPort]] = []
        self._gc_at = 0.0
        self.stopping = False
        self.ep: pj.Endpoint | None = None
        self.acc: _Account | None = None
        rec = Path(self.cfg.recording.folder)
        self.recordings = rec if rec.is_absolute() else self.cfg.base / rec

    def log_event(self, call: BotCall, event: str, detail: str = "") -> None:
        log.info("call=%s worker=%d event=%s %s", call.id, self.worker, event, detail)

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
        mt.boundAddress = self.host
        acc = _Account(self)
        acc.create(acfg, True)
        self.ep, self.acc = ep, acc
        log.info("worker=%d listening on %s %s:%d, RTP %d-%d", self.worker,
                 "+".join(sip.transports), self.host, self.port, self.rtp_port,
                 self.rtp_port + sip.rtp_ports_per_worker - 1)

    def run(self, stop: threading.Event) -> None:
        """Serve calls until ``stop`` is set, then end calls politely and return."""
        assert self.ep is not None
        # Python's cyclic GC runs on whichever thread allocates when it is due, including
        # PJSIP's clock thread inside onFrameRequested; collecting a cycle that holds a
        # pjsua2 object there destroyed it under the bridge's feet (segfault at 30+ calls).
        gc.disable()
        last_check = 0.0
        deadline: float | None = None
        while True:
            self.ep.libHandleEvents(10)
            self._drain()
            t = time.monotonic()
            if t - last_check >= 0.25:
                last_check = t
                self._housekeeping(t)
            if stop.is_set() and not self.stopping:
                self.stopping = True
                deadline = t + self.cfg.sip.shutdown_grace_s
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
        for _ in range(50):  # let the BYEs and their answers go out
            self.ep.libHandleEvents(10)
            self._drain()

    def close(self) -> None:
        if self.ep is not None:
            self.ep.hangupAllCalls()
            for _ in range(20):
                self.ep.libHandleEvents(10)
                self._drain()
            # Every pjsua2 object goes before the library does (see softphone.run).
            self.calls.clear()
            self.rejected.clear()
            self.dead.clear()
            self.graveyard.clear()
            self.acc = None
            gc.collect()
            self.ep.libDestroy()
            self.ep = None

    # --- calls ---

    def incoming(self, acc: pj.Account, prm: Any) -> None:
        call = BotCall(self, acc, prm.callId)
        msg = prm.rdata.wholeMsg
        request_line = msg.split("\r\n", 1)[0] if "\r\n" in msg else msg.split("\n", 1)[0]
        parts = request_line.split()
        call.dialled = _user_of(parts[1]) if len(parts) > 1 else ""
        info = call.getInfo()
        call.caller = info.remoteUri
        call.sip_call_id = info.callIdString
        code, reason = 0, ""
        if self.stopping:
            code, reason = 503, "Service Unavailable"
        elif call.dialled not in self.cfg.sip.numbers:
            code, reason = 404, "Not Found"
        elif len(self.calls) >= self.cfg.sip.max_calls:
            code, reason = 486, "Busy Here"
        op = pj.CallOpParam()
        if code:
            self.rejected.append(call)
            op.statusCode = code
            op.reason = reason
            log.info("call=%s worker=%d event=rejected code=%d dialled=%s caller=%s", call.id,
                     self.worker, code, call.dialled, call.caller)
            call.answer(op)
            return
        call.accepted = True
        self.calls[call.id] = call
        self.store.call_started(call.id, call.sip_call_id, call.caller, call.dialled,
                                self.worker)
        self.log_event(call, "incoming", f"dialled={call.dialled} caller={call.caller} "
                                         f"sip_call_id={call.sip_call_id}")
        op.statusCode = 200
        call.answer(op)

    def _drain(self) -> None:
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
        while True:
            try:
                call = self.finished.get_nowait()
            except queue.Empty:
                break
            self._finalize(call)

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

    def _housekeeping(self, t: float) -> None:
        for dead in list(self.dead):
            self._release(dead)
        self.graveyard = [(until, port) for until, port in self.graveyard if until > t]
        if t >= self._gc_at:
            # The cyclic collector is off in this process (see run): collect here, on the
            # thread that owns pjsua2, so no pjsua2 object is ever destroyed on the media
            # clock thread in the middle of a frame callback.
            self._gc_at = t + GC_INTERVAL_S
            gc.collect()
        for call in list(self.calls.values()):
            if call.disconnected or call.session is None:
                continue
            # Recording starts once the caller has heard that the call is recorded.
            if (self.cfg.recording.enabled and not call.recording_tried
                    and call.session.notice_done.is_set() and call.audio is not None):
                self._start_recording(call)
            if call.answered_at and t - call.answered_at > self.cfg.dialog.max_call_s:
                self._end_politely(call, "max_duration")
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

    def _start_recording(self, call: BotCall) -> None:
        day = time.strftime("%Y-%m-%d")
        folder = self.recordings / day
        folder.mkdir(parents=True, exist_ok=True)
        call.rec_path = folder / f"{call.id}.wav"
        # PJSIP picks the file format from the extension, so the partial file ends in .wav too.
        call.rec_part = folder / f".{call.id}.part.wav"
        call.recording_tried = True
        rec = pj.AudioMediaRecorder()
        try:
            rec.createRecorder(str(call.rec_part))
        except pj.Error as exc:
            log.error("call=%s cannot record to %s: %s", call.id, call.rec_part, exc.info())
            call.rec_path = call.rec_part = None
            return
        call.recorder = rec
        assert call.audio is not None and call.port is not None
        call.audio.startTransmit(rec)  # the caller
        call.port.startTransmit(rec)  # the bot: the bridge mixes both into one track
        self.log_event(call, "recording", str(call.rec_path))

    def _finalize(self, call: BotCall) -> None:
        """After DISCONNECTED: finish the session, save the recording, complete the record."""
        if call in self.rejected:
            self.rejected.remove(call)
            self._release(call)
            return
        self.calls.pop(call.id, None)
        session = call.session
        result, language = "abandoned", None
        if session is not None:
            if not session.ended.is_set():
                session.post(CallerHungUp(session.player.tx_ms))
                session.ended.wait(5.0)
            session.close()
            result = session.result or session.engine.outcome
            language = session.engine.language
        if call.ended_by == "transfer":
            result = "transferred"
        recording = None
        if call.recorder is not None and call.rec_part is not None and call.rec_path:
            call.recorder = None  # destroying the recorder writes the WAV header
            # ...but PJSIP 2.15 removes conference ports on its clock thread, so the header
            # lands a tick or two later: publish the file only once it is a complete WAV.
            if not _wait_wav_header(call.rec_part):
                log.warning("call=%s recording header not written in time: %s", call.id,
                            call.rec_part)
            try:
                os.replace(call.rec_part, call.rec_path)
                recording = str(call.rec_path)
            except OSError as exc:
                log.error("call=%s recording not saved: %s", call.id, exc)
        self.store.call_ended(call.id, result, language, recording, call.ended_by, call.reason)
        rx = call.port.rx_frames if call.port is not None else 0
        barge = [round(ms) for ms in session.stats.barge_in_ms] if session is not None else []
        self.log_event(call, "ended", f"result={result} by={call.ended_by} "
                                      f"reason={call.reason or '-'} recording={recording} "
                                      f"rx_frames={rx} barge_in_ms={barge}")
        if call.port is not None:
            # PJSIP removes a port from the bridge on its clock thread, a tick after it is
            # asked to: the Python side of the port must outlive that, or the clock thread
            # calls into a half-deleted object (seen as AttributeError, then a crash).
            if call.audio is not None:
                with contextlib.suppress(pj.Error):
                    call.audio.stopTransmit(call.port)
                with contextlib.suppress(pj.Error):
                    call.port.stopTransmit(call.audio)
            self.graveyard.append((time.monotonic() + PORT_GRACE_S, call.port))
            call.port = None
        call.session = None
        self._release(call)

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
