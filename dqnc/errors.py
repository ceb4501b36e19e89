"""The error hierarchy and the one place that maps outcomes to exit codes.

Every failure a user can cause is a ``DqncError`` whose message names the problem and the fix.
The CLI prints it as one line and exits with ``exit_code``; anything else is a bug: one line,
exit 3, and the traceback with ``--debug``.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3  # a bug in dqnc (any exception that is not a DqncError)
EXIT_INTERRUPTED = 130


class DqncError(Exception):
    """A failure caused by input or environment, reported as one line."""

    exit_code = EXIT_USAGE


class UsageError(DqncError):
    """Bad command-line options or config values."""


class ConfigError(UsageError):
    """A config or recipe that does not validate."""


class ArtifactError(DqncError):
    """An artifact that is missing, malformed, or whose checksums disagree."""


class EnvError(DqncError):
    """An environment id that cannot be made, or whose spaces dqnc cannot handle."""


class OutputExistsError(DqncError):
    """The output path exists and ``--force`` was not given."""


class GateFailed(DqncError):
    """A quality gate was not met. Carries the measured result so it can still be reported."""

    exit_code = EXIT_GATE_FAILED

    def __init__(self, message: str, result: dict | None = None) -> None:
        super().__init__(message)
        self.result = result or {}


class Interrupted(DqncError):
    """Ctrl-C or SIGTERM: whatever could be saved for a resume has been saved."""

    exit_code = EXIT_INTERRUPTED
