"""`voicebot report`: what the call records say, as HTML and Markdown with PNG charts and CSVs.

Everything comes from the store (calls, turns, tickets, callbacks), so a report of
simulated calls and of real ones is the same code. `voicebot serve --web` serves the
same report live and read-only (stdlib http.server, rebuilt at most every few seconds).
"""

from __future__ import annotations

import csv
import datetime as dt
import html
import http.server
import logging
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .store import CallRecord, Store, local

log = logging.getLogger("voicebot.report")

# Options that navigate rather than ask for a service: not "requested services".
NAV_PREFIXES = ("nav.", "confirm.", "lang.")


@dataclass
class Table:
    """One section: a title, a CSV, an optional chart."""

    name: str
    title: str
    header: list[str]
    rows: list[list[Any]]
    chart: str | None = None
    note: str = ""


@dataclass
class Report:
    since: dt.date | None
    calls: int
    tables: list[Table] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def _day(iso: str | None, tz: dt.tzinfo = dt.UTC) -> str:
    """The call centre's day (in ``tz``) of a stored time: times are stored in UTC, and a
    call at 01:00 in Baku belongs to that day, not to the UTC day before."""
    t = local(iso, tz)
    return t.date().isoformat() if t else (iso or "?")[:10]


def _calls(store: Store, since: dt.date | None) -> list[CallRecord]:
    calls = store.calls()
    if since is not None:
        calls = [c for c in calls if _day(c.started_at, store.tz) >= since.isoformat()]
    return sorted(calls, key=lambda c: c.started_at or "")


def analyse(store: Store, since: dt.date | None = None) -> Report:
    """The report's tables, from the store; days are the call centre's (``store.tz``)."""
    tz = store.tz
    calls = _calls(store, since)
    rep = Report(since, len(calls))
    # Calls per day and language.
    per_day: dict[str, Counter[str]] = defaultdict(Counter)
    for c in calls:
        per_day[_day(c.started_at, tz)][c.language or "none"] += 1
    langs = sorted({lg for cnt in per_day.values() for lg in cnt})
    rep.tables.append(Table("calls_per_day", "Calls per day and language", ["day", *langs, "total"],
                            [[d, *(per_day[d][lg] for lg in langs), sum(per_day[d].values())]
                             for d in sorted(per_day)], "calls_per_day.png"))
    # Menu paths and where callers leave.
    paths = Counter(" > ".join(c.path) or "(nothing chosen)" for c in calls)
    rep.tables.append(Table("menu_paths", "Menu paths", ["path", "calls"],
                            [[p, n] for p, n in paths.most_common(30)]))
    exits: Counter[tuple[str, str]] = Counter()
    for c in calls:
        last = c.turns[-1]["node"] if c.turns else "before the first turn"
        exits[(last, c.result or "in progress")] += 1
    rep.tables.append(Table("exits", "Where calls end (last menu, result)",
                            ["node", "result", "calls"],
                            [[n, r, k] for (n, r), k in exits.most_common()], "exits.png",
                            "abandoned = the caller hung up before being served"))
    # DTMF against speech per node; confidence and no-match rate per prompt.
    inputs: dict[str, Counter[str]] = defaultdict(Counter)
    conf: dict[str, list[float]] = defaultdict(list)
    fails: Counter[str] = Counter()
    speech_turns: Counter[str] = Counter()
    services: Counter[str] = Counter()
    for c in calls:
        for t in c.turns:
            node = t["node"] or "?"
            inputs[node][t["input"] or "none"] += 1
            if t["input"] == "speech":
                speech_turns[node] += 1
                if t["confidence"] is not None:
                    conf[node].append(float(t["confidence"]))
                if t["result"] in ("no_match", "rejected"):
                    fails[node] += 1
            opt = t["option"]
            if opt and t["result"] in ("accepted", "recorded") and not opt.startswith(NAV_PREFIXES):
                services[opt] += 1
    nodes = sorted(inputs)
    rep.tables.append(Table("input_by_node", "DTMF against speech per menu",
                            ["node", "dtmf", "speech", "none"],
                            [[n, inputs[n]["dtmf"], inputs[n]["speech"], inputs[n]["none"]]
                             for n in nodes], "input_by_node.png"))
    rows = []
    for n in sorted(speech_turns, key=lambda k: -fails[k] / speech_turns[k]):
        mean = sum(conf[n]) / len(conf[n]) if conf[n] else None
        rows.append([n, speech_turns[n], None if mean is None else round(mean, 3),
                     round(fails[n] / speech_turns[n], 3)])
    rep.tables.append(Table("speech_by_prompt",
                            "Recognition per prompt (the prompts callers are not understood at)",
                            ["node", "speech_turns", "mean_confidence", "no_match_rate"], rows,
                            "speech_by_prompt.png",
                            "no-match rate = spoken answers not understood or said no to"))
    rep.tables.append(Table("services", "Most requested services", ["option", "requests"],
                            [[o, n] for o, n in services.most_common()], "services.png"))
    cbs = store.callbacks(outstanding_only=True)
    rep.tables.append(Table("callbacks_outstanding", "Callbacks outstanding",
                            ["id", "caller", "language", "reason", "requested"],
                            [[b["id"], b["caller"], b["language"], b["reason"], b["created_at"]]
                             for b in cbs]))
    tickets = [t for t in store.tickets()
               if since is None or _day(t["created_at"], tz) >= since.isoformat()]
    rep.tables.append(Table("tickets", "Messages received (complaints, proposals, reports)",
                            ["ticket", "kind", "language", "state", "seconds", "recording"],
                            [[t["ticket"], t["kind"], t["language"], t["state"],
                              round((t["duration_ms"] or 0) / 1000, 1), t["recording"]]
                             for t in tickets]))
    return rep


