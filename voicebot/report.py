"""`voicebot report`: what the call records say, as HTML and Markdown with PNG charts and CSVs.

Everything comes from the store (calls, turns, tickets, callbacks), so a report of
simulated calls and of real ones is the same code. `voicebot serve --web` serves the
same report live and read-only (stdlib http.server, in a thread of the supervisor, which
runs no SIP; rebuilt at most every ``[web] max_age_s`` however many requests arrive).

Caller data is personal data, and some of it is whatever a caller chose to send (the From
header's display name, the number part of a forged From). So: every value is HTML-escaped
in index.html and in report.md (Markdown viewers render raw HTML), CSV cells that a
spreadsheet would run as a formula are quoted, and the page is served on loopback unless
``[web] password`` is set (HTTP Basic, user ``voicebot``), with no-store, nosniff and a
Content-Security-Policy that allows no script at all.
"""

from __future__ import annotations

import base64
import collections
import csv
import datetime as dt
import hashlib
import hmac
import html
import http.server
import ipaddress
import logging
import os
import re
import shutil
import socket
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError
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


def _calls(calls: list[CallRecord], store: Store, since: dt.date | None) -> list[CallRecord]:
    if since is not None:
        calls = [c for c in calls if _day(c.started_at, store.tz) >= since.isoformat()]
    return sorted(calls, key=lambda c: c.started_at or "")


