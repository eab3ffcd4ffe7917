"""The menu tree and the language packs under ``grammars/``, loaded and validated.

``grammars/menu.toml`` holds the structure (nodes, options, DTMF keys, what each
option does); ``grammars/packs/<lang>.toml`` holds everything said or heard in
one language (prompt texts, keywords, training phrases, voice, ASR model).
Adding a language is adding a pack file.

Loading checks everything and reports every problem at once, each naming the
file, the path inside it and the problem.
"""

from __future__ import annotations

import string
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import read_toml
from .errors import DataError, DataErrors

DTMF_KEYS = "0123456789*#ABCD"
MIN_PHRASES = 15

# Prompts the dialog engine itself uses, with the placeholders each may hold.
SYSTEM_PROMPTS: dict[str, frozenset[str]] = {
    "welcome": frozenset(),
    "language_item": frozenset(),
    "speech_hint": frozenset(),
    "hours": frozenset({"days", "open", "close"}),
    "operator_transfer": frozenset(),
    "operator_closed": frozenset(),
    "transfer_failed": frozenset(),
    "confirm": frozenset({"label"}),
    "no_match": frozenset(),
    "no_input": frozenset(),
    "escalate_info": frozenset(),
    "goodbye": frozenset(),
    "call_ending": frozenset(),
    # Call-centre duties (issue 5): application status, messages with tickets, callbacks.
    "status_ask": frozenset(),
    "status_readback": frozenset({"number"}),
    "status_unknown": frozenset({"number"}),
    "status_received": frozenset({"number", "date"}),
    "status_in_review": frozenset({"number", "date"}),
    "status_approved": frozenset({"number", "date"}),
    "status_rejected": frozenset({"number", "date"}),
    "status_ready": frozenset({"number", "date"}),
    "callback_offer": frozenset(),
    "callback_booked": frozenset(),
    "record_instructions": frozenset(),
    "record_saved": frozenset({"ticket"}),
    "record_empty": frozenset(),
    # Failures (issue 10): the apology the caller hears before the operator or a menu.
    "apology": frozenset(),
    "lookup_failed": frozenset(),
    "record_failed": frozenset(),
    "callback_failed": frozenset(),
}
# Caller controls (issue 12), needed when the menu has [controls]: the help that says the
# keys, each control's acknowledgement, the end of a range, the warning before a timeout
# moves the call on, and the sentence that says remembered settings were applied.
CONTROL_PROMPTS: dict[str, frozenset[str]] = {
    "help": frozenset(),
    "control_slower": frozenset(),
    "control_faster": frozenset(),
    "control_louder": frozenset(),
    "control_quieter": frozenset(),
    "control_more_time": frozenset(),
    "control_no_timeout": frozenset(),
    "control_limit": frozenset(),
    "timeout_warning": frozenset(),
    "timeout_warning_digits": frozenset(),
    "settings_restored": frozenset(),
}

# Application states the store accepts; each has a status_<state> prompt in every pack.
APPLICATION_STATES = ("received", "in_review", "approved", "rejected", "ready")
DIGITS = "0123456789"

ACTIONS = ("operator", "status")
# Caller controls: help and more_time have keys at every node; the other four have keys
# inside help only (elsewhere they are said).
CONTROLS = ("help", "more_time", "slower", "faster", "louder", "quieter")
GLOBAL_CONTROLS = ("help", "more_time")
HELP_NODE = "help"  # the help sub-menu the help control opens
OFFER_MODES = ("always", "with_model")


def normalize_text(text: str) -> str:
    """Casefold, NFC, punctuation to spaces, single spaces: how keywords and ASR text compare."""
    text = unicodedata.normalize("NFC", text).casefold()
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        out.append(" " if cat[0] in "PSZC" and ch not in "'-" else ch)
    return " ".join("".join(out).split())


@dataclass(frozen=True)
class Option:
    """One choice at a menu node.

    kind: "language", "goto", "play", "action", "record", "command" (repeat, back,
    operator), "confirm" or "control" (a caller control: target is its name in CONTROLS).
    target: the language code, node id, prompt key, action name, message type (record),
    command or control name. key "" is an option that is said, not keyed.
    """

    id: str
    key: str
    kind: str
    target: str = ""


