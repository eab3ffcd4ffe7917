"""Configuration: ``voicebot.toml``, validated on load.

Every section is a dataclass with defaults, so an empty file is a working
configuration. Unknown keys and wrong types are errors that name the file and
the key (``voicebot.toml: vad.hangover: unknown key ...``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError, DataErrors

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "voicebot.toml"


@dataclass
class PathsConfig:
    """Where voicebot finds its data. Relative paths are relative to the config file."""

    grammars: str = "grammars"
    models: str = "models"
    audio: str = "audio"
    var: str = "var"


@dataclass
class HoursConfig:
    """When operators take calls."""

    timezone: str = "Asia/Baku"
    open: str = "09:00"
    close: str = "18:00"
    days: list[str] = field(default_factory=lambda: ["mon", "tue", "wed", "thu", "fri"])
    holidays: list[str] = field(default_factory=list)


@dataclass
class LanguagesConfig:
    """Which language packs the call offers and in which one it greets."""

    default: str = "az"
    # Packs in the order the language menu offers them; empty means every pack by key.
    offered: list[str] = field(default_factory=list)


@dataclass
class TtsConfig:
    """Prompt rendering with pyttsx3 on espeak-ng."""

    rate: int = 165  # words per minute; espeak's 200 is fast on a phone line
    volume_dbfs: float = -16.0  # RMS level prompts are normalised to
    sample_rate: int = 8000


@dataclass
class VadConfig:
    """Voice activity detection and endpointing (see voicebot/vad.py)."""

    aggressiveness: int = 2  # webrtcvad mode 0 (least) .. 3 (most aggressive)
    frame_ms: int = 20  # webrtcvad frame: 10, 20 or 30 ms
    start_ms: int = 60  # voiced, loud audio (ms, majority of a window) before speech-start
    # Quiet audio (ms) after the caller's last loud 5 ms block that ends an utterance.
    # webrtcvad's own 100-150 ms overhang does not count: those frames are quiet.
    hangover_ms: int = 140
    preroll_ms: int = 300  # audio (ms) before the speech start handed to ASR with speech-start
    min_utterance_ms: int = 80  # shorter speech (ms) ends with too_short=True (clicks, coughs)
    max_utterance_ms: int = 10000  # an utterance (ms) this long is cut and recognised
    energy_margin_db: float = 6.0  # dB a 5 ms block must exceed the noise floor to be speech
    # dB a frame's 20 ms mean must exceed the noise floor to be speech (weak fricatives in noise)
    frame_margin_db: float = 2.5
    min_level_dbfs: float = -55.0  # blocks below this level (dBFS RMS) are never speech
    # dB under the utterance's loudest 5 ms block below which audio does not extend it
    end_drop_db: float = 40.0
    noise_window_ms: int = 1000  # noise floor: quietest frame in this much recent non-speech (ms)


@dataclass
class DtmfConfig:
    """In-band DTMF detection (Goertzel), after ITU-T Q.24 practice.

    Twist is named as in Bellcore / Q.24 (and spandsp, Asterisk): normal twist is
    the low group louder than the high group, reverse twist the opposite.
    """

    min_on_ms: int = 40  # a tone this long always counts (~28 ms and shorter never do)
    min_off_ms: int = 40  # a pause this long always separates two presses of the same key
    max_twist_db: float = 8.0  # normal twist: row (low group) louder than column
    max_reverse_twist_db: float = 4.0  # reverse twist: column (high group) louder than row
    min_level_dbfs: float = -40.0  # each tone of the pair at least this loud (RMS dBFS)


@dataclass
class AsrConfig:
    """Speech recognition with Vosk."""

    auto_download: bool = False  # download official models on start-up when missing
    grammar: bool = True  # grammar mode at menus (keywords + decoys); False: free mode
    min_word_confidence: float = 0.5  # mean word confidence below this lowers the turn score
    model_paths: dict[str, str] = field(default_factory=dict)  # model name -> folder


@dataclass
class NluConfig:
    """Intent decision thresholds, on the combined ASR x classifier score."""

    accept: float = 0.70  # at or above: take the option
    confirm: float = 0.40  # at or above (below accept): ask yes/no


@dataclass
class DialogConfig:
    """Turn-taking rules."""

    no_input_ms: int = 6000  # silence after a prompt that counts as no input
    # Silence (ms) after spoken digits that ends the number: callers say numbers in
    # groups ("three five ... seven"), so one utterance is not the whole number.
    digit_pause_ms: int = 1500
    max_retries: int = 2  # re-prompts after no-input/no-match before escalating
    max_call_s: int = 900
    # A caller who has heard nothing for this long (s) while the bot is not listening with
    # a timer (a lookup, a transfer or a save that never answers) gets an apology and moves
    # on: dead air is the one thing a public line must never do.
    max_silence_s: float = 10.0


@dataclass
class OperatorConfig:
    """Where calls for a person go."""

    uri: str = "sip:operator@127.0.0.1:5099"


@dataclass
class RegistrationConfig:
    """Optional registration to a PBX or trunk (digest credentials)."""

    registrar: str = ""  # e.g. sip:pbx.example.org; empty: no registration
    id_uri: str = ""  # e.g. sip:919@pbx.example.org
    username: str = ""
    password: str = ""
    realm: str = "*"
    expires_s: int = 300


@dataclass
class TlsConfig:
    """SIP over TLS on the front (Kamailio) and the workers, when both files are named."""

    certificate: str = ""  # PEM certificate (chain) file
    key: str = ""  # PEM private key file
    port: int = 5061  # the front's TLS port (same host as [sip] listen)
    verify_peer: bool = False  # ask callers for a certificate signed by ca_list
    ca_list: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.certificate or self.key)


@dataclass
class SipConfig:
    """The SIP edge: where voicebot listens and which calls it takes."""

    listen: str = "127.0.0.1:5060"  # public address: the endpoint, or Kamailio with workers
    transports: list[str] = field(default_factory=lambda: ["udp", "tcp"])
    numbers: list[str] = field(default_factory=lambda: ["919"])  # dialled numbers answered
    max_calls: int = 4  # per worker process; pjsua2-python is built for 4
    codecs: list[str] = field(default_factory=lambda: ["G722", "PCMU", "PCMA"])
    # Conference bridge rate (Hz). 8000: PCMU/PCMA audio reaches the recogniser untouched;
    # a 16 kHz bridge resamples it up and down again, which cuts 3.4-4 kHz and made the
    # Korean model miss short keywords over SIP. 16000 keeps G.722 calls wideband.
    clock_rate: int = 8000
    worker_port: int = 5100  # first worker's SIP port when --workers > 1
    rtp_port: int = 40000  # first RTP port of this host
    rtp_ports_per_worker: int = 200
    no_rtp_timeout_s: float = 20.0  # hang up when no RTP arrives for this long
    shutdown_grace_s: float = 15.0  # on SIGTERM, time calls get to end politely
    user_agent: str = "voicebot"
    # Peers that may send requests (CIDR). Anyone else gets 403 and a log line; a
    # deployment lists its trunk or PBX. P-Asserted-Identity is believed only from these.
    allow: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    # More than this many requests per second from one source bans it for ban_s, silently.
    flood_limit: int = 20
    ban_s: int = 300
    # User-Agent substrings of SIP scanners (case-insensitive): dropped and banned.
    scanner_agents: list[str] = field(default_factory=lambda: [
        "friendly-scanner", "sipvicious", "sipcli", "VaxSIPUserAgent", "VaxIPUserAgent",
        "sundayddr", "sipsak", "iWar", "SIVuS", "smap", "VoIPSIPScanner", "pplsip",
        "Cisco-SIPGateway-Scan", "PortSIP VoIP SDK"])
    # Workers listen here (loopback or a private address): only the front reaches them.
    worker_address: str = "127.0.0.1"
    srtp: str = "off"  # off, optional or mandatory (SDES keys: use with [sip.tls])
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)


@dataclass
class WebConfig:
    """The live call report (`serve --web`)."""

    listen: str = ""  # HOST:PORT; empty: no report unless --web names one
    # Required on any address but loopback (HTTP Basic, user "voicebot").
    password: str = ""
    max_age_s: float = 5.0  # the page is rebuilt at most this often, however many requests


@dataclass
class StoreConfig:
    """Call records."""

    path: str = "var/voicebot.sqlite"  # SQLite (WAL) file shared by the workers of a host
    dsn: str = ""  # postgresql://user:pass@host/db for several hosts (needs psycopg)


@dataclass
class RecordingConfig:
    """Call recordings: both directions mixed, WAV, from the end of the recording notice."""

    enabled: bool = True
    folder: str = "var/recordings"
    # Recordings and messages older than this are deleted, once a day (0: keep forever).
    keep_days: int = 90


@dataclass
class Config:
    """The whole configuration; ``base`` is the folder relative paths hang from."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    languages: LanguagesConfig = field(default_factory=LanguagesConfig)
    hours: HoursConfig = field(default_factory=HoursConfig)
    tts: TtsConfig = field(default_factory=TtsConfig)
    vad: VadConfig = field(default_factory=VadConfig)
    dtmf: DtmfConfig = field(default_factory=DtmfConfig)
    asr: AsrConfig = field(default_factory=AsrConfig)
    nlu: NluConfig = field(default_factory=NluConfig)
    dialog: DialogConfig = field(default_factory=DialogConfig)
    operator: OperatorConfig = field(default_factory=OperatorConfig)
    sip: SipConfig = field(default_factory=SipConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    recording: RecordingConfig = field(default_factory=RecordingConfig)
    web: WebConfig = field(default_factory=WebConfig)
    base: Path = field(default=PROJECT_ROOT, metadata={"internal": True})
    source: str = field(default="(defaults)", metadata={"internal": True})

    def resolve(self, value: str) -> Path:
        """A file named in the config: absolute, or relative to ``base``."""
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else (self.base / p)

    def path(self, name: str) -> Path:
        """Absolute path of one of the [paths] entries."""
        p = Path(os.path.expanduser(getattr(self.paths, name)))
        return p if p.is_absolute() else (self.base / p)

    @property
    def grammars_dir(self) -> Path:
        return self.path("grammars")

    @property
    def models_dir(self) -> Path:
        return self.path("models")

    @property
    def audio_dir(self) -> Path:
        return self.path("audio")

    @property
    def var_dir(self) -> Path:
        return self.path("var")


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; a syntax error names the file and the line."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise DataError(path, "", "file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise DataError(path, "", f"not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise DataError(path, "", f"not UTF-8 text: {exc}") from None


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is None:
        return getattr(tp, "__name__", str(tp))
    args = ", ".join(_type_name(a) for a in typing.get_args(tp))
    return f"{origin.__name__}[{args}]"


def _check_value(value: Any, tp: Any, file: Path, where: str) -> Any:
    """Check one value against a dataclass field type; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise DataError(file, where, f"expected a table, got {type(value).__name__}")
        return build_dataclass(tp, value, file, where)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _check_value(value, arg, file, where)
            except DataError:
                continue
        raise DataError(file, where, f"expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise DataError(file, where, f"expected a list, got {value!r}")
        return [_check_value(v, item_tp, file, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise DataError(file, where, f"expected a table, got {value!r}")
        return {k: _check_value(v, val_tp, file, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise DataError(file, where, f"expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DataError(file, where, f"expected a whole number, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise DataError(file, where, f"expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise DataError(file, where, f"expected a string, got {value!r}")
        return value
    return value


def build_dataclass(cls: Any, data: dict[str, Any], file: Path, where: str = "") -> Any:
    """Build dataclass ``cls`` from a TOML table, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise DataError(file, path, f"unknown key; known keys here: {known}")
        kwargs[key] = _check_value(value, hints[key], file, path)
    return cls(**kwargs)


def validate(cfg: Config) -> list[DataError]:
    """Cross-field checks that types alone do not catch."""
    from .hours import WorkingHours

    errs: list[DataError] = []
    f = cfg.source
    if cfg.vad.aggressiveness not in (0, 1, 2, 3):
        errs.append(DataError(f, "vad.aggressiveness", "must be 0, 1, 2 or 3"))
    if cfg.vad.frame_ms not in (10, 20, 30):
        errs.append(DataError(f, "vad.frame_ms", "webrtcvad takes 10, 20 or 30 ms frames"))
    if cfg.tts.sample_rate not in (8000, 16000):
        errs.append(DataError(f, "tts.sample_rate", "must be 8000 or 16000"))
    if not 0.0 < cfg.nlu.confirm <= cfg.nlu.accept <= 1.0:
        errs.append(DataError(f, "nlu", "need 0 < confirm <= accept <= 1"))
    if cfg.dialog.max_retries < 0:
        errs.append(DataError(f, "dialog.max_retries", "must be 0 or more"))
    if not 1.0 <= cfg.dialog.max_silence_s <= 120.0:
        errs.append(DataError(f, "dialog.max_silence_s", "must be 1 to 120 seconds"))
    if cfg.dialog.max_call_s < 30:
        errs.append(DataError(f, "dialog.max_call_s", "must be 30 seconds or more"))
    if not 1 <= cfg.sip.max_calls <= 4:
        errs.append(DataError(f, "sip.max_calls", "must be 1 to 4: pjsua2-python holds 4 calls "
                              "per process; run more workers (serve --workers N) for more"))
    try:
        parse_hostport(cfg.sip.listen)
    except ValueError as exc:
        errs.append(DataError(f, "sip.listen", str(exc)))
    for t in cfg.sip.transports:
        if t not in ("udp", "tcp"):
            errs.append(DataError(f, "sip.transports", f"{t!r}: use udp and/or tcp"))
    for c in cfg.sip.codecs:
        if c.upper() not in ("PCMU", "PCMA", "G722"):
            errs.append(DataError(f, "sip.codecs", f"{c!r}: voicebot speaks PCMU, PCMA, G722"))
    for i, net in enumerate(cfg.sip.allow):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            errs.append(DataError(f, f"sip.allow[{i}]", f"{net!r} is not an address or CIDR "
                                  "network, e.g. 10.0.0.0/24 or 192.0.2.7"))
    if not cfg.sip.allow:
        errs.append(DataError(f, "sip.allow", "empty: no peer could call; list your trunk or "
                              "PBX, e.g. [\"192.0.2.0/24\"]"))
    if cfg.sip.flood_limit < 1:
        errs.append(DataError(f, "sip.flood_limit", "must be 1 request per second or more"))
    if cfg.sip.ban_s < 1:
        errs.append(DataError(f, "sip.ban_s", "must be 1 second or more"))
    try:
        ipaddress.ip_address(cfg.sip.worker_address)
    except ValueError:
        errs.append(DataError(f, "sip.worker_address", f"{cfg.sip.worker_address!r}: use an IP "
                              "address (loopback or private), e.g. 127.0.0.1"))
    if cfg.sip.srtp not in ("off", "optional", "mandatory"):
        errs.append(DataError(f, "sip.srtp", f"{cfg.sip.srtp!r}: use off, optional or mandatory"))
    tls = cfg.sip.tls
    if tls.enabled:
        for key in ("certificate", "key"):
            value = getattr(tls, key)
            if not value:
                errs.append(DataError(f, f"sip.tls.{key}", "missing: TLS needs both certificate "
                                      "and key (PEM files)"))
            elif not cfg.resolve(value).is_file():
                errs.append(DataError(f, f"sip.tls.{key}", f"{value}: no such file"))
        if tls.verify_peer and not tls.ca_list:
            errs.append(DataError(f, "sip.tls.ca_list", "verify_peer needs a CA list (PEM)"))
    if not 0 < tls.port < 65536:
        errs.append(DataError(f, "sip.tls.port", "must be 1 to 65535"))
    if cfg.web.listen:
        try:
            parse_hostport(cfg.web.listen, 8080)
        except ValueError as exc:
            errs.append(DataError(f, "web.listen", str(exc)))
    if cfg.web.max_age_s < 0:
        errs.append(DataError(f, "web.max_age_s", "must be 0 or more seconds"))
    if cfg.recording.keep_days < 0:
        errs.append(DataError(f, "recording.keep_days", "must be 0 (keep) or more days"))
    if cfg.sip.clock_rate not in (8000, 16000):
        errs.append(DataError(f, "sip.clock_rate", "must be 8000 or 16000"))
    try:
        WorkingHours.from_config(cfg.hours)
    except ValueError as exc:
        errs.append(DataError(f, "hours", str(exc)))
    return errs


def parse_hostport(text: str, default_port: int = 5060) -> tuple[str, int]:
    """'127.0.0.1:5060' -> ('127.0.0.1', 5060); ValueError says what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(default_port)
    try:
        p = int(port)
    except ValueError:
        raise ValueError(f"{text!r}: port {port!r} is not a number (use HOST:PORT)") from None
    if not host or not 0 < p < 65536:
        raise ValueError(f"{text!r}: use HOST:PORT, e.g. 127.0.0.1:5060")
    return host, p


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load ``voicebot.toml`` (or the given file); a missing default file means defaults.

    ``VOICEBOT_CONFIG`` names the file when ``path`` is None.
    """
    explicit = path if path is not None else os.environ.get("VOICEBOT_CONFIG")
    p = Path(explicit) if explicit else DEFAULT_CONFIG
    if not p.exists():
        if explicit:
            raise DataError(p, "", "config file not found; pass --config with an existing file")
        return Config()
    data = read_toml(p)
    cfg: Config = build_dataclass(Config, data, p)
    cfg.base = p.resolve().parent
    cfg.source = str(p)
    errs = validate(cfg)
    if len(errs) == 1:
        raise errs[0]
    if errs:
        raise DataErrors(errs)
    return cfg
