"""`voicebot call`: a pjsua2 caller for people and tests.

It dials, listens to the bot, and when the bot has finished speaking (or, with
barge-in, while it speaks) gives the next input: keys as RFC 4733 events (or SIP
INFO, or in-band tones), speech synthesised by espeak-ng or a recording streamed as
RTP, or silence. After the last input it waits for the reply and hangs up. What the
bot heard and decided comes from the bot's call records (matched by SIP Call-ID)
when they are reachable, otherwise from what the softphone itself observed. With
``identify`` the prompts the caller actually heard are found in the received audio
(:mod:`voicebot.heard`), independently of the bot's records.
"""

from __future__ import annotations

import bisect
import gc
import logging
import random
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pjsua2 as pj

from .config import Config
from .dtmf import generate
from .errors import VoicebotError
from .frames import AudioFrame, read_audio, resample, rms_dbfs, silence, write_wav
from .heard import Heard, matcher_for
from .menus import Grammars, load_grammars, normalize_text
from .simulator import CALLER_LEVEL_DBFS, CALLER_RATE_WPM, CallerInput
from .store import Store
from .telephony import MediaPort, create_endpoint, log_config, stream_rate
from .tts import PromptCache

log = logging.getLogger("voicebot.softphone")

VOICE_DBFS = -45.0  # bot audio louder than this is speech
# A pause this long starts a new stretch of bot speech. Prompts that follow each other
# without a gap (a menu after a key typed ahead during the welcome) are told apart only
# by the pause between sentences, 180-360 ms in espeak's prompts.
ONSET_GAP_MS = 160


@dataclass
class Observed:
    """What the softphone saw of one turn: its input and the bot's reply (ms of call time)."""

    input: CallerInput
    sent_ms: float
    reply_start_ms: float | None = None
    reply_end_ms: float | None = None


@dataclass
class CallResult:
    sip_call_id: str
    connected: bool
    status: int
    reason: str
    observed: list[Observed]
    records: list[dict[str, Any]] = field(default_factory=list)
    call_record: dict[str, Any] | None = None
    recording: Path | None = None
    duration_ms: float = 0.0
    # Everything the bot sent, as received after the codec (int16 at received_rate).
    received: np.ndarray | None = None
    received_rate: int = 8000
    heard: list[Heard] = field(default_factory=list)  # with identify: prompts found in it
    # What the caller saw of its own call's security (from the bot's 2xx to the INVITE):
    # the transport our Via carried ("UDP", "TLS"...), the Contact the answering side
    # gave (a worker answering over TLS says ;transport=tls), and whether the answer's
    # SDP chose SRTP (an a=crypto key in it).
    transport: str = ""
    remote_contact: str = ""
    srtp: bool = False
    answer_sdp: str = ""