def analyse(store: Store, since: dt.date | None = None) -> Report:
    """The report's tables, from the store; days are the call centre's (``store.tz``)."""
    tz = store.tz
    every = store.calls()
    calls = _calls(every, store, since)
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
    # An unverified number is only what the From header said: show that header as the
    # caller sent it (display name included), for whoever makes the call back.
    from_of = {c.id: c.caller_from for c in every}
    rep.tables.append(Table("callbacks_outstanding", "Callbacks outstanding",
                            ["id", "caller", "verified", "from (as sent)", "language", "reason",
                             "requested"],
                            [[b["id"], b["caller"], "yes" if b["verified"] else "unverified",
                              from_of.get(b["call_id"]), b["language"], b["reason"],
                              b["created_at"]]
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


# The page's only style; the Content-Security-Policy allows exactly this one (by hash), so
# no injected style or script would run even if something escaped the escaping.
STYLE = ("body{font-family:sans-serif;max-width:60em;margin:1em auto}table{border-collapse:"
         "collapse}td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}"
         ".notice{background:#fee;border:1px solid #c00;padding:4px 8px}")
CSP = ("default-src 'none'; img-src 'self'; style-src 'sha256-"
       + base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
       + "'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# Cells a spreadsheet would evaluate (=HYPERLINK(...), @SUM(...)) when someone opens the CSV.
_FORMULA = re.compile(r"^[=@\t\r]|^[+-](?![\d\s().-]*$)")


def _text(v: Any) -> str:
    return "" if v is None else str(v)


def _html(v: Any) -> str:
    return html.escape(_text(v), quote=True)


def _md(v: Any) -> str:
    """A Markdown table cell: escaped as HTML (Markdown passes raw HTML through), on one
    line, with no cell separator of its own."""
    return _html(v).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _csv(v: Any) -> Any:
    if isinstance(v, str) and _FORMULA.match(v):
        return "'" + v
    return v


def write(rep: Report, out: Path) -> Report:
    """CSV per table, PNG charts, index.html and report.md under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for t in rep.tables:
        p = out / f"{t.name}.csv"
        with p.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(t.header)
            w.writerows([_csv(v) for v in r] for r in t.rows)
        rep.files.append(p)
    _charts(rep, out)
    stamp = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    scope = f"calls since {rep.since}" if rep.since else "all calls"
    md = ["# voicebot call report\n", f"{rep.calls} calls ({scope}); built {stamp}.\n"]
    body = [f"<h1>voicebot call report</h1><p>{rep.calls} calls ({_html(scope)}); "
            f"built {_html(stamp)}.</p>"]
    for t in rep.tables:
        md.append(f"## {t.title}\n")
        body.append(f"<h2>{_html(t.title)}</h2>")
        if t.note:
            md.append(f"{t.note}\n")
            body.append(f"<p><i>{_html(t.note)}</i></p>")
        if t.chart:
            md.append(f"![{t.title}]({t.chart})\n")
            body.append(f'<img src="{_html(t.chart)}" alt="{_html(t.title)}">')
        # Headers too: a language column is named after a value from the store.
        md.append("| " + " | ".join(_md(h) for h in t.header) + " |")
        md.append("|" + "---|" * len(t.header))
        md.extend("| " + " | ".join(_md(v) for v in r) + " |" for r in t.rows)
        md.append(f"\n[{t.name}.csv]({t.name}.csv)\n")
        cells = "".join(f"<th>{_html(h)}</th>" for h in t.header)
        trs = "".join("<tr>" + "".join(f"<td>{_html(v)}</td>" for v in r) + "</tr>"
                      for r in t.rows)
        body.append(f"<table><tr>{cells}</tr>{trs}</table>"
                    f'<p><a href="{_html(t.name)}.csv">{_html(t.name)}.csv</a></p>')
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    (out / "index.html").write_text(
        f'<!doctype html><html><head><meta charset="utf-8"><title>voicebot report</title>'
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n", encoding="utf-8")
    rep.files += [out / "report.md", out / "index.html"]
    return rep


def build(store: Store, out: Path, since: dt.date | None = None) -> Report:
    return write(analyse(store, since), out)



# --- the live page (`voicebot serve --web`) ---

WEB_USER = "voicebot"
# The files a build writes: nothing else under the folder is ever served (no listing).
_SERVED = re.compile(r"^/([a-z0-9_]+\.(html|md|csv|png))$")
_TYPES = {"html": "text/html; charset=utf-8", "md": "text/markdown; charset=utf-8",
          "csv": "text/csv; charset=utf-8", "png": "image/png"}
# Wrong passwords from one address: more than this many a minute, and it gets 429 for a
# minute, so a password cannot be guessed at the speed of the network.
AUTH_FAILURES_PER_MIN = 20


def is_loopback(host: str) -> bool:
    """True only for a loopback address or "localhost"; any other name counts as public (it
    could resolve elsewhere tomorrow, or on the next bind)."""
    h = host.strip().strip("[]")
    if h.lower() == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(h.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return bool(addr.is_loopback or (mapped is not None and mapped.is_loopback))


def check_web(cfg: Any, host: str, port: int) -> None:
    """Refuse a report on a non-loopback address without ``[web] password`` (DataError)."""
    if is_loopback(host) or cfg.web.password:
        return
    source = cfg.source if cfg.source != "(defaults)" else "voicebot.toml"
    where = f"{host}:{port}" if ":" not in host or host.startswith("[") else f"[{host}]:{port}"
    raise DataError(source, "[web] password",
                    f"required to serve the report on {where} (not loopback); set it, or "
                    "serve on 127.0.0.1")


class LiveReport:
    """The report served over HTTP, rebuilt from the store at most every ``max_age_s``.

    One build at a time: while it runs, other requests get the last good page at once
    (only the very first page is waited for). A build that fails (the store down) keeps
    the last good page and shows a notice on it; the next try is ``max_age_s`` later, so
    a dead store is not hammered either. ``builds`` counts attempts (tests, metrics)."""

    def __init__(self, store_factory: Any, folder: Path, max_age_s: float = 5.0) -> None:
        self.store_factory = store_factory
        self.folder = folder
        self.max_age_s = max_age_s
        self.builds = 0
        self.failures = 0
        self._tried = -float("inf")  # monotonic time the last build ended, good or not
        self._lock = threading.Lock()
        self._page: bytes | None = None  # index.html of the last good build
        self.notice = ""
        folder.mkdir(parents=True, exist_ok=True)

    def refresh(self) -> None:
        if time.monotonic() - self._tried < self.max_age_s:
            return
        if not self._lock.acquire(blocking=self._page is None):
            return  # someone is rebuilding: the last page is good enough meanwhile
        try:
            # Waited for the first build, or raced with one that just ended: fresh now.
            if time.monotonic() - self._tried < self.max_age_s:
                return
            self._rebuild()
        finally:
            self._lock.release()

    def _rebuild(self) -> None:
        self.builds += 1
        t0 = time.monotonic()
        tmp = self.folder / ".build"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            store = self.store_factory()
            try:
                build(store, tmp)
            finally:
                store.close()
            # File by file, atomically: a request during the swap reads an old or a new
            # file, never half of one.
            for f in tmp.iterdir():
                os.replace(f, self.folder / f.name)
            self._page = (self.folder / "index.html").read_bytes()
            self.notice = ""
            log.info("web: report built in %.2f s (build %d)", time.monotonic() - t0,
                     self.builds)
        except Exception as exc:
            self.failures += 1
            # The log gets the cause; the page only says that it is old (no traceback, no
            # store path on a page that may face a network).
            log.warning("web: the report could not be rebuilt (build %d): %s", self.builds,
                        exc)
            at = dt.datetime.now().astimezone().strftime("%H:%M:%S")
            self.notice = (f"The report could not be rebuilt at {at} (the call store did not "
                            "answer); this is the last report that could be built. The next "
                            f"try is in {self.max_age_s:g} s.")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            self._tried = time.monotonic()

    def file(self, name: str) -> bytes | None:
        """A served file's bytes (index.html with the notice, if any); None: there is none."""
        if name == "index.html":
            page = self._page
            if page is None:
                return None
            if self.notice:
                note = f'<p class="notice" role="alert">{_html(self.notice)}</p>'.encode()
                page = page.replace(b"<body>", b"<body>" + note, 1)
            return page
        try:
            return (self.folder / name).read_bytes()
        except OSError:
            return None


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET and HEAD of the report's own files only; HTTP Basic when a password is set."""

    live: LiveReport
    password: str
    failures: dict[str, collections.deque[float]]
    failures_lock: threading.Lock
    server_version = "voicebot"
    sys_version = ""  # no Python version for a scanner
    timeout = 30  # a client that sends nothing holds its thread at most this long

    def version_string(self) -> str:
        return self.server_version

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _send(self, code: int, data: bytes, ctype: str, body: bool,
              extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")
        if code not in (401, 429):  # nothing about the report before the password
            self.send_header("X-Report-Builds", str(self.live.builds))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _text(self, code: int, text: str, body: bool,
              extra: dict[str, str] | None = None) -> None:
        self._send(code, text.encode(), "text/plain; charset=utf-8", body, extra)

    def _authorised(self, body: bool) -> bool:
        if not self.password:
            return True
        src = self.client_address[0]
        now = time.monotonic()
        with self.failures_lock:
            recent = self.failures.setdefault(src, collections.deque())
            while recent and now - recent[0] > 60:
                recent.popleft()
            if len(recent) >= AUTH_FAILURES_PER_MIN:
                self._text(429, "too many wrong passwords; try again in a minute\n", body,
                           {"Retry-After": "60"})
                return False
        given = b""
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() == "basic":
            try:
                given = base64.b64decode(token.strip(), validate=True)
            except ValueError:
                given = b""
        expected = f"{WEB_USER}:{self.password}".encode()
        if given and hmac.compare_digest(given, expected):
            return True
        with self.failures_lock:
            if given:  # a browser's first request carries no credentials: not a guess
                recent.append(now)
        # Nothing about the report (or callers) in a 401: only that a login is needed.
        self._text(401, "authentication required\n", body,
                   {"WWW-Authenticate": f'Basic realm="{WEB_USER}", charset="UTF-8"'})
        return False

    def _serve(self, body: bool) -> None:
        if not self._authorised(body):
            return
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        m = _SERVED.match("/index.html" if path == "/" else path)
        if m is None:
            self._text(404, "not found\n", body)
            return
        # Only now, after the password: nobody outside makes us rebuild.
        self.live.refresh()
        data = self.live.file(m.group(1))
        if data is None:
            if m.group(1) == "index.html":  # the first build failed: nothing to show yet
                self._text(503, f"{self.live.notice or 'the report is not built yet'}\n",
                           body, {"Retry-After": f"{max(1, round(self.live.max_age_s))}"})
            else:
                self._text(404, "not found\n", body)
            return
        self._send(200, data, _TYPES[m.group(2)], body)

    def log_message(self, format: str, *args: Any) -> None:
        log.info("web %s %s", self.client_address[0], format % args)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # a burst of requests waits in the backlog, not refused


def serve_web(live: LiveReport, host: str, port: int,
              password: str = "") -> http.server.ThreadingHTTPServer:
    """Start the read-only report page in a daemon thread; returns the server (shutdown()).

    ``password``: HTTP Basic for user ``voicebot``; required off loopback (see
    :func:`check_web`, which the caller runs before anything slow)."""
    h = host.strip("[]")
    handler = type("Handler", (_Handler,), {"live": live, "password": password,
                                            "failures": {}, "failures_lock": threading.Lock()})
    server_cls = _Server
    if ":" in h:
        server_cls = type("Server6", (_Server,), {"address_family": socket.AF_INET6})
    httpd = server_cls((h, port), handler)
    threading.Thread(target=httpd.serve_forever, name="web", daemon=True).start()
    log.info("report page on http://%s:%d/%s", host, port,
             " (HTTP Basic, user voicebot)" if password else "")
    return httpd
