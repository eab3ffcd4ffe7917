"""A call recording whose disk fills up (a 200 KB tmpfs), on a real `voicebot serve`.

What PJSIP 2.15 does then: its WAV writer drops every block it cannot write without a word
(the bridge ignores the recorder's put_frame error), and on destroy its header update may
fail as well (RIFF sizes left at 0). The bot notices the recording has stopped growing,
stops it with one log line, the call goes on (keys still work), and at the call's end the
file is made a playable WAV of what reached the disk.
"""

from __future__ import annotations

import json
import re
import wave
from pathlib import Path

import pytest
from sipbot import Bot, start_bot


@pytest.fixture()
def full_disk(tmpfs) -> Path:  # type: ignore[no-untyped-def]
    return tmpfs("200k")


def test_call_goes_on_when_the_recording_disk_fills(tmp_path: Path, full_disk: Path) -> None:
    bot: Bot = start_bot(tmp_path / "bot",
                         extra=f'[recording]\nfolder = "{full_disk / "rec"}"\n')
    try:
        out = bot.call("--press", "3", "--press", "2", "--barge-in", "--json", timeout=180)
        assert out.returncode == 0, out.stderr[-2000:]
        rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        # The keys came after the disk was full (200 KB is under 13 s of 8 kHz audio, and the
        # first key waits for the welcome and the language menu): the dialog went on.
        assert [r["option"] for r in rows] == ["lang.en", "main.hours"], out.stdout
        rec = bot.wait_call(rows[0]["sip_call_id"])
        assert rec.result == "completed" and rec.path == ["lang.en", "main.hours"], rec
        log = bot.log()
        stopped = re.findall(rf"call={rec.id} .*event=recording_stopped.*", log)
        assert len(stopped) == 1, log[-4000:]
        assert "the call goes on" in stopped[0]
        # What reached the disk is kept as a playable WAV, and nothing partial is left.
        assert rec.recording and Path(rec.recording).parent.parent == full_disk / "rec"
        with wave.open(rec.recording, "rb") as w:
            seconds = w.getnframes() / w.getframerate()
        assert 5.0 < seconds < 14.0, seconds
        assert not list((full_disk / "rec").rglob("*.part*"))
        assert bot.proc.poll() is None
    finally:
        code = bot.stop()
    assert code == 0, bot.log()[-3000:]
