"""Caller data on disk: private file modes and the ``[recording] keep_days`` retention.

What voicebot keeps about callers, and where:

- call recordings ``<recordings>/<day>/<call id>.wav`` (pjsua2's WAV writer makes
  ``.<call id>.part.wav``, renamed when the call ends; voicebot.telephony);
- recorded messages ``<recordings>/messages/<day>/<ticket>-<kind>.wav`` (written as
  ``.wav.part``; voicebot.duties.MessageRecorder);
- the SQLite store (``[store] path``) with its ``-wal``/``-shm`` files, and the journal
  spool ``<var>/spool/*.jsonl`` (voicebot.store): caller numbers, application numbers;
- reports under ``<var>`` (``report``, ``report-live``): caller numbers again.

New files are private because ``voicebot`` sets the process umask to 0o077 in
:func:`voicebot.cli.main` (pjsua2's recorder opens its file with the process umask, so no
mode argument of ours would reach it). :func:`secure_files` fixes what an older version
left group- or world-readable; :func:`purge` deletes recordings and messages older than
``keep_days``; :func:`start_daily` runs both at start and then once a day.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config

log = logging.getLogger("voicebot.retention")

DAY_S = 86400.0
# Partial files of calls (and messages) in progress: telephony's ``.<id>.part.wav`` and
# MessageRecorder's ``<ticket>-<kind>.wav.part``. Never purged: they are being written
# (so they are recent anyway), and start-up recovery (voicebot.recovery) is what turns a
# dead process's partial file into a recording.
PART_SUFFIXES = (".part.wav", ".wav.part", ".part")


def recordings_folder(cfg: Config) -> Path:
    """``[recording] folder``, resolved as telephony and the session resolve it."""
    return cfg.resolve(cfg.recording.folder)


def store_files(cfg: Config) -> list[Path]:
    """The SQLite file of ``[store] path`` and the files SQLite keeps beside it (none for a
    PostgreSQL DSN: that database's access is the database server's business)."""
    if cfg.store.dsn:
        return []
    p = Path(cfg.store.path)
    p = p if p.is_absolute() else cfg.base / p
    return [p, *(p.with_name(p.name + s) for s in ("-wal", "-shm", "-journal"))]


def _private(mode: int, is_dir: bool) -> int:
    """The mode without group and other access; folders keep rwx for the owner (0700)."""
    new = stat.S_IMODE(mode) & ~0o077
    return new | 0o700 if is_dir else new


def _fix(path: Path, changed: list[str], errors: list[str]) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        errors.append(f"{path}: {exc.strerror or exc}")
        return
    # A symbolic link is not followed: its target may be anybody's file (and Linux has no
    # mode on the link itself).
    if stat.S_ISLNK(st.st_mode) or not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        return
    old = stat.S_IMODE(st.st_mode)
    new = _private(st.st_mode, stat.S_ISDIR(st.st_mode))
    if new == old:
        return
    try:
        os.chmod(path, new)
    except OSError as exc:  # another user's file: say so, fix the rest
        errors.append(f"{path}: {exc.strerror or exc}")
        return
    changed.append(f"{path}: {old:04o} -> {new:04o}")


def _fix_tree(root: Path, changed: list[str], errors: list[str]) -> None:
    """``root`` and everything under it (symbolic links inside are not followed)."""
    root = root.resolve()  # a var/ that is a link to a data disk is that disk's folder
    if not root.exists():
        return
    _fix(root, changed, errors)
    if not root.is_dir():
        return
    for folder, dirs, files in os.walk(root, onerror=lambda e: errors.append(
            f"{e.filename}: {e.strerror or e}")):
        for name in dirs + files:
            _fix(Path(folder) / name, changed, errors)


def secure_files(cfg: Config) -> list[str]:
    """Make caller data private: folders 0700, files 0600 (group and other bits removed).

    Covers ``<var>`` (spool, reports, pid file, Kamailio's generated config: only this
    user reads them, Kamailio being started by this process as this user), the recordings
    folder (with the messages in it) and the SQLite files wherever they are. Prompts,
    models and grammars are not caller data and are left as they are. Returns what it
    changed, as ``"path: 0644 -> 0600"`` lines, and logs them once (one line)."""
    changed: list[str] = []
    errors: list[str] = []
    _fix_tree(cfg.var_dir, changed, errors)
    rec = recordings_folder(cfg)
    if not rec.resolve().is_relative_to(cfg.var_dir.resolve()):
        _fix_tree(rec, changed, errors)
    for p in store_files(cfg):
        # Only the files: the folder of a store outside var/ may be shared with others.
        _fix(p, changed, errors)
    if changed:
        shown = "; ".join(changed[:10]) + (f"; ... {len(changed) - 10} more"
                                           if len(changed) > 10 else "")
        log.warning("files: %d file(s) and folder(s) of caller data were readable by other "
                    "users, made private (folders 0700, files 0600): %s", len(changed), shown)
    if errors:
        log.error("files: %d could not be made private (owned by another user?): %s",
                  len(errors), "; ".join(errors[:10]))
    return changed


@dataclass
class PurgeResult:
    """What :func:`purge` deleted (or, with ``dry_run``, would delete)."""

    keep_days: int
    dry_run: bool = False
    cutoff: float | None = None  # files modified before this time (epoch s) go
    recordings: list[Path] = field(default_factory=list)
    messages: list[Path] = field(default_factory=list)
    bytes: int = 0
    kept: int = 0
    parts_skipped: int = 0  # partial files of calls/messages in progress, never touched
    folders_removed: list[Path] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def deleted(self) -> list[Path]:
        return self.recordings + self.messages

    def line(self) -> str:
        if self.keep_days == 0:
            return "retention: [recording] keep_days = 0: recordings and messages are kept"
        verb = "would delete" if self.dry_run else "deleted"
        text = (f"retention: {verb} {len(self.recordings)} recording(s) and "
                f"{len(self.messages)} message(s) older than {self.keep_days} days "
                f"({self.bytes / 1e6:.1f} MB); kept {self.kept}; {self.parts_skipped} "
                "partial file(s) of calls in progress left alone")
        if self.errors:
            text += f"; {len(self.errors)} could not be deleted: {'; '.join(self.errors[:5])}"
        return text


def purge(cfg: Config, now: float | None = None, *, dry_run: bool = False) -> PurgeResult:
    """Delete recordings and messages whose age (mtime) is over ``[recording] keep_days``.

    Only finished WAVs under the recordings folder are candidates: partial files (see
    PART_SUFFIXES) and anything that is not a ``.wav`` are left alone. Day folders emptied
    here are removed. The store is not changed: a call's ``recording`` may then name a
    file that is gone (``voicebot calls`` says so). Logs one line with counts and bytes."""
    days = cfg.recording.keep_days
    res = PurgeResult(keep_days=days, dry_run=dry_run)
    root = recordings_folder(cfg)
    if days <= 0 or not root.is_dir():
        if days <= 0:
            log.info("%s", res.line())
        return res
    res.cutoff = (time.time() if now is None else now) - days * DAY_S
    messages = root / "messages"
    emptied: set[Path] = set()
    for folder, _dirs, files in os.walk(root):
        for name in sorted(files):
            path = Path(folder) / name
            if name.endswith(PART_SUFFIXES):
                res.parts_skipped += 1
                continue
            if not name.endswith(".wav") or name.startswith("."):
                continue  # not a finished recording (a temporary file, a note)
            try:
                st = path.lstat()
            except OSError:
                continue  # renamed or deleted meanwhile
            if not stat.S_ISREG(st.st_mode) or st.st_mtime >= res.cutoff:
                res.kept += 1
                continue
            if not dry_run:
                try:
                    path.unlink()
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    res.errors.append(f"{path}: {exc.strerror or exc}")
                    continue
                emptied.add(path.parent)
            res.bytes += st.st_size
            (res.messages if path.is_relative_to(messages) else res.recordings).append(path)
    # Deepest first, so a day folder goes before its parent could; the recordings folder
    # and its messages folder stay. Emptied folders held only old days' files: a new call
    # writes into today's folder, so none is removed under a call that is starting.
    for folder in sorted(emptied, key=lambda p: len(p.parts), reverse=True):
        if folder in (root, messages):
            continue
        try:
            folder.rmdir()
        except OSError:
            continue  # not empty (a file other than a purged one), or gone
        res.folders_removed.append(folder)
    log.info("%s", res.line())
    return res


def forget_old_settings(cfg: Config, now: float | None = None) -> int:
    """Remove callers' remembered controls (issue 12) not changed for
    store.CALLER_SETTINGS_DAYS; the rows removed. Logs one line."""
    import datetime as dt

    from .store import CALLER_SETTINGS_DAYS, Store

    at = dt.datetime.fromtimestamp(time.time() if now is None else now, dt.UTC)
    store = Store.from_config(cfg)
    try:
        n = store.purge_caller_settings(at - dt.timedelta(days=CALLER_SETTINGS_DAYS))
    finally:
        store.close()
    log.info("retention: %d caller setting(s) older than %d days forgotten", n,
             CALLER_SETTINGS_DAYS)
    return n


def start_daily(cfg: Config, stop: threading.Event,
                interval_s: float = DAY_S) -> threading.Thread:
    """Run :func:`secure_files` and :func:`purge` now and then every ``interval_s`` (a day)
    until ``stop`` is set; the wait ends as soon as it is. A failure is logged and the
    next round runs as planned: retention must never take the bot down."""

    def run() -> None:
        while not stop.is_set():
            try:
                secure_files(cfg)
                purge(cfg)
                forget_old_settings(cfg)
            except Exception:  # logged: the calls go on, the next round runs
                log.exception("retention: failed; next attempt in %.0f s", interval_s)
            if stop.wait(interval_s):
                return

    t = threading.Thread(target=run, name="retention", daemon=True)
    t.start()
    return t
