"""`voicebot serve`: worker processes under a supervisor, behind Kamailio.

pjsua2-python holds 4 calls per process, so capacity comes from processes. The
supervisor (the very process that was started) loads the Vosk models and intent
classifiers once, then forks the workers: the models' memory (about 500 MB for
Korean) is shared copy-on-write by every worker instead of being loaded N times.
Each worker runs its own pjsua2 endpoint on its own SIP port and RTP range.
Kamailio, configured from ``deploy/kamailio.cfg.tmpl``, runs in front in every mode,
one worker too: only it listens on the public address (``[sip] listen``). It keeps out
who is not allowed (``[sip] allow``: 403), floods (``flood_limit``/``ban_s``) and known
scanners (``scanner_agents``), sends each new call to the least-loaded worker with a
free slot, health-checks workers with OPTIONS, and skips one that is busy, refuses or
has died. Workers listen on ``[sip] worker_address`` (loopback by default) at
``worker_port + index``, so nothing but the front reaches them. Each worker is a forked,
supervised process, so a crash in PJSIP (an assertion abort) costs that worker's calls,
never the line.

The supervisor restarts a dead worker (or Kamailio) with backoff, 0.5 s doubling
to 30 s, back to 0.5 s once a process has stayed up for a minute. Workers and
Kamailio die with the supervisor (PR_SET_PDEATHSIG, and the worker watches its
parent too), and ``var/serve.pid`` names every process of a running bot, so the
next start can clean up what a killed one left holding the ports.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from . import tls
from .config import PROJECT_ROOT, Config, parse_hostport
from .errors import VoicebotError
from .libc import prctl
from .session import VoiceCore
from .store import Store

log = logging.getLogger("voicebot.server")

KAMAILIO_MODULES = ("/usr/lib/x86_64-linux-gnu/kamailio/modules", "/usr/lib/kamailio/modules",
                    "/usr/local/lib64/kamailio/modules", "/usr/local/lib/kamailio/modules")

# Restart backoff (s): a process that dies at once (a port taken, a broken store) must not
# be forked in a tight loop, and one that ran for a while gets a fast restart again.
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0
PARENT_CHECK_S = 0.5  # how often a worker checks that its supervisor is still there
PID_FILE = "serve.pid"
# The front opens once the workers answer SIP (or after this long, with those that do):
# a caller, or a readiness probe, reaching Kamailio then reaches a worker too.
WORKERS_READY_S = 60.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def make_clock(core: VoiceCore, at: dt.datetime | None):  # type: ignore[no-untyped-def]
    """Wall clock for working hours; with ``at`` it starts there and runs on (tests, demos)."""
    if at is None:
        return lambda: dt.datetime.now(core.hours.tz)
    t0 = time.monotonic()
    return lambda: at + dt.timedelta(seconds=time.monotonic() - t0)


def worker_address(cfg: Config, index: int) -> tuple[str, int]:
    """SIP listen address ("HOST:PORT") and first RTP port of worker ``index``.

    Never the public address: only Kamailio listens there, and the workers are reached
    through it alone (``[sip] worker_address``, loopback by default)."""
    host = cfg.sip.worker_address
    rtp = cfg.sip.rtp_port + index * cfg.sip.rtp_ports_per_worker
    # Unbracketed even for IPv6: parse_hostport splits at the last colon.
    return f"{host}:{cfg.sip.worker_port + index}", rtp


def run_worker(core: VoiceCore, index: int, at: dt.datetime | None,
               stop: threading.Event, listen: str | None = None) -> None:
    """One pjsua2 endpoint serving calls until ``stop``, on its private address."""
    from .telephony import Telephony

    address, rtp = worker_address(core.cfg, index)
    store = Store.from_config(core.cfg)
    # Before the endpoint takes calls: the calls a killed predecessor left open are closed
    # as interrupted, its half-written recordings made playable.
    run_recovery(core.cfg, store, index)
    # Signalling on the worker address (only the front reaches it), media on the public
    # one: callers send RTP straight to the worker.
    media_host, _ = parse_hostport(listen or core.cfg.sip.listen)
    tel = Telephony(core, store, address, rtp, worker=index, clock=make_clock(core, at),
                    media_host=media_host)
    try:
        tel.start()
        tel.run(stop)
    finally:
        tel.close()
        store.close()


def run_recovery(cfg: Config, store: Store, worker: int | None) -> None:
    """Close calls a crash left open and repair `.part` recordings (voicebot.recovery).

    ``worker`` None: every worker of this host (the supervisor, once at start). Recovery
    is repair work: an import or runtime failure is logged and never stops serving."""
    try:
        from . import recovery
    except Exception:
        log.exception("start-up recovery unavailable (voicebot.recovery does not import); "
                      "serving without it: calls a crash left open stay open")
        return
    try:
        recovery.recover(cfg, store, worker=worker, host=store.host)
    except Exception:
        log.exception("start-up recovery failed for %s; serving anyway",
                      "every worker" if worker is None else f"worker {worker}")


# --- dying with the supervisor ---


def die_with_parent(parent: int, sig: int = signal.SIGTERM) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies (Linux).

    SIGTERM, not SIGKILL: a worker whose supervisor was killed still ends its calls
    politely. If the parent is already gone (it died before this ran), exit now."""
    fn = prctl()
    if fn is not None:
        fn(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def watch_parent(parent: int, stop: threading.Event, grace_s: float) -> threading.Thread:
    """Second line behind PR_SET_PDEATHSIG: stop when the supervisor is gone, exit for sure.

    The thread never touches pjsua2; it sets ``stop`` (the worker ends its calls) and,
    if the worker has not exited ``grace_s`` later, ends the process."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        log.error("worker pid %d: its supervisor (pid %d) is gone; ending calls and exiting",
                  os.getpid(), parent)
        stop.set()
        time.sleep(grace_s)
        log.error("worker pid %d did not stop within %.0f s of its supervisor's death; exiting",
                  os.getpid(), grace_s)
        os._exit(1)

    t = threading.Thread(target=watch, name="parent-watch", daemon=True)
    t.start()
    return t


# --- the pid file: what a running bot consists of ---


def _stat_fields(path: Path) -> list[str] | None:
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat fields from field 3 (state) on; None if no such live process.

    A zombie holds no port, but the leader of a threaded process shows as a zombie while
    its other threads are still exiting and holding the sockets: alive until all are."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    if fields is None or fields[0] not in ("Z", "X"):
        return fields
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            t = _stat_fields(task / "stat")
            if t is not None and t[0] not in ("Z", "X"):
                return fields
    return None


def proc_start(pid: int) -> int | None:
    """Start time of live process ``pid`` (clock ticks since boot): pid and start time
    name one process even after the pid number is reused."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None


def _entry(pid: int) -> dict[str, int]:
    return {"pid": pid, "start": proc_start(pid) or 0}


def _same_process(entry: Any) -> bool:
    try:
        pid, start = int(entry["pid"]), int(entry["start"])
    except (KeyError, TypeError, ValueError):
        return False
    return pid > 0 and pid != os.getpid() and proc_start(pid) == start


def _group_members(pgid: int, needle: str) -> list[int]:
    """Live processes in process group ``pgid`` whose command line contains ``needle``."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        fields = _proc_stat(int(d.name))
        if not fields or int(fields[2]) != pgid:
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmd:
            found.append(int(d.name))
    return found


def write_pid_file(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # a reader never sees half a file


def reclaim_stale(path: Path, wait_s: float = 5.0) -> list[int]:
    """Clean up after a bot that died without stopping its processes; returns pids stopped.

    A live supervisor named in ``path`` is a running bot: that is an error saying how to
    stop it (killing someone's running line is not ours to do). Workers and Kamailio whose
    supervisor is dead are orphans holding the SIP ports: SIGTERM, then SIGKILL."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s); ignoring it", path, exc)
        return []
    sup = data.get("supervisor")
    if _same_process(sup):
        pid = sup["pid"]
        raise VoicebotError(
            f"{path}: voicebot serve is already running as pid {pid} (listening on "
            f"{data.get('listen', '?')}); stop it first (`kill {pid}`, or through your service "
            "manager), or give this bot its own [paths] var folder")
    victims: dict[int, str] = {}
    for index, entry in (data.get("workers") or {}).items():
        if _same_process(entry):
            victims[int(entry["pid"])] = f"worker {index}"
    kam = data.get("kamailio")
    if isinstance(kam, dict) and kam.get("pid"):
        # Kamailio runs in its own process group; its children are found through it.
        for pid in _group_members(int(kam["pid"]), str(kam.get("config") or "kamailio")):
            victims[pid] = "kamailio"
    starts = {pid: proc_start(pid) for pid in victims}

    def alive() -> list[int]:
        return [p for p, st in starts.items() if st is not None and proc_start(p) == st]

    for pid, what in victims.items():
        log.warning("%s (pid %d) of a voicebot serve that died (pid %s) still runs; stopping "
                    "it", what, pid, (sup or {}).get("pid", "?"))
        print(f"note: stopping {what} (pid {pid}) left running by a voicebot serve that died",
              file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGCONT)  # a stopped process acts on its SIGTERM only then
    deadline = time.monotonic() + wait_s
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in alive():
        log.warning("pid %d did not stop on SIGTERM; killing it", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive():
        raise VoicebotError(f"{path}: processes {alive()} of a dead voicebot serve cannot be "
                            "stopped; kill them by hand (kill -9) and start again")
    path.unlink(missing_ok=True)
    return sorted(victims)


def check_ports_free(cfg: Config, workers: int, listen: str) -> None:
    """Fail before loading models when a SIP port we need is taken, naming it: the
    front's (Kamailio's) on ``listen`` and every worker's."""
    wanted = [parse_hostport(listen)]
    wanted += [parse_hostport(worker_address(cfg, i)[0]) for i in range(workers)]
    for host, port in wanted:
        for transport in cfg.sip.transports:
            kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with socket.socket(family, kind) as s:
                if kind == socket.SOCK_STREAM:  # TIME_WAIT leftovers do not block a listener
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((host, port))
                except OSError as exc:
                    raise VoicebotError(
                        f"cannot listen on {transport} {host}:{port} ({exc.strerror}): another "
                        "program holds it (another voicebot or a PBX?); stop it, or change "
                        "[sip] listen / worker_port or pass --listen") from None


def sip_ping(address: str, timeout: float = 0.3) -> bool:
    """Does the SIP endpoint at ``address`` ("HOST:PORT") answer an OPTIONS over UDP?"""
    host, port = parse_hostport(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    tag = os.urandom(6).hex()
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        lport = s.getsockname()[1]
        me = f"[{host}]:{lport}" if family == socket.AF_INET6 else f"{host}:{lport}"
        you = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        msg = (f"OPTIONS sip:{you} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK{tag}\r\n"
               f"From: <sip:supervisor@{me}>;tag={tag}\r\nTo: <sip:{you}>\r\n"
               f"Call-ID: ready-{tag}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n"
               "Content-Length: 0\r\n\r\n")
        s.settimeout(timeout)
        try:
            s.sendto(msg.encode(), (host, port))
            return s.recv(4096).startswith(b"SIP/2.0 ")
        except OSError:  # a timeout, or ICMP port unreachable (nothing listens yet)
            return False


def _install_stop_handlers(stop: threading.Event) -> None:
    def handler(signum: int, frame: object) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def kamailio_binary() -> str:
    """Kamailio's executable: the front door of every `voicebot serve`."""
    binary = shutil.which("kamailio") or "/usr/sbin/kamailio"
    if not Path(binary).exists():
        raise VoicebotError("kamailio is not installed: voicebot serve runs it in front of "
                            "its workers (ACL, flood and scanner limits); `make run` installs "
                            "it, or apt-get install kamailio")
    return binary


def kamailio_modules() -> str:
    for d in KAMAILIO_MODULES:
        if Path(d, "dispatcher.so").exists():
            return d
    raise FileNotFoundError("Kamailio's modules were not found; install the Debian package "
                            "kamailio (make run does it)")


def scanner_regex(agents: list[str]) -> str:
    """[sip] scanner_agents as one POSIX regex in a Kamailio string literal ("" if none).

    Each substring is matched literally (regex metacharacters escaped); Kamailio's ``=~``
    matches case-insensitively. Backslashes and quotes are escaped once more for the
    string literal of the .cfg file."""
    alts = [re.sub(r"([\\.\[\](){}*+?|^$])", r"\\\1", a) for a in agents if a.strip()]
    return "|".join(alts).replace("\\", "\\\\").replace('"', '\\"')


def kamailio_allow(cfg: Config) -> str:
    """[sip] allow as ipops' comma-separated subnet list, each entry as ADDRESS/BITS."""
    return ",".join(str(ipaddress.ip_network(n, strict=False)) for n in cfg.sip.allow)


def write_kamailio_config(cfg: Config, workers: int, listen: str, folder: Path) -> Path:
    """Fill deploy/kamailio.cfg.tmpl and the dispatcher list for local workers."""
    host, port = parse_hostport(listen)
    folder.mkdir(parents=True, exist_ok=True)
    dlist = folder / "dispatcher.list"
    lines = ["# setid destination flags priority attributes (generated by voicebot serve)"]
    for i in range(workers):
        whost, wport = parse_hostport(worker_address(cfg, i)[0])
        uri_host = f"[{whost}]" if ":" in whost else whost
        # With [sip.tls], to the worker's TLS port: caller data never in clear between hosts.
        transport = tls.dispatcher_transport(cfg)
        if transport == "tls":
            wport = tls.worker_tls_port(cfg, i)
        lines.append(f"1 sip:{uri_host}:{wport};transport={transport} 0 0 duid=w{i};"
                     f"maxload={cfg.sip.max_calls}")
    dlist.write_text("\n".join(lines) + "\n", encoding="utf-8")
    listens = "\n".join(f"listen={t}:{host}:{port}" for t in cfg.sip.transports)
    agents = scanner_regex(cfg.sip.scanner_agents)
    values = {
        "debug": "2", "listen": listens, "alias": f"{host}:{port}",
        "modules": kamailio_modules(), "dispatcher_list": str(dlist), "fr_timer_ms": "1500",
        "ping_interval_s": "1",
        # A call whose BYE never comes (its worker was killed, the caller's phone died)
        # gives its slot back after the longest call a worker allows.
        "load_expire_s": str(int(cfg.dialog.max_call_s) + 60), "load_initexpire_s": "60",
        # The front door (route[FRONT_DOOR]).
        "allow": kamailio_allow(cfg), "flood_limit": str(cfg.sip.flood_limit),
        "ban_s": str(cfg.sip.ban_s),
        # No scanner list: the check is left out (an empty regex would match everyone).
        "scanner_match": f'$ua != $null && $ua =~ "{agents}"' if agents else "0",
        # TLS listen and module section ([sip.tls]); empty without TLS.
        "tls": tls.kamailio_section(cfg, folder),
    }
    text = (PROJECT_ROOT / "deploy" / "kamailio.cfg.tmpl").read_text(encoding="utf-8")
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    out = folder / "kamailio.cfg"
    out.write_text(text, encoding="utf-8")
    return out


def pss_mb(pids: list[int]) -> float:
    """Sum of the proportional set size of ``pids`` (MB): shared pages counted once overall.

    RSS would count the copy-on-write model pages once per worker; PSS splits each page
    among the processes sharing it, so the sum is what the host really spends."""
    total_kb = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        m = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
        total_kb += int(m.group(1)) if m else 0
    return total_kb / 1024


def describe_exit(status: int) -> str:
    """A waitpid status in words: "killed by SIGABRT", "exit code 1"."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


class Supervisor:
    """The process that was started: forks the workers, runs Kamailio, restarts what dies."""

    def __init__(self, core: VoiceCore, workers: int, listen: str,
                 at: dt.datetime | None, pid_file: Path | None = None) -> None:
        self.core = core
        self.workers = workers
        self.listen = listen
        self.at = at
        self.pid_file = pid_file
        self.pids: dict[int, int] = {}  # pid -> worker index
        self.kamailio: subprocess.Popen[bytes] | None = None
        self.kamailio_conf: Path | None = None
        self.stop = threading.Event()
        self.restarts = 0
        self.web: tuple[str, int] | None = None
        # Backoff per process ("kamailio" or a worker index): when it started, its last
        # restart delay, and when a pending restart is due.
        self._started: dict[int | str, float] = {}
        self._delay: dict[int | str, float] = {}
        self._due: dict[int | str, float] = {}

    # --- processes ---

    def _fork(self, index: int) -> None:
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                die_with_parent(parent)
                stop = threading.Event()
                _install_stop_handlers(stop)
                watch_parent(parent, stop, self.core.cfg.sip.shutdown_grace_s + 5.0)
                run_worker(self.core, index, self.at, stop, self.listen)
            except BaseException:
                log.exception("worker %d failed", index)
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        self.pids[pid] = index
        self._started[index] = time.monotonic()
        log.info("worker %d started (pid %d)", index, pid)
        self._save()

    def _start_kamailio(self) -> None:
        binary = kamailio_binary()
        folder = self.core.cfg.var_dir / "kamailio"
        conf = write_kamailio_config(self.core.cfg, self.workers, self.listen, folder)
        check = subprocess.run([binary, "-c", "-f", str(conf)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"{conf}: Kamailio rejects the configuration:\n{check.stderr}")
        parent = os.getpid()
        prctl()  # resolved here: the child between fork and exec must not dlopen

        def dies_with_us() -> None:
            die_with_parent(parent)

        # Its own session: a Ctrl-C in the terminal must not take Kamailio down while the
        # workers are still sending their goodbyes' BYEs through it (record-routed); the
        # supervisor stops it last. Its children share its process group, which is how a
        # later start finds them if they outlive everything.
        self.kamailio = subprocess.Popen(
            [binary, "-DD", "-E", "-f", str(conf), "-P", str(folder / "kamailio.pid"),
             "-m", "64", "-M", "8"], stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=dies_with_us)
        self.kamailio_conf = conf
        self._started["kamailio"] = time.monotonic()
        log.info("kamailio (pid %d) dispatching %s to %d workers", self.kamailio.pid,
                 self.listen, self.workers)
        self._save()

    def _save(self) -> None:
        """The pid file: every process of this bot, for the next start to clean up."""
        if self.pid_file is None:
            return
        kam = None
        if self.kamailio is not None and self.kamailio.returncode is None:
            kam = {**_entry(self.kamailio.pid), "config": str(self.kamailio_conf)}
        write_pid_file(self.pid_file, {
            "supervisor": _entry(os.getpid()), "listen": self.listen,
            "workers": {str(i): _entry(pid) for pid, i in sorted(self.pids.items(),
                                                                  key=lambda kv: kv[1])},
            "kamailio": kam, "restarts": self.restarts})

    def _schedule_restart(self, key: int | str, why: str) -> None:
        """Restart ``key`` after its backoff delay; ``why`` says what happened to it."""
        now = time.monotonic()
        uptime = now - self._started.get(key, now)
        prev = self._delay.get(key)
        delay = (BACKOFF_FIRST_S if prev is None or uptime >= STABLE_AFTER_S
                 else min(prev * 2, BACKOFF_MAX_S))
        self._delay[key] = delay
        self._due[key] = now + delay
        self.restarts += 1
        log.warning("%s after %.1f s; restart %d of this bot in %.1f s", why, uptime,
                    self.restarts, delay)

    def _restart_due(self) -> None:
        now = time.monotonic()
        for key, due in sorted(self._due.items(), key=lambda kv: kv[1]):
            if due > now or self.stop.is_set():
                continue
            del self._due[key]
            try:
                if key == "kamailio":
                    self._start_kamailio()
                else:
                    assert isinstance(key, int)
                    self._fork(key)
            except Exception as exc:  # try again later rather than leave the line down
                self._started[key] = now
                self._schedule_restart(key, f"restarting {key} failed ({exc})")

    def _reap(self) -> None:
        """Collect every child that ended; schedule restarts unless we are stopping."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.pids:
                index = self.pids.pop(pid)
                if self.stop.is_set():
                    log.info("worker %d (pid %d) stopped: %s", index, pid, describe_exit(status))
                else:
                    self._schedule_restart(
                        index, f"worker {index} (pid {pid}) died: {describe_exit(status)}")
            elif self.kamailio is not None and pid == self.kamailio.pid:
                self.kamailio.returncode = os.waitstatus_to_exitcode(status)
                if not self.stop.is_set():
                    self._schedule_restart(
                        "kamailio", f"kamailio (pid {pid}) died: {describe_exit(status)}")
            else:
                continue
            self._save()

    def _wait_workers_ready(self) -> None:
        """Until every worker answers SIP on its private address (WORKERS_READY_S at most),
        restarting any that dies meanwhile: only then does the front open."""
        waiting = {i: worker_address(self.core.cfg, i)[0] for i in range(self.workers)}
        deadline = time.monotonic() + WORKERS_READY_S
        while waiting and not self.stop.is_set() and time.monotonic() < deadline:
            self._reap()
            self._restart_due()
            for i, address in list(waiting.items()):
                if sip_ping(address):
                    del waiting[i]
            if waiting:
                self.stop.wait(0.2)
        if waiting and not self.stop.is_set():
            log.warning("worker(s) %s not answering SIP after %.0f s; opening the front with "
                        "the others", sorted(waiting), WORKERS_READY_S)

    # --- the loop ---

    def run(self) -> int:
        _install_stop_handlers(self.stop)
        # Objects that exist now (models' Python side, packs, prompts) never die: keep the
        # workers' collector from writing to their pages, which would un-share them.
        gc.collect()
        gc.freeze()
        for i in range(self.workers):
            self._fork(i)
        self._wait_workers_ready()
        # In every mode, one worker too: the front door (ACL, flood and scanner bans) is
        # Kamailio's, and the workers are reachable only through it.
        if not self.stop.is_set():
            self._start_kamailio()
        # After the forks (no extra thread exists at a fork): caller data 0700/0600 and
        # [recording] keep_days, now and then once a day.
        from .retention import start_daily

        start_daily(self.core.cfg, self.stop)
        memory_at = time.monotonic() + 5.0
        httpd = start_web(self.core.cfg, self.web) if self.web else None
        while not self.stop.is_set():
            if memory_at and time.monotonic() > memory_at:
                memory_at = 0.0
                pids = [os.getpid(), *self.pids]
                log.info("memory: %.0f MB PSS over %d voicebot processes (models loaded once, "
                         "shared by the workers)", pss_mb(pids), len(pids))
            self._reap()
            self._restart_due()
            self.stop.wait(0.2)
        self._due.clear()
        for pid in list(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.core.cfg.sip.shutdown_grace_s + 10
        while self.pids and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.1)
        for pid in list(self.pids):
            log.warning("worker pid %d did not stop; killing it", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while self.pids and time.monotonic() < deadline + 5:
            self._reap()
            time.sleep(0.05)
        if self.kamailio is not None and self.kamailio.returncode is None:
            self.kamailio.terminate()
            try:
                self.kamailio.wait(10)
            except subprocess.TimeoutExpired:
                self.kamailio.kill()
                self.kamailio.wait(5)
        if httpd is not None:
            httpd.shutdown()
        log.info("stopped (%d restart(s) while running)", self.restarts)
        return 0


def start_web(cfg: Config, web: tuple[str, int]):  # type: ignore[no-untyped-def]
    """The live, read-only report page (`serve --web`), in a thread of this process: the
    supervisor, which runs no SIP, so a rebuild (queries, charts) never delays a call."""
    from .report import LiveReport, check_web, serve_web

    check_web(cfg, *web)  # the CLI checked before loading models; a caller in code may not
    live = LiveReport(lambda: Store.from_config(cfg), cfg.var_dir / "report-live",
                      cfg.web.max_age_s)
    httpd = serve_web(live, *web, password=cfg.web.password)
    auth = " (HTTP Basic, user voicebot)" if cfg.web.password else ""
    print(f"voicebot: call report on http://{web[0]}:{web[1]}/{auth}", flush=True)
    return httpd


def serve(cfg: Config, workers: int = 1, listen: str | None = None,
          at: dt.datetime | None = None, web: tuple[str, int] | None = None) -> int:
    """Load everything once, then serve calls until SIGINT or SIGTERM; returns 0."""
    listen = listen or cfg.sip.listen
    pid_file = cfg.var_dir / PID_FILE
    # Before anything slow: a killed bot's orphans give the ports back, a running bot on
    # the same var/ is an error, and a port someone else holds is named now, not after
    # the models have loaded.
    reclaim_stale(pid_file)
    kamailio_binary()
    kamailio_modules()
    check_ports_free(cfg, workers, listen)
    write_pid_file(pid_file, {"supervisor": _entry(os.getpid()), "listen": listen,
                              "workers": {}, "kamailio": None, "restarts": 0})
    try:
        core = VoiceCore(cfg)
        for line in core.startup_report():
            log.warning("%s", line)
            print(f"note: {line}", file=sys.stderr)
        core.load_models()
        _ = core.intents  # load before forking, so workers share them too
        store = Store.from_config(cfg)  # creates the schema once
        try:
            run_recovery(cfg, store, None)  # no worker runs yet: every open call is a crash's
        finally:
            store.close()
        host, port = parse_hostport(listen)
        number = cfg.sip.numbers[0]
        print(f"voicebot: listening on sip:{number}@{host}:{port} "
              f"({'+'.join(cfg.sip.transports)}), {workers} worker(s) x {cfg.sip.max_calls} "
              "calls", flush=True)
        # `make run` starts us from .venv/bin, which is usually not on the PATH of the
        # terminal the user calls from: print a command that works there.
        exe = "voicebot" if shutil.which("voicebot") else str(Path(sys.argv[0]).resolve())
        print(f"voicebot: call it with: {exe} call sip:{number}@{host}:{port} --press 3 "
              "--press 2 --json", flush=True)
        sup = Supervisor(core, workers, listen, at, pid_file=pid_file)
        sup.web = web
        return sup.run()
    finally:
        # Workers never get here (they leave through os._exit); a bot that stopped,
        # cleanly or not, leaves no pid file naming it.
        pid_file.unlink(missing_ok=True)