@dataclass(frozen=True)
class Node:
    """A menu: the prompt that lists it, its options, where * goes."""

    id: str
    prompt: str
    options: tuple[Option, ...]
    back: str | None = None
    multilingual: bool = False


@dataclass(frozen=True)
class Menu:
    """The whole tree plus the commands every node takes and the yes/no pair."""

    nodes: dict[str, Node]
    start: str
    home: str
    fallback: str
    repeat: Option
    back: Option
    yes: Option
    no: Option
    file: Path
    operator: Option | None = None
    controls: tuple[Option, ...] = ()  # each control with its key inside help

    def node(self, node_id: str) -> Node:
        if node_id == HELP_NODE and node_id not in self.nodes:
            return self.help_node()
        return self.nodes[node_id]

    def help_node(self) -> Node:
        """The help sub-menu: the controls on their keys; * goes back where help was opened."""
        return Node(HELP_NODE, "help", self.controls, back=None)

    def control(self, name: str) -> Option | None:
        return next((o for o in self.controls if o.target == name), None)

    def has_node(self, node_id: str) -> bool:
        return node_id in self.nodes or (node_id == HELP_NODE and bool(self.controls))

    def choices(self, node_id: str) -> tuple[Option, ...]:
        """Options a caller can pick at a node: its own, repeat, back where it has a parent
        (and always in help), the operator unless the node has its own operator option, and
        the caller controls: help and more time on their keys, the others by voice."""
        node = self.node(node_id)
        extra = [self.repeat]
        if node.back or node_id == HELP_NODE:
            extra.append(self.back)
        own_operator = any(o.kind == "action" and o.target == "operator" for o in node.options)
        if self.operator is not None and not own_operator:
            extra.append(self.operator)
        if node_id != HELP_NODE:
            for c in self.controls:
                key = c.key if c.target in GLOBAL_CONTROLS else ""
                extra.append(Option(c.id, key, c.kind, c.target))
        return (*node.options, *extra)

    def spoken_choices(self, node_id: str) -> tuple[Option, ...]:
        """What a caller may say at a node: its choices, and at a multilingual node (the
        language menu) also the home menu's own options, unkeyed, so that a caller who says
        what they want in their own language skips the language question. There the home
        menu's operator option stands for the operator command (the same words)."""
        own = self.choices(node_id)
        node = self.nodes.get(node_id)
        if node is None or not node.multilingual or self.home not in self.nodes:
            return own
        home = tuple(Option(o.id, "", o.kind, o.target) for o in self.nodes[self.home].options)
        if any(o.kind == "action" and o.target == "operator" for o in home):
            own = tuple(o for o in own if self.operator is None or o.id != self.operator.id)
        return (*own, *home)

    def confirm_choices(self) -> tuple[Option, ...]:
        return (self.yes, self.no)

    def all_options(self) -> list[Option]:
        """Every option id a pack must give words for, in menu order."""
        out: list[Option] = []
        for node in self.nodes.values():
            out.extend(node.options)
        out.extend([self.repeat, self.back, self.yes, self.no])
        if self.operator is not None:
            out.append(self.operator)
        out.extend(self.controls)
        return out

    def prompt_keys(self) -> set[str]:
        """Prompt keys the menu refers to (node prompts and played prompts)."""
        keys = set(SYSTEM_PROMPTS) | {n.prompt for n in self.nodes.values()}
        if self.controls:
            keys |= set(CONTROL_PROMPTS)
        keys |= {o.target for n in self.nodes.values() for o in n.options if o.kind == "play"}
        return keys

    def option_by_id(self, option_id: str) -> Option:
        for o in self.all_options():
            if o.id == option_id:
                return o
        raise KeyError(option_id)


@dataclass(frozen=True)
class OptionWords:
    """What a caller may say for one option in one language."""

    label: str
    keywords: tuple[str, ...]
    phrases: tuple[str, ...]
    asr_words: dict[str, str] = field(default_factory=dict)

    def asr_phrase(self, keyword: str) -> str:
        """The keyword as the ASR model spells it (``asr_words``), normalised."""
        return normalize_text(self.asr_words.get(keyword, keyword))