class _Audio:
    """Both directions of the call as the clock thread sees them."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.lock = threading.Lock()
        self.rx: list[np.ndarray] = []
        self.tx: list[np.ndarray] = []
        self.sending = np.zeros(0, dtype=np.int16)
        self.pos = 0
        self.t_ms = 0.0
        self.last_voice_ms: float | None = None
        self.onsets: list[float] = []  # ms where bot speech resumed after a pause

    def sink(self, frame: AudioFrame) -> None:
        self.rx.append(frame.samples)
        self.t_ms = frame.end_ms
        if rms_dbfs(frame.samples) > VOICE_DBFS:
            if self.last_voice_ms is None or frame.timestamp_ms - self.last_voice_ms > ONSET_GAP_MS:
                self.onsets.append(frame.timestamp_ms)
            self.last_voice_ms = frame.end_ms

    def onset_after(self, t_ms: float) -> float | None:
        """The first time bot speech (re)started after ``t_ms``."""
        i = bisect.bisect_right(self.onsets, t_ms)
        return self.onsets[i] if i < len(self.onsets) else None

    def source(self, n: int) -> np.ndarray:
        with self.lock:
            chunk = self.sending[self.pos:self.pos + n]
            self.pos += n
        if len(chunk) < n:
            chunk = np.concatenate([chunk, np.zeros(n - len(chunk), dtype=np.int16)])
        self.tx.append(chunk)
        return chunk

    def send(self, samples: np.ndarray) -> None:
        with self.lock:
            self.sending = samples
            self.pos = 0

    @property
    def busy_sending(self) -> bool:
        with self.lock:
            return self.pos < len(self.sending)


class _Call(pj.Call):
    def __init__(self, phone: Softphone, acc: pj.Account) -> None:
        super().__init__(acc)
        self.phone = phone
        self.state = 0
        self.status = 0
        self.reason = ""
        self.port: MediaPort | None = None
        self.media: pj.AudioMedia | None = None
        self.audio: _Audio | None = None
        self.answer = ""  # the whole 2xx to our INVITE, as received

    def onCallTsxState(self, prm: Any) -> None:
        # The answer, as it reached us: its top Via is ours (the transport we sent on),
        # its SDP the keys the far end chose. Copied as text, nothing kept of PJSIP's.
        ts = prm.e.body.tsxState
        if ts.type == pj.PJSIP_EVENT_RX_MSG and not self.answer:
            msg = str(ts.src.rdata.wholeMsg)
            if msg.startswith("SIP/2.0 2") and re.search(r"(?im)^CSeq:\s*\d+\s+INVITE", msg):
                self.answer = msg

    def onCallState(self, prm: Any) -> None:
        info = self.getInfo()
        self.state = info.state
        self.status = info.lastStatusCode
        self.reason = info.lastReason
        if not self.phone.sip_call_id:
            self.phone.sip_call_id = info.callIdString

    def onCallMediaState(self, prm: Any) -> None:
        info = self.getInfo()
        for mi in info.media:
            if mi.type == pj.PJMEDIA_TYPE_AUDIO and mi.status == pj.PJSUA_CALL_MEDIA_ACTIVE:
                media = self.getAudioMedia(mi.index)
                if self.port is None:
                    rate, _ = stream_rate(self, mi.index, 8000)
                    self.audio = _Audio(rate)
                    self.port = MediaPort(rate, "softphone")
                    self.port.create()
                    self.port.bind(self.audio.sink, self.audio.source)
                media.startTransmit(self.port)
                self.port.startTransmit(media)
                self.media = media


class Softphone:
    """One outgoing call driven by a list of caller inputs."""

    def __init__(self, cfg: Config, uri: str, inputs: Sequence[CallerInput],
                 language: str | None = None, barge_in_ms: int | None = None,
                 dtmf_method: str = "rfc4733", quiet_ms: int = 1500,
                 record: Path | None = None, timeout_s: float = 300.0,
                 bind: str = "127.0.0.1", grammars: Grammars | None = None,
                 identify: bool = False, tls: bool = False, srtp: str = "off",
                 ca: Path | None = None, cert: tuple[Path, Path] | None = None) -> None:
        if not uri.startswith(("sip:", "sips:")):
            raise VoicebotError(f"{uri!r} is not a SIP URI; use sip:919@HOST:PORT")
        if srtp not in ("off", "optional", "mandatory"):
            raise VoicebotError("--srtp must be off, optional or mandatory")
        if ca is not None and not ca.is_file():
            raise VoicebotError(f"--ca {ca}: no such file (a PEM CA list or certificate)")
        # sips: or --tls: signalling over TLS only (no UDP transport exists to fall back
        # on); a sip: URI gets ;transport=tls so PJSIP picks the TLS transport.
        self.tls = tls or uri.startswith("sips:") or ";transport=tls" in uri.lower()
        if self.tls and not uri.startswith("sips:") and ";transport=" not in uri.lower():
            uri = uri + ";transport=tls"
        self.srtp = srtp
        self.ca = ca
        for f in cert or ():
            if not f.is_file():
                raise VoicebotError(f"--cert/--key {f}: no such file (PEM)")
        self.cert = cert  # (certificate, key) shown to a bot that asks (verify_peer)
        if dtmf_method not in ("rfc4733", "info", "inband"):
            raise VoicebotError("--dtmf must be rfc4733, info or inband")
        self.cfg = cfg
        self.uri = uri
        self.inputs = list(inputs)
        self.language = language
        self.barge_in_ms = barge_in_ms
        self.dtmf_method = dtmf_method
        self.quiet_ms = quiet_ms
        self.record = record
        self.timeout_s = timeout_s
        self.bind = bind
        self.identify = identify
        self.grammars = grammars or load_grammars(cfg.grammars_dir)
        self.sip_call_id = ""
        self._voice: PromptCache | None = None
        for inp in self.inputs:
            if inp.kind == "say_wav":
                read_audio(inp.value, 8000)  # fail early with the file name

    # --- caller audio ---

    def _speech(self, inp: CallerInput, rate: int, current: str | None) -> np.ndarray:
        if inp.kind == "say_wav":
            return np.concatenate([silence(100, rate), read_audio(inp.value, rate)])
        lang = current or self.language or self._guess_language(inp.value)
        if self._voice is None:
            self._voice = PromptCache(self.cfg.audio_dir / "cache" / "caller", 8000,
                                      CALLER_RATE_WPM, CALLER_LEVEL_DBFS)
        audio = self._voice.get(inp.value, self.grammars.packs[lang].voice)
        return np.concatenate([silence(100, rate), resample(audio, 8000, rate)])

    def _guess_language(self, text: str) -> str:
        norm = normalize_text(text)
        for lang, pack in self.grammars.packs.items():
            if any(normalize_text(k) == norm for ow in pack.options.values()
                   for k in ow.keywords):
                return lang
        return self.cfg.languages.default

    # --- the call ---

    def run(self) -> CallResult:
        # As in the bot (Telephony.run): no cyclic GC on PJSIP's clock thread.
        gc.disable()
        try:
            result = self._run()
        finally:
            gc.enable()
        if self.identify and result.received is not None:
            # After the call, off PJSIP's threads: matching takes about 2% of the call's
            # length, and building the matcher (every prompt's audio) about a second.
            result.heard = matcher_for(self.cfg, self.grammars).identify(
                result.received, result.received_rate)
        return result

    def _run(self) -> CallResult:
        ep = create_endpoint()
        ec = pj.EpConfig()
        ec.uaConfig.threadCnt = 0
        ec.uaConfig.mainThreadOnly = True
        ec.uaConfig.userAgent = "voicebot-softphone"
        log_config(ec)
        ec.medConfig.ecTailLen = 0
        ec.medConfig.noVad = True
        # A phone's own audio path is 8 kHz: a 16 kHz bridge would resample the caller's
        # speech twice more before the codec, each time cutting into the 3.4-4 kHz band.
        ec.medConfig.clockRate = 8000
        ec.medConfig.sndClockRate = 8000
        ep.libInit(ec)
        tc = pj.TransportConfig()
        tc.port = 0
        tc.boundAddress = self.bind
        if self.tls:
            # Without --ca the bot's certificate is accepted unchecked (a test's
            # self-signed one); with it, a certificate not signed by it ends the call.
            tc.tlsConfig.proto = pj.PJ_SSL_SOCK_PROTO_TLS1_2 | pj.PJ_SSL_SOCK_PROTO_TLS1_3
            if self.ca is not None:
                tc.tlsConfig.CaListFile = str(self.ca)
                tc.tlsConfig.verifyServer = True
            if self.cert is not None:
                tc.tlsConfig.certFile, tc.tlsConfig.privKeyFile = map(str, self.cert)
            ep.transportCreate(pj.PJSIP_TRANSPORT_TLS, tc)
        else:
            ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tc)
        ep.audDevManager().setNullDev()
        for ci in ep.codecEnum2():
            prio = {"PCMA/8000/1": 200, "PCMU/8000/1": 190}.get(ci.codecId, 0)
            ep.codecSetPriority(ci.codecId, prio)
        ep.libStart()
        acfg = pj.AccountConfig()
        # A sips: call needs a sips: Contact (RFC 5630): PJSIP answers 480 "SIPS Required"
        # to a sips: INVITE whose Contact is sip:.
        scheme = "sips" if self.uri.startswith("sips:") else "sip"
        acfg.idUri = f"{scheme}:caller@{self.bind}"
        acfg.regConfig.registerOnAdd = False
        acfg.mediaConfig.transportConfig.port = random.randrange(50000, 59000, 100)
        acfg.mediaConfig.transportConfig.portRange = 100
        acfg.mediaConfig.transportConfig.boundAddress = self.bind
        acfg.mediaConfig.srtpUse = {"off": pj.PJMEDIA_SRTP_DISABLED,
                                    "optional": pj.PJMEDIA_SRTP_OPTIONAL,
                                    "mandatory": pj.PJMEDIA_SRTP_MANDATORY}[self.srtp]
        # SDES over whatever we signal on: the caller decides; the bot's policy decides
        # whether it takes the call ([sip] srtp).
        acfg.mediaConfig.srtpSecureSignaling = 0
        acc = pj.Account()
        acc.create(acfg, True)
        call: _Call | None = _Call(self, acc)
        result = CallResult("", False, 0, "", [])
        try:
            assert call is not None
            result = self._drive(ep, call)
        finally:
            try:
                ep.hangupAllCalls()
                for _ in range(30):
                    ep.libHandleEvents(10)
            finally:
                # pjsua2 objects must go before the library: a Call destroyed after
                # libDestroy trips an assertion in pjsua_call_set_user_data.
                if call is not None:
                    call.port = None
                call = None
                del acc
                gc.collect()
                ep.libDestroy()
        if self.sip_call_id:
            self._collect_records(result)
        return result

    def _pump(self, ep: pj.Endpoint, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            ep.libHandleEvents(10)

    def _wait(self, ep: pj.Endpoint, call: _Call, cond: Any, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if call.state == pj.PJSIP_INV_STATE_DISCONNECTED:
                return False
            if cond():
                return True
            ep.libHandleEvents(10)
        return False

    def _drive(self, ep: pj.Endpoint, call: _Call) -> CallResult:
        started = time.monotonic()
        call.makeCall(self.uri, pj.CallOpParam(True))
        ok = self._wait(ep, call, lambda: call.state == pj.PJSIP_INV_STATE_CONFIRMED
                        and call.audio is not None, 15.0)
        result = CallResult(self.sip_call_id, ok, call.status, call.reason, [])
        self._security(call, result)
        if not ok:
            result.status, result.reason = call.status, call.reason
            return result
        audio = call.audio
        assert audio is not None
        deadline = started + self.timeout_s
        current_lang: str | None = None
        last_reply_mark = 0.0
        for i, inp in enumerate(self.inputs):
            remaining = max(1.0, deadline - time.monotonic())
            # The first input waits for the bot to finish: the welcome carries the recording
            # notice, which cannot be interrupted, and the language menu follows it with no
            # pause a listener could tell from a pause between sentences.
            if self.barge_in_ms is not None and i > 0:
                # Speak this long into the bot's next prompt.
                def into_prompt(m: float = last_reply_mark) -> bool:
                    onset = audio.onset_after(m)
                    return onset is not None and audio.t_ms - onset >= self.barge_in_ms
                ready = self._wait(ep, call, into_prompt, remaining)
            else:
                ready = self._wait(ep, call, lambda m=last_reply_mark: (
                    audio.last_voice_ms is not None and audio.last_voice_ms >= m
                    and audio.t_ms - audio.last_voice_ms >= self.quiet_ms), remaining)
            if not ready:
                break
            sent_ms = audio.t_ms
            self._send(call, audio, inp, current_lang)
            obs = Observed(inp, sent_ms)
            result.observed.append(obs)
            self._wait(ep, call, lambda: not audio.busy_sending, remaining)
            end_input = audio.t_ms
            # The reply: new bot audio after the input ended (a prompt that was interrupted
            # stops; keys during a prompt are heard at once).
            got = self._wait(ep, call, lambda e=end_input: audio.onset_after(e) is not None,
                             max(1.0, deadline - time.monotonic()))
            if got:
                obs.reply_start_ms = audio.onset_after(end_input)
            last_reply_mark = end_input
            current_lang = current_lang or self._language_after(inp)
        # Hear the last reply out, then hang up.
        self._wait(ep, call, lambda m=last_reply_mark: audio.last_voice_ms is not None
                   and audio.last_voice_ms >= m and audio.t_ms - audio.last_voice_ms
                   >= self.quiet_ms, max(1.0, deadline - time.monotonic()))
        if result.observed:
            result.observed[-1].reply_end_ms = audio.last_voice_ms
        if call.state != pj.PJSIP_INV_STATE_DISCONNECTED:
            call.hangup(pj.CallOpParam(True))
            self._wait(ep, call, lambda: False, 3.0)
        result.sip_call_id = self.sip_call_id
        result.status, result.reason = call.status, call.reason
        result.duration_ms = audio.t_ms
        result.received = (np.concatenate(audio.rx) if audio.rx
                           else np.zeros(0, dtype=np.int16))
        result.received_rate = audio.rate
        if self.record is not None:
            rx = np.concatenate(audio.rx).astype(np.int32) if audio.rx else np.zeros(0, np.int32)
            tx = np.concatenate(audio.tx).astype(np.int32) if audio.tx else np.zeros(0, np.int32)
            m = max(len(rx), len(tx))
            mix = np.pad(rx, (0, m - len(rx))) + np.pad(tx, (0, m - len(tx)))
            result.recording = write_wav(self.record, np.clip(mix, -32768, 32767), audio.rate)
        return result

    @staticmethod
    def _security(call: _Call, result: CallResult) -> None:
        """Transport, Contact and SRTP of the answer, as this caller received it."""
        msg = call.answer
        if not msg:
            return
        via = re.search(r"(?im)^(?:Via|v):\s*SIP/2\.0/(\w+)", msg)
        result.transport = via.group(1).upper() if via else ""
        contact = re.search(r"(?im)^(?:Contact|m):\s*(.+?)\s*$", msg)
        result.remote_contact = contact.group(1) if contact else ""
        _, _, sdp = msg.partition("\r\n\r\n")
        result.answer_sdp = sdp
        # An answer with a key is SRTP: RTP/SAVP when we required it, RTP/AVP with a=crypto
        # when both sides only offered it (PJSIP's "optional", best-effort SRTP).
        audio = re.search(r"(?m)^m=audio \d+ (\S+)", sdp)
        result.srtp = bool(audio and audio.group(1) in ("RTP/SAVP", "RTP/AVP")
                           and re.search(r"(?m)^a=crypto:", sdp))

    def _language_after(self, inp: CallerInput) -> str | None:
        """The language a key at the language menu picks, for --say voices afterwards."""
        if inp.kind != "press":
            return None
        menu = self.grammars.menu
        for o in menu.node(menu.start).options:
            if o.kind == "language" and o.key == inp.value[:1]:
                return o.target
        return None

    def _send(self, call: _Call, audio: _Audio, inp: CallerInput, lang: str | None) -> None:
        if inp.kind == "press":
            if self.dtmf_method == "inband":
                audio.send(np.concatenate([silence(100, audio.rate),
                                           generate(inp.value, audio.rate, 100, 100)]))
                return
            prm = pj.CallSendDtmfParam()
            prm.digits = inp.value
            prm.method = (pj.PJSUA_DTMF_METHOD_SIP_INFO if self.dtmf_method == "info"
                          else pj.PJSUA_DTMF_METHOD_RFC2833)
            prm.duration = 160
            call.sendDtmf(prm)
        elif inp.kind in ("say", "say_wav"):
            audio.send(self._speech(inp, audio.rate, lang))

    def _collect_records(self, result: CallResult) -> None:
        """The bot's own record of the call, when its store is reachable from here."""
        try:
            store = Store.from_config(self.cfg)
        except Exception as exc:  # another host's bot: fall back to what we observed
            log.info("bot records not reachable (%s)", exc)
            return
        try:
            for _ in range(50):
                recs = store.calls(sip_call_id=self.sip_call_id)
                if recs and recs[0].ended_at:
                    result.call_record = recs[0].to_json()
                    result.records = recs[0].turns
                    return
                time.sleep(0.1)
            if recs:
                result.call_record = recs[0].to_json()
                result.records = recs[0].turns
        finally:
            store.close()
