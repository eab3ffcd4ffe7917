"""The ``voicebot`` command: one console script, one subcommand per job."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import Config, load_config
from .errors import VoicebotError


class _AppendInput(argparse.Action):
    """Keeps --press/--say/--say-wav/--silent in the order given: one input per turn."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        from .simulator import CallerInput

        kind = {"--press": "press", "--say": "say", "--say-wav": "say_wav",
                "--silent": "silent"}[option_string or ""]
        inputs = list(getattr(namespace, "inputs", None) or [])
        inputs.append(CallerInput(kind, "" if values is None else str(values)))
        namespace.inputs = inputs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="voicebot", description=__doc__)
    p.add_argument("--config", help="configuration file (default: voicebot.toml in the project)")
    p.add_argument("--log-level", default=None,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", required=True)

    menus = sub.add_parser("menus", help="check or show the menu and language packs")
    msub = menus.add_subparsers(dest="action", required=True)
    chk = msub.add_parser("check", help="validate grammars/ and check keywords against models")
    chk.add_argument("--strict", action="store_true",
                     help="exit 1 when a keyword is missing from an installed model's vocabulary")
    show = msub.add_parser("show", help="print the menu tree")
    show.add_argument("--lang", help="language pack to show words from (default: all)")

    prompts = sub.add_parser("prompts", help="render prompts")
    psub = prompts.add_subparsers(dest="action", required=True)
    build = psub.add_parser("build", help="render every prompt into the cache (changed ones only)")
    build.add_argument("--quiet", action="store_true", help="no progress bar")

    models = sub.add_parser("models", help="ASR models: list, install, import")
    osub = models.add_subparsers(dest="action", required=True)
    osub.add_parser("list", help="models the packs use and where they are")
    inst = osub.add_parser("install", help="download an official model (vosk's own downloader)")
    inst.add_argument("name")
    imp = osub.add_parser("import", help="install a model from a zip file or a folder")
    imp.add_argument("path")
    imp.add_argument("--name", help="model name (default: the folder name in the zip)")

    intents = sub.add_parser("intents", help="intent classifiers: train, evaluate")
    isub = intents.add_subparsers(dest="action", required=True)
    isub.add_parser("train", help="train and save one classifier set per language")
    ev = isub.add_parser("eval", help="cross-validated accuracy per language and node")
    ev.add_argument("--folds", type=int, default=5)

    sim = sub.add_parser("simulate", help="run a call on audio through the real voice core")
    sim.add_argument("--lang", help="start at this language's main menu")
    sim.add_argument("--press", action=_AppendInput, metavar="KEYS",
                     help="caller presses keys (in-band DTMF tones)")
    sim.add_argument("--say", action=_AppendInput, metavar="TEXT",
                     help="caller says TEXT (espeak-ng in the call's language)")
    sim.add_argument("--say-wav", action=_AppendInput, metavar="FILE",
                     help="caller plays a recording (WAV/FLAC/OGG)")
    sim.add_argument("--silent", action=_AppendInput, nargs=0,
                     help="caller says nothing for one turn (no-input)")
    sim.add_argument("--at", help="time of the call, ISO (default now), in the call centre's "
                                  "timezone unless it carries an offset")
    sim.add_argument("--barge-in", nargs="?", const=1500, type=int, metavar="MS",
                     help="caller speaks MS ms into each prompt instead of after it (1500)")
    sim.add_argument("--caller", metavar="NUMBER",
                     help="the caller's number: its remembered controls (slower, louder, "
                     "more time) apply and are saved, as for a real caller")
    sim.add_argument("--transfer-fails", action="store_true",
                     help="the operator transfer fails (busy)")
    sim.add_argument("--rate", type=int, default=8000, choices=[8000, 16000],
                     help="call sample rate (Hz)")
    sim.add_argument("--record", metavar="FILE", help="write both directions to a WAV file")
    sim.add_argument("--json", action="store_true", help="one JSON object per turn")
    sim.set_defaults(inputs=[])

    srv = sub.add_parser("serve", help="answer SIP calls (pjsua2), optionally N workers behind "
                                       "Kamailio")
    srv.add_argument("--listen", metavar="HOST:PORT", help="public SIP address (default from "
                                                           "[sip] listen: 127.0.0.1:5060)")
    srv.add_argument("--workers", type=int, default=1,
                     help="worker processes (4 calls each); more than 1 runs Kamailio in front")
    srv.add_argument("--at", help="set the clock (ISO time) for working hours, e.g. for tests")
    srv.add_argument("--web", metavar="HOST:PORT",
                     help="also serve the call report, live and read-only, e.g. 127.0.0.1:8080 "
                          "(overrides [web] listen; off loopback [web] password is required)")

    call = sub.add_parser("call", help="dial a SIP URI with a softphone and navigate by keys or "
                                       "speech")
    call.add_argument("uri", help="e.g. sip:919@127.0.0.1:5060")
    call.add_argument("--press", action=_AppendInput, metavar="KEYS", help="send keys")
    call.add_argument("--say", action=_AppendInput, metavar="TEXT",
                      help="say TEXT (espeak-ng, streamed as RTP)")
    call.add_argument("--say-wav", action=_AppendInput, metavar="FILE",
                      help="stream a recording as RTP")
    call.add_argument("--silent", action=_AppendInput, nargs=0, help="say nothing for one turn")
    call.add_argument("--lang", help="voice for --say (default: the language chosen by key, or "
                                     "the pack whose keyword it is)")
    call.add_argument("--barge-in", nargs="?", const=1500, type=int, metavar="MS",
                      help="give each input after the first MS ms into the bot's reply "
                           "instead of after it (1500)")
    call.add_argument("--dtmf", default="rfc4733", choices=["rfc4733", "info", "inband"],
                      help="how keys are sent (default RFC 4733 telephone-events)")
    call.add_argument("--record", metavar="FILE", help="write both directions to a WAV file")
    call.add_argument("--json", action="store_true", help="one JSON object per turn")
    call.add_argument("--heard", action="store_true",
                      help="find the prompts heard in the received audio (matched against the "
                           "prompt cache); with --json one {\"heard\": [...]} object follows "
                           "the turns")
    call.add_argument("--timeout", type=float, default=300.0, metavar="S",
                      help="give up after S seconds")
    call.add_argument("--tls", action="store_true",
                      help="signal over TLS (implied by a sips: URI), e.g. to port 5061")
    call.add_argument("--srtp", default="off", choices=["off", "optional", "mandatory"],
                      help="offer SRTP (SDES keys); mandatory: no call without it")
    call.add_argument("--ca", metavar="FILE", help="with TLS: accept only a bot certificate "
                      "signed by this PEM CA list (default: accept any, e.g. self-signed)")
    call.add_argument("--cert", nargs=2, metavar=("CERT", "KEY"),
                      help="with TLS: show this PEM certificate and key (a bot with "
                           "[sip.tls] verify_peer asks callers for one)")
    call.set_defaults(inputs=[])

    bench = sub.add_parser("bench", help="latency, capacity and accuracy benchmarks "
                                         "(writes benchmarks/results/NAME.json and NAME.md)")
    bench.add_argument("--quick", action="store_true",
                       help="CI smoke: every section, small (under 3 minutes)")
    bench.add_argument("--name", help="result name (default: quick or full)")
    bench.add_argument("--out", metavar="DIR", help="results folder (default "
                                                    "benchmarks/results)")
    bench.add_argument("--suite", metavar="FILE",
                       help="run only this accuracy suite (CSV or YAML: audio, language, node, "
                            "expected)")
    bench.add_argument("--sip", metavar="URI", help="with --suite: call a running bot at URI "
                                                    "instead of the in-process voice core")
    bench.add_argument("--port", type=int, default=5400,
                       help="first SIP port the benchmark's own servers use (5400; it uses "
                            "the next ~40)")
    bench.add_argument("--only", action="append", metavar="SECTION",
                       help="run only these sections: core, asr, vad, dtmf, latency, "
                            "capacity, suites (repeatable)")
    bench.add_argument("--soak", type=float, metavar="MINUTES",
                       help="instead: a soak of speaking calls through the workers behind "
                            "Kamailio for MINUTES (failures, calls recorded, PSS, open fds "
                            "and turn latency per minute); writes NAME.json and NAME.md "
                            "(default name soak)")
    bench.add_argument("--security", action="store_true",
                       help="instead: the front's flood and scanner limits and an allowed "
                            "caller's turn latency during a sipvicious scan (default name "
                            "security)")
    bench.add_argument("--soak-calls", type=int, default=40, metavar="N",
                       help="concurrent calls of the soak, the probe included (40)")

    calls = sub.add_parser("calls", help="list recorded calls with their paths")
    calls.add_argument("--json", action="store_true", help="one JSON object per call")
    calls.add_argument("--last", type=int, default=20, metavar="N", help="newest N calls (20)")

    apps = sub.add_parser("applications", help="application statuses the status menu reads")
    asub = apps.add_subparsers(dest="action", required=True)
    aimp = asub.add_parser("import", help="import a CSV (number,status,date); bad rows are "
                                          "listed with their line numbers, the rest imported")
    aimp.add_argument("file")
    ashow = asub.add_parser("show", help="the stored status of one application")
    ashow.add_argument("number")

    cbs = sub.add_parser("callbacks", help="the callback queue")
    csub = cbs.add_subparsers(dest="action", required=True)
    clist = csub.add_parser("list", help="callbacks outstanding (--all: done ones too)")
    clist.add_argument("--all", action="store_true")
    clist.add_argument("--json", action="store_true")
    cdone = csub.add_parser("done", help="mark a callback made")
    cdone.add_argument("id", type=int)
    cexp = csub.add_parser("export", help="write the callbacks to a CSV file")
    cexp.add_argument("file")
    cexp.add_argument("--all", action="store_true", help="done ones too")

    cls = sub.add_parser("callers", help="what is remembered for a caller number (their "
                                         "accessibility settings, 90 days)")
    clsub = cls.add_subparsers(dest="action", required=True)
    clsub.add_parser("show", help="the settings remembered for a number").add_argument("number")
    clsub.add_parser("forget", help="remove what is remembered for a number"
                     ).add_argument("number")

    recs = sub.add_parser("recordings", help="call recordings and messages on disk")
    rsub = recs.add_subparsers(dest="action", required=True)
    rpurge = rsub.add_parser("purge", help="delete recordings and messages older than "
                                           "[recording] keep_days now (serve does it daily)")
    rpurge.add_argument("--dry-run", action="store_true",
                        help="list what would be deleted, delete nothing")

    rpt = sub.add_parser("report", help="HTML and Markdown report with PNG charts and CSVs")
    rpt.add_argument("--since", help="only calls from this day on (YYYY-MM-DD)")
    rpt.add_argument("--out", default=None, help="folder (default: <var>/report)")
    _common_everywhere(p)
    return p


def _common_everywhere(parser: argparse.ArgumentParser) -> None:
    """Accept --config and --log-level after any subcommand too (``voicebot serve --config F``).

    SUPPRESS keeps a subcommand's unset option from overwriting one given before it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in set(action.choices.values()):
                child.add_argument("--config", default=argparse.SUPPRESS,
                                   help="configuration file (default: voicebot.toml)")
                child.add_argument("--log-level", default=argparse.SUPPRESS,
                                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])
                _common_everywhere(child)


def _respawn_with_few_malloc_arenas() -> None:
    """Start `voicebot serve` again with MALLOC_ARENA_MAX=2 in its environment.

    glibc gives each thread that allocates its own malloc arena (up to 8 per core), and
    every call has a worker thread: idle arenas cost memory per call (7.4 MB per call
    with the default, 5.1 MB with 2 arenas; 3 workers, 12 calls). The limit is read once,
    when the first extra arena is made, and import-time threads (OpenBLAS) make one before
    any code of ours runs, so it must be in the environment when the process starts.
    """
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return
    # execve replaces this program in place: the pid the service manager (or a shell)
    # started stays the pid of the supervisor, which owns the workers and Kamailio; a
    # child process here would leave a wrapper whose death orphans them all.
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
              {**os.environ, "MALLOC_ARENA_MAX": "2"})


# Commands that write only shared, non-caller artefacts (prompt audio, ASR models, intent
# classifiers) keep the user's umask, so that e.g. a model installed by an administrator
# stays readable by the service user. Every other command can write caller data.
_NO_CALLER_DATA = frozenset({"menus", "prompts", "models", "intents"})


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command not in _NO_CALLER_DATA:
        # Caller data (recordings, messages, the SQLite store and its -wal/-shm, the spool,
        # reports and CSV exports) is created 0600, folders 0700. A umask is the only way
        # that reaches every writer: pjsua2's WAV recorder and SQLite open their files with
        # the process umask and take no mode from us. execve (below) keeps it.
        os.umask(0o077)
    if argv is None and args.command == "serve":
        _respawn_with_few_malloc_arenas()  # only from the command line, never in-process
    level = args.log_level or ("INFO" if args.command == "serve" else "WARNING")
    logging.basicConfig(level=getattr(logging, level),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        cfg = load_config(args.config)
        handler = {
            "menus": _menus, "prompts": _prompts, "models": _models, "intents": _intents,
            "simulate": _simulate, "serve": _serve, "calls": _calls, "call": _call,
            "bench": _bench,
            "applications": _applications, "callbacks": _callbacks, "report": _report,
            "recordings": _recordings, "callers": _callers,
        }[args.command]
        return handler(cfg, args)
    except VoicebotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# --- menus ---


def _menus(cfg: Config, args: argparse.Namespace) -> int:
    from .menus import load_grammars

    g = load_grammars(cfg.grammars_dir)
    if args.action == "show":
        if args.lang and args.lang not in g.packs:
            raise VoicebotError(f"--lang {args.lang}: no such pack; have {', '.join(g.packs)}")
        _show_tree(g, args.lang)
        return 0
    from .asr import ModelStore, vocabulary_report

    store = ModelStore(cfg)
    n_opts = len(g.menu.all_options())
    print(f"ok: {g.menu.file.name} has {len(g.menu.nodes)} menus and {n_opts} options; "
          f"packs: {', '.join(sorted(g.packs))}; every pack has all "
          f"{len(g.required_prompts())} prompts")
    missing_total = 0
    for lang, pack in sorted(g.packs.items()):
        loc = store.location(pack.asr_model)
        if loc is None:
            print(f"{lang}: vocabulary not checked, model {pack.asr_model} is not installed")
            continue
        missing = vocabulary_report(store.get(pack.asr_model), pack, g.menu)
        missing_total += len(missing)
        if not missing:
            print(f"{lang}: every keyword and decoy is in {pack.asr_model}'s vocabulary")
        for m in missing:
            print(f"{lang}: {pack.file.name}: {m.where}: word {m.word!r} of {m.phrase!r} is not "
                  f"in {pack.asr_model}'s vocabulary (give it an asr_words spelling the model "
                  "knows)")
    for line in store.missing_report(g.packs.values()):
        print(f"note: {line}")
    return 1 if (args.strict and missing_total) else 0


def _show_tree(g: object, lang: str | None) -> None:
    from .menus import Grammars

    assert isinstance(g, Grammars)
    langs = [lang] if lang else sorted(g.packs)
    menu = g.menu

    def words(option_id: str) -> str:
        parts = []
        for lg in langs:
            ow = g.packs[lg].options[option_id]
            parts.append(f"{lg}: {ow.label} [{', '.join(ow.keywords)}]")
        return "; ".join(parts)

    def action(o: object) -> str:
        kind, target = o.kind, o.target  # type: ignore[attr-defined]
        if kind == "language":
            return f"-> {menu.home} in {target}"
        if kind == "goto":
            return f"-> {target}"
        if kind == "play":
            return f"plays {target}, back to this menu"
        if kind == "action" and target == "operator":
            return f"operator in working hours, else hours and -> {menu.fallback}"
        return kind

    for node_id, node in menu.nodes.items():
        where = " (start)" if node_id == menu.start else (" (home)" if node_id == menu.home
                                                           else "")
        print(f"{node_id}{where}: prompt {node.prompt!r}"
              + (f", * -> {node.back}" if node.back else ""))
        for o in node.options:
            print(f"  {o.key}  {o.id:<26} {action(o)}")
            print(f"       {words(o.id)}")
        for o in (menu.repeat, menu.back):
            if o is menu.back and not node.back:
                continue
            print(f"  {o.key}  {o.id:<26} {'repeats' if o is menu.repeat else 'goes back'}")
        op = menu.operator
        if op is not None and op.id in {o.id for o in menu.choices(node_id)}:
            print(f"  {op.key}  {op.id:<26} operator, as {menu.home}'s operator option")
    if menu.controls:
        # The caller controls work at every node: help and more time by key, all by voice.
        print("controls (at every menu; by voice everywhere, the keys shown):")
        for c in menu.controls:
            where = "at every menu" if c.target in ("help", "more_time") else "in help"
            print(f"  {c.key}  {c.id:<26} {c.target.replace('_', ' ')} ({where})")
            print(f"       {words(c.id)}")
        print(f"  *  {menu.back.id:<26} leaves help, back to the menu it was opened from")
    print(f"confirm: {menu.yes.key} {menu.yes.id}, {menu.no.key} {menu.no.id}")
    print(f"  {words(menu.yes.id)}")
    print(f"  {words(menu.no.id)}")


# --- prompts ---


def _prompts(cfg: Config, args: argparse.Namespace) -> int:
    from .session import VoiceCore

    core = VoiceCore(cfg)
    items = [(f"{p.language}.{p.key}", p.text, p.voice) for p in core.all_prompts()]
    report = core.prompts.build(items, progress=not args.quiet)
    print(f"prompts: {report.files} in {core.prompts.root} ({report.rendered} rendered, "
          f"{report.cached} unchanged)")
    return 0


# --- models ---


def _models(cfg: Config, args: argparse.Namespace) -> int:
    from .menus import load_grammars
    from .models import fix_hint, import_model, install, load_catalog, resolve

    if args.action == "install":
        loc = install(cfg, args.name)
        print(f"{args.name}: installed at {loc.path} ({loc.source})")
        return 0
    if args.action == "import":
        loc = import_model(cfg, Path(args.path), args.name)
        print(f"{loc.name}: imported to {loc.path}")
        return 0
    catalog = load_catalog(cfg)
    g = load_grammars(cfg.grammars_dir)
    users: dict[str, list[str]] = {}
    for lang, pack in g.packs.items():
        users.setdefault(pack.asr_model, []).append(lang)
    names = sorted(set(catalog) | set(users))
    print(f"{'model':<30} {'packs':<8} {'size':>6}  status")
    for name in names:
        entry = catalog.get(name)
        size = f"{entry.size_mb}MB" if entry else "?"
        loc = resolve(cfg, name)
        status = f"installed ({loc.source}): {loc.path}" if loc else "missing"
        print(f"{name:<30} {','.join(sorted(users.get(name, []))) or '-':<8} {size:>6}  {status}")
    for name in names:
        if resolve(cfg, name) is None and name in users:
            print(f"  to install {name}: {fix_hint(cfg, name)}")
    return 0


# --- intents ---


def _intents(cfg: Config, args: argparse.Namespace) -> int:
    from .menus import load_grammars
    from .nlu import evaluate, load, save, train

    g = load_grammars(cfg.grammars_dir)
    if args.action == "train":
        for lang, pack in sorted(g.packs.items()):
            if load(cfg.models_dir, pack, g.menu) is not None:
                print(f"{lang}: intent model up to date")
                continue
            path = save(train(pack, g.menu), cfg.models_dir)
            print(f"{lang}: trained {path}")
        return 0
    print(f"{'lang':<5} {'node':<10} {'phrases':>7} {'accuracy':>9} {'none-recall':>12}")
    for lang, pack in sorted(g.packs.items()):
        results = evaluate(pack, g.menu, folds=args.folds)
        total = sum(r.samples for r in results)
        for r in results:
            print(f"{lang:<5} {r.node:<10} {r.samples:>7} {r.accuracy:>9.3f} "
                  f"{r.none_recall:>12.3f}")
        acc = sum(r.accuracy * r.samples for r in results) / total
        print(f"{lang:<5} {'(all)':<10} {total:>7} {acc:>9.3f}")
    return 0


# --- simulate ---


def _simulate(cfg: Config, args: argparse.Namespace) -> int:
    from .hours import parse_at
    from .session import VoiceCore
    from .simulator import Simulator, transcript_lines, turn_json
    from .store import Store

    core = VoiceCore(cfg)
    for line in core.startup_report():
        print(f"note: {line}", file=sys.stderr)
    if args.lang and args.lang not in core.grammars.packs:
        raise VoicebotError(f"--lang {args.lang}: no such pack; have "
                            f"{', '.join(sorted(core.grammars.packs))}")
    at = parse_at(args.at, core.hours.tz) if args.at else dt.datetime.now(core.hours.tz)
    # The store answers the status menu and keeps messages, tickets and callbacks; the
    # simulated call is recorded in it too (caller "simulator", or --caller), as a real one
    # would be.
    store = Store.from_config(cfg)
    sim = Simulator(core, args.inputs, at, language=args.lang, barge_in_ms=args.barge_in,
                    transfer_fails=args.transfer_fails, sample_rate=args.rate,
                    record=Path(args.record) if args.record else None, store=store,
                    caller=args.caller or "simulator", remember_settings=bool(args.caller))
    try:
        res = sim.run()
    finally:
        store.close()
    if args.json:
        for turn in res.turns:
            print(json.dumps(turn_json(turn), ensure_ascii=False))
    else:
        for line in transcript_lines(res):
            print(line)
        if res.recording:
            print(f"recording: {res.recording}")
    return 0


# --- serve and calls ---


def _serve(cfg: Config, args: argparse.Namespace) -> int:
    from .config import parse_hostport
    from .hours import WorkingHours, parse_at
    from .server import serve

    if args.workers < 1:
        raise VoicebotError("--workers must be 1 or more")
    if args.listen:
        parse_hostport(args.listen)
    at = parse_at(args.at, WorkingHours.from_config(cfg.hours).tz) if args.at else None
    # --web overrides [web] listen; off loopback the password is checked now, before the
    # models load, so a bad start fails in a second rather than after half a minute.
    web_at = args.web or cfg.web.listen
    web = parse_hostport(web_at, 8080) if web_at else None
    if web is not None:
        from .report import check_web

        check_web(cfg, *web)
    return serve(cfg, workers=args.workers, listen=args.listen, at=at, web=web)


def _calls(cfg: Config, args: argparse.Namespace) -> int:
    from .store import Store, local

    store = Store.from_config(cfg)
    try:
        records = store.calls(last=args.last)
    finally:
        store.close()
    if args.json:
        for r in records:
            print(json.dumps(r.to_json(), ensure_ascii=False))
        return 0
    if not records:
        print("no calls recorded yet")
    for r in records:
        path = " > ".join(r.path) or "-"
        # Stored in UTC; shown in the call centre's own time ([hours] timezone).
        t = local(r.started_at, store.tz)
        when = t.isoformat(sep=" ", timespec="seconds") if t else (r.started_at or "?")
        print(f"{when:<25} {r.id}  {r.caller or '?'} -> {r.dialled or '?'}  "
              f"{r.language or '-':<3} {r.result or 'in progress':<11} {path}")
        if r.recording and not Path(r.recording).exists():
            # Retention deletes the file, the store keeps naming it (voicebot.retention).
            gone = (f"(deleted after keep_days = {cfg.recording.keep_days}, or not on this "
                    "host)" if cfg.recording.keep_days else f"{r.recording} (missing)")
            print(f"{'':<25} recording: {gone}")
        elif r.recording:
            print(f"{'':<25} recording: {r.recording}")
    return 0


def _recordings(cfg: Config, args: argparse.Namespace) -> int:
    from .retention import purge, recordings_folder

    res = purge(cfg, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    for path in res.deleted:
        print(f"{verb} {path}")
    print(f"{recordings_folder(cfg)}: {res.line().removeprefix('retention: ')}")
    return 1 if res.errors else 0


def _call(cfg: Config, args: argparse.Namespace) -> int:
    from .softphone import Softphone

    phone = Softphone(cfg, args.uri, args.inputs, language=args.lang, barge_in_ms=args.barge_in,
                      dtmf_method=args.dtmf, record=Path(args.record) if args.record else None,
                      timeout_s=args.timeout, identify=args.heard, tls=args.tls,
                      srtp=args.srtp, ca=Path(args.ca) if args.ca else None,
                      cert=(Path(args.cert[0]), Path(args.cert[1])) if args.cert else None)
    res = phone.run()
    secure = {"transport": res.transport, "srtp": res.srtp, "contact": res.remote_contact}
    show_secure = phone.tls or args.srtp != "off"
    if not res.connected:
        why = (f"{res.status} {res.reason}" if res.status else
               "no answer: is voicebot serve running at that address?")
        print(f"error: the call to {args.uri} did not connect ({why})", file=sys.stderr)
        return 1
    keys = ("node", "prompt", "input", "heard", "confidence", "option", "language", "result",
            "barge_in", "latency_ms", "prompt_text")
    if res.records:
        rows = [{k: t.get(k) for k in keys} for t in res.records]
    else:  # the bot's records are elsewhere: report what this end observed
        kinds = {"press": "dtmf", "say": "speech", "say_wav": "speech", "silent": "none"}
        rows = [{"node": None, "prompt": None, "input": kinds[o.input.kind],
                 "heard": o.input.value, "confidence": None, "option": None,
                 "reply_after_ms": None if o.reply_start_ms is None
                 else round(o.reply_start_ms - o.sent_ms)} for o in res.observed]
    if args.json:
        for row in rows:
            print(json.dumps({**row, "sip_call_id": res.sip_call_id}, ensure_ascii=False))
        if args.heard:
            print(json.dumps({"heard": [h.to_json() for h in res.heard],
                              "sip_call_id": res.sip_call_id}, ensure_ascii=False))
        if show_secure:
            print(json.dumps({"security": secure, "sip_call_id": res.sip_call_id}))
    else:
        for row in rows:
            print(f"{row['node'] or '?':<9} {row['input']:<6} {row['heard']!s:<12} -> "
                  f"{row['option'] or '-':<26} {row['prompt'] or ''}: "
                  f"{row.get('prompt_text') or ''}")
        summary = res.call_record or {}
        print(f"call {res.sip_call_id}: {summary.get('result', 'ended')}, "
              f"{res.duration_ms / 1000:.1f} s" + (f", recording {res.recording}"
                                                   if res.recording else ""))
        if args.heard:
            from .heard import summarise

            print(f"heard: {summarise(res.heard) or 'nothing'}")
        if show_secure:
            print(f"security: signalling {res.transport or '?'}, media "
                  f"{'SRTP' if res.srtp else 'plain RTP'}, answered by {res.remote_contact}")
    return 0


# --- call-centre duties ---


def _applications(cfg: Config, args: argparse.Namespace) -> int:
    from .duties import import_applications
    from .store import Store

    store = Store.from_config(cfg)
    try:
        if args.action == "show":
            found = store.application(args.number)
            print(f"{args.number}: {found[0]} since {found[1]}" if found
                  else f"{args.number}: no such application")
            return 0 if found else 1
        rep = import_applications(store, Path(args.file))
    finally:
        store.close()
    for e in rep.errors:
        print(f"{rep.file}: {e}", file=sys.stderr)
    print(f"{rep.file}: imported {rep.imported} application(s), rejected {len(rep.errors)} "
          "row(s)")
    return 1 if rep.errors else 0


def _callers(cfg: Config, args: argparse.Namespace) -> int:
    from .store import CALLER_SETTINGS_DAYS, Store

    store = Store.from_config(cfg)
    try:
        if args.action == "forget":
            n = store.forget_caller(args.number)
            print(f"{args.number}: " + ("remembered settings removed" if n
                                        else "nothing was remembered"))
            return 0
        settings = store.caller_settings(args.number)
    finally:
        store.close()
    if settings is None:
        print(f"{args.number}: nothing remembered (or older than {CALLER_SETTINGS_DAYS} days)")
    else:
        print(f"{args.number}: speech rate x{settings.rate}, louder by {settings.gain_db} dB, "
              f"more time {('no', 'x3', 'no time limit')[settings.more_time]}")
    return 0


def _callbacks(cfg: Config, args: argparse.Namespace) -> int:
    import csv

    from .store import Store

    store = Store.from_config(cfg)
    try:
        if args.action == "done":
            if not store.callback_done(args.id):
                raise VoicebotError(f"callback {args.id}: no such outstanding callback "
                                    "(see voicebot callbacks list --all)")
            print(f"callback {args.id}: done")
            return 0
        rows = store.callbacks(outstanding_only=not args.all)
    finally:
        store.close()
    # The number is unverified unless a trusted peer asserted it (P-Asserted-Identity):
    # whoever calls back should know it may be what a forged From said (issue 11).
    for r in rows:
        r["identity"] = "verified" if r["verified"] else "unverified"
    if args.action == "export":
        path = Path(args.file)
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["id", "caller", "identity", "language",
                                              "reason", "created_at", "done_at", "call_id"],
                               extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        print(f"{path}: {len(rows)} callback(s)")
        return 0
    if args.json:
        for r in rows:
            print(json.dumps(r, ensure_ascii=False))
        return 0
    if not rows:
        print("no callbacks outstanding" if not args.all else "no callbacks")
    for r in rows:
        state = f"done {r['done_at']}" if r["done_at"] else "outstanding"
        print(f"{r['id']:>5}  {r['created_at']}  {r['caller'] or '?':<28} {r['identity']:<10} "
              f"{r['language'] or '-':<3} {r['reason']:<16} {state}")
    return 0


def _report(cfg: Config, args: argparse.Namespace) -> int:
    from .report import build
    from .store import Store

    since = None
    if args.since:
        try:
            since = dt.date.fromisoformat(args.since)
        except ValueError:
            raise VoicebotError(f"--since {args.since!r}: expected a day as YYYY-MM-DD") from None
    out = Path(args.out) if args.out else cfg.var_dir / "report"
    store = Store.from_config(cfg)
    try:
        rep = build(store, out, since)
    finally:
        store.close()
    print(f"report: {rep.calls} calls -> {out / 'index.html'} and {out / 'report.md'} "
          f"({len(rep.files)} files)")
    return 0


# --- bench ---


def _bench(cfg: Config, args: argparse.Namespace) -> int:
    from .bench import run_bench
    from .bench.runner import SECTIONS

    if args.sip and not args.suite:
        raise VoicebotError("--sip needs --suite FILE (the suite's cases are the calls)")
    bad = [s for s in args.only or [] if s not in SECTIONS]
    if bad:
        raise VoicebotError(f"--only {bad[0]}: no such section; have {', '.join(SECTIONS)}")
    if args.security:
        from .bench.security import run_security

        jpath, mpath = run_security(cfg, name=args.name,
                                    out_dir=Path(args.out) if args.out else None, port=args.port)
    elif args.soak is not None:
        from .bench.soak import run_soak

        if args.soak <= 0 or args.soak_calls < 2:
            raise VoicebotError("--soak needs MINUTES > 0 and --soak-calls at least 2 (the "
                                "probe and one sipp caller)")
        jpath, mpath = run_soak(cfg, args.soak, args.soak_calls, name=args.name,
                                out_dir=Path(args.out) if args.out else None, port=args.port)
    else:
        jpath, mpath = run_bench(cfg, quick=args.quick, name=args.name,
                                 out_dir=Path(args.out) if args.out else None,
                                 suite=Path(args.suite) if args.suite else None,
                                 sip_uri=args.sip, port=args.port, only=args.only)
    data = json.loads(jpath.read_text(encoding="utf-8"))
    for t in data.get("targets", []):
        mark = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        print(f"{mark:>12}  {t['what']}: {t['measured']}")
    for section, err in (data.get("errors") or {}).items():
        print(f"error in {section}: {err}", file=sys.stderr)
    print(f"results: {jpath}\nreport:  {mpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