@dataclass(frozen=True)
class Format:
    """How a language speaks times and day ranges."""

    locale: str
    time: str
    time_minutes: str
    am: str
    pm: str
    hour_word: dict[str, str]
    minute_word: dict[str, str]
    day_from: tuple[str, ...]
    day_to: tuple[str, ...]
    day_range: str
    list_separator: str
    hour_words: tuple[str, ...] = ()  # 24 spoken hours, where digits would take the wrong case
    day_names: tuple[str, ...] = ()  # plain weekday names, for lists of days that are no range
    # Dates: a template over {day} {month} {year}; the month name comes from CLDR (babel,
    # in the form a date takes: genitive in Russian); day_words say the day where digits
    # would take the wrong case (Russian ordinals); the year is said only when it is not
    # the current one (date_year).
    date: str = "{day} {month}"
    date_year: str = "{day} {month} {year}"
    day_words: tuple[str, ...] = ()  # 31 spoken days of the month
    # How {year} is said, as num2words arguments ({"to": "ordinal", "case": "genitive"}
    # gives Russian "две тысячи двадцать пятого"); empty: digits, for espeak-ng to read.
    year_words: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Pack:
    """One language: voice, ASR model, prompt texts, words per option."""

    language: str
    name: str
    voice: str
    asr_model: str
    offer: str
    format: Format
    prompts: dict[str, str]
    options: dict[str, OptionWords]
    decoys: tuple[str, ...]
    none_phrases: tuple[str, ...]
    file: Path
    # Spoken digits for application numbers: digit -> words, and ASR spellings of words.
    digit_words: dict[str, tuple[str, ...]] = field(default_factory=dict)
    digit_asr: dict[str, str] = field(default_factory=dict)

    def digit_grammar(self) -> list[str]:
        """The words a digits grammar listens for, as the ASR model spells them."""
        out = [normalize_text(self.digit_asr.get(w, w)) for ws in self.digit_words.values()
               for w in ws]
        return list(dict.fromkeys(out))

    def parse_digits(self, text: str) -> str:
        """The digits said in ``text`` ("one two three", "일 이 삼"); other words are dropped."""
        table: dict[str, str] = {}
        for d, ws in self.digit_words.items():
            for w in ws:
                table[normalize_text(w)] = d
                table[normalize_text(self.digit_asr.get(w, w))] = d
        out = []
        for tok in normalize_text(text).split():
            if tok.isdigit():
                out.append(tok)
            elif tok in table:
                out.append(table[tok])
        return "".join(out)

    def text(self, key: str, **params: str) -> str:
        """Prompt text with its placeholders filled."""
        return self.prompts[key].format(**params) if params else self.prompts[key]

    def words(self, option_id: str) -> OptionWords:
        return self.options[option_id]

    def asr_to_keyword(self) -> dict[str, str]:
        """Map from ASR spellings back to the pack's keywords, for every option."""
        out: dict[str, str] = {}
        for ow in self.options.values():
            for k in ow.keywords:
                spelled = ow.asr_phrase(k)
                if spelled != normalize_text(k):
                    out[spelled] = normalize_text(k)
        return out


@dataclass(frozen=True)
class Grammars:
    """The validated menu and every pack, keyed by language code."""

    menu: Menu
    packs: dict[str, Pack]
    root: Path

    def pack(self, language: str) -> Pack:
        return self.packs[language]

    def required_prompts(self) -> set[str]:
        return self.menu.prompt_keys()


# --- loading ---------------------------------------------------------------------------


class _Collector:
    """Gathers every error of one load so the user sees them all."""

    def __init__(self) -> None:
        self.errors: list[DataError] = []

    def add(self, file: Path, where: str, problem: str) -> None:
        self.errors.append(DataError(_show(file), where, problem))