def _charts(rep: Report, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    by = {t.name: t for t in rep.tables}

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        rep.files.append(out / name)

    t = by["calls_per_day"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    days = [r[0] for r in t.rows]
    bottom = [0] * len(days)
    for i, lang in enumerate(t.header[1:-1], start=1):
        vals = [r[i] for r in t.rows]
        ax.bar(days, vals, bottom=bottom, label=lang)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_ylabel("calls")
    ax.set_title("Calls per day and language")
    if t.header[1:-1]:
        ax.legend()
    ax.tick_params(axis="x", labelrotation=30)
    save(fig, "calls_per_day.png")

    def barh(table: Table, col: int, name: str, title: str, label: str) -> None:
        rows = table.rows[:15]
        fig, ax = plt.subplots(figsize=(7, max(2.5, 0.35 * len(rows) + 1)))
        names = [" / ".join(str(x) for x in r[:col]) for r in rows]
        ax.barh(names[::-1], [r[col] or 0 for r in rows][::-1], color="#3b6ea5")
        ax.set_xlabel(label)
        ax.set_title(title)
        save(fig, name)

    barh(by["exits"], 2, "exits.png", "Where calls end", "calls")
    barh(by["services"], 1, "services.png", "Most requested services", "requests")
    barh(by["speech_by_prompt"], 3, "speech_by_prompt.png", "No-match rate per prompt",
         "share of spoken answers not understood")
    t = by["input_by_node"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    nodes = [r[0] for r in t.rows]
    dtmf = [r[1] for r in t.rows]
    speech = [r[2] for r in t.rows]
    ax.bar(nodes, dtmf, label="DTMF")
    ax.bar(nodes, speech, bottom=dtmf, label="speech")
    ax.set_title("DTMF against speech per menu")
    ax.set_ylabel("turns")
    ax.legend()
    save(fig, "input_by_node.png")


def write(rep: Report, out: Path) -> Report:
    """CSV per table, PNG charts, index.html and report.md under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for t in rep.tables:
        p = out / f"{t.name}.csv"
        with p.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(t.header)
            w.writerows(t.rows)
        rep.files.append(p)
    _charts(rep, out)
    stamp = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    scope = f"calls since {rep.since}" if rep.since else "all calls"
    md = ["# voicebot call report\n", f"{rep.calls} calls ({scope}); built {stamp}.\n"]
    body = [f"<h1>voicebot call report</h1><p>{rep.calls} calls ({html.escape(scope)}); "
            f"built {stamp}.</p>"]
    for t in rep.tables:
        md.append(f"## {t.title}\n")
        body.append(f"<h2>{html.escape(t.title)}</h2>")
        if t.note:
            md.append(f"{t.note}\n")
            body.append(f"<p><i>{html.escape(t.note)}</i></p>")
        if t.chart:
            md.append(f"![{t.title}]({t.chart})\n")
            body.append(f'<img src="{t.chart}" alt="{html.escape(t.title)}">')
        md.append("| " + " | ".join(t.header) + " |")
        md.append("|" + "---|" * len(t.header))
        md.extend("| " + " | ".join("" if v is None else str(v) for v in r) + " |"
                  for r in t.rows)
        md.append(f"\n[{t.name}.csv]({t.name}.csv)\n")
        cells = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
        trs = "".join("<tr>" + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>"
                                       for v in r) + "</tr>" for r in t.rows)
        body.append(f"<table><tr>{cells}</tr>{trs}</table>"
                    f'<p><a href="{t.name}.csv">{t.name}.csv</a></p>')
    style = ("body{font-family:sans-serif;max-width:60em;margin:1em auto}table{border-collapse:"
             "collapse}td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}")
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    (out / "index.html").write_text(
        f'<!doctype html><html><head><meta charset="utf-8"><title>voicebot report</title>'
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n", encoding="utf-8")
    rep.files += [out / "report.md", out / "index.html"]
    return rep


def build(store: Store, out: Path, since: dt.date | None = None) -> Report:
    return write(analyse(store, since), out)


class _Handler(http.server.SimpleHTTPRequestHandler):
    """GET and HEAD only (the page is read-only); the report is rebuilt when stale."""

    live: LiveReport

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, directory=str(self.live.folder), **kwargs)

    def do_GET(self) -> None:
        self.live.refresh()
        super().do_GET()

    def do_HEAD(self) -> None:
        self.live.refresh()
        super().do_HEAD()

    def log_message(self, format: str, *args: Any) -> None:
        log.info("web %s", format % args)


class LiveReport:
    """The report served over HTTP, rebuilt from the store at most every ``max_age_s``."""

    def __init__(self, store_factory: Any, folder: Path, max_age_s: float = 5.0) -> None:
        self.store_factory = store_factory
        self.folder = folder
        self.max_age_s = max_age_s
        self._built = 0.0
        self._lock = threading.Lock()
        folder.mkdir(parents=True, exist_ok=True)

    def refresh(self) -> None:
        with self._lock:
            if time.monotonic() - self._built < self.max_age_s:
                return
            store = self.store_factory()
            try:
                build(store, self.folder)
            finally:
                store.close()
            self._built = time.monotonic()


def serve_web(live: LiveReport, host: str, port: int) -> http.server.ThreadingHTTPServer:
    """Start the read-only report page in a daemon thread; returns the server (shutdown())."""
    handler = type("Handler", (_Handler,), {"live": live})
    httpd = http.server.ThreadingHTTPServer((host, port), handler)
    threading.Thread(target=httpd.serve_forever, name="web", daemon=True).start()
    log.info("report page on http://%s:%d/", host, port)
    return httpd
