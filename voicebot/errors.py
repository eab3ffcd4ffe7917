"""Errors that reach a person: each names the file, the place inside it and what to do."""

from __future__ import annotations

from pathlib import Path


class VoicebotError(Exception):
    """An error with a message written for the operator of the bot."""


class DataError(VoicebotError):
    """Bad configuration or grammar data.

    file: the file that holds the problem.
    where: the path inside it (``options."main.info".keywords``, ``vad.hangover_ms``).
    problem: what is wrong and, where it helps, what to do.
    """

    def __init__(self, file: str | Path, where: str, problem: str) -> None:
        self.file = str(file)
        self.where = where
        self.problem = problem
        location = f"{self.file}: {where}" if where else self.file
        super().__init__(f"{location}: {problem}")


class DataErrors(VoicebotError):
    """Several data errors found in one pass, so the user can fix them all at once."""

    def __init__(self, errors: list[DataError]) -> None:
        self.errors = errors
        lines = "\n".join(f"  - {e}" for e in errors)
        super().__init__(f"{len(errors)} problem(s) found:\n{lines}")


class ModelMissing(VoicebotError):
    """An ASR model is not installed; the message carries the command that fixes it."""