def _show(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def _quote(key: str) -> str:
    return f'"{key}"' if "." in key else key


def _unknown(errs: _Collector, file: Path, where: str, table: dict[str, Any],
             allowed: Iterable[str]) -> None:
    allowed = set(allowed)
    for key in table:
        if key not in allowed:
            path = f"{where}.{_quote(key)}" if where else _quote(key)
            errs.add(file, path, f"unknown key; expected one of: {', '.join(sorted(allowed))}")


def _table(errs: _Collector, file: Path, data: dict[str, Any], key: str,
           where: str = "") -> dict[str, Any]:
    path = f"{where}.{key}" if where else key
    value = data.get(key)
    if value is None:
        errs.add(file, path, "missing table")
        return {}
    if not isinstance(value, dict):
        errs.add(file, path, f"expected a table, got {type(value).__name__}")
        return {}
    return value


def _str(errs: _Collector, file: Path, data: dict[str, Any], key: str, where: str,
         required: bool = True) -> str:
    path = f"{where}.{key}" if where else key
    value = data.get(key)
    if value is None:
        if required:
            errs.add(file, path, "missing")
        return ""
    if not isinstance(value, str) or not value.strip():
        errs.add(file, path, f"expected a non-empty string, got {value!r}")
        return ""
    return value


def _str_list(errs: _Collector, file: Path, data: dict[str, Any], key: str, where: str,
              required: bool = True) -> list[str]:
    path = f"{where}.{key}" if where else key
    value = data.get(key)
    if value is None:
        if required:
            errs.add(file, path, "missing")
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        errs.add(file, path, "expected a list of non-empty strings")
        return []
    return value


def _command(errs: _Collector, file: Path, data: dict[str, Any], where: str,
             kind: str) -> Option:
    _unknown(errs, file, where, data, ("id", "key"))
    oid = _str(errs, file, data, "id", where)
    key = _str(errs, file, data, "key", where)
    if key and key not in DTMF_KEYS:
        errs.add(file, f"{where}.key", f"{key!r} is not a DTMF key ({DTMF_KEYS})")
    return Option(oid, key, kind, where.split(".")[-1])


def load_menu(path: Path, errs: _Collector) -> Menu | None:
    """Parse and check ``menu.toml``; problems go to ``errs``."""
    try:
        data = read_toml(path)
    except DataError as exc:
        errs.errors.append(exc)
        return None
    _unknown(errs, path, "", data, ("call", "commands", "confirm", "controls", "nodes"))
    call = _table(errs, path, data, "call")
    _unknown(errs, path, "call", call, ("start", "home", "fallback"))
    commands = _table(errs, path, data, "commands")
    _unknown(errs, path, "commands", commands, ("repeat", "back", "operator"))
    confirm = _table(errs, path, data, "confirm")
    _unknown(errs, path, "confirm", confirm, ("yes", "no"))
    repeat = _command(errs, path, _table(errs, path, commands, "repeat", "commands"),
                      "commands.repeat", "command")
    back = _command(errs, path, _table(errs, path, commands, "back", "commands"),
                    "commands.back", "command")
    yes = _command(errs, path, _table(errs, path, confirm, "yes", "confirm"), "confirm.yes",
                   "confirm")
    no = _command(errs, path, _table(errs, path, confirm, "no", "confirm"), "confirm.no",
                  "confirm")
    operator: Option | None = None
    if "operator" in commands:
        operator = _command(errs, path, _table(errs, path, commands, "operator", "commands"),
                            "commands.operator", "command")
    raw_controls = data.get("controls", {})
    if not isinstance(raw_controls, dict):
        errs.add(path, "controls", "expected a table")
        raw_controls = {}
    _unknown(errs, path, "controls", raw_controls, CONTROLS)
    controls: list[Option] = []
    help_keys: dict[str, str] = {back.key: back.id, repeat.key: repeat.id}
    for name in CONTROLS:
        if name not in raw_controls:
            if raw_controls:
                errs.add(path, f"controls.{name}", "missing: give every control an id and a key")
            continue
        c = _command(errs, path, _table(errs, path, raw_controls, name, "controls"),
                     f"controls.{name}", "control")
        c = Option(c.id, c.key, "control", name)
        if c.key in help_keys and help_keys[c.key] != c.id:
            errs.add(path, f"controls.{name}.key",
                     f"key {c.key!r} is already used in help by {help_keys[c.key]}")
        elif c.key:
            help_keys[c.key] = c.id
        controls.append(c)
    # Keys that work at every node: no menu option may use them (the operator key only by
    # an operator option, which then takes the command's place at its node).
    global_keys = {c.key: c.id for c in controls if c.target in GLOBAL_CONTROLS and c.key}
    for key, cid in global_keys.items():
        if key in (repeat.key, back.key) or (operator is not None and key == operator.key):
            errs.add(path, f"controls.{cid.split('.')[-1]}.key",
                     f"key {key!r} is already a command key")
    if yes.key and yes.key == no.key:
        errs.add(path, "confirm.no.key", f"key {no.key!r} is already used by {yes.id}")

    nodes: dict[str, Node] = {}
    seen_ids: dict[str, str] = {o.id: w for o, w in ((repeat, "commands.repeat"),
                                                     (back, "commands.back"),
                                                     (yes, "confirm.yes"), (no, "confirm.no"))}
    if operator is not None:
        seen_ids[operator.id] = "commands.operator"
    for c in controls:
        seen_ids[c.id] = f"controls.{c.target}"
    raw_nodes = _table(errs, path, data, "nodes")
    for node_id, raw in raw_nodes.items():
        where = f"nodes.{node_id}"
        if not isinstance(raw, dict):
            errs.add(path, where, "expected a table")
            continue
        _unknown(errs, path, where, raw, ("prompt", "options", "back", "multilingual"))
        prompt = _str(errs, path, raw, "prompt", where)
        node_back = raw.get("back")
        multilingual = bool(raw.get("multilingual", False))
        raw_opts = raw.get("options")
        if not isinstance(raw_opts, list) or not raw_opts:
            errs.add(path, f"{where}.options", "expected a non-empty list of options")
            raw_opts = []
        keys: dict[str, str] = {repeat.key: repeat.id, **global_keys}
        if node_back:
            keys[back.key] = back.id
        options: list[Option] = []
        for i, ro in enumerate(raw_opts):
            ow = f"{where}.options[{i}]"
            if not isinstance(ro, dict):
                errs.add(path, ow, "expected a table like { id = ..., key = ..., goto = ... }")
                continue
            _unknown(errs, path, ow, ro, ("id", "key", "language", "goto", "play", "action",
                                          "record"))
            oid = _str(errs, path, ro, "id", ow)
            key = _str(errs, path, ro, "key", ow)
            if key and key not in DTMF_KEYS:
                errs.add(path, f"{ow}.key", f"{key!r} is not a DTMF key ({DTMF_KEYS})")
            elif key in keys:
                errs.add(path, f"{ow}.key",
                         f"two options on one key: {key!r} is already used by {keys[key]}")
            elif key:
                keys[key] = oid
            if oid in seen_ids:
                errs.add(path, f"{ow}.id", f"option id {oid!r} is already used at {seen_ids[oid]}")
            elif oid:
                seen_ids[oid] = ow
            kinds = [k for k in ("language", "goto", "play", "action", "record") if k in ro]
            if len(kinds) != 1:
                errs.add(path, ow, "needs exactly one of language, goto, play, action, record")
                continue
            kind = kinds[0]
            target = _str(errs, path, ro, kind, ow)
            if (operator is not None and key == operator.key
                    and not (kind == "action" and target == "operator")):
                errs.add(path, f"{ow}.key", f"key {key!r} is the operator key "
                         f"(commands.operator) at every menu; only an operator option may use it")
            if kind == "action" and target and target not in ACTIONS:
                errs.add(path, f"{ow}.action", f"unknown action {target!r}; known: {ACTIONS}")
            options.append(Option(oid, key, kind, target))
        nodes[node_id] = Node(node_id, prompt, tuple(options),
                              node_back if isinstance(node_back, str) else None, multilingual)

    start = _str(errs, path, call, "start", "call")
    home = _str(errs, path, call, "home", "call")
    fallback = _str(errs, path, call, "fallback", "call")
    for where, ref in (("call.start", start), ("call.home", home), ("call.fallback", fallback)):
        if ref and ref not in nodes:
            errs.add(path, where, f"no node named {ref!r}")
    for node in nodes.values():
        if node.back and node.back not in nodes:
            errs.add(path, f"nodes.{node.id}.back", f"no node named {node.back!r}")
        for i, o in enumerate(node.options):
            if o.kind == "goto" and o.target not in nodes:
                errs.add(path, f"nodes.{node.id}.options[{i}].goto", f"no node named {o.target!r}")
    if HELP_NODE in nodes and controls:
        errs.add(path, f"nodes.{HELP_NODE}", "the name is taken by the help of [controls]")
    return Menu(nodes, start, home, fallback, repeat, back, yes, no, path, operator,
                tuple(controls))


_FORMAT_KEYS = ("locale", "time", "time_minutes", "am", "pm", "hour_word", "minute_word",
                "day_from", "day_to", "day_range", "list_separator", "hour_words", "day_names",
                "date", "date_year", "day_words", "year_words")


def _check_year_words(errs, path: Path, spec: object,  # type: ignore[no-untyped-def]
                      pack_language: str) -> dict[str, str] | None:
    """format.year_words: num2words arguments, tried on a year so a bad one fails on load."""
    if not isinstance(spec, dict) or not all(isinstance(v, str) for v in spec.values()):
        errs.add(path, "format.year_words",
                 'expected a table of num2words arguments, e.g. { to = "ordinal" }')
        return None
    try:
        from num2words import num2words

        num2words(2025, lang=pack_language, **spec)
    except (NotImplementedError, TypeError, ValueError, AttributeError, KeyError) as exc:
        errs.add(path, "format.year_words",
                 f"num2words cannot say a year with {spec} in {pack_language!r}: {exc}")
        return None
    return dict(spec)


def _placeholders(text: str) -> set[str] | None:
    try:
        return {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError:
        return None


def load_pack(path: Path, menu: Menu, errs: _Collector) -> Pack | None:
    """Parse and check one pack against the menu; problems go to ``errs``."""
    try:
        data = read_toml(path)
    except DataError as exc:
        errs.errors.append(exc)
        return None
    _unknown(errs, path, "", data, ("pack", "format", "prompts", "asr", "nlu", "options",
                                    "digits"))
    meta = _table(errs, path, data, "pack")
    _unknown(errs, path, "pack", meta, ("language", "name", "voice", "asr_model", "offer"))
    language = _str(errs, path, meta, "language", "pack")
    if language and language != path.stem:
        errs.add(path, "pack.language",
                 f"is {language!r} but the file is {path.name}; name the file {language}.toml")
    offer = meta.get("offer", "always")
    if offer not in OFFER_MODES:
        errs.add(path, "pack.offer", f"{offer!r} is not one of {OFFER_MODES}")

    fmt_raw = _table(errs, path, data, "format")
    _unknown(errs, path, "format", fmt_raw, _FORMAT_KEYS)
    for key in ("day_from", "day_to", "day_names"):
        days = fmt_raw.get(key)
        if days is not None and (not isinstance(days, list) or len(days) != 7):
            errs.add(path, f"format.{key}", "needs the seven weekday names, Monday first")
    day_words = fmt_raw.get("day_words")
    if day_words is not None and (not isinstance(day_words, list) or len(day_words) != 31):
        errs.add(path, "format.day_words", "needs 31 entries, for days 1 to 31")
        day_words = None
    for key in ("date", "date_year"):
        tmpl = fmt_raw.get(key)
        if tmpl is not None:
            found = _placeholders(tmpl) if isinstance(tmpl, str) else None
            if found is None or found - {"day", "month", "year"}:
                errs.add(path, f"format.{key}", "expected a template over {day} {month} {year}")
    year_words = fmt_raw.get("year_words")
    if year_words is not None:
        year_words = _check_year_words(errs, path, year_words,
                                       pack_language=language or path.stem)
    hour_words = fmt_raw.get("hour_words")
    if hour_words is not None and (not isinstance(hour_words, list) or len(hour_words) != 24):
        errs.add(path, "format.hour_words", "needs 24 entries, for hours 0 to 23")
        hour_words = None
    locale = fmt_raw.get("locale")
    if isinstance(locale, str):
        try:
            from babel import Locale, UnknownLocaleError

            Locale.parse(locale)
        except (UnknownLocaleError, ValueError):
            errs.add(path, "format.locale", f"{locale!r} is not a CLDR locale (e.g. en, ru, az)")
    for key in ("hour_word", "minute_word"):
        forms = fmt_raw.get(key)
        if forms is not None and (not isinstance(forms, dict) or "other" not in forms):
            errs.add(path, f"format.{key}",
                     'needs plural forms as a table with at least "other" (CLDR categories)')
    fmt = Format(
        locale=_str(errs, path, fmt_raw, "locale", "format"),
        time=_str(errs, path, fmt_raw, "time", "format"),
        time_minutes=_str(errs, path, fmt_raw, "time_minutes", "format"),
        am=fmt_raw.get("am", ""), pm=fmt_raw.get("pm", ""),
        hour_word=dict(fmt_raw.get("hour_word") or {"other": ""}),
        minute_word=dict(fmt_raw.get("minute_word") or {"other": ""}),
        day_from=tuple(fmt_raw.get("day_from") or ()),
        day_to=tuple(fmt_raw.get("day_to") or ()),
        day_range=_str(errs, path, fmt_raw, "day_range", "format"),
        list_separator=fmt_raw.get("list_separator", ", "),
        hour_words=tuple(hour_words or ()),
        day_names=tuple(fmt_raw.get("day_names") or ()),
        date=fmt_raw.get("date") or "{day} {month}",
        date_year=fmt_raw.get("date_year") or "{day} {month} {year}",
        day_words=tuple(day_words or ()),
        year_words=tuple(sorted((year_words or {}).items())),
    )

    prompts_raw = _table(errs, path, data, "prompts")
    prompts: dict[str, str] = {}
    for key, text in prompts_raw.items():
        if not isinstance(text, str) or not text.strip():
            errs.add(path, f"prompts.{key}", "expected non-empty text")
            continue
        allowed = SYSTEM_PROMPTS.get(key, CONTROL_PROMPTS.get(key, frozenset()))
        found = _placeholders(text)
        if found is None:
            errs.add(path, f"prompts.{key}", "unbalanced { } in the text")
        elif found - allowed:
            errs.add(path, f"prompts.{key}",
                     f"unknown placeholder(s) {sorted(found - allowed)}; this prompt takes "
                     f"{sorted(allowed) or 'none'}")
        prompts[key] = text

    asr = data.get("asr", {})
    _unknown(errs, path, "asr", asr, ("decoys",))
    decoys = _str_list(errs, path, asr, "decoys", "asr", required=False)
    nlu = data.get("nlu", {})
    _unknown(errs, path, "nlu", nlu, ("none_phrases",))
    none_phrases = _str_list(errs, path, nlu, "none_phrases", "nlu", required=False)

    digits_raw = _table(errs, path, data, "digits")
    _unknown(errs, path, "digits", digits_raw, ("words", "asr_words"))
    words_raw = digits_raw.get("words", {}) if isinstance(digits_raw, dict) else {}
    digit_words: dict[str, tuple[str, ...]] = {}
    if not isinstance(words_raw, dict):
        errs.add(path, "digits.words", 'expected a table like { "0" = ["zero"], ... }')
        words_raw = {}
    _unknown(errs, path, "digits.words", words_raw, DIGITS)
    for d in DIGITS:
        ws = _str_list(errs, path, words_raw, d, "digits.words") if words_raw else []
        digit_words[d] = tuple(ws)
    if not words_raw:
        errs.add(path, "digits.words", "missing: the words for 0-9 a caller says in a number")
    digit_asr = digits_raw.get("asr_words", {}) if isinstance(digits_raw, dict) else {}
    if not isinstance(digit_asr, dict) or not all(isinstance(v, str) for v in
                                                   digit_asr.values()):
        errs.add(path, "digits.asr_words", 'expected a table of word = "ASR spelling"')
        digit_asr = {}
    all_digit_words = {w for ws in digit_words.values() for w in ws}
    for k in digit_asr:
        if k not in all_digit_words:
            errs.add(path, f"digits.asr_words.{_quote(k)}", "is not one of the digit words")

    options_raw = _table(errs, path, data, "options")
    known = {o.id for o in menu.all_options()}
    _unknown(errs, path, "options", options_raw, known)
    options: dict[str, OptionWords] = {}
    for oid in sorted(known):
        where = f'options."{oid}"'
        raw = options_raw.get(oid)
        if raw is None:
            errs.add(path, where, "missing: every option of the menu needs its words in each pack")
            continue
        if not isinstance(raw, dict):
            errs.add(path, where, "expected a table")
            continue
        _unknown(errs, path, where, raw, ("label", "keywords", "phrases", "asr_words"))
        label = _str(errs, path, raw, "label", where)
        keywords = _str_list(errs, path, raw, "keywords", where, required=False)
        if not keywords:
            errs.add(path, f"{where}.keywords",
                     "option without keywords: give at least one word a caller may say")
        phrases = _str_list(errs, path, raw, "phrases", where, required=False)
        if len(phrases) < MIN_PHRASES:
            errs.add(path, f"{where}.phrases",
                     f"needs at least {MIN_PHRASES} training phrases for the intent classifier, "
                     f"has {len(phrases)}")
        asr_words = raw.get("asr_words", {})
        if not isinstance(asr_words, dict) or not all(isinstance(v, str) for v in
                                                       asr_words.values()):
            errs.add(path, f"{where}.asr_words", "expected a table of keyword = \"ASR spelling\"")
            asr_words = {}
        for k in asr_words:
            if k not in keywords:
                errs.add(path, f"{where}.asr_words.{_quote(k)}",
                         "is not one of this option's keywords")
        options[oid] = OptionWords(label, tuple(keywords), tuple(phrases), dict(asr_words))

    # The same spoken keyword for two options at one node would make speech ambiguous.
    node_sets = [menu.spoken_choices(n) for n in menu.nodes] + [menu.confirm_choices()]
    if menu.controls:
        node_sets.append(menu.choices(HELP_NODE))
    reported: set[tuple[str, str, str]] = set()  # the home menu is heard at two nodes
    for choices in node_sets:
        owner: dict[str, str] = {}
        for o in choices:
            if o.id not in options:
                continue
            for k in options[o.id].keywords:
                nk = normalize_text(k)
                if nk in owner and owner[nk] != o.id and (o.id, nk, owner[nk]) not in reported:
                    reported.add((o.id, nk, owner[nk]))
                    errs.add(path, f'options."{o.id}".keywords',
                             f"keyword {k!r} is also a keyword of {owner[nk]} at the same menu")
                owner.setdefault(nk, o.id)
    all_keywords = {normalize_text(k) for ow in options.values() for k in ow.keywords}
    for i, d in enumerate(decoys):
        if normalize_text(d) in all_keywords:
            errs.add(path, f"asr.decoys[{i}]", f"decoy {d!r} is also a keyword")

    return Pack(language=language or path.stem, name=_str(errs, path, meta, "name", "pack"),
                voice=_str(errs, path, meta, "voice", "pack"),
                asr_model=_str(errs, path, meta, "asr_model", "pack"), offer=offer, format=fmt,
                prompts=prompts, options=options, decoys=tuple(decoys),
                none_phrases=tuple(none_phrases), file=path, digit_words=digit_words,
                digit_asr=dict(digit_asr))


def load_grammars(root: Path) -> Grammars:
    """Load ``root/menu.toml`` and every ``root/packs/*.toml``; raise with all problems found."""
    errs = _Collector()
    menu = load_menu(root / "menu.toml", errs)
    packs: dict[str, Pack] = {}
    pack_dir = root / "packs"
    files = sorted(pack_dir.glob("*.toml")) if pack_dir.is_dir() else []
    if not files:
        errs.add(pack_dir, "", "no language packs (*.toml) found")
    unreadable: set[str] = set()
    if menu is not None:
        for f in files:
            pack = load_pack(f, menu, errs)
            if pack is not None:
                packs[pack.language] = pack
            else:
                unreadable.add(f.stem)
        required = menu.prompt_keys()
        union = required | {k for p in packs.values() for k in p.prompts}
        for pack in packs.values():
            for key in sorted(union - set(pack.prompts)):
                holders = sorted(lang for lang, p in packs.items() if key in p.prompts)
                why = (f"a prompt missing in this language (present in {', '.join(holders)})"
                       if holders else "missing; the menu or the dialog engine needs it")
                errs.add(pack.file, f"prompts.{key}", why)
        for node in menu.nodes.values():
            for i, o in enumerate(node.options):
                if o.kind == "language" and o.target not in set(packs) | unreadable:
                    errs.add(menu.file, f"nodes.{node.id}.options[{i}].language",
                             f"no pack {o.target}.toml under {_show(pack_dir)}")
    if errs.errors:
        if len(errs.errors) == 1:
            raise errs.errors[0]
        raise DataErrors(errs.errors)
    assert menu is not None
    return Grammars(menu, packs, root)
