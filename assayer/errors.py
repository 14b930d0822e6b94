"""One exception hierarchy; each error knows its exit code and says how to fix it."""

from __future__ import annotations


class AssayerError(Exception):
    """Base of every error Assayer reports to a person."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  fix: {self.hint}" if self.hint else self.message


class ConfigError(AssayerError):
    """A setting, flag or spec is invalid."""

    exit_code = 2


class EvaluatorError(ConfigError):
    """An evaluator reference cannot be imported or called."""


class WatchError(ConfigError):
    """A watch spec is invalid or names a watch that does not exist."""


class RedisUnavailable(AssayerError):
    """Redis cannot be reached."""

    exit_code = 3


class StackError(AssayerError):
    """The local supervisor stack cannot be started or stopped."""

    exit_code = 4


class Retry(Exception):
    """Raise it from an evaluator for a failure worth another attempt (a busy GPU, a flaky mount).

    Crashes, OOM kills, timeouts and lost workers are retried anyway; any other exception an
    evaluator raises is taken as deterministic and ends the evaluation as failed at once.
    """


class EvaluationFailed(Exception):
    """Raised inside an eval job so rq records the attempt as failed (and retries it).

    Not an :class:`AssayerError`: it never reaches a person's terminal, only rq.
    """
