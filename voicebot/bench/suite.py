"""Recognition accuracy suites: QA teams' own recordings through the real pipeline.

A suite is a CSV file (or YAML, with PyYAML installed) with one case per row:

    audio,language,node,expected
    ../../../shared/data/speech/fsdd-en/1_george_0.wav,en,info,info.temporary_stay
    say:운영 시간,ko,main,main.hours
    say:바나나,ko,main,none

``audio`` is a recording (WAV/FLAC/OGG, any rate; relative to the suite file) or
``say:TEXT`` for espeak-ng speech in the case's language; ``node`` the menu the caller is
at when speaking; ``expected`` the option id the bot should take, or ``none`` for
out-of-grammar speech (anything taken is then a false accept).

Each case is one call: by default the real voice core in lock-step (the simulator: DTMF
keys to reach the node, then the audio); with ``--sip URI`` a real SIP call to a running
bot (the bot's records must be reachable through this config's store for the outcome).
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import VoicebotError
from ..menus import Grammars
from ..session import VoiceCore
from ..simulator import CallerInput, Simulator
from .common import IN_HOURS, summary

NONE = "none"


@dataclass(frozen=True)
class Case:
    audio: str  # a path, or say:TEXT
    language: str
    node: str
    expected: str
    line: int


class SuiteError(VoicebotError):
    """A suite file that cannot be used; the message names the file, the row and the fix."""


def load_suite(path: Path, grammars: Grammars) -> list[Case]:
    if not path.is_file():
        raise SuiteError(f"{path}: no such suite file")
    rows: list[dict[str, Any]]
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml  # type: ignore[import-untyped]
        except ImportError as exc:
            raise SuiteError(f"{path}: YAML suites need PyYAML (pip install pyyaml), or write "
                             "the suite as CSV") from exc
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        rows = data.get("cases", data) if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise SuiteError(f"{path}: expected a list of cases (or cases: [...])")
    else:
        with path.open(encoding="utf-8", newline="") as f:
            rows = [r for r in csv.DictReader(
                line for line in f if line.strip() and not line.lstrip().startswith("#"))]
    cases = []
    for i, r in enumerate(rows, start=2):
        missing = [k for k in ("audio", "language", "node", "expected") if not r.get(k)]
        if missing:
            raise SuiteError(f"{path}: case {i}: missing {', '.join(missing)} (columns: audio, "
                             "language, node, expected)")
        lang, node, exp = str(r["language"]), str(r["node"]), str(r["expected"])
        if lang not in grammars.packs:
            raise SuiteError(f"{path}: case {i}: no language pack {lang!r}; have "
                             f"{', '.join(sorted(grammars.packs))}")
        if node not in grammars.menu.nodes:
            raise SuiteError(f"{path}: case {i}: no menu node {node!r}; have "
                             f"{', '.join(grammars.menu.nodes)}")
        audio = str(r["audio"])
        if not audio.startswith("say:"):
            p = Path(audio)
            audio = str(p if p.is_absolute() else (path.parent / p).resolve())
        cases.append(Case(audio, lang, node, exp, i))
    return cases


def keys_to(grammars: Grammars, node: str) -> str:
    """DTMF keys from the home menu to ``node`` (breadth-first over goto options)."""
    menu = grammars.menu
    todo = [(menu.home, "")]
    seen = {menu.home}
    while todo:
        cur, keys = todo.pop(0)
        if cur == node:
            return keys
        for o in menu.node(cur).options:
            if o.kind == "goto" and o.target not in seen:
                seen.add(o.target)
                todo.append((o.target, keys + o.key))
    raise SuiteError(f"menu node {node!r} cannot be reached from {menu.home!r} by keys")


def language_key(grammars: Grammars, lang: str) -> str:
    menu = grammars.menu
    for o in menu.node(menu.start).options:
        if o.kind == "language" and o.target == lang:
            return o.key
    raise SuiteError(f"language {lang!r} is not on the language menu")


def _inputs(grammars: Grammars, case: Case, with_language: bool) -> list[CallerInput]:
    ins = [CallerInput("press", language_key(grammars, case.language))] if with_language else []
    ins += [CallerInput("press", k) for k in keys_to(grammars, case.node)]
    if case.audio.startswith("say:"):
        ins.append(CallerInput("say", case.audio[4:]))
    else:
        ins.append(CallerInput("say_wav", case.audio))
    return ins


def run_suite(core: VoiceCore, path: Path, sip_uri: str | None = None,
              limit: int | None = None) -> dict[str, Any]:
    cases = load_suite(path, core.grammars)
    out: dict[str, Any] = {"suite": str(path), "cases": len(cases),
                           "via": f"SIP {sip_uri}" if sip_uri else "voice core (simulator)"}
    usable = [c for c in cases if c.language in core.speech_languages]
    skipped_langs = sorted({c.language for c in cases} - core.speech_languages)
    if skipped_langs:
        out["skipped"] = {lang: f"skipped: model not installed "
                                f"({core.grammars.packs[lang].asr_model}; voicebot models "
                                f"install {core.grammars.packs[lang].asr_model})"
                          for lang in skipped_langs}
    missing_audio = [c for c in usable if not c.audio.startswith("say:")
                     and not Path(c.audio).is_file()]
    if missing_audio:
        out["missing_audio"] = [f"case {c.line}: {c.audio}" for c in missing_audio[:10]]
        usable = [c for c in usable if c not in missing_audio]
    if limit is not None and len(usable) > limit:
        # Spread a short run over the whole suite (in-grammar and out-of-grammar cases alike).
        step = len(usable) / limit
        usable = [usable[int(i * step)] for i in range(limit)]
    results = []
    for c in usable:
        results.append(_run_case(core, c, sip_uri))
    out["ran"] = len(results)
    out.update(score(results))
    out["_raw"] = {"results": results}
    return out


def _run_case(core: VoiceCore, c: Case, sip_uri: str | None) -> dict[str, Any]:
    row: dict[str, Any] = {"audio": c.audio, "language": c.language, "node": c.node,
                           "expected": c.expected}
    if sip_uri:
        from .probe import ProbePhone

        phone = ProbePhone(core.cfg, sip_uri, _inputs(core.grammars, c, True), language=c.language,
                           timeout_s=120.0)
        res = phone.run()
        turns = [t for t in res.records if t.get("input") == "speech"]
        if not res.connected:
            row.update(got=None, result="call failed", error=f"{res.status} {res.reason}")
            return row
        if not turns:
            row.update(got=None, result="no record", error="the bot's records are not reachable "
                       "from this config's [store]; point --config at the bot's config")
            return row
        t = turns[-1]
        row.update(got=t.get("option") or NONE, result=t.get("result"), heard=t.get("heard"),
                   confidence=t.get("confidence"), latency_ms=t.get("latency_ms"),
                   at_node=t.get("node"))
        return row
    sim = Simulator(core, _inputs(core.grammars, c, False), IN_HOURS, language=c.language)
    res = sim.run()
    speech = [t for t in res.turns if t.input == "speech"]
    if not speech:
        row.update(got=None, result="no turn")
        return row
    t = speech[0]
    row.update(got=t.option or NONE, result=t.result, heard=t.heard, confidence=t.confidence,
               latency_ms=t.latency_ms, at_node=t.node)
    if t.result == "confirm":
        # The bot asked "Did you say X?": the option it proposed is its guess.
        row["got"] = t.option or NONE
    return row


def score(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-language accuracy, confusion matrix, false accepts and confirmations."""
    by_lang: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        by_lang[r["language"]].append(r)
    langs: dict[str, Any] = {}
    for lang, rs in sorted(by_lang.items()):
        accepted = lambda r: r.get("result") == "accepted"  # noqa: E731
        correct = sum(1 for r in rs if r.get("got") == r["expected"]
                      and (r["expected"] == NONE or accepted(r)))
        oog = [r for r in rs if r["expected"] == NONE]
        ing = [r for r in rs if r["expected"] != NONE]
        confusion: dict[str, Counter[str]] = defaultdict(Counter)
        for r in rs:
            got = r.get("got") or NONE
            label = got if accepted(r) or got == NONE else f"{got}?"
            confusion[r["expected"]][label] += 1
        langs[lang] = {
            "cases": len(rs), "accuracy": round(correct / len(rs), 3) if rs else None,
            "in_grammar": len(ing),
            "in_grammar_accepted_correct": sum(1 for r in ing if accepted(r)
                                               and r.get("got") == r["expected"]),
            "out_of_grammar": len(oog),
            "false_accepts": sum(1 for r in oog if accepted(r)),
            "wrong_accepts": sum(1 for r in ing if accepted(r) and r.get("got") != r["expected"]),
            "confirmations": sum(1 for r in rs if r.get("result") == "confirm"),
            "latency_ms": summary([r["latency_ms"] for r in rs if r.get("latency_ms")
                                   is not None]),
            "confusion": {k: dict(v) for k, v in sorted(confusion.items())},
        }
    return {"languages": langs}
